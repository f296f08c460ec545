"""The operator's command line: `weightavg serve/health/info/stats`, run in-process and as real processes."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from weightavg import Client, UnauthenticatedError
from weightavg._cli import COMMANDS, main
from weightavg_server.domain import lerp, weighted_sum
from weightavg_server.ops.app import SERVICE_NAME, create_server, set_serving
from weightavg_server.ops.config import ENV_PREFIX, ServerConfig

from conftest import LiveServer, refused_port, with_limits

ROOT = Path(__file__).resolve().parent.parent


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main() in this process: (exit status, stdout, stderr); argparse's SystemExit counts as a status."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# -- serve --help ----------------------------------------------------------------------------------


def test_serve_help_documents_every_option_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["serve", "--help"], capsys)
    assert code == 0
    assert out.startswith("usage: weightavg serve")
    for field in dataclasses.fields(ServerConfig):
        assert "--" + field.name.replace("_", "-") in out, field.name
        assert ENV_PREFIX + field.name.upper() in out, field.name


def test_serve_options_come_from_flags_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from weightavg_server.ops.cli import build_parser, config_from_args

    monkeypatch.setenv("WEIGHTAVG_KEEPALIVE_TIME_SECONDS", "45")
    monkeypatch.setenv("WEIGHTAVG_METRICS_PORT", "9100")
    monkeypatch.setenv("WEIGHTAVG_LOG_LEVEL", "DEBUG")
    config = config_from_args(build_parser().parse_args(["--metrics-port", "9200", "--keepalive-timeout-seconds", "3"]))
    assert config.keepalive_time_seconds == 45.0  # from the environment
    assert config.metrics_port == 9200  # the flag wins over the variable
    assert config.keepalive_timeout_seconds == 3.0
    assert config.log_level == "DEBUG"
    assert ServerConfig().metrics_port == -1  # metrics are off unless asked for


def test_serve_without_the_server_extra_says_what_to_install() -> None:
    # torch made unimportable, as on a client-only install.
    script = "import sys; sys.modules['torch'] = None; from weightavg._cli import main; sys.exit(main(['serve']))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "pip install 'weightavg[server]'" in result.stderr


# -- dispatch --------------------------------------------------------------------------------------


def test_usage_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for name in COMMANDS:
        assert f"\n  {name} " in out
    code, _, err = run_main(["frobnicate"], capsys)
    assert code == 2 and "unknown command 'frobnicate'" in err
    assert run_main([], capsys)[0] == 2


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "weightavg"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.strip() == "weightavg 0.1.0"



def test_every_option_of_the_client_commands_is_in_ops_md(capsys: pytest.CaptureFixture[str]) -> None:
    """The operator commands' options, read from their --help, each named in docs/ops.md: the serve
    options have their table (tests/test_docs_facts.py); --timeout was documented for health alone."""
    text = (ROOT / "docs" / "ops.md").read_text()
    client = [name for name in COMMANDS if name not in ("serve", "demo")]
    assert client == ["health", "info", "stats", "snapshot", "purge", "merge"]
    for name in client:
        code, out, _ = run_main([name, "--help"], capsys)
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", out)) - {"--help"}
        assert "--timeout" in options and "--token" in options, (name, options)
        assert sorted(o for o in options if f"`{o}`" not in text and f"[{o} " not in text) == [], name


# -- health, info, stats ---------------------------------------------------------------------------


def test_health_command_prints_serving_and_exits_zero(
    live_server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main(["health", live_server.address], capsys)[:2] == (0, "SERVING\n")
    assert run_main(["health", live_server.address, "--service", SERVICE_NAME], capsys)[:2] == (0, "SERVING\n")
    code, out, err = run_main(["health", live_server.address, "--service", "no.such.Service"], capsys)
    assert (code, out, err) == (1, "", "weightavg health: NOT_FOUND: the server has no health status for service "
                                "'no.such.Service' (leave out --service for the server's)\n")


def test_health_command_exits_one_when_not_serving_or_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    server, port, health = create_server(ServerConfig(host="127.0.0.1", port=0, device="cpu"))
    server.start()
    set_serving(health, False)
    try:
        assert run_main(["health", f"127.0.0.1:{port}"], capsys)[:2] == (1, "NOT_SERVING\n")
    finally:
        server.stop(grace=None)
    code, out, err = run_main(["health", f"127.0.0.1:{port}", "--timeout", "5"], capsys)
    assert code == 1 and out == "" and err.startswith("weightavg health: UNAVAILABLE: ")


def test_info_command_prints_server_info_as_json(live_server: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["info", live_server.address], capsys)
    assert code == 0
    with Client(live_server.address) as c:
        assert json.loads(out) == c.info()


def test_stats_command_prints_server_stats_as_json(live_server: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    with Client(live_server.address) as c:
        c.ping()
    code, out, _ = run_main(["stats", live_server.address], capsys)
    assert code == 0
    stats = json.loads(out)
    assert stats["methods"][f"/{SERVICE_NAME}/Ping"]["count"] >= 1


@pytest.mark.parametrize("command", ["health", "info", "stats", "snapshot", "purge"])
def test_every_client_command_on_an_unreachable_server_names_the_code_once_and_hints_in_flags(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with refused_port() as port:
        code, out, err = run_main([command, f"127.0.0.1:{port}", "--timeout", "5"], capsys)
        code_tls, _, err_tls = run_main([command, f"127.0.0.1:{port}", "--timeout", "5", "--tls"], capsys)
    assert (code, out) == (1, "")
    assert err == (
        f"weightavg {command}: UNAVAILABLE: failed to connect to all addresses: ipv4:127.0.0.1:{port}: Failed to "
        f"connect to remote host: Connection refused (could not reach 127.0.0.1:{port} over plaintext: is the "
        "server running there, and does it use TLS? then add --tls-ca FILE)\n"
    )
    assert code_tls == 1 and err_tls.count("UNAVAILABLE") == 1 and err_tls.endswith(
        f"(TLS connection to 127.0.0.1:{port} failed: is the server running there with TLS (without it, leave out "
        "--tls and --tls-ca)? check that --tls-ca signed the server's certificate, and add --client-cert and "
        "--client-key if the server requires client certificates)\n"
    )


def test_tls_to_a_plaintext_server_hints_that_it_may_not_serve_tls(
    live_server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--tls` against a server without TLS blamed the CA alone, one that was never given (found by review)."""
    code, out, err = run_main(["info", live_server.address, "--tls", "--timeout", "10"], capsys)
    assert (code, out) == (1, "") and err.startswith("weightavg info: UNAVAILABLE: ")
    assert "is the server running there with TLS (without it, leave out --tls and --tls-ca)?" in err


