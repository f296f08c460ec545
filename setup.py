"""The compiled parts of weightavg: the server's native CPU kernels (fused lerp, weighted sum, TIES
selection, huge-page advice, streaming copies: server/weightavg_server/domain/_native.c) and the
client's streaming copies into shared memory (client/weightavg/_copy.c); the two share one copy loop
(client/weightavg/_stream_bytes.h). Everything else is declared in pyproject.toml.

Optional on purpose: where no C compiler or Python headers exist (a slim container, Windows), the
install goes on without them; the server does the same work with torch and the client copies with
numpy: the same numbers and bytes, slower on large CPU averages and merges (docs/perf.md, "Native
lerp") and on shared-memory uploads ("Streaming stores in the client")."""

import os

from setuptools import Extension, setup

SHARED_HEADERS = ["client/weightavg"]
"""Where _stream_bytes.h lies, for both extensions."""

setup(
    ext_modules=[
        Extension(
            "weightavg_server.domain._native",
            ["server/weightavg_server/domain/_native.c"],
            include_dirs=SHARED_HEADERS,
            depends=["client/weightavg/_stream_bytes.h"],
            optional=True,
            # -O3 vectorises the loops; nothing that changes rounding (no -ffast-math): the module
            # must give torch's bits, and lerp.py checks that it does before using it.
            extra_compile_args=["-O3", "-std=gnu11"] if os.name == "posix" else [],
            extra_link_args=["-pthread"] if os.name == "posix" else [],
        ),
        Extension(
            "weightavg._copy",
            ["client/weightavg/_copy.c"],
            include_dirs=SHARED_HEADERS,
            depends=["client/weightavg/_stream_bytes.h"],
            optional=True,
            extra_compile_args=["-O3", "-std=gnu11"] if os.name == "posix" else [],
        ),
    ]
)
