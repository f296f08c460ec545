"""Throughput against tensor size, from a results JSON: `python -m bench.plot results.json out.png`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def plot(result: dict[str, Any], path: Path) -> None:
    """Two panels: transfer (weightavg vs raw gRPC, both ways) and averaging (avgparms vs in-process lerp_)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result["sweep"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    transfer = sweep.get("transfer", [])
    sizes = [p["bytes"] for p in transfer]
    for key, style, label in (
        ("fetch", "o-", "weightavg fetch (server to client)"),
        ("raw down", "o--", "raw gRPC stream, server to client"),
        ("upload", "s-", "weightavg upload (client to server)"),
        ("raw up", "s--", "raw gRPC stream, client to server"),
    ):
        left.plot(sizes, [p[key] for p in transfer], style, label=label)
    left.set(xscale="log", yscale="log", xlabel="tensor size (bytes)", ylabel="GB/s", title="Transfer: one tensor, 4 MiB chunks")
    average = sweep.get("average", [])
    sizes = [p["bytes"] for p in average]
    right.plot(sizes, [p["avgparms"] for p in average], "o-", label="avgparms (server, end to end)")
    right.plot(sizes, [p["lerp_"] for p in average], "o--", label="lerp_ loop in-process")
    right.set(xscale="log", xlabel="tensor size (bytes), about 100 MB in all", ylabel="GB/s (3 x bytes / time)",
              title="Averaging: avgparms against in-process lerp_")
    machine = result["machine"]
    threads = result.get("threads") or "default"
    fig.suptitle(f"{machine['cpu']}, {machine['nproc']} cores, torch {machine['torch']} ({threads} threads), "
                 f"grpc {machine['grpc']}, {result['started']}",
                 fontsize=9)
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    plot(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