@pytest.mark.parametrize("flag", ["--tls-ca", "--client-cert", "--client-key"])
def test_a_tls_file_that_is_not_pem_is_refused_before_any_connection(flag: str, tmp_path: Path) -> None:
    """gRPC failed every connection with "Failed to create security handshaker" under two lines of its
    own log, and a hint about which CA signed what (found by review). A real process: grpc's log goes
    to the process's stderr."""
    der = tmp_path / "ca.der"
    der.write_bytes(b"\x30\x82\x01\x0a not PEM")
    pem = tmp_path / "other.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    pair = {"--client-cert": ["--client-key", str(pem)], "--client-key": ["--client-cert", str(pem)]}.get(flag, [])
    result = subprocess.run(
        [str(Path(sys.executable).parent / "weightavg"), "info", "127.0.0.1:1", flag, str(der), *pair],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"weightavg info: error: {flag} {der} is not PEM (no '-----BEGIN' line): give the PEM file, not DER or "
        "another format"
    )


@pytest.mark.parametrize("command", ["health", "info"])
def test_a_tls_file_that_cannot_be_read_is_one_line_not_a_traceback(
    command: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "absent.pem"
    code, out, err = run_main([command, "127.0.0.1:1", "--tls-ca", str(missing)], capsys)
    assert (code, out) == (1, "")
    assert err == f"weightavg {command}: [Errno 2] No such file or directory: '{missing}'\n"


@pytest.mark.parametrize("given", ["--client-cert", "--client-key"])
def test_a_client_certificate_without_its_key_is_refused_not_a_crash(given: str, tmp_path: Path) -> None:
    """gRPC's C core aborted the process (SIGABRT, a core dump) on either of the pair alone, in the
    command and in any program making such a Client (found by review). Real processes: an abort
    would end the test run itself."""
    pem = tmp_path / "one.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "weightavg"), "info", "127.0.0.1:1", given, str(pem)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "weightavg info: error: --client-cert and --client-key go together: give both or neither"
    )
    keyword = given.removeprefix("--").replace("-", "_")
    library = subprocess.run(
        [sys.executable, "-c", f"from weightavg import Client\nClient('127.0.0.1:1', {keyword}={str(pem)!r})"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert library.returncode == 1 and library.stderr.splitlines()[-1] == (
        "ValueError: client_cert and client_key go together: give both (the certificate and its key) or neither"
    ), library.stderr


def test_an_address_with_a_bad_port_is_refused_and_one_without_gets_the_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run_main(["stats", "localhost:http"], capsys)
    assert code == 2 and err.endswith(
        "weightavg stats: error: argument address: address 'localhost:http': the port must be a number from 1 "
        "to 65535, e.g. 'localhost:50051'\n"
    )
    code, _, err = run_main(["info", "127.0.0.1", "--timeout", "5"], capsys)
    assert code == 1 and "(could not reach 127.0.0.1:50051 over plaintext" in err  # never gRPC's 443


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "1e300", "soon"])
def test_a_timeout_grpc_cannot_wait_is_refused_not_sent(
    live_server: LiveServer, timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each was sent as given, and grpc answered DEADLINE_EXCEEDED at once, as if the server were too
    slow (0 waited without a deadline); found by review."""
    code, out, err = run_main(["health", live_server.address, "--timeout", timeout], capsys)
    assert (code, out) == (2, "")
    assert err.splitlines()[-1].startswith("weightavg health: error: argument --timeout: ")
    assert "Deadline" not in err
    code, out, _ = run_main(["health", live_server.address, "--timeout", "1e9"], capsys)  # the longest: served
    assert (code, out) == (0, "SERVING\n")


@pytest.mark.parametrize("token", ["s3cret-token-0123456789\n", "sécret-token-0123456789", " s3cret-token-0123456789"])
def test_a_token_grpc_metadata_cannot_carry_is_refused_without_showing_it(
    live_server: LiveServer, token: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It failed as "INTERNAL: Invalid metadata" under a line of grpc's log (found by review); from the
    variable as from the flag, and the message never shows it."""
    for argv, env in ((["--token", token], None), ([], token)):
        if env is None:
            monkeypatch.delenv("WEIGHTAVG_TOKEN", raising=False)
        else:
            monkeypatch.setenv("WEIGHTAVG_TOKEN", env)
        code, out, err = run_main(["info", live_server.address, *argv], capsys)
        assert (code, out) == (2, "")
        assert "gRPC metadata cannot carry" in err and "INTERNAL" not in err
        assert token.strip() not in err


# -- the real process: serve, metrics, logs, SIGTERM -----------------------------------------------


@pytest.fixture
def served() -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """`weightavg serve` as a child process on free ports: (process, gRPC address, metrics URL)."""
    env = dict(os.environ, WEIGHTAVG_LOG_LEVEL="DEBUG", WEIGHTAVG_METRICS_PORT="0")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "weightavg"), "serve", "--port", "0", "--device", "cpu",
         "--grace-seconds", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip().removeprefix("weightavg serving on ")
        metrics = process.stdout.readline().strip().removeprefix("weightavg metrics on ")
        yield process, address, metrics
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_serve_process_drains_on_sigterm_reporting_not_serving(
    served: tuple[subprocess.Popen[str], str, str],
) -> None:
    import urllib.request

    process, address, metrics_url = served
    assert address.startswith("127.0.0.1:") and metrics_url.startswith("http://127.0.0.1:")
    health_cli = subprocess.run(
        [str(Path(sys.executable).parent / "weightavg"), "health", address],
        capture_output=True, text=True, timeout=120,
    )
    assert (health_cli.returncode, health_cli.stdout) == (0, "SERVING\n")
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        assert 'weightavg_rpc_handled_total{code="OK",method="Check",service="grpc.health.v1.Health"} 1.0' in (
            response.read().decode()
        )
    with grpc.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        # The open Watch stream sees the drain: the server says NOT_SERVING before it goes.
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # the last in-flight call; the server may now stop before its grace ends
    assert process.wait(timeout=120) == 0
    _, err = process.communicate()
    assert "rpc method=/grpc.health.v1.Health/Check code=OK" in err  # WEIGHTAVG_LOG_LEVEL=DEBUG took effect
    assert "stopping: draining" in err
    # the start-up line says which kernels average and merge
    assert f"CPU averages on {lerp.native_state()}, CPU merges on {weighted_sum.native_state()}" in err
    with pytest.raises(grpc.RpcError) as info, grpc.insecure_channel(address) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@pytest.mark.parametrize("flag, message", [("--port", "could not bind"), ("--metrics-port", "cannot serve metrics")])
