"""In-process microbenchmark of the averaging data path (no server): average_parameters and
ema_update of a flat module into a flat copy, the same on separate allocations (the path before
flat layouts), a bare lerp_ loop, and one add_ over the same bytes; alternated, median of repeats.

    PYTHONPATH=client:server python -m bench.flat_micro [--threads N] [--reps R]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from weightavg_server.domain import averaging, flat, specs
from weightavg_server.domain.dictionaries import TensorDict
from weightavg_server.domain.specs import LayerSpec


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = LayerSpec("sequential", children=tuple(
        LayerSpec("linear", args=(400, 400), options=(("bias", False),)) for _ in range(160)))
    flat_m = flat.build_flat(lambda: specs.build_module(spec, max_depth=10))
    plain_m = specs.build_module(spec, max_depth=10)
    flat_d = averaging.copy_parameters(flat_m)
    plain_d = TensorDict({n: t.detach().clone() for n, t in plain_m.named_parameters()})
    ema_d = averaging.copy_parameters(flat_m)
    params = [q.detach() for q in plain_m.parameters()]
    avgs = [q.clone() for q in params]
    big_a = torch.cat([a.reshape(-1) for a in avgs])
    big_b = torch.cat([q.reshape(-1) for q in params])
    calls = [1]

    def loop() -> None:
        calls[0] += 1
        with torch.no_grad():
            for a, q in zip(avgs, params):
                a.lerp_(q, 1.0 / calls[0])

    cases: dict[str, Callable[[], object]] = {
        "average_parameters flat": lambda: averaging.average_parameters(flat_m, flat_d),
        "average_parameters separate": lambda: averaging.average_parameters(plain_m, plain_d),
        "ema_update flat": lambda: averaging.ema_update(flat_m, ema_d, step=10**6),
        "lerp_ loop": loop,
        "add_": lambda: big_a.add_(big_b),
        "prepare_average flat (checks, cached)": lambda: averaging.prepare_average(flat_m, flat_d),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.reps):
        for name, f in cases.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["lerp_ loop"])
    for name, xs in times.items():
        m = statistics.median(xs)
        print(f"{name:40s} {m * 1e3:9.3f} ms  {m / base:5.2f}x the loop")


if __name__ == "__main__":
    main()
