"""Ratios across saved runs, to tell a real change from this machine's noise.

`python -m bench.summary [results/*.json]` prints, per row, the ratio of every full (non-quick) run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .__main__ import RESULTS


def main(paths: list[str]) -> None:
    files = [Path(p) for p in paths] or sorted(p for p in RESULTS.glob("2*.json"))
    runs = [json.loads(f.read_text()) for f in files]
    runs = [r for r in runs if not r["quick"]]
    ratios: dict[tuple[str, str, str], list[str]] = {}
    for run in runs:
        for row in run["rows"]:
            if row["kind"] == "row":
                key = (row["case"], row["measured"], row["baseline"])
                ratios.setdefault(key, []).append(f"{row['ratio']:.2f}")
    print(f"{len(runs)} full runs: " + ", ".join(f"{r['started']} (load {r['machine']['load_average'][0]:.1f}, threads {r.get('threads') or 'default'})" for r in runs))
    print()
    print("| case | measured | baseline | ratio in each run |")
    print("| --- | --- | --- | --- |")
    for (case, measured, baseline), values in ratios.items():
        print(f"| {case} | {measured} | {baseline} | {', '.join(values)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