def test_serve_on_a_taken_port_exits_with_a_message(flag: str, message: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = ["--port", "0", "--metrics-port", "-1", "--device", "cpu", flag, str(taken.getsockname()[1])]
        result = subprocess.run(
            [str(Path(sys.executable).parent / "weightavg"), "serve", *args],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )
    assert result.returncode == 1
    assert f"weightavg serve: {message}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("env, message", [
    ({"WEIGHTAVG_PORT": "abc"}, "WEIGHTAVG_PORT='abc' is not a valid int"),
    # found by review: "is not a valid bool", naming no value that is
    ({"WEIGHTAVG_ALLOW_SHM": "maybe"}, "WEIGHTAVG_ALLOW_SHM='maybe' is not a switch: use 1 or 0 (or true/false, yes/no, on/off)"),
    # found by review: logging's "Unknown level: 'LOUD'", naming neither the flag nor a level it takes
    ({"WEIGHTAVG_LOG_LEVEL": "loud"}, "--log-level must be DEBUG, INFO, WARNING, ERROR or CRITICAL; got 'loud'"),
    # sizes take units (tests/test_cli_sizes.py); a negative one is refused as it is read
    ({"WEIGHTAVG_PINNED_CACHE_BYTES": "-1"}, "WEIGHTAVG_PINNED_CACHE_BYTES='-1' is negative; give a whole number of "
     "bytes, optionally with a unit: K, M, G, T or KiB, MiB, GiB, TiB (powers of 1024), KB, MB, GB, TB (powers of "
     "1000), any case, e.g. 67108864, 64MiB, 64M, 1.5GiB, 500MB"),
    ({"WEIGHTAVG_MAX_LOCKED_BYTES": "0.3K"}, "WEIGHTAVG_MAX_LOCKED_BYTES='0.3K' is 307.2 bytes, not a whole number; "
     "give a whole number of bytes, optionally with a unit: K, M, G, T or KiB, MiB, GiB, TiB (powers of 1024), KB, "
     "MB, GB, TB (powers of 1000), any case, e.g. 67108864, 64MiB, 64M, 1.5GiB, 500MB"),
    # found by review: -5 served on 65531; a device that does not exist printed a traceback
    ({"WEIGHTAVG_METRICS_PORT": "-5"}, "the metrics port must be -1 (off) or 0 to 65535 (0 picks a free one), not -5"),
    # torch's own message listed twenty device types, of which the server takes two
    ({"WEIGHTAVG_DEVICE": "nonsense"}, "--device nonsense: unknown device 'nonsense'; use cpu, cuda or cuda:N, or auto "
     "(CUDA when there is one, else the CPU)"),
    # found by review: every fetch INTERNAL; no periodic snapshot (a traceback in its thread); no session at all
    ({"WEIGHTAVG_CHUNK_BYTES": "0"}, "--chunk-bytes must be a whole number from 1 to 2147483647; got 0"),
    ({"WEIGHTAVG_SNAPSHOT_EVERY": "inf"}, "--snapshot-every must be a number of seconds, 0 or more, at most "
     "9.22337e+09; got inf"),
    ({"WEIGHTAVG_MAX_SESSION_LEASE_SECONDS": "30"}, "--session-lease-seconds (60) is longer than "
     "--max-session-lease-seconds (30): every session asking for the default would be refused"),
    # found by review: served, refusing every call, while each client failed with INTERNAL: Invalid metadata
    ({"WEIGHTAVG_TOKEN": "a-token-long-enough-1\n"}, "--token (WEIGHTAVG_TOKEN) has surrounding spaces or a character "
     "other than printable ASCII: no client could send it, so every call would be refused; is it the whole token and "
     "only it?"),
    ({"WEIGHTAVG_AUDIT_LOG": "/nonexistent/dir/audit.log"},  # found by review: a traceback
     "cannot open the audit log /nonexistent/dir/audit.log: No such file or directory"),
])
def test_serve_with_a_bad_setting_exits_with_a_message(env: dict[str, str], message: str) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "weightavg"), "serve", "--port", "0"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ, **env),
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"weightavg serve: {message}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
@pytest.mark.parametrize("device, problem", [
    ("cuda", f"device 'cuda' requested but this server has no CUDA device (torch {torch.__version__} is built "
     "without CUDA); use cpu" if torch.version.cuda is None else "requested but this server has no CUDA device ("),
    ("cuda:0", "device 'cuda:0' requested but this server has no CUDA device ("),
    ("cuda:x", "unknown device 'cuda:x'; use cpu, cuda or cuda:N"),
    ("gpu", "unknown device 'gpu'; use cpu, cuda or cuda:N"),
])
def test_serve_on_a_device_this_machine_lacks_is_one_line_naming_the_flag_and_the_fix(
    device: str, problem: str, tmp_path: Path,
) -> None:
    """The message named no flag ("device 'cuda' requested but this server has no CUDA device"), and
    came after the state directory was made; under torchrun a device that was not one served anyway,
    on the GPUs or the CPU (found by review)."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "weightavg"), "serve", "--port", "0", "--device", device,
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"weightavg serve: --device {device}: {problem}"), result.stderr
    assert result.stderr.rstrip().endswith(", or auto (CUDA when there is one, else the CPU)")
    assert not (tmp_path / "state").exists()  # refused before anything was made


@pytest.mark.parametrize("setting, value, message", [
    ("chunk_bytes", 0, "--chunk-bytes must be a whole number from 1"),  # every fetch: INTERNAL
    ("chunk_bytes", -1, "--chunk-bytes must be a whole number from 1"),  # fetches answered with no entries
    ("max_message_bytes", -1, "--max-message-bytes must be a whole number from 1"),  # every call refused
    ("max_message_bytes", 1 << 31, "--max-message-bytes must be a whole number from 1 to 2147483647"),
    ("max_workers", 0, "--max-workers must be a whole number from 1"),
    ("max_spec_depth", -1, "--max-spec-depth must be a whole number from 1"),
    # every fetch of a tensor over the message cap: RESOURCE_EXHAUSTED, "Sent message larger than max"
    ("max_message_bytes", 1 << 20, "--chunk-bytes (4194304) leaves no room in --max-message-bytes (1048576) for a "
     "chunk's name and shape (1024 bytes): every tensor the server sends in chunks would be refused; give "
     "--chunk-bytes 1047552 or less"),
    ("max_message_bytes", 1000, "raise --max-message-bytes above 1024"),
    ("max_upload_bytes", -1, "--max-upload-bytes must be 0 or more; got -1"),  # every upload refused
    ("max_device_bytes", -1, "--max-device-bytes must be 0 or more; got -1"),  # silently no cap
    ("max_handles", -1, "--max-handles must be 0 or more; got -1"),
    ("max_sessions", -1, "--max-sessions must be 0 or more; got -1"),
    ("grace_seconds", -5.0, "--grace-seconds must be a number of seconds, 0 or more"),
    ("grace_seconds", float("nan"), "--grace-seconds must be a number of seconds, 0 or more"),
    ("snapshot_every", float("inf"), "--snapshot-every must be a number of seconds, 0 or more"),
    ("snapshot_every", -1.0, "--snapshot-every must be a number of seconds, 0 or more"),
    ("snapshot_every", 60.0, "--snapshot-every needs --state-dir"),  # silently no snapshot at all
    ("metrics_host", "0.0.0.0", "--metrics-host needs --metrics-port"),  # silently no metrics at all
    ("session_lease_seconds", -5.0, "--session-lease-seconds must be a number of seconds, more than 0"),
    ("max_session_lease_seconds", 30.0, "--session-lease-seconds (60) is longer than --max-session-lease-seconds"),
    ("keepalive_time_seconds", 0.0, "--keepalive-time-seconds must be a number of seconds, more than 0"),
    ("keepalive_timeout_seconds", 1e12, "--keepalive-timeout-seconds must be a number of seconds, more than 0, at most"),
    ("cluster_timeout_seconds", float("nan"), "--cluster-timeout-seconds must be a number of seconds, more than 0"),
    # the host cache refused it only as it was configured, naming no flag ("idle time must be positive")
    ("host_cache_idle_seconds", 0.0, "--host-cache-idle-seconds must be a number of seconds, more than 0"),
    # every spec refused as having "more than 0 (-1) layers"; GetServerInfo INTERNAL past int64
    ("max_spec_layers", 0, "--max-spec-layers must be a whole number from 1 to 2147483647; got 0"),
    ("max_spec_layers", -1, "--max-spec-layers must be a whole number from 1 to 2147483647; got -1"),
    ("max_spec_layers", 2**63, "--max-spec-layers must be a whole number from 1 to 2147483647"),
    # refused by the store without naming a flag, and under torchrun by rank 0 alone after the ranks met
    ("max_request_ids", -1, "--max-request-ids must be 0 or more; got -1"),
    ("max_request_id_bytes", -1, "--max-request-id-bytes must be 0 or more; got -1"),
    ("request_id_window_seconds", float("nan"), "--request-id-window-seconds must be a number of seconds, 0 or more"),
    ("request_id_window_seconds", -1.0, "--request-id-window-seconds must be a number of seconds, 0 or more"),
])
def test_a_setting_no_server_can_run_with_is_refused_naming_its_flag(setting: str, value: float, message: str) -> None:
    """Each of these started a server that failed later, or never applied its cap (found by review)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        create_server(ServerConfig(host="127.0.0.1", port=0, device="cpu", **{setting: value}))


