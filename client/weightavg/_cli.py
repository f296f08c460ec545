"""`weightavg`: the command line. Each subcommand is one function in COMMANDS.

`serve` and `demo` need the server extra (torch) and import it only when asked; `health`, `info`,
`stats`, `snapshot` and `purge` are operator commands that need only this thin client, as does
`merge` (mergekit configs over safetensors checkpoints, local or downloaded from the Hugging Face Hub;
YAML needs PyYAML). Their
failures print one line on stderr, `weightavg COMMAND: CODE: message`, with hints in flags.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from . import __version__, checkpoints, mergekit
from ._client import DEFAULT_PORT, MAX_TIMEOUT, Client, checked_timeout, target
from ._errors import NotFoundError, WeightavgError
from ._sizes import BYTE_SIZE_FORMS, parse_bytes

DEFAULT_TIMEOUT = 10.0
"""Seconds health, info and stats wait for an answer: they are probes, not work."""


def _server_command(module: str, extra: str, argv: list[str], *, keep_sighup: bool = False) -> int:
    # Imported lazily: the server needs torch, which a client-only install does not have.
    try:
        if keep_sighup:  # before torch loads (seconds): a SIGHUP meanwhile is kept for when the server serves
            importlib.import_module("weightavg_server.ops.startup").keep_sighup()
        command = importlib.import_module(module)
    except ImportError as exc:
        print(
            f"weightavg: the server is not installed ({exc}); install it with: pip install 'weightavg[{extra}]'",
            file=sys.stderr,
        )
        return 2
    command.main(argv)
    return 0


def _serve(argv: list[str]) -> int:
    return _server_command("weightavg_server.ops.cli", "server", argv, keep_sighup=True)


def _demo(argv: list[str]) -> int:
    return _server_command("weightavg_server.ops.demo", "server,demo", argv)


LOCAL_ADDRESS = "local"
"""The ADDRESS that makes `weightavg merge` start a server in its own process, for the merge alone."""


def _local_or_address(value: str) -> str:
    return value if value == LOCAL_ADDRESS else _address(value)


def _address(value: str) -> str:
    """argparse's type for ADDRESS: Client's rule (a default port, never 443), refused with its reason."""
    try:
        return target(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _timeout(value: str) -> float:
    """argparse's type for --timeout: seconds, more than 0 and at most MAX_TIMEOUT (the Client's own
    check, `checked_timeout`)."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    try:
        return checked_timeout(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give a number of seconds more than 0, at most {MAX_TIMEOUT:g}") from None


def _token(value: str) -> str:
    """argparse's type for --token (and WEIGHTAVG_TOKEN, its default): a token gRPC metadata can
    carry, printable ASCII without surrounding spaces. Another (a newline from a secret file, say)
    failed as "INTERNAL: Invalid metadata", with a line of grpc's own log above it (found by
    review). The message never shows the token."""
    if value and (value != value.strip() or not all(" " <= c <= "~" for c in value)):
        raise argparse.ArgumentTypeError(
            "the token (--token or WEIGHTAVG_TOKEN) has surrounding spaces or a character other than printable "
            "ASCII, which gRPC metadata cannot carry; is it the whole token and only it?"
        )
    return value


T = TypeVar("T")


def _probe_parser(
    name: str, description: str, timeout: float = DEFAULT_TIMEOUT, *, local: bool = False
) -> argparse.ArgumentParser:
    """ADDRESS plus the token and TLS options every client command shares; with `local`, ADDRESS may
    also be LOCAL_ADDRESS (a server the command starts in its own process)."""
    p = argparse.ArgumentParser(prog=f"weightavg {name}", description=description)
    p.add_argument("address", type=_local_or_address if local else _address,
                   help=f"host:port of the server, e.g. 127.0.0.1:{DEFAULT_PORT} (the port defaults to {DEFAULT_PORT})"
                   + (f"; '{LOCAL_ADDRESS}' starts one in this process for the command (needs weightavg[server]; "
                      "CUDA when available)" if local else ""))
    p.add_argument("--timeout", type=_timeout, default=timeout, help=f"seconds to wait for the answer (default {timeout})")
    p.add_argument("--token", type=_token, default=os.environ.get("WEIGHTAVG_TOKEN"),
                   help="bearer token (default: $WEIGHTAVG_TOKEN)")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's trusted roots")
    p.add_argument("--tls-ca", help="PEM CA that signed the server's certificate (implies --tls)")
    p.add_argument("--client-cert", help="PEM client certificate, for servers that require one")
    p.add_argument("--client-key", help="PEM key of --client-cert")
    return p


def _parse(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The arguments of a client command, refusing a client certificate without its key or a key
    without its certificate (gRPC aborted the process on either, with a core dump; found by review)."""
    args = p.parse_args(argv)
    if bool(args.client_cert) != bool(args.client_key):
        p.error("--client-cert and --client-key go together: give both or neither")
    for flag, path in (("--tls-ca", args.tls_ca), ("--client-cert", args.client_cert), ("--client-key", args.client_key)):
        if path and not _is_pem(path):
            # gRPC took it and failed every connection with "Failed to create security handshaker", two lines
            # of its own log above, and a hint about which CA signed what (found by review).
            p.error(f"{flag} {path} is not PEM (no '-----BEGIN' line): give the PEM file, not DER or another format")
    return args


def _is_pem(path: str) -> bool:
    """Whether the file at `path` holds PEM (a BEGIN line in its first MiB: text such as `openssl x509
    -text` writes may come first; /dev/zero is not read without end); True when it cannot be read,
    which the client reports with the reason when it opens it."""
    try:
        with open(path, "rb") as f:
            return b"-----BEGIN " in f.read(1 << 20)
    except OSError:
        return True


class _CliClient(Client):
    """A client whose hints name this command line's flags instead of Client's keywords."""

    def _unavailable_hint(self) -> str:
        if self.tls:
            # A server without TLS answered --tls with "check that --tls-ca signed ..." alone (found by review).
            return (f" (TLS connection to {self.address} failed: is the server running there with TLS (without it, "
                    "leave out --tls and --tls-ca)? check that --tls-ca signed the server's certificate, "
                    "and add --client-cert and --client-key if the server requires client certificates)")
        return (f" (could not reach {self.address} over plaintext: is the server running there, and does it use TLS? "
                "then add --tls-ca FILE)")

    def _deadline_hint(self) -> str:
        return f" (no answer within --timeout {self.timeout:g} s; give a longer --timeout)"


def _client(args: argparse.Namespace, **options: Any) -> Client:
    return _CliClient(
        args.address, timeout=args.timeout, token=args.token, tls=args.tls, tls_ca=args.tls_ca,
        client_cert=args.client_cert, client_key=args.client_key, **options,
    )


def _failed(name: str, exc: WeightavgError | OSError | ValueError) -> int:
    """Print a failure once, as `weightavg NAME: CODE: message` (or the file that could not be read,
    for --tls-ca and the client certificate), and return the exit status 1."""
    print(f"weightavg {name}: {exc}", file=sys.stderr)
    return 1


def _health(argv: list[str]) -> int:
    p = _probe_parser(
        "health", "Ask the server's grpc.health.v1 service for its status and print it (SERVING, NOT_SERVING, ...). "
        "Exit status 0 when SERVING, 1 otherwise (including unreachable).",
    )
    p.add_argument("--service", default="",
                   help="service to ask about, e.g. weightavg.v1.WeightAveragingService (default: the whole server)")
    args = _parse(p, argv)
    try:
        with _client(args) as client:
            try:
                # The method by name: grpcio-health-checking's HealthStub has no type annotations.
                check = client._channel.unary_unary(
                    "/grpc.health.v1.Health/Check",
                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString,
                )
                response = check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
            except grpc.RpcError as exc:
                raise client._translate(exc) from exc
    except NotFoundError as exc:  # grpc's health service says only NOT_FOUND
        exc.message = f"the server has no health status for service {args.service!r} (leave out --service for the server's)"
        return _failed("health", exc)
    except (WeightavgError, OSError) as exc:
        return _failed("health", exc)
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def _one_call(
    name: str, description: str, call: Callable[[Client], T], render: Callable[[T], str], argv: list[str],
    timeout: float = DEFAULT_TIMEOUT,
) -> int:
    """Parse ADDRESS and the client options, make one call, print what it answered (or its failure)."""
    args = _parse(_probe_parser(name, description, timeout=timeout), argv)
    try:
        with _client(args) as client:
            result = call(client)
    except (WeightavgError, OSError) as exc:
        return _failed(name, exc)
    print(render(result))
    return 0


def _print_json(name: str, description: str, fetch: Callable[[Client], dict[str, Any]], argv: list[str]) -> int:
    return _one_call(name, description, fetch, lambda result: json.dumps(result, indent=2), argv)


def _info(argv: list[str]) -> int:
    return _print_json(
        "info", "Print GetServerInfo as JSON: versions, device, CUDA memory, layer types, dtypes and limits.",
        Client.info, argv,
    )


def _stats(argv: list[str]) -> int:
    return _print_json(
        "stats", "Print GetServerStats as JSON: per-method counts, status codes, latency and tensor bytes, "
        "live handles and bytes per device, and calls, failures, handles and bytes held per tenant.",
        Client.stats, argv,
    )


SNAPSHOT_INCOMPLETE = 3
"""The exit status of `weightavg snapshot` when the server wrote its snapshot but left handles out of
it: they would be missing after a restart from it. The command exited 0 then, so a script taking a
snapshot before a restart went on without them (found by review). 3, as scripts/container-test's
"nothing failed but something was skipped"."""


def _snapshot(argv: list[str]) -> int:
    args = _parse(_probe_parser(
        "snapshot", "Ask a running server to write every live handle to its --state-dir now. Exit status 0 when "
        f"every handle was saved, {SNAPSHOT_INCOMPLETE} when the snapshot was written without some (each named on "
        "stderr with why), 1 when none was written.", timeout=600.0,
    ), argv)
    try:
        with _client(args) as client:
            result = client.snapshot()
    except (WeightavgError, OSError) as exc:
        return _failed("snapshot", exc)
    print(f"saved {result['handles']} handle(s), {result['tensor_bytes']} tensor bytes, to {result['directory']}")
    skipped: list[str] = result["skipped"]
    if not skipped:
        return 0
    # stderr, one line per handle: `ID (KIND): why`, which says what to change (free it, or build it otherwise).
    print(f"weightavg snapshot: {len(skipped)} handle(s) NOT saved, missing from this snapshot and lost if the "
          "server restarts from it:", file=sys.stderr)
    for item in skipped:
        print(f"  {item}", file=sys.stderr)
    return SNAPSHOT_INCOMPLETE


def _purge(argv: list[str]) -> int:
    return _one_call(
        "purge", "Free every handle on a running server, every client's and every session's (an operator's "
        "clean-up; clients' next calls on those handles get NOT_FOUND). Authenticated like every call by --token.",
        lambda client: client.purge(), lambda freed: f"freed {freed} handle(s)", argv,
    )


def _merge(argv: list[str]) -> int:
    p = _probe_parser(
        "merge", "Merge safetensors checkpoints on a server as a mergekit config says, as mergekit-yaml "
        "would: every model the config names (a directory of *.safetensors, or one file; a Hugging Face repository ID "
        "is downloaded first, safetensors only) goes up a batch of tensors "
        "at a time, is merged there (weightavg.mergekit), and the result is written to OUT as model.safetensors (or "
        "shards and their index) with the base model's config, the tokenizer (the models' vocabularies aligned to it "
        "where the config names one), the config and a model card. Exit status 0 when written, 1 "
        "otherwise (nothing is left on the server either way, and nothing written to OUT).",
        timeout=3600.0, local=True,
    )
    p.add_argument("config", help="the mergekit config: YAML (needs PyYAML) or JSON")
    p.add_argument("out", help="directory to write model.safetensors (and the copied files) to")
    p.add_argument("--shm", action=argparse.BooleanOptionalAction, default=None,
                   help="move the tensors through shared memory (a server on this host started with --allow-shm; "
                   "the stream where it refuses). Default: on for an address on this host (127.0.0.1, ::1, localhost, "
                   "0.0.0.0, ::, unix:), off for others; --no-shm: the stream always")
    p.add_argument("--seed", "--random-seed", dest="seed", type=int,
                   help="seed of DARE's and DELLA's random masks (the server's default: 0)")
    p.add_argument("--batch-bytes", type=_byte_size, default=mergekit.DEFAULT_BATCH_BYTES,
                   help="most bytes of tensors (every model's copy and the results) the server holds for the merge at "
                   "a time, as two batches of half of it, one going up while the other comes back (default 256MiB; "
                   f"a batch the server's caps refuse is split): {BYTE_SIZE_FORMS}")
    shard = p.add_mutually_exclusive_group()
    shard.add_argument("--shard-bytes", type=_byte_size, default=checkpoints.DEFAULT_SHARD_BYTES,
                       help="largest output shard (default 5GB, mergekit's)")
    shard.add_argument("--out-shard-size", dest="shard_bytes", type=_mergekit_size,
                       help="the same in mergekit-yaml's form: bytes, or a whole number of thousands, millions or "
                       "billions of bytes (1000K, 500M, 5B)")
    p.add_argument("--no-model-card", "--no-write-model-card", dest="model_card", action="store_false",
                   help="write neither README.md (a model card) nor mergekit_config.yml (the config) to OUT, as "
                   "mergekit-yaml's --no-write-model-card does (--write-model-card: write them, the default)")
    p.add_argument("--write-model-card", dest="model_card", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the base model's tokenizer files to OUT, as mergekit-yaml does (--no-copy-tokenizer: "
                   "none, unless the config names a tokenizer, whose files are always written)")
    p.add_argument("--transformers-cache", metavar="DIR",
                   help="where models named by Hugging Face ID are downloaded to (default: the Hugging Face cache, "
                   "HF_HUB_CACHE), as mergekit-yaml's flag of this name")
    p.add_argument("--quiet", action="store_true",
                   help="no progress line on a terminal, nor huggingface_hub's download bars")
    args = _parse(p, argv)
    if args.quiet:  # read by huggingface_hub when a download first imports it
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    options = {"seed": args.seed} if args.seed is not None else {}
    stop: Callable[[], None] | None = None
    try:
        config, text = _mergekit_config(args.config)
        if args.shm is None:
            args.shm = args.address == LOCAL_ADDRESS or _on_this_host(args.address)
        if args.address == LOCAL_ADDRESS:
            args.address, stop = _embedded_server()
            args.shm = True  # the server is this process: its tensors move through shared memory
            args.token, args.tls, args.tls_ca, args.client_cert, args.client_key = None, False, None, None, None
        with _client(args, shm=args.shm, session=True) as client, warnings.catch_warnings(record=True) as noted:
            warnings.simplefilter("always")
            written = mergekit.merge_checkpoints(client, config, args.out, batch_bytes=args.batch_bytes,
                                                 shard_bytes=args.shard_bytes,
                                                 progress=None if args.quiet else _progress_line(),
                                                 model_card=args.model_card, config_text=text,
                                                 copy_tokenizer=args.copy_tokenizer, hub_cache=args.transformers_cache,
                                                 **options)
    except (WeightavgError, OSError, ValueError) as exc:
        return _failed("merge", exc)
    finally:
        if stop is not None:
            stop()
    for warning in noted:  # one line each, as the failures (Python's format adds the file and the source line)
        print(f"weightavg merge: warning: {warning.message}", file=sys.stderr)
    print(f"wrote {written}")
    return 0


def _on_this_host(address: str) -> bool:
    """Whether an address names a server on this machine (a loopback host, localhost, the unspecified
    address 0.0.0.0 or ::, which a connection takes for this host, or a Unix socket), where shared
    memory may move a merge's tensors: the server takes it with --allow-shm, and the client falls
    back to the stream where it refuses. False for anything it cannot tell (this host's other addresses
    too: telling them would take a listing of its interfaces)."""
    try:
        resolved = target(address)
    except ValueError:
        return False
    if resolved.startswith(("unix:", "unix-abstract:")):
        return True
    host = resolved.rpartition(":")[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def _embedded_server() -> tuple[str, Callable[[], None]]:
    """A server started in this process on a free loopback port, with shared memory allowed and the
    server's default device (CUDA when available): its address, and how to stop it. ValueError where
    the server is not installed."""
    try:
        app = importlib.import_module("weightavg_server.ops.app")
        config = importlib.import_module("weightavg_server.ops.config")
    except ImportError as exc:
        raise ValueError(f"ADDRESS {LOCAL_ADDRESS} starts a server in this process, which is not installed ({exc}); "
                         "install it with: pip install 'weightavg[server]', or give a running server's address") from None
    server, port, health = app.create_server(config.ServerConfig(host="127.0.0.1", port=0, allow_shm=True))
    server.start()
    app.set_serving(health, True)
    return f"127.0.0.1:{port}", lambda: server.stop(grace=None)


def _progress_line() -> Callable[[int, int], None] | None:
    """On a terminal, a progress line on stderr redrawn after each merged batch (none into a pipe or
    a file, where it would only add lines to read)."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        print(f"\rweightavg merge: {done}/{total} tensors", end="\n" if done == total else "", file=sys.stderr,
              flush=True)

    return show


def _byte_size(text: str) -> int:
    """argparse's type for a size in bytes: a positive size in the server's forms (64MiB, 1.5G, 500MB)."""
    try:
        size = parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is no bytes; give a positive size")
    return size


def _mergekit_size(text: str) -> int:
    """argparse's type for mergekit-yaml's --out-shard-size: a whole number of bytes, or of thousands,
    millions or billions of them with K, M or B (either case), as mergekit reads it (5B: 5,000,000,000)."""
    digits, unit = (text[:-1], text[-1].lower()) if text[-1:].lower() in ("k", "m", "b") else (text, "")
    if not digits.isdigit() or int(digits) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size as mergekit writes one: a positive whole number, "
                                         "optionally followed by K, M or B (e.g. 5B)")
    return int(digits) * {"": 1, "k": 1000, "m": 1000**2, "b": 1000**3}[unit]


