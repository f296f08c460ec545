"""Regenerate the Python stubs in client/weightavg/v1 from proto/ (one command: python scripts/gen_protos.py).

The stubs are committed; tests/test_protos.py regenerates them into a temporary folder and fails
when the committed ones differ.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUTPUT_ROOT = ROOT / "client"
PROTO_FILES = ("weightavg/v1/weightavg.proto",)
GENERATED = (
    "weightavg/v1/weightavg_pb2.py",
    "weightavg/v1/weightavg_pb2.pyi",
    "weightavg/v1/weightavg_pb2_grpc.py",
    "weightavg/v1/weightavg_pb2_grpc.pyi",
)


def generate(output_root: Path) -> None:
    """Run protoc (from grpcio-tools) with the mypy-protobuf plugins into output_root."""
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    for name in GENERATED:
        (output_root / name).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc",
            f"-I{PROTO_ROOT}", f"-I{well_known}",
            f"--python_out={output_root}", f"--grpc_python_out={output_root}",
            f"--mypy_out={output_root}", f"--mypy_grpc_out={output_root}",
            *PROTO_FILES,
        ],
        check=True,
        cwd=ROOT,
        env=env,
    )


def stale_files() -> list[str]:
    """Names of committed stubs that differ from freshly generated ones."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [
            name for name in GENERATED
            if not (OUTPUT_ROOT / name).exists()
            or (OUTPUT_ROOT / name).read_bytes() != (Path(tmp) / name).read_bytes()
        ]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for name in GENERATED:
            shutil.copyfile(Path(tmp) / name, OUTPUT_ROOT / name)
    print("regenerated:", ", ".join(GENERATED))


if __name__ == "__main__":
    main()