def test_chunks_as_large_as_the_setting_allows_fetch_a_tensor_over_the_message_cap(start_server) -> None:  # type: ignore[no-untyped-def]
    """The largest --chunk-bytes the check lets through for a message cap still sends every chunk; one
    byte short of the header room, 4 KiB chunks under a 4 KiB cap, failed every fetch (found by review)."""
    import numpy as np

    from weightavg_server.ops.config import CHUNK_HEADER_ROOM

    cap = 8192
    server = start_server(max_message_bytes=cap, chunk_bytes=cap - CHUNK_HEADER_ROOM)
    with Client(server.address, timeout=60, chunk_bytes=1024, session=True) as c:
        values = np.arange(10_000, dtype=np.float32)  # 40 KB: five chunks of the server's
        named = "layer." * 100 + "weight"  # a 606-character name rides in the header chunk
        assert np.array_equal(c.dict(c.dict({named: values}), named), values)


def test_a_setting_at_its_limit_still_serves() -> None:
    server, _, _ = create_server(ServerConfig(
        host="127.0.0.1", port=0, device="cpu", chunk_bytes=1, max_message_bytes=2**31 - 1, max_workers=1,
        max_upload_bytes=0, max_device_bytes=0, max_handles=0, max_sessions=0, grace_seconds=0.0, snapshot_every=0.0,
        session_lease_seconds=1.0, max_session_lease_seconds=1.0, keepalive_time_seconds=2147483.0,
    ))
    server.stop(None)


