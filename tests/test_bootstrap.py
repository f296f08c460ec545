"""scripts/bootstrap.py, the set-up behind scripts/demo and scripts/test: which torch build it picks
(GPU probe and indexes faked), what real pip would fetch from faked indexes, and the stamp that
makes a second run install nothing."""

from __future__ import annotations

import contextlib
import functools
import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from conftest import refused_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bootstrap.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bootstrap", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bootstrap"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bootstrap = _load()


# -- the decisions, with the probe and the index faked -------------------------------------------------


def test_the_pin_is_the_server_extra_s() -> None:
    assert f'"{bootstrap.TORCH}"' in (ROOT / "pyproject.toml").read_text()


def test_the_python_floor_is_the_package_s() -> None:
    floor = ".".join(map(str, bootstrap.MIN_PYTHON))
    assert f'requires-python = ">={floor}"' in (ROOT / "pyproject.toml").read_text()


def test_an_older_python_is_refused_in_one_line_before_anything_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.8 printed a TypeError traceback; 3.9 made the venv, then failed in pip's resolver on
    torch (found by review). The real interpreter where this machine has one, else this one made to
    say it is 3.9."""
    venv = tmp_path / "venv"
    older = [found for found in map(shutil.which, ("python3.8", "python3.9")) if found]
    for python in older:
        run = subprocess.run([python, str(SCRIPT), "--venv", str(venv)], capture_output=True, text=True, timeout=60)
        if "is not available" in run.stderr or "command exists in these Python versions" in run.stderr:
            continue  # a pyenv shim without that version selected
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.startswith("weightavg setup: weightavg needs Python 3.10 or later")
    monkeypatch.setitem(sys.modules, "bootstrap", bootstrap)  # _load() replaces it; the other tests use this one
    monkeypatch.setattr(sys, "version_info", (3, 9, 18, "final", 0))
    with pytest.raises(SystemExit, match=r"^weightavg setup: weightavg needs Python 3\.10 or later, and .* is "):
        _load()
    assert not venv.exists()


@pytest.mark.parametrize(
    ("env", "gpu", "variant"),
    [({}, False, "cpu"), ({}, True, "cuda"), ({"WEIGHTAVG_TORCH": "auto"}, True, "cuda"),
     ({"WEIGHTAVG_TORCH": "cpu"}, True, "cpu"), ({"WEIGHTAVG_TORCH": "CUDA"}, False, "cuda")],
)
def test_variant_follows_the_gpu_unless_chosen(env: dict[str, str], gpu: bool, variant: str) -> None:
    assert bootstrap.choose_variant(env, lambda: gpu) == variant


def test_an_unknown_variant_is_refused_saying_the_choices() -> None:
    with pytest.raises(SystemExit) as exit_:
        bootstrap.choose_variant({"WEIGHTAVG_TORCH": "rocm"}, lambda: False)
    assert str(exit_.value) == (
        "WEIGHTAVG_TORCH='rocm': use cpu, cuda or auto (the default: cuda when an NVIDIA GPU is found)"
    )


def _smi(code: int, out: str) -> Any:
    return lambda *a, **k: subprocess.CompletedProcess(a, code, out, "")


def test_gpu_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_proc = tmp_path / "absent"
    monkeypatch.setattr(bootstrap.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    assert bootstrap.has_nvidia_gpu(_smi(0, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n"), no_proc)
    assert not bootstrap.has_nvidia_gpu(_smi(9, "NVIDIA-SMI has failed"), no_proc)
    (tmp_path / "gpus" / "0000:01:00.0").mkdir(parents=True)
    assert bootstrap.has_nvidia_gpu(_smi(9, ""), tmp_path / "gpus")  # a driver without nvidia-smi working
    monkeypatch.setattr(bootstrap.shutil, "which", lambda name: None)
    assert not bootstrap.has_nvidia_gpu(_smi(0, "GPU 0"), no_proc)


def test_cpu_build_comes_from_pytorch_s_cpu_index_when_it_answers() -> None:
    asked: list[str] = []
    source = bootstrap.torch_source("cpu", "Linux", bootstrap.CPU_INDEX, lambda url: asked.append(url) or True)
    assert source.pip_args == ("torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cpu")
    assert asked == [bootstrap.CPU_INDEX] and not source.warning


def test_cpu_build_falls_back_to_the_configured_index_with_a_warning() -> None:
    source = bootstrap.torch_source("cpu", "Linux", bootstrap.CPU_INDEX, lambda url: False)
    assert source.pip_args == ("torch==2.13.0",)
    assert source.warning.startswith("could not reach https://download.pytorch.org/whl/cpu; taking torch==2.13.0")


def test_cuda_and_other_systems_use_the_configured_index_without_asking_the_cpu_index() -> None:
    def never(url: str) -> bool:
        raise AssertionError("the CPU index must not be asked")

    assert bootstrap.torch_source("cuda", "Linux", bootstrap.CPU_INDEX, never).pip_args == ("torch==2.13.0",)
    assert bootstrap.torch_source("cpu", "Darwin", bootstrap.CPU_INDEX, never).pip_args == ("torch==2.13.0",)


def test_stamp_changes_with_pyproject_variant_and_python() -> None:
    base = bootstrap.stamp_hash(b"[project]", "cpu", "3.11")
    assert base == bootstrap.stamp_hash(b"[project]", "cpu", "3.11")
    assert len({base, bootstrap.stamp_hash(b"[project] ", "cpu", "3.11"), bootstrap.stamp_hash(b"[project]", "cuda", "3.11"),
                bootstrap.stamp_hash(b"[project]", "cpu", "3.12")}) == 4


# -- real pip against faked indexes ---------------------------------------------------------------------


def _wheel(folder: Path, version: str) -> str:
    """A tiny wheel named torch at `version`: enough for pip to resolve it."""
    name = f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / name, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return name


def _index(folder: Path, version: str) -> None:
    """A PEP 503 simple index holding one torch wheel at `version`."""
    project = folder / "torch"
    project.mkdir(parents=True)
    name = _wheel(project, version)
    (project / "index.html").write_text(f'<html><body><a href="{name}">{name}</a></body></html>')


@contextlib.contextmanager
def _served(folder: Path) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def indexes(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """("PyPI", "PyTorch CPU index") on loopback: torch 2.13.0 (the CUDA build, as on PyPI) and 2.13.0+cpu."""
    _index(tmp_path / "pypi", "2.13.0")
    _index(tmp_path / "cpu", "2.13.0+cpu")
    with _served(tmp_path / "pypi") as pypi, _served(tmp_path / "cpu") as cpu:
        yield pypi, cpu


def _dry_run(tmp_path: Path, pypi: str, cpu_index: str, gpu: bool) -> subprocess.CompletedProcess[str]:
    """scripts/bootstrap.py --dry-run with pip's configuration replaced by the faked "PyPI" only (no
    local wheels, no other index) and a PATH whose nvidia-smi, if any, reports a GPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    if gpu:
        smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
        smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "WEIGHTAVG_"))}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=f"{pypi}/",
               PIP_NO_CACHE_DIR="1", WEIGHTAVG_TORCH_CPU_INDEX=cpu_index)
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True,
                          timeout=300, check=False)


