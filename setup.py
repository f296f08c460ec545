"""The one compiled part of weightavg: the server's fused CPU lerp (server/weightavg_server/domain/
_native.c). Everything else is declared in pyproject.toml.

Optional on purpose: where no C compiler or Python headers exist (a slim container, Windows), the
install goes on without it and the server averages with torch's lerp_: the same numbers, about a
fifth slower on large CPU averages (docs/perf.md, "Native lerp")."""

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