def test_a_tls_key_that_is_not_pem_is_named_not_taken_for_a_port_in_use(tmp_path: Path) -> None:
    """grpc only says that it could not serve: the message was "could not bind 127.0.0.1:0 (in use?)"
    for a key that is not PEM (found by review)."""
    garbage = tmp_path / "not.pem"
    garbage.write_text("not a certificate\n")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "weightavg"), "serve", "--port", "0", "--device", "cpu",
         "--tls-cert", str(garbage), "--tls-key", str(garbage)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "weightavg serve: could not bind 127.0.0.1:0: the port is in use, or the host is not an address of this "
        "machine, or --tls-cert/--tls-key are not a PEM certificate chain and its PEM private key"
    )


@pytest.mark.parametrize("port", [-5, 65536])
def test_a_port_outside_0_to_65535_is_refused(port: int) -> None:
    """grpc bound -5 as port 65531 (found by review)."""
    from weightavg_server.ops.app import create_server
    from weightavg_server.ops.config import ServerConfig

    with pytest.raises(ValueError, match=f"the port must be 0 to 65535 \\(0 picks a free one\\), not {port}"):
        create_server(ServerConfig(host="127.0.0.1", port=port, device="cpu"))



def test_a_bad_port_or_tls_file_is_refused_before_the_state_directory_is_made_or_restored(
    state_server, tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """The ports were checked, and the TLS files read, only after the state directory had been made
    and its snapshot restored (minutes for a large one), and under torchrun on rank 0 alone after
    the ranks met (found by review)."""
    serve = [str(Path(sys.executable).parent / "weightavg"), "serve", "--device", "cpu"]
    for flag, port in [("--port", "70000"), ("--metrics-port", "-5")]:
        fresh = tmp_path / f"state{flag}"
        result = subprocess.run([*serve, "--port", "0", flag, port, "--state-dir", str(fresh)],
                                capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert result.returncode == 1 and "port must be" in result.stderr, result.stderr
        assert not fresh.exists()
    with Client(f"127.0.0.1:{state_server.port}") as c:
        c.dict({"w": 1.0})
        c.snapshot()
    missing = str(tmp_path / "missing.pem")
    result = subprocess.run(
        [*serve, "--port", "0", "--state-dir", state_server.config.state_dir, "--tls-cert", missing, "--tls-key", missing],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 1 and "restored" not in result.stderr, result.stderr
    assert result.stderr.strip() == f"weightavg serve: cannot read TLS key {missing}: No such file or directory"



def test_ctrl_c_stops_a_command_with_one_line_and_status_130(tmp_path: Path) -> None:
    """Ctrl-C on a client command waiting for its answer, or on `serve` before it serves (importing
    torch, restoring a snapshot), printed a traceback (found by review). Each waits on something the
    test holds, so the signal lands mid-command without a sleep: a port that accepts connections
    but never answers, and a tokens file that is a pipe no one has written yet."""
    import socket

    weightavg = str(Path(sys.executable).parent / "weightavg")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(120)
        command = subprocess.Popen([weightavg, "info", f"127.0.0.1:{silent.getsockname()[1]}", "--timeout", "300"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        connection, _ = silent.accept()  # the command is in its call
        command.send_signal(signal.SIGINT)
        out, err = command.communicate(timeout=120)
        connection.close()
    assert (command.returncode, out, err) == (130, "", "weightavg info: interrupted\n")

    pipe = tmp_path / "tokens.toml"
    os.mkfifo(pipe, 0o600)
    for serve in ([weightavg, "serve"], [sys.executable, "-m", "weightavg_server"]):
        server = subprocess.Popen([*serve, "--port", "0", "--device", "cpu", "--tokens", str(pipe)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        with open(pipe, "w"):  # returns once the server opened it: it is starting, blocked reading its tokens
            server.send_signal(signal.SIGINT)
            out, err = server.communicate(timeout=120)
        assert (server.returncode, out) == (130, ""), err
        assert err.strip().splitlines()[-1] == "weightavg serve: interrupted" and "Traceback" not in err



def test_a_sighup_while_the_server_starts_is_kept_for_when_it_serves(tmp_path: Path) -> None:
    """SIGHUP's default action ended a server that was still starting (restoring its snapshot, say),
    without a word (found by review); it rereads the tokens once it serves. The tokens file is a
    pipe: the signal lands while the server waits to read it, and the reload is seen reading it again."""
    pipe = tmp_path / "tokens.toml"
    os.mkfifo(pipe, 0o600)
    tokens = '[[tokens]]\ntoken = "a-token-long-enough-1"\ntenant = "t"\nrole = "admin"\n'
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "weightavg"), "serve", "--port", "0", "--device", "cpu", "--tokens", str(pipe)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        with open(pipe, "w") as start:  # returns once the server opened it: it is starting
            server.send_signal(signal.SIGHUP)
            start.write(tokens)
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("weightavg serving on "), server.communicate(timeout=60)
        with open(pipe, "w") as reload:  # returns once the server opens it again: the SIGHUP's reload
            reload.write(tokens)
        with Client(line.split()[-1], token="a-token-long-enough-1") as c:
            c.ping()
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, err
    assert "tokens reloaded from" in err and "Traceback" not in err


TORCH_GATE = """
import os, sys

class _TorchGate:
    \"\"\"Holds the first import of torch until the test closes the pipe at $WEIGHTAVG_TEST_TORCH_GATE.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            with open(os.environ["WEIGHTAVG_TEST_TORCH_GATE"]) as gate:
                gate.read()
        return None

sys.meta_path.insert(0, _TorchGate())
"""
"""A sitecustomize for the server process: its import of torch waits on a pipe the test holds."""


@pytest.mark.parametrize("serve", [["weightavg", "serve"], ["python", "-m", "weightavg_server"]])
def test_a_sighup_while_torch_loads_is_kept_for_when_the_server_serves(serve: list[str], tmp_path: Path) -> None:
    """SIGHUP was kept only from serve() on, after torch's import: one sent right after the start
    ended the process without a word (found by review). The server's import of torch is held on a
    pipe, so the signal lands inside it without a sleep; the kept SIGHUP's reload logs its line."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(TORCH_GATE)
    gate = tmp_path / "gate"
    os.mkfifo(gate, 0o600)
    path = os.pathsep.join([str(hook), str(ROOT / "client"), str(ROOT / "server"), os.environ.get("PYTHONPATH", "")])
    command = [str(Path(sys.executable).parent / serve[0]), *serve[1:]]
    server = subprocess.Popen(
        [*command, "--port", "0", "--device", "cpu", "--metrics-port", "-1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=path, WEIGHTAVG_TEST_TORCH_GATE=str(gate)),
    )
    try:
        with open(gate, "w"):  # returns once the server opened it: it is importing torch
            server.send_signal(signal.SIGHUP)
        assert server.stdout is not None and server.stderr is not None
        line = server.stdout.readline()
        assert line.startswith("weightavg serving on "), (server.wait(60), server.stderr.read())
        for logged in server.stderr:  # the kept SIGHUP's reload, once the server serves (no --tokens here)
            if "SIGHUP: no --tokens file to reload" in logged:
                break
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0 and "Traceback" not in err, err


def test_serve_raises_its_open_files_limit_to_the_hard_limit() -> None:
    """Connections and shared memory regions take descriptors; the usual soft limit of 1024 is low
    for a server, and a client's regions could take them all (docs/security.md)."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    process = subprocess.Popen(
        with_limits([str(Path(sys.executable).parent / "weightavg"), "serve", "--port", "0", "--device", "cpu"],
                    open_files=low),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        line = process.stdout.readline()
        assert line.startswith("weightavg serving on "), (line, process.poll(), process.stderr.read() if process.poll() is not None else "")
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        soft_now = next(line.split()[3] for line in limits.splitlines() if line.startswith("Max open files"))
        assert soft_now == ("unlimited" if hard == resource.RLIM_INFINITY else str(hard))
    finally:
        process.kill()
        process.wait()


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this host has no IPv6 loopback")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_host_serves_prints_addresses_that_work_and_is_loopback(host: str) -> None:
    """`--host ::1` could not bind (gRPC read "::1:0" as ::0.1.0.0 on port 443); `[::1]` bound, was
    warned about as an open interface and could not serve metrics (found by review)."""
    import urllib.request

    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "weightavg"), "serve", "--host", host, "--port", "0", "--device", "cpu",
         "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip().removeprefix("weightavg serving on ")
        url = process.stdout.readline().strip().removeprefix("weightavg metrics on ")
        assert re.fullmatch(r"\[::1\]:\d+", address) and re.fullmatch(r"http://\[::1\]:\d+/metrics", url), (address, url)
        assert subprocess.run(
            [str(Path(sys.executable).parent / "weightavg"), "health", address], capture_output=True, text=True,
            timeout=60, cwd=ROOT,
        ).stdout == "SERVING\n"
        with urllib.request.urlopen(url, timeout=30) as reply:
            assert b"weightavg_build_info" in reply.read()
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "WARNING" not in err  # loopback: neither the API nor the metrics are warned about


def test_the_metrics_endpoint_can_stay_on_a_trusted_interface() -> None:
    """/metrics has no token: a server on 0.0.0.0 showed every tenant's name and bytes to the
    network (found by review). --metrics-host binds it elsewhere."""
    import urllib.request

    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "weightavg"), "serve", "--host", "0.0.0.0", "--port", "0", "--device", "cpu",
         "--metrics-port", "0", "--metrics-host", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("weightavg serving on 0.0.0.0:")
        url = process.stdout.readline().strip().removeprefix("weightavg metrics on ")
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        with urllib.request.urlopen(url, timeout=30) as response:
            assert b"weightavg_" in response.read()
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("metrics_host, warned", [("", True), ("0.0.0.0", True), ("127.0.0.1", False)])
def test_metrics_open_to_the_network_are_warned_about_even_with_a_token(metrics_host: str, warned: bool) -> None:
    """A server with a token on 0.0.0.0 served every tenant's name and bytes on its metrics port without
    a word, where a gRPC port open with no token is warned about (found by review)."""
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "weightavg"), "serve", "--host", "0.0.0.0", "--port", "0", "--device", "cpu",
         "--metrics-port", "0", "--metrics-host", metrics_host],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=dict(os.environ, WEIGHTAVG_TOKEN="a-token-long-enough-1"),
    )
    try:
        assert process.stdout is not None and process.stdout.readline().startswith("weightavg serving on ")
        assert process.stdout.readline().startswith("weightavg metrics on ")
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert ("have no token: whoever reaches that port reads every tenant's name" in err) is warned, err
    assert "a-token-long-enough-1" not in err


def test_a_burst_of_signals_still_drains_snapshots_and_exits(tmp_path: Path) -> None:
    """The handlers called Event.set() and reloaded the tokens file, taking locks inside a signal
    handler: a signal that arrived while another's handler held such a lock ran its handler on the
    same thread, which waited for that lock forever. SIGTERMs sent at once (a wrapper and the
    process group, `kill` twice) hung the server without its shutdown snapshot (found by review).
    Now the handlers only record what arrived, and the main thread acts on it."""
    import time

    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[tokens]]\ntoken = "a-token-long-enough-1"\ntenant = "a"\nrole = "admin"\n')
    for trial in range(3):  # each burst hung the unfixed server about one time in three
        state = tmp_path / f"state-{trial}"
        process = subprocess.Popen(
            [sys.executable, "-m", "weightavg_server", "--port", "0", "--device", "cpu", "--tokens", str(tokens),
             "--state-dir", str(state), "--grace-seconds", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        try:
            assert process.stdout is not None and process.stdout.readline().startswith("weightavg serving on ")
            for sig, seconds in ((signal.SIGHUP, 0.3), (signal.SIGTERM, 0.5)):
                end = time.monotonic() + seconds
                while time.monotonic() < end and process.poll() is None:
                    try:
                        process.send_signal(sig)
                    except ProcessLookupError:
                        break
            _, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 0, err[-2000:]
        assert "saved 0 handle(s)" in err and (state / "manifest.json").exists()


def test_a_tokens_file_every_user_can_read_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Plain tokens in a file other users of the host can read lend them every tenant's access; the
    server read such a file without a word (found by review). Digests alone are no secret."""
    import hashlib
    import logging

    from weightavg_server.ops.tokens import load_tokens

    plain = tmp_path / "tokens.toml"
    plain.write_text('[[tokens]]\ntoken = "a-token-long-enough-1"\ntenant = "a"\nrole = "user"\n')
    digest = tmp_path / "digests.toml"
    digest.write_text(f'[[tokens]]\nsha256 = "{hashlib.sha256(b"a-token-long-enough-1").hexdigest()}"\n'
                      'tenant = "a"\nrole = "user"\n')
    warnings = []
    for path, mode in ((plain, 0o644), (plain, 0o600), (plain, 0o640), (digest, 0o644)):
        path.chmod(mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="weightavg.server"):
            load_tokens(path)
        warnings.append([r.getMessage() for r in caplog.records])
    assert warnings[0] == [
        f"the tokens file {plain} is readable by every user of this host (mode 0644): anyone here can read its "
        f"tokens; chmod o-r {plain} (or 0600), or list the tokens by their sha256 instead"
    ]
    assert warnings[1:] == [[], [], []]


def test_a_tokens_file_every_user_can_write_is_refused_at_start_and_on_sighup(tmp_path: Path) -> None:
    """Anyone on the host could add an admin token of their own to it, digests or plain tokens, and
    the server took it at the next start or SIGHUP (found by review)."""
    from weightavg_server.ops.app import create_runtime
    from weightavg_server.ops.tokens import TokensFileError

    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[tokens]]\ntoken = "a-token-long-enough-1"\ntenant = "a"\nrole = "user"\n')
    tokens.chmod(0o666)
    config = ServerConfig(host="127.0.0.1", port=0, device="cpu", tokens=str(tokens))
    refusal = f"the tokens file {tokens} is writable by every user of this host (mode 0666)"
    with pytest.raises(TokensFileError, match=re.escape(refusal)):
        create_runtime(config)
    tokens.chmod(0o644)
    runtime = create_runtime(config)
    runtime.start()
    try:
        tokens.write_text('[[tokens]]\ntoken = "an-intruders-token-01"\ntenant = "a"\nrole = "admin"\n')
        tokens.chmod(0o646)
        assert runtime.reload_tokens() is False  # the tokens in force stay
        with Client(f"127.0.0.1:{runtime.port}", token="an-intruders-token-01", timeout=30) as c:
            with pytest.raises(UnauthenticatedError):
                c.info()
        with Client(f"127.0.0.1:{runtime.port}", token="a-token-long-enough-1", timeout=30) as c:
            assert c.info()["device"] == "cpu"
    finally:
        runtime.stop(None)


def test_a_sighup_whose_reload_fails_keeps_serving_and_the_shutdown_snapshot(tmp_path: Path) -> None:
    """A tokens file of arrays nested thousands deep raised RecursionError out of the reload and ended
    the server with a traceback, without its shutdown snapshot (found by review): refused like any
    bad file, the tokens in force stay, and SIGTERM still saves every handle."""
    token = "a-token-long-enough-1"
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [{"token": token, "tenant": "a", "role": "admin"}]}))
    tokens.chmod(0o600)
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "weightavg"), "serve", "--port", "0", "--device", "cpu",
         "--tokens", str(tokens), "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=dict(os.environ, WEIGHTAVG_METRICS_PORT="-1"),
    )
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip().removeprefix("weightavg serving on ")
        with Client(address, timeout=60, token=token) as c:
            c.module(["linear", 2, 1])
            tokens.write_text('{"tokens": ' + "[" * 100_000 + "]" * 100_000 + "}")
            process.send_signal(signal.SIGHUP)
            assert process.stderr is not None
            seen = []  # the server's log up to the reload's outcome, before SIGTERM may overtake it
            while not seen or not any(mark in seen[-1] for mark in ("nest too deeply", "Traceback")):
                line = process.stderr.readline()
                assert line, "".join(seen)  # the server ended
                seen.append(line)
            assert "tokens file not reloaded, the tokens in force stay" in seen[-1], "".join(seen)
            assert len(c.handles()) == 1  # served on, with the tokens in force
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "Traceback" not in err and "saved 1 handle(s)" in err


def test_an_audit_log_the_server_creates_is_its_users_alone(tmp_path: Path) -> None:
    """Each audit line names a tenant, its handles and the caller's address; the file was created
    0644, readable by every user of the host (found by review). One that exists keeps its mode."""
    from weightavg_server.ops import cli

    created, existing = tmp_path / "audit.jsonl", tmp_path / "kept.jsonl"
    existing.write_text("")
    existing.chmod(0o640)
    audit = logging.getLogger(cli.AUDIT_LOGGER)
    before = list(audit.handlers), audit.propagate
    old = os.umask(0o022)
    try:
        for path in (created, existing):
            cli.audit_to_file(str(path))
    finally:
        os.umask(old)
        for handler in audit.handlers[len(before[0]):]:
            handler.close()
        audit.handlers[:] = before[0]
        audit.propagate = before[1]
    assert (created.stat().st_mode & 0o777, existing.stat().st_mode & 0o777) == (0o600, 0o640)


def test_an_audit_log_moved_away_by_a_rotation_is_made_again_its_users_alone(tmp_path: Path) -> None:
    """logrotate renames the file and expects the next line in a new one at the path: the server kept
    writing the renamed file, so the trail went wherever rotation sent it and, at the last rotation,
    was deleted (found by review). The new file is 0600 as the first was."""
    audit = tmp_path / "audit.jsonl"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "weightavg"), "serve", "--port", "0", "--device", "cpu",
         "--audit-log", str(audit)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
        env=dict(os.environ, WEIGHTAVG_METRICS_PORT="-1"),
    )
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip().removeprefix("weightavg serving on ")
        with Client(address, timeout=60) as c:
            c.free(c.module(["linear", 2, 1]))
            audit.rename(tmp_path / "audit.jsonl.1")  # as logrotate does, without copytruncate
            c.free(c.module(["linear", 3, 1]))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    rotated = [json.loads(line)["method"] for line in (tmp_path / "audit.jsonl.1").read_text().splitlines()]
    assert rotated == ["CreateModule", "FreeHandles"]
    assert [json.loads(line)["method"] for line in audit.read_text().splitlines()] == ["CreateModule", "FreeHandles"]
    assert audit.stat().st_mode & 0o777 == 0o600


def test_an_audit_log_that_cannot_be_written_is_one_error_line_and_the_calls_go_on(tmp_path: Path) -> None:
    """A full disk under --audit-log printed logging's 40-line "--- Logging error ---" traceback on
    stderr for every changing call (found by review). Now: one ERROR line, every call served, and
    once lines can be written again (here: logrotate moved the full file away) one line saying how
    many could not be. The disk is full as far as the server knows: files may not grow past 1000
    bytes (RLIMIT_FSIZE; a write past it fails with EFBIG, as a full disk's with ENOSPC)."""
    audit = tmp_path / "audit.jsonl"
    process = subprocess.Popen(
        with_limits([str(Path(sys.executable).parent / "weightavg"), "serve", "--port", "0", "--device", "cpu",
                     "--audit-log", str(audit)], file_bytes=1000),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=dict(os.environ, WEIGHTAVG_METRICS_PORT="-1"),
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("weightavg serving on "), (line, process.communicate(timeout=60)[1][-4000:])
        address = line.strip().removeprefix("weightavg serving on ")
        with Client(address, timeout=60) as c:
            for _ in range(6):  # about 260 bytes a line: the fourth and later cannot be written
                c.free(c.module(["linear", 2, 1]))
            audit.rename(tmp_path / "audit.jsonl.1")
            c.free(c.module(["linear", 3, 1]))
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "Logging error" not in err and "Traceback" not in err, err
    failed = [line for line in err.splitlines() if "cannot write an audit line" in line]
    assert len(failed) == 1 and f"ERROR weightavg.server audit log {audit}: cannot write an audit line (File too " \
        "large); the calls go on" in failed[0], err
    again = [line for line in err.splitlines() if "written again" in line]
    assert len(again) == 1 and re.search(r"written again; [1-9][0-9]* line\(s\) before this one could not be", again[0])
    assert [json.loads(line)["method"] for line in audit.read_text().splitlines()] == ["CreateModule", "FreeHandles"]


def test_sighup_for_a_cluster_goes_to_the_pid_rank_0_names_and_the_cluster_serves_on(tmp_path: Path) -> None:
    """torchrun takes SIGHUP as a stop: `kill -HUP <torchrun>` ended every rank without a snapshot
    (found by review). Rank 0 names its pid in its start line, where SIGHUP rereads the tokens file."""
    import time

    from conftest import Cluster

    admin, later = "admin-token-long-enough", "a-later-token-long-enough"
    tokens = tmp_path / "tokens.toml"
    entry = '[[tokens]]\ntoken = "{}"\ntenant = "default"\nrole = "admin"\n'
    tokens.write_text(entry.format(admin))
    tokens.chmod(0o600)
    cluster = Cluster(tmp_path, "--tokens", str(tokens))
    try:
        found = re.search(r"weightavg serving on [\d.]+:\d+ \(rank 0 of 2, pid (\d+)\)", cluster.out.read_text())
        assert found, cluster.out.read_text()[-2000:]
        rank0 = int(found.group(1))
        assert rank0 == cluster.rank_pid(0)
        tokens.write_text(entry.format(admin) + entry.format(later))
        os.kill(rank0, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "tokens reloaded" not in cluster.out.read_text():
            assert time.monotonic() < deadline, cluster.out.read_text()[-2000:]
            time.sleep(0.1)
        with Client(cluster.address, token=later, timeout=30) as c:
            assert c.dict(c.dict({"w": [1.0, 2.0]}), "w").tolist() == [1.0, 2.0]
        assert cluster.proc.poll() is None
    finally:
        cluster.stop()