no_gpu_here = pytest.mark.skipif(Path("/proc/driver/nvidia/gpus").exists(), reason="this machine has an NVIDIA driver")


@no_gpu_here
def test_without_a_gpu_pip_would_fetch_the_cpu_build(tmp_path: Path, indexes: tuple[str, str]) -> None:
    pypi, cpu = indexes
    result = _dry_run(tmp_path, pypi, f"{cpu}/", gpu=False)
    assert result.returncode == 0, result.stderr
    assert f"torch would come from: {cpu}/torch/torch-2.13.0+cpu-py3-none-any.whl" in result.stdout
    assert f"weightavg setup: cpu build: torch==2.13.0, CPU build, from {cpu}/" in result.stderr


def test_with_a_gpu_pip_would_fetch_the_configured_index_s_cuda_build(tmp_path: Path, indexes: tuple[str, str]) -> None:
    pypi, cpu = indexes
    result = _dry_run(tmp_path, pypi, f"{cpu}/", gpu=True)
    assert result.returncode == 0, result.stderr
    assert f"torch would come from: {pypi}/torch/torch-2.13.0-py3-none-any.whl" in result.stdout
    assert "weightavg setup: cuda build" in result.stderr


@no_gpu_here
def test_without_the_cpu_index_pip_falls_back_to_the_configured_one(tmp_path: Path, indexes: tuple[str, str]) -> None:
    pypi, _ = indexes
    with refused_port() as port:
        result = _dry_run(tmp_path, pypi, f"http://127.0.0.1:{port}/", gpu=False)
    assert result.returncode == 0, result.stderr
    assert f"torch would come from: {pypi}/torch/torch-2.13.0-py3-none-any.whl" in result.stdout
    assert "weightavg setup: warning: could not reach" in result.stderr


