"""The committed stubs match the .proto, and the client's public surface is what it claims."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import weightavg

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh() -> None:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    stale = gen.stale_files()
    assert stale == [], f"stubs differ from proto/: run `python scripts/gen_protos.py` ({stale})"


def test_public_names_are_sorted_and_exist() -> None:
    assert weightavg.__all__ == sorted(weightavg.__all__)
    for name in weightavg.__all__:
        assert hasattr(weightavg, name), name


TORCH_HELPERS = ("torch.py", "sharded.py")
"""The client modules users import by name where torch is installed (weightavg.torch, weightavg.sharded)."""


def test_client_package_has_no_torch_dependency() -> None:
    """Only the torch helpers import torch, and no other client module imports them
    (tests/test_torch_client.py imports weightavg with torch blocked, and each helper refuses saying
    to install it)."""
    client_dir = ROOT / "client" / "weightavg"
    for path in client_dir.rglob("*.py"):
        if path.parent == client_dir and path.name in TORCH_HELPERS:
            continue
        assert not _torch_imports(path), (path, _torch_imports(path))


def _torch_imports(path: Path) -> list[str]:
    """The imports of torch or of the torch helpers (weightavg.torch, weightavg.sharded) in a client module (any form: `import torch.nn`,
    `from torch import x`, `from .torch import y`, `from . import torch`, inside functions too), read
    from its syntax tree: text may name them (a message saying to use weightavg.torch.push)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names
                      if a.name.split(".")[0] == "torch" or a.name.startswith(("weightavg.torch", "weightavg.sharded"))]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            helpers = ("torch", "sharded")
            if (node.level == 0 and (module.split(".")[0] == "torch" or module.startswith(("weightavg.torch", "weightavg.sharded")))) or (
                node.level > 0 and (module.split(".")[0] in helpers or (not module and any(a.name in helpers for a in node.names)))
            ):
                found.append("." * node.level + module)
    return found
