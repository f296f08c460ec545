"""`python -m weightavg_server [serve flags]` runs the server."""

from .ops.cli import main

main()