def test_the_build_inputs_change_with_each_build_file_and_with_each_built_extension(tmp_path: Path) -> None:
    """A change to setup.py, a C source or their shared header must reinstall (the extensions are
    compiled at install), and so must an extension removed from beside its source (`git clean -X`),
    the client's included: a venv built before it existed lacks it."""
    for name in bootstrap.BUILD_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    seen = {bootstrap.build_inputs(tmp_path)}
    for name in bootstrap.BUILD_FILES:
        (tmp_path / name).write_text(name + " changed")
        seen.add(bootstrap.build_inputs(tmp_path))
    for where, extension in bootstrap.EXTENSIONS:
        (tmp_path / where / f"{extension}.pyi").write_text("")  # a stub is not a build
        assert bootstrap.build_inputs(tmp_path) in seen
        (tmp_path / where / f"{extension}.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
        seen.add(bootstrap.build_inputs(tmp_path))
    assert len(seen) == len(bootstrap.BUILD_FILES) + 1 + len(bootstrap.EXTENSIONS)


# -- the stamp: a second run installs nothing -------------------------------------------------------------


def _fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A venv whose python only logs how it was called (so no real pip runs)."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    python.chmod(0o755)
    return venv, log


def _run_setup(venv: Path, extras: str, torch: str = "cpu") -> subprocess.CompletedProcess[str]:
    with refused_port() as port:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("WEIGHTAVG_")},
               "WEIGHTAVG_TORCH": torch, "WEIGHTAVG_TORCH_CPU_INDEX": f"http://127.0.0.1:{port}/"}
        return subprocess.run([sys.executable, str(SCRIPT), "--venv", str(venv), "--extras", extras], env=env,
                              capture_output=True, text=True, timeout=120, check=False)


def test_a_stamped_venv_installs_nothing_and_a_new_extra_installs_the_union(tmp_path: Path) -> None:
    venv, log = _fake_venv(tmp_path)
    first = _run_setup(venv, "server,demo")
    assert first.returncode == 0, first.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("-m pip install -q --disable-pip-version-check torch==2.13.0")
    assert calls[1].endswith(f"-e {ROOT}[demo,server]")
    stamp = json.loads((venv / bootstrap.STAMP).read_text())
    assert stamp["extras"] == ["demo", "server"] and stamp["variant"] == "cpu"

    log.unlink()
    again = _run_setup(venv, "demo,server")  # same inputs, same extras: nothing runs, nothing printed
    assert again.returncode == 0 and again.stderr == "" and not log.exists()

    more = _run_setup(venv, "server,demo,dev")
    assert more.returncode == 0, more.stderr
    assert log.read_text().splitlines()[1].endswith(f"-e {ROOT}[demo,dev,server]")
    log.unlink()
    assert _run_setup(venv, "server").returncode == 0 and not log.exists()


def test_switching_the_build_reinstalls_torch(tmp_path: Path) -> None:
    venv, log = _fake_venv(tmp_path)
    assert _run_setup(venv, "server").returncode == 0
    log.unlink()
    assert _run_setup(venv, "server", torch="cuda").returncode == 0
    assert log.read_text().splitlines()[0].endswith("--force-reinstall torch==2.13.0")
    assert json.loads((venv / bootstrap.STAMP).read_text())["variant"] == "cuda"
