"""The server's import rule, read from the source with `ast` (nothing is imported or run).

Layers, lowest first: domain (plain torch), store, service, transport, ops. A module may import
from its own layer and the ones below, never from a layer above. The three inner layers (domain,
store, service) stay free of the wire: no grpc* package, no google.protobuf and no client package
`weightavg` (transport may use the client's wire codec). Modules at the package's top (__init__,
__main__) belong to no layer and are not checked.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SERVER = Path(__file__).resolve().parent.parent / "server" / "weightavg_server"
LAYERS = ("domain", "store", "service", "transport", "ops")
INNER = frozenset({"domain", "store", "service"})


@dataclass(frozen=True)
class Module:
    """One source file under the package root: its dotted name, whether it is a package's __init__, its layer."""

    path: Path
    name: str
    is_package: bool
    layer: str | None


def module_at(root: Path, path: Path) -> Module:
    """The Module for `path`, a .py file under the package folder `root` (whose name is the package's)."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    layer = parts[1] if len(parts) > 1 and parts[1] in LAYERS else None
    return Module(path, ".".join(parts), is_package, layer)


def imported_names(module: Module, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute dotted names an import statement may bind: `from X import y` may be module X.y or X's y.

    Relative imports resolve against the importing module's package, as Python does.
    """
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join([*anchor, base]) if base else ".".join(anchor)
    return [base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")]


def layer_of(name: str, package: str) -> str | None:
    """The layer a dotted name inside `package` lies in; None outside the package or outside any layer."""
    parts = name.split(".")
    if parts[0] != package or len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return parts[1]


def wire_package(name: str) -> bool:
    """Whether a dotted name is grpc (any grpc* package), google.protobuf or the client package weightavg."""
    top = name.split(".")[0]
    return top.startswith("grpc") or top == "weightavg" or name == "google.protobuf" or name.startswith("google.protobuf.")


def broken_rule(module: Module, name: str, package: str) -> str | None:
    """Why `module` may not import `name`, or None when it may."""
    if module.layer is None:
        return None
    if module.layer in INNER and wire_package(name):
        return f"{module.layer} may not import grpc, google.protobuf or the client package"
    target = layer_of(name, package)
    if target is not None and LAYERS.index(target) > LAYERS.index(module.layer):
        return f"{module.layer} may not import from {target}"
    return None


def violations(root: Path) -> tuple[list[str], list[Module]]:
    """Every import under the package folder `root` that breaks the rule, and the modules that were read."""
    modules = [module_at(root, path) for path in sorted(root.rglob("*.py"))]
    found: list[str] = []
    for module in modules:
        tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            reasons: set[str] = set()  # one report per rule a statement breaks: `from X import y` names X and X.y
            for name in imported_names(module, node):
                reason = broken_rule(module, name, root.name)
                if reason is not None and reason not in reasons:
                    reasons.add(reason)
                    found.append(f"{module.path.relative_to(root).as_posix()}:{node.lineno} imports {name}: {reason}")
    return found, modules


def write_package(root: Path, files: dict[str, str]) -> None:
    """A package folder with the given sources (relative path -> text); every folder gets an __init__."""
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()


def test_checker_finds_known_violations_in_a_synthetic_package(tmp_path: Path) -> None:
    """The checker is not vacuous: each kind of breach is found, at its line, and allowed imports are not."""
    root = tmp_path / "weightavg_server"
    write_package(root, {
        "domain/errors.py": "import torch\nfrom . import specs\n",
        "domain/specs.py": "from .errors import X\nimport weightavg_server.domain.errors\n",
        "domain/tensors.py": "from ..store.registry import Entry\n",
        "domain/wire.py": "def f():\n    from weightavg.wire import encode\n",
        "domain/__init__.py": "from .. import store\n",
        "store/registry.py": "from ..domain import specs\nimport grpc.aio\n",
        "store/snapshot.py": "from ..transport import codec\nfrom weightavg_server.ops import app\n",
        "service.py": "from .store import registry\nfrom google.protobuf import struct_pb2\nimport grpc_status\n",
        "transport/codec.py": "from weightavg.wire import encode\nimport grpc\nfrom ..service import x\n",
        "transport/servicer.py": "from ..ops.config import Config\n",
        "ops/app.py": "from ..transport import servicer\nfrom .. import service\n",
        "store/limits.py": "from .. import domain, service, transport\n",
        "__main__.py": "from .ops import app\n",
    })
    found, modules = violations(root)
    assert sorted(found) == sorted([
        "domain/__init__.py:1 imports weightavg_server.store: domain may not import from store",
        "domain/tensors.py:1 imports weightavg_server.store.registry: domain may not import from store",
        "domain/wire.py:2 imports weightavg.wire: domain may not import grpc, google.protobuf or the client package",
        "store/registry.py:2 imports grpc.aio: store may not import grpc, google.protobuf or the client package",
        "store/snapshot.py:1 imports weightavg_server.transport: store may not import from transport",
        "store/snapshot.py:2 imports weightavg_server.ops: store may not import from ops",
        "service.py:2 imports google.protobuf: service may not import grpc, google.protobuf or the client package",
        "service.py:3 imports grpc_status: service may not import grpc, google.protobuf or the client package",
        "transport/servicer.py:1 imports weightavg_server.ops.config: transport may not import from ops",
        "store/limits.py:1 imports weightavg_server.service: store may not import from service",
        "store/limits.py:1 imports weightavg_server.transport: store may not import from transport",
    ])
    assert {m.name: m.layer for m in modules}["weightavg_server.service"] == "service"


def test_server_layers_import_only_downward() -> None:
    found, modules = violations(SERVER)
    checked = {layer: sum(m.layer == layer for m in modules) for layer in LAYERS}
    for layer in ("domain", "store", "transport", "ops"):
        assert checked[layer] > 0, f"no modules found in {layer}/: {checked}"
    assert found == [], "imports that break the layer rule:\n" + "\n".join(found)
