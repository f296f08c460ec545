"""The one compiled part of weightavg: the server's native CPU kernels (fused lerp, weighted sum,
TIES selection, huge-page advice: server/weightavg_server/domain/_native.c). Everything else is declared in
pyproject.toml.

Optional on purpose: where no C compiler or Python headers exist (a slim container, Windows), the
install goes on without it and the server does the same work with torch: the same numbers, slower
on large CPU averages and merges (docs/perf.md, "Native lerp")."""

import os

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "weightavg_server.domain._native",
            ["server/weightavg_server/domain/_native.c"],
            optional=True,
            # -O3 vectorises the loops; nothing that changes rounding (no -ffast-math): the module
            # must give torch's bits, and lerp.py checks that it does before using it.
            extra_compile_args=["-O3", "-std=gnu11"] if os.name == "posix" else [],
            extra_link_args=["-pthread"] if os.name == "posix" else [],
        )
    ]
)
