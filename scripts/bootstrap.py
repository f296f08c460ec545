"""Set up `.venv` for scripts/demo and scripts/test: the torch build that fits this machine, then
weightavg with the extras asked for; nothing at all when a stamp says that is already there.

Standard library only: it runs with the system's python3 before the virtualenv exists.

Which torch build (the one place that decides it; tests/test_bootstrap.py fakes the probe and
the indexes):
- WEIGHTAVG_TORCH=cpu or cuda chooses; unset or `auto` asks the machine: an NVIDIA GPU
  (`nvidia-smi -L` lists one, or /proc/driver/nvidia/gpus has an entry) means cuda, else cpu.
- cuda: torch from pip's configured index (PyPI serves the CUDA build on Linux).
- cpu on Linux: torch from PyTorch's CPU wheel index (WEIGHTAVG_TORCH_CPU_INDEX overrides its
  address); when that index cannot be reached, from pip's configured index instead, with a
  warning, since on an ordinary Linux machine that index serves the multi-GB CUDA build. Elsewhere
  (macOS, Windows) the configured index already serves a CPU build.

The stamp (.venv/weightavg-setup.json) records a hash of the build files (pyproject.toml, setup.py
and the C extension's source, and whether the extension is built), the chosen build and the Python
version, and the extras installed; a run whose hash matches and whose extras are
already in place installs nothing, so it starts at once and needs no network.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MIN_PYTHON = (3, 10)
"""pyproject.toml's requires-python (tests/test_bootstrap.py checks they agree)."""
if sys.version_info < MIN_PYTHON:
    # Before anything else: Python 3.8 failed on the next lines with a TypeError traceback, and 3.9
    # made a venv and then failed in pip's resolver on torch (found by review).
    raise SystemExit(
        f"weightavg setup: weightavg needs Python {'.'.join(map(str, MIN_PYTHON))} or later, and "
        f"{sys.executable} is {platform.python_version()}; run with a newer one, e.g. PYTHON=python3.11 scripts/demo"
    )

TORCH = "torch==2.13.0"
"""The pin of pyproject.toml's server extra (tests/test_bootstrap.py checks they agree)."""
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
"""PyTorch's index of CPU-only builds (about 200 MB instead of the CUDA build's several GB)."""
STAMP = "weightavg-setup.json"
VARIANTS = ("cpu", "cuda")

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def has_nvidia_gpu(run: Runner = subprocess.run, proc: Path = Path("/proc/driver/nvidia/gpus")) -> bool:
    """True when the NVIDIA driver reports a GPU: `nvidia-smi -L` lists one, or the driver's /proc
    folder has an entry (a driver without nvidia-smi)."""
    if shutil.which("nvidia-smi"):
        try:
            listed = run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            listed = None
        if listed is not None and listed.returncode == 0 and "GPU" in listed.stdout:
            return True
    try:
        return any(proc.iterdir())
    except OSError:
        return False


def choose_variant(env: Mapping[str, str], gpu: Callable[[], bool]) -> str:
    """cpu or cuda: WEIGHTAVG_TORCH when set to one of them, else what the GPU probe says."""
    asked = env.get("WEIGHTAVG_TORCH", "auto").strip().lower() or "auto"
    if asked in VARIANTS:
        return asked
    if asked != "auto":
        raise SystemExit(f"WEIGHTAVG_TORCH={asked!r}: use cpu, cuda or auto (the default: cuda when an NVIDIA GPU is found)")
    return "cuda" if gpu() else "cpu"


