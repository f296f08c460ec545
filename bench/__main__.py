"""`python -m bench [--quick] [--cases a,b] [--plot]`: run the cases, print the table, write JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from weightavg import Client

from . import cases
from ._harness import QUICK_NOTE, Row, Skip, as_json, bench_server, machine, table, unchecked

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller sweeps: about a minute; "
                   "targets are not checked (met is left empty)")
    p.add_argument("--cases", default=",".join(cases.CASES), help=f"comma-separated subset of {','.join(cases.CASES)}")
    p.add_argument("--device", default="cpu", help="server device (cuda for the GPU case)")
    p.add_argument("--threads", type=int, help="torch intra-op threads in this process and the server "
                   "(OMP_NUM_THREADS for the server); default: torch's own choice in each")
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/<time>.json and latest.json)")
    p.add_argument("--plot", type=Path, help="also draw throughput against tensor size to this PNG (needs the sweep case)")
    args = p.parse_args(argv)
    chosen = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in cases.CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {list(cases.CASES)}")

    if args.threads:
        # The same count on both sides: on a loaded 2-vCPU VM two OpenMP threads ran an MLP epoch
        # up to 10x slower than one (docs/perf.md), so mismatched counts would decide the ratios.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server process
        torch.set_num_threads(args.threads)
    started = time.time()
    rows: list[Row | Skip] = []
    sweep: dict[str, list[dict[str, float]]] = {}
    with bench_server(args.device) as address, Client(address, timeout=600) as client:
        channel, raw = cases.raw_client(address)
        ctx = cases.Context(address, args.quick, client, raw, sweep, args.device)
        for name in chosen:
            t0 = time.perf_counter()
            print(f"# {name} ...", file=sys.stderr, flush=True)
            rows.extend(cases.CASES[name](ctx))
            print(f"# {name} took {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        channel.close()
    if args.quick:
        rows = unchecked(rows)

    print(table(rows))
    if args.quick:
        print(f"\n(met left empty: {QUICK_NOTE})")
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "quick": args.quick,
        "threads": args.threads,
        "machine": machine(),
        "rows": as_json(rows),
        "sweep": sweep,
    }
    paths = [args.out] if args.out else [RESULTS / time.strftime("%Y%m%d-%H%M%S.json", time.gmtime(started)),
                                         RESULTS / "latest.json"]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {', '.join(map(str, paths))}", file=sys.stderr)
    if args.plot:
        from .plot import plot

        plot(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
