"""How long the server's idle OpenMP threads spin before they sleep: bounded, set before torch loads.

torch's CPU kernels run on an OpenMP team (libgomp in the pip builds). After each parallel kernel
libgomp's workers busy-wait for the next one: with neither `OMP_WAIT_POLICY` nor `GOMP_SPINCOUNT`
set, 300,000 spins, which measured about 4 ms of a core after every large call on this project's
2-vCPU machines (docs/perf.md, "Idle spinning"). A server shares its cores with the training job
beside it, so that time is taken from the job it serves (and from the next call, when the job's own
workers spin back). `GOMP_SPINCOUNT` below bounds it to tens of microseconds; the server's own
training and averaging measured no slower with it.

libgomp reads its environment once, when torch first loads it, so this runs at import of the
`weightavg_server` package, before any of its modules imports torch. A process that loaded torch
first (an in-process server in a test) keeps whatever it had. An operator's own setting of either
variable wins: `OMP_WAIT_POLICY=ACTIVE` or `GOMP_SPINCOUNT=...` in the server's environment.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_COUNT = "10000"
"""libgomp's spins before an idle worker sleeps (its default is 300000): about 0.1 ms on this
project's machines (0.25 ms of server CPU after a large call, against 4.25 ms by default)."""

OPERATOR_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
"""Variables through which an operator chooses the policy; with either set, the server sets nothing."""


def bound_idle_spin(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set GOMP_SPINCOUNT unless the operator chose a wait policy; whether it was set."""
    if any(name in environ for name in OPERATOR_SETTINGS):
        return False
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True
