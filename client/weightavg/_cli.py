"""The `weightavg` command: `weightavg serve [flags]` runs a server, `weightavg demo [flags]` the examples.

Both subcommands live with the server (they need torch), so the thin client imports them only when
asked and says which extra to install when they are missing.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

USAGE = """usage: weightavg {serve,demo} [options]

  serve   run the weightavg gRPC server (weightavg serve --help)
  demo    run the reference's weight-averaging examples against an embedded server (weightavg demo --help)
"""


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch to a subcommand with the remaining arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return
    command, rest = args[0], args[1:]
    if command not in ("serve", "demo"):
        sys.stderr.write(f"weightavg: unknown command '{command}'\n{USAGE}")
        raise SystemExit(2)
    try:
        # Imported by name: the server is an optional extra of this client package.
        run = importlib.import_module("weightavg_server.cli" if command == "serve" else "weightavg_server.demo").main
    except ImportError as exc:
        extra = "server" if command == "serve" else "server,demo"
        sys.stderr.write(f"weightavg {command} needs the server installed: pip install 'weightavg[{extra}]' ({exc})\n")
        raise SystemExit(1) from None
    run(rest)


if __name__ == "__main__":
    main()
