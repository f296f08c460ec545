"""In-process microbenchmark of the native kernels (no server): the figures docs/perf.md ("Native
lerp", "Averaging across models") quotes. Each timed call follows a 30 ms pause, as in the bench's
`interleaved`; medians of the alternated repeats, in ms.

- lerp over 25.6M float32: one `add_` and torch's `lerp_` on plain tensors, the native lerp on the same
  plain tensors (4 KiB pages) and on flat buffers advised for huge pages (`flat.new_buffer`).
- lerp over many separate tensors (an uploaded dictionary's entries: 160 x 400 x 400, 400 x 64 x 64,
  and the reference's 2-to-1 linear): torch's loop of `lerp_`, the native kernel deciding its batch
  on each call (`lerp.native_lerp_all_`), and running one decided before (`lerp.run`, what a cached
  averaging plan does).
- weighted sum of 8 x 25.6M float32 in 160 entries: torch's loop (`weighted_sum.by_torch` per entry),
  the native kernel per entry on one thread and on the default threads, every (separate) entry in
  one native call (`weighted_sum.native_weighted_sums`, what a merge of uploads does), and one
  native call over the flat spans.

    PYTHONPATH=client:server python -m bench.native_micro [--reps R]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from weightavg_server.domain import flat, lerp, weighted_sum

N = 25_600_000
ENTRIES, WIDTH, INPUTS = 160, 400, 8


def timed(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            time.sleep(0.03)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}


def lerps(reps: int) -> dict[str, float]:
    a, b = torch.randn(N), torch.randn(N)
    key = (torch.device("cpu"), torch.float32)
    ha, hb = flat.new_buffer(N, key), flat.new_buffer(N, key)
    ha.copy_(a)
    hb.copy_(b)
    return timed({
        "add_": lambda: a.add_(b),
        "torch lerp_": lambda: a.lerp_(b, 0.25),
        "native lerp, 4 KiB pages": lambda: lerp.native_lerp_(a, b, 0.25),
        "native lerp, huge pages": lambda: lerp.native_lerp_(ha, hb, 0.25),
    }, reps)


def many(reps: int, shapes: Sequence[tuple[int, ...]]) -> dict[str, float]:
    pairs = [(torch.randn(shape), torch.randn(shape)) for shape in shapes]
    decided = lerp.batch(pairs)
    assert decided is not None and not decided.rest

    def torch_loop() -> None:
        for a, v in pairs:
            a.lerp_(v, 0.25)

    return timed({
        "torch lerp_ loop": torch_loop,
        "native, deciding": lambda: lerp.native_lerp_all_(pairs, 0.25),
        "native, decided": lambda: lerp.run(decided, 0.25),
    }, reps)


def sums(reps: int) -> dict[str, float]:
    weights = [float(w) for w in range(1, INPUTS + 1)]
    total = sum(weights)
    entries = [[torch.randn(WIDTH, WIDTH) for _ in range(ENTRIES)] for _ in range(INPUTS)]
    out = [torch.empty(WIDTH, WIDTH) for _ in range(ENTRIES)]
    spans = [torch.cat([t.reshape(-1) for t in d]) for d in entries]
    out_span = torch.empty(ENTRIES * WIDTH * WIDTH)

    def by_torch() -> None:
        for i, acc in enumerate(out):
            weighted_sum.by_torch(acc, [d[i] for d in entries], weights, total)

    def per_entry(threads: int | None) -> None:
        for i, acc in enumerate(out):
            weighted_sum._run(acc, [d[i] for d in entries], weights, total, threads)

    return timed({
        "torch loop": by_torch,
        "native per entry, one thread": lambda: per_entry(1),
        "native per entry": lambda: per_entry(None),
        "native, every entry in one call": lambda: weighted_sum.native_weighted_sums(
            [(acc, [d[i] for d in entries], total) for i, acc in enumerate(out)], weights),
        "native over the spans": lambda: weighted_sum._run(out_span, spans, weights, total),
    }, reps)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    print(f"lerp kernel: {lerp.native_state()}; sum kernel: {weighted_sum.native_state()}; "
          f"{torch.get_num_threads()} torch threads")
    if lerp.native_state() == "native fused lerp":
        print("lerp, 25.6M float32 (ms):", lerps(args.reps))
        for name, shapes in (
            ("160 x 400 x 400", [(400, 400)] * 160), ("400 x 64 x 64", [(64, 64)] * 400), ("linear 2->1", [(1, 2), (1,)]),
        ):
            print(f"lerp of {name} separate float32 tensors (ms):", many(args.reps, shapes))
    if weighted_sum.active():
        print("weighted sum, 8 x 25.6M float32 in 160 entries (ms):", sums(args.reps))


if __name__ == "__main__":
    main()
