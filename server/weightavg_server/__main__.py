"""`python -m weightavg_server [serve] [serve flags]` runs the server (under torchrun: a cluster)."""

import sys

from .ops.startup import keep_sighup

keep_sighup()  # torch loads next: a SIGHUP meanwhile is kept for when the server serves, not fatal

from weightavg._cli import interrupted  # noqa: E402

try:
    from .ops.cli import main  # imports torch: seconds, during which Ctrl-C must not print a traceback

    # `serve` may be named, as in `weightavg serve` and torchrun's `-m weightavg_server serve --port P`.
    main(sys.argv[2:] if sys.argv[1:2] == ["serve"] else None)
except KeyboardInterrupt:
    sys.exit(interrupted("serve"))