def index_reachable(url: str, timeout: float = 8.0) -> bool:
    """True when the index answers (any HTTP status below 500) within `timeout` seconds."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=timeout) as reply:
            return int(reply.status) < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class TorchSource:
    """Where torch comes from: pip arguments, and a line saying so."""

    pip_args: tuple[str, ...]
    note: str
    warning: str = ""


def torch_source(variant: str, system: str, cpu_index: str, reachable: Callable[[str], bool]) -> TorchSource:
    """The pip arguments that install the chosen build (`reachable` is asked only when it matters)."""
    if variant == "cuda":
        return TorchSource((TORCH,), f"{TORCH}, CUDA build, from pip's configured index (WEIGHTAVG_TORCH=cpu for the CPU build)")
    if system != "Linux":
        return TorchSource((TORCH,), f"{TORCH} from pip's configured index (a CPU build on {system})")
    if reachable(cpu_index):
        return TorchSource(
            (TORCH, "--index-url", cpu_index), f"{TORCH}, CPU build, from {cpu_index} (WEIGHTAVG_TORCH=cuda for the CUDA build)"
        )
    return TorchSource(
        (TORCH,),
        f"{TORCH} from pip's configured index",
        f"could not reach {cpu_index}; taking {TORCH} from pip's configured index instead, which on Linux is the "
        "CUDA build (several GB) unless a CPU wheel is at hand (pip --find-links); stop now (Ctrl-C) if that is not wanted",
    )


BUILD_FILES = (
    "pyproject.toml", "setup.py", "server/weightavg_server/domain/_native.c", "client/weightavg/_copy.c",
    "client/weightavg/_stream_bytes.h",
)
"""What an install is made from: the package's metadata and its two C extensions (and the header they
share), which `pip install -e` compiles next to their sources."""
EXTENSIONS = (("server/weightavg_server/domain", "_native"), ("client/weightavg", "_copy"))
"""Where each compiled extension lands, and its name."""


def build_inputs(root: Path) -> bytes:
    """The build files' contents, and which compiled extensions are in place: a change to a file, or an
    extension removed (`git clean -X`, or a checkout from before it existed), installs again."""
    parts = [name.encode() + b"\0" + ((root / name).read_bytes() if (root / name).exists() else b"") for name in BUILD_FILES]
    for where, name in EXTENSIONS:
        if any(p.suffix in (".so", ".pyd") for p in (root / where).glob(f"{name}.*")):
            parts.append(b"built " + name.encode())
    return b"\0".join(parts)


def stamp_hash(pyproject: bytes, variant: str, python: str) -> str:
    """What the environment was built from: the build inputs (`build_inputs`; pyproject.toml alone in
    older stamps), the torch build and the Python version."""
    digest = hashlib.sha256()
    for part in (pyproject, variant.encode(), python.encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def read_stamp(venv: Path) -> dict[str, object]:
    """The venv's stamp, or {} when there is none (or it is unreadable)."""
    try:
        stamp = json.loads((venv / STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) and _venv_python(venv).exists() else {}


def stamped_extras(stamp: Mapping[str, object], digest: str) -> set[str]:
    """The extras the stamp says are installed, when it was made from the same inputs; else none."""
    extras = stamp.get("extras")
    if stamp.get("hash") != digest or not isinstance(extras, list):
        return set()
    return {str(e) for e in extras}


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(command: list[str]) -> None:
    print("+ " + " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True)


def install(root: Path, venv: Path, source: TorchSource, extras: Sequence[str], replace_torch: bool) -> None:
    """Create the venv if missing, install torch from its source (again when the build changed: pip
    would keep a 2.13.0 of the other build), then weightavg with the extras."""
    if not _venv_python(venv).exists():
        _run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(_venv_python(venv)), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, *(["--force-reinstall"] if replace_torch else []), *source.pip_args])
    _run([*pip, "-e", f"{root}[{','.join(extras)}]"])


def dry_run(source: TorchSource) -> str:
    """Ask pip which torch file it would fetch, installing nothing (pip install --dry-run --report)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "-q",
                   "--disable-pip-version-check", "--report", str(report), *source.pip_args]
        subprocess.run(command, check=True)
        items = json.loads(report.read_text())["install"]
    return urllib.parse.unquote(str(items[0]["download_info"]["url"]))


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] = os.environ) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--extras", default="server,demo", help="extras of weightavg to install (default server,demo)")
    p.add_argument("--venv", type=Path, help="the virtualenv (default: .venv beside pyproject.toml)")
    p.add_argument("--dry-run", action="store_true",
                   help="install nothing: print the torch build chosen and the file pip would fetch for it")
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    venv = args.venv or root / ".venv"
    extras = sorted({e.strip() for e in args.extras.split(",") if e.strip()})
    variant = choose_variant(env, has_nvidia_gpu)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    digest = stamp_hash(build_inputs(root), variant, python)
    stamp = read_stamp(venv)
    installed = stamped_extras(stamp, digest)
    if not args.dry_run and set(extras) <= installed:
        return 0
    extras = sorted(installed | set(extras))
    cpu_index = env.get("WEIGHTAVG_TORCH_CPU_INDEX", CPU_INDEX)
    source = torch_source(variant, platform.system(), cpu_index, index_reachable)
    if source.warning:
        print(f"weightavg setup: warning: {source.warning}", file=sys.stderr)
    print(f"weightavg setup: {variant} build: {source.note}", file=sys.stderr, flush=True)
    if args.dry_run:
        print(f"torch would come from: {dry_run(source)}")
        return 0
    install(root, venv, source, extras, replace_torch=stamp.get("variant", variant) != variant)
    digest = stamp_hash(build_inputs(root), variant, python)  # the install has just built the extension
    (venv / STAMP).write_text(json.dumps({"hash": digest, "extras": extras, "variant": variant}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
