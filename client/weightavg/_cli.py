"""The `weightavg` command: one subcommand per entry of COMMANDS (serve needs the server extra)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from ._client import Client
from ._errors import WeightavgError


def _serve(argv: Sequence[str]) -> int:
    try:  # imported by name: the client package must not depend on the server (or on torch)
        server_cli = importlib.import_module("weightavg_server.cli")
    except ImportError:
        print("weightavg serve needs the server: pip install 'weightavg[server]'", file=sys.stderr)
        return 1
    server_cli.main(argv)
    return 0


def _demo(argv: Sequence[str]) -> int:
    try:  # the demo embeds a server, so it needs the server and demo extras
        demo = importlib.import_module("weightavg_server.demo")
    except ImportError as exc:
        print(f"weightavg demo needs the server: pip install 'weightavg[server,demo]' ({exc})", file=sys.stderr)
        return 1
    demo.main(argv)
    return 0


def _connection_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """ADDRESS plus the token and TLS options every client command shares."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("address", help="host:port of the server")
    p.add_argument("--token", default=os.environ.get("WEIGHTAVG_TOKEN"),
                   help="bearer token (default: $WEIGHTAVG_TOKEN)")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's trusted roots")
    p.add_argument("--tls-ca", help="PEM CA that signed the server's certificate (implies --tls)")
    p.add_argument("--client-cert", help="PEM client certificate, for servers that require one")
    p.add_argument("--client-key", help="PEM key of --client-cert")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
    return p


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.address, timeout=args.timeout, token=args.token, tls=args.tls, tls_ca=args.tls_ca,
        client_cert=args.client_cert, client_key=args.client_key,
    )


def _snapshot(argv: Sequence[str]) -> int:
    args = _connection_parser(
        "weightavg snapshot", "Ask a running server to write every live handle to its --state-dir now."
    ).parse_args(argv)
    with _client(args) as c:
        result = c.snapshot()
    print(f"saved {result['handles']} handle(s), {result['tensor_bytes']} tensor bytes, to {result['directory']}")
    for skipped in result["skipped"]:
        print(f"not saved (no snapshot format for its kind yet): {skipped}")
    return 0


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "serve": (_serve, "run the server (weightavg serve --help)"),
    "demo": (_demo, "run the reference's weight-averaging examples against an embedded server (weightavg demo --help)"),
    "snapshot": (_snapshot, "ask a running server to snapshot every live handle to its --state-dir"),
}


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `weightavg` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:10} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: weightavg COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, _ = COMMANDS[argv[0]]
    try:
        raise SystemExit(command(argv[1:]))
    except WeightavgError as exc:
        print(f"weightavg {argv[0]}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
