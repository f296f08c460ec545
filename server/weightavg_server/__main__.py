"""`python -m weightavg_server [serve flags]` runs the server."""

from .cli import main

main()
