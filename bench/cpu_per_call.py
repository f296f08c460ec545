"""CPU per avgparms call of the server and the client process, for N clients against one (docs/perf.md,
"Many clients"): the load of other sessions moves calls/s far more than CPU seconds per call.

Run by hand (Linux: reads /proc): .venv/bin/python -m bench.cpu_per_call [--clients 16 1 16 1] [--seconds 3]
Profile the server meanwhile with py-spy: py-spy record -p <the printed pid> -d 5 -r 250 -f raw --gil
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

from .cases import _calls_per_second


def _process_cpu(pid: int) -> float:
    """User plus system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_per_call")
    p.add_argument("--clients", type=int, nargs="+", default=[16, 1, 16, 1])
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as `python -m bench --threads 1` gives the server
    server = subprocess.Popen([sys.executable, "-m", "bench._server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    address = f"127.0.0.1:{int(server.stdout.readline())}"
    print(f"server pid {server.pid}, load average {os.getloadavg()[0]:.2f}", flush=True)
    try:
        _calls_per_second(address, 1, 0.5)  # warm up
        for n in args.clients:
            s0, c0, t0 = _process_cpu(server.pid), _own_cpu(), time.perf_counter()
            rate, errors = _calls_per_second(address, n, args.seconds)
            seconds = time.perf_counter() - t0
            server_cpu, client_cpu = _process_cpu(server.pid) - s0, _own_cpu() - c0
            calls = rate * args.seconds  # the CPU includes each client's set-up: a few calls' worth
            print(f"{n:2d} clients: {rate:6.0f} calls/s, {errors} errors; server {server_cpu / seconds:.2f} cores, "
                  f"{server_cpu / calls * 1e6:4.0f} us a call; client {client_cpu / seconds:.2f} cores, "
                  f"{client_cpu / calls * 1e6:4.0f} us a call", flush=True)
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait()


if __name__ == "__main__":
    main()
