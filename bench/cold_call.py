"""A small call's server-side cost with the caches empty, in one process (docs/perf.md, "The small
call, a third pass").

Served on a small shared VM, a call finds the caches and the TLB holding nothing of the last one, so
each distinct step it takes costs 5-30 us whatever it does, and latencies swing 1.3-1.6x from run
to run. This runs the server's own handlers (every interceptor, the servicer, the service) in this
process, writes `--evict` MB of memory before each call so that it starts as cold, and prints the
median time of a small `avgparms` (with a request ID, as the client sends it) and of the health
Check: alternated runs of two trees agree to a few percent. `--evict 0` gives the warm figures.

It reaches the handlers through grpc's server object (`_state`): a tool run by hand, for the grpcio
this checkout pins.

Run by hand: PYTHONPATH=client:server .venv/bin/python -m bench.cold_call [--evict 512] [--calls 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from grpc_health.v1 import health_pb2

from weightavg._retry import new_request_id
from weightavg.v1 import weightavg_pb2 as pb
from weightavg_server.ops.app import create_server, set_serving
from weightavg_server.ops.config import ServerConfig

_SERVICE = "/weightavg.v1.WeightAveragingService/"


class _Details:
    """What an interceptor reads of a call before it runs (grpc.HandlerCallDetails)."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata: tuple[tuple[str, str], ...] = ()


class _Context:
    """The parts of grpc.ServicerContext that a successful unary call touches, for a call with no
    metadata from 127.0.0.1."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def is_active(self) -> bool:
        return True

    def time_remaining(self) -> float:
        return 60.0

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return True

    def code(self) -> None:
        return None

    def details(self) -> None:
        return None

    def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")

    def set_code(self, code: Any) -> None:
        pass

    def set_details(self, details: str) -> None:
        pass

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass


def _handler(server: Any, method: str) -> Callable[[Any, Any], Any]:
    """The unary behaviour gRPC would run for `method`, every interceptor around it."""
    state = server._state
    found = state.registered_method_handlers.get(method)

    def continuation(details: _Details) -> Any:
        if found is not None:
            return found
        return next(h for g in state.generic_handlers if (h := g.service(details)) is not None)

    handler = state.interceptor_pipeline.execute(continuation, _Details(method))
    behaviour: Callable[[Any, Any], Any] = handler.unary_unary
    return behaviour


def _median_us(call: Callable[[], Any], junk: np.ndarray, calls: int) -> float:
    times = []
    for _ in range(calls):
        if junk.size:
            np.add(junk, 1.0, out=junk)
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cold_call")
    p.add_argument("--evict", type=int, default=512, help="MB written before each call (0: warm)")
    p.add_argument("--calls", type=int, default=200, help="calls per round")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds; the best median is shown")
    args = p.parse_args()
    server, _, health_servicer = create_server(ServerConfig.from_env(host="127.0.0.1", port=0, device="cpu"))
    set_serving(health_servicer, True)
    context = _Context()
    create, copy = _handler(server, _SERVICE + "CreateModule"), _handler(server, _SERVICE + "CopyParameters")
    average, check = _handler(server, _SERVICE + "AverageParameters"), _handler(server, "/grpc.health.v1.Health/Check")
    spec = pb.LayerSpec(type="linear", args=[pb.OptionValue(int_value=2), pb.OptionValue(int_value=1)])
    module = create(pb.CreateModuleRequest(spec=spec), context).module.id
    dictionary = copy(pb.CopyParametersRequest(handle=module), context).dictionary.id

    def avgparms() -> Any:
        request = pb.AverageParametersRequest(handle=module, dictionary=dictionary, request_id=new_request_id())
        return average(request, context)

    request = health_pb2.HealthCheckRequest()
    calls: dict[str, Callable[[], Any]] = {"avgparms": avgparms, "health Check": lambda: check(request, context)}
    for call in calls.values():
        for _ in range(500):
            call()
    junk = np.ones((args.evict << 20) // 8)
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, call in calls.items():
            best[name] = min(best.get(name, float("inf")), _median_us(call, junk, args.calls))
    print(f"{args.evict} MB written before each call; best of {args.rounds} medians of {args.calls} calls:")
    for name, us in best.items():
        print(f"  {name:13s} {us:8.1f} us")
    print(f"  difference    {best['avgparms'] - best['health Check']:8.1f} us")
    server.stop(None)


if __name__ == "__main__":
    main()
