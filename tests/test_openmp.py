"""The server bounds OpenMP's idle spinning before torch loads, unless the operator chose a policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from weightavg_server.ops.openmp import SPIN_COUNT, bound_idle_spin

SERVER = Path(__file__).resolve().parent.parent / "server"


@pytest.mark.parametrize(
    ("environ", "expected", "changed"),
    [
        ({}, SPIN_COUNT, True),
        ({"PATH": "/bin"}, SPIN_COUNT, True),
        ({"GOMP_SPINCOUNT": "5"}, "5", False),  # the operator's count stays
        ({"OMP_WAIT_POLICY": "ACTIVE"}, None, False),  # so does a policy: libgomp derives the count from it
        ({"OMP_WAIT_POLICY": "PASSIVE"}, None, False),
    ],
)
def test_the_spin_is_bounded_unless_the_operator_chose(environ: dict[str, str], expected: str | None, changed: bool) -> None:
    assert bound_idle_spin(environ) is changed
    assert environ.get("GOMP_SPINCOUNT") == expected


# Records the environment at the moment torch is first imported, then imports the module named in argv[1].
_PROBE = """
import importlib, json, os, sys
seen = {}
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.update(GOMP_SPINCOUNT=os.environ.get("GOMP_SPINCOUNT"), OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY"))
        return None
sys.meta_path.insert(0, Probe())
importlib.import_module(sys.argv[1])
print(json.dumps(seen))
"""


def _environment_when_torch_loads(module: str, **extra: str) -> dict[str, str | None]:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(extra, PYTHONPATH=os.pathsep.join([str(SERVER), env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _PROBE, module], env=env, capture_output=True, text=True, timeout=300, check=True)
    seen: dict[str, str | None] = json.loads(out.stdout.strip().splitlines()[-1])
    return seen


@pytest.mark.parametrize("module", ["weightavg_server.ops.cli", "weightavg_server.ops.app", "weightavg_server.service"])
def test_every_server_entry_sets_it_before_torch_loads(module: str) -> None:
    """`weightavg serve` and `python -m weightavg_server` import ops.cli; the bench and embedders import app or service."""
    assert _environment_when_torch_loads(module) == {"GOMP_SPINCOUNT": SPIN_COUNT, "OMP_WAIT_POLICY": None}


def test_an_operator_policy_reaches_libgomp_unchanged() -> None:
    seen = _environment_when_torch_loads("weightavg_server.ops.cli", OMP_WAIT_POLICY="ACTIVE")
    assert seen == {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "ACTIVE"}