def _mergekit_config(path: str) -> tuple[dict[str, Any], str]:
    """A mergekit config file read as data, and its text: JSON, or YAML through PyYAML's safe loader
    (plain data only, no tags that construct objects), which a client-only install may lack."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        loaded = json.loads(text)
    else:
        try:
            yaml = importlib.import_module("yaml")
        except ImportError:
            raise ValueError(f"{path} is YAML, which needs PyYAML: pip install 'weightavg[merge]' (or give the config "
                             "as JSON)") from None
        loaded = yaml.safe_load(text)
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds no mergekit config (a mapping with merge_method and models)")
    return loaded, text


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "serve": (_serve, "run the server (needs weightavg[server]); weightavg serve --help lists every option"),
    "demo": (_demo, "does weight averaging help? trains and compares, through an embedded server (--reference: the"
             " reference's examples)"),
    "health": (_health, "print a server's health status; exit 0 when SERVING"),
    "info": (_info, "print a server's versions, device and limits as JSON"),
    "stats": (_stats, "print a server's per-RPC statistics and live objects as JSON"),
    "snapshot": (_snapshot, "ask a running server to snapshot every live handle to its --state-dir; exit "
                 f"{SNAPSHOT_INCOMPLETE} when it left some out"),
    "purge": (_purge, "free every handle on a running server (every client's: an operator's clean-up)"),
    "merge": (_merge, "merge safetensors checkpoints (local, or by Hugging Face ID) on a server as a mergekit config says, a batch of "
              "tensors at a time; writes OUT/model.safetensors or shards"),
}
"""Subcommand name -> (function taking the remaining arguments and returning the exit status, summary)."""


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "usage: weightavg COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines) + (
        "\n\nweightavg COMMAND --help describes a command's arguments."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `weightavg` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"weightavg {__version__}")
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"weightavg: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return command[0](args[1:])
    except KeyboardInterrupt:
        return interrupted(args[0])


INTERRUPTED = 128 + 2
"""The exit status of a command stopped by Ctrl-C (SIGINT), as a shell gives one."""


def interrupted(name: str) -> int:
    """One line for a command stopped by Ctrl-C, and its exit status: a client command waiting on
    its answer, or `serve` before it serves (importing torch, restoring a snapshot; once serving,
    SIGINT drains it), printed a traceback (found by review)."""
    print(f"weightavg {name}: interrupted", file=sys.stderr)
    return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
