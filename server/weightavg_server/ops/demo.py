"""`weightavg demo`: does weight averaging help? Then, with --reference, the reference's two
weight-averaging examples. Both end to end over gRPC.

An embedded server starts on a free loopback port; everything after that goes through the thin
client, exactly as a remote user would drive it.

The default run (demo_swa.py) trains a small batchnorm network over several seeds with the SWA
paper's recipe, a high constant learning rate while averaging, and reports the averaged weights
against the same run's last weights and against a run with a decayed learning rate, as mean and
spread, with a verdict in words. --reference runs the reference's examples instead: a linear
classifier averaged over further epochs (twice), the reference's network with a batchnorm layer,
averaged, its batchnorm statistics recalculated, and one run averaged two ways at once, SWA (the
equal-weight mean) and a float32 EMA with warm-up, side by side.

Data: scikit-learn's bundled digits by default (no download), or MNIST IDX files with --mnist DIR
(gzipped or not). With only the 10,000-image test set in DIR, the first 8,000 train and the last
2,000 test (the first and last 80/20 in general); with the training files too, the usual 60,000/10,000 split is used.
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weightavg import Client
from weightavg import WeightavgError as CallFailed
from weightavg._cli import _address, _token

from ..domain.ema import EmaSchedule
from ..domain.errors import WeightavgError
from . import demo_swa
from .app import create_server, set_serving
from .config import ServerConfig


@dataclass
class Dataset:
    """Train and test arrays: float32 inputs in [-1, 1], int64 labels."""

    name: str
    x: np.ndarray
    y: np.ndarray
    X: np.ndarray
    Y: np.ndarray


def load_digits() -> Dataset:
    """scikit-learn's 1,797 8x8 digits (pixels 0-16): the first 1,437 train, the last 360 test."""
    from sklearn.datasets import load_digits as sk_load

    digits = sk_load()
    x = (digits.data / 8.0 - 1.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    cut = 1437
    return Dataset("scikit-learn digits (8x8)", x[:cut], y[:cut], x[cut:], y[cut:])


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array of its declared shape; the magic number is checked."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {data.size} values")
    return data.reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).exists():
            return directory / name
    return None


def load_mnist(directory: Path) -> Dataset:
    """MNIST from IDX files, pixels scaled as the reference does: p/127.5 - 1, flattened to 784."""

    def pair(prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
        images, labels = _find(directory, f"{prefix}-images-idx3-ubyte"), _find(directory, f"{prefix}-labels-idx1-ubyte")
        if images is None or labels is None:
            return None
        x = (read_idx(images).astype(np.float64) / 127.5 - 1.0).astype(np.float32).reshape(-1, 784)
        return x, read_idx(labels).astype(np.int64)

    test = pair("t10k")
    if test is None:
        raise SystemExit(f"no t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] in {directory}")
    train = pair("train")
    if train is not None:
        return Dataset("MNIST (60,000 train / 10,000 test)", train[0], train[1], test[0], test[1])
    x, y = test
    cut = len(x) * 4 // 5  # 8,000 of the real 10,000
    return Dataset(f"MNIST test set (first {cut:,} train / last {len(x) - cut:,} test)", x[:cut], y[:cut], x[cut:], y[cut:])


class Progress:
    """A plain text progress bar on stderr: `label [#####.....] 5/10 loss 0.1234`."""

    def __init__(self, label: str, total: int, width: int = 30) -> None:
        self.label, self.total, self.width, self.start = label, total, width, time.monotonic()

    def update(self, done: int, note: str = "") -> None:
        """Redraw the bar in place on a terminal; elsewhere (logs, pipes) write only the finished bar."""
        finished = done >= self.total
        if not finished and not sys.stderr.isatty():
            return
        filled = self.width * done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self.start
        line = f"  {self.label:<20} [{bar}] {done}/{self.total} {note} {elapsed:5.1f}s"
        sys.stderr.write(("\r" if sys.stderr.isatty() else "") + line + ("\n" if finished else ""))
        sys.stderr.flush()


def train_epochs(c: Client, m: Any, epochs: int, label: str, average: Any = None) -> None:
    """Run epochs with a progress bar; fold the weights into `average` after each when given."""
    bar = Progress(label, epochs)
    bar.update(0)
    for epoch in range(1, epochs + 1):
        loss = c.run(m)
        if average is not None:
            c.avgparms(m, average)
        bar.update(epoch, f"loss {loss:.4f}")


def accuracy(c: Client, m: Any, X: np.ndarray, Y: np.ndarray) -> float:
    """Test accuracy in percent, as the reference computes it: argmax of evaluate against the labels."""
    return float(100.0 * np.mean(c.evaluate(m, X).argmax(1) == Y))


def example_linear(c: Client, d: Dataset, epochs: int, avg_epochs: int, avg_runs: int, seed: int) -> list[str]:
    """Example 1: a linear model, then averaging runs continuing from the average each time."""
    features = d.x.shape[1]
    q = c.module(["linear", features, 10])
    m = c.model(q, c.loss("ce"), c.opt("sgd", q, 0.04))
    c.train(m, batchsize=100, shuffle=True, seed=seed)
    c.train(m, d.x, d.y)
    lines = [
        f"Example 1: linear {features}->10, cross entropy, SGD lr .04, batch 100, shuffled",
        f"  {'phase':<36}{'epochs':>8}{'un-averaged':>14}{'averaged':>11}",
    ]
    train_epochs(c, m, epochs, "training")
    lines.append(f"  {'trained, no averaging':<36}{f'1-{epochs}':>8}{accuracy(c, m, d.X, d.Y):>13.2f}%{'':>11}")
    p = c.copyparms(m)
    done = epochs
    for run in range(1, avg_runs + 1):
        train_epochs(c, m, avg_epochs, f"averaging run {run}", p)
        plain = accuracy(c, m, d.X, d.Y)
        c.copyparms(m, p)
        averaged = accuracy(c, m, d.X, d.Y)
        span = f"{done + 1}-{done + avg_epochs}"
        done += avg_epochs
        count = int(c.dict(p, ".n"))
        lines.append(f"  {f'averaging run {run} (mean of {count})':<36}{span:>8}{plain:>13.2f}%{averaged:>10.2f}%")
    c.free(m, p)
    return lines


def _stats(c: Client, b: Any) -> dict[str, Any]:
    return {k: np.asarray(v) for k, v in c.dict(b).items()}


def example_batchnorm(c: Client, d: Dataset, epochs: int, avg_epochs: int, hidden: int, seed: int) -> list[str]:
    """Example 2: the reference's batchnorm network, averaged, then its statistics recalculated."""
    features = d.x.shape[1]
    q = c.module([
        "sequential",
        ["linear", "a", features, hidden],
        ["batchnorm1d", "b", hidden, 1e-7, 0.1],
        ["relu", "c"],
        ["linear", "d", hidden, 10],
    ])
    b = c.buffers(q, "b")
    m = c.model(c.addref(q), c.loss("ce"), c.opt("sgd", q, 0.05, 0.9, nesterov=True))
    c.train(m, batchsize=100, shuffle=True, seed=seed)
    batches = c.train(m, d.x, d.y)
    c.test(m, batchsize=1000, metrics="accuracy")
    c.test(m, d.X, d.Y)
    lines = [
        f"Example 2: {features}-{hidden} linear, batchnorm (momentum .1), relu, {hidden}-10 linear;"
        " SGD .05, momentum .9, nesterov",
        f"  {'phase':<52}{'test accuracy':>14}",
    ]
    train_epochs(c, m, epochs, "training")
    lines.append(f"  {f'trained {epochs} epochs, no averaging':<52}{c.testrun(m):>13.2f}%")
    p = c.copyparms(m)
    train_epochs(c, m, avg_epochs, "averaging", p)
    lines.append(f"  {f'{epochs + avg_epochs} epochs, no averaging':<52}{c.testrun(m):>13.2f}%")
    c.copyparms(m, p)
    stale = _stats(c, b)
    lines.append(f"  {'averaged weights, batchnorm statistics from training':<52}{c.testrun(m):>13.2f}%")
    sys.stderr.write(f"  recalculating batchnorm over {batches} batches...\n")
    momenta = c.batchnorm(m)
    fresh = _stats(c, b)
    lines.append(f"  {'averaged weights, batchnorm recalculated':<52}{c.testrun(m):>13.2f}%")
    rows = [
        ("running_mean, first 4", _fmt(stale["running_mean"][:4]), _fmt(fresh["running_mean"][:4])),
        ("running_mean, mean", f"{stale['running_mean'].mean():.4f}", f"{fresh['running_mean'].mean():.4f}"),
        ("running_var, first 4", _fmt(stale["running_var"][:4]), _fmt(fresh["running_var"][:4])),
        ("running_var, mean", f"{stale['running_var'].mean():.4f}", f"{fresh['running_var'].mean():.4f}"),
        ("num_batches_tracked", str(int(stale["num_batches_tracked"])), str(int(fresh["num_batches_tracked"]))),
        ("mean ratio before/after: mean", f"{np.mean(stale['running_mean'] / fresh['running_mean']):.3f}", ""),
        ("mean ratio before/after: var", f"{np.mean(stale['running_var'] / fresh['running_var']):.3f}", ""),
    ]
    lines += ["", f"  batchnorm layer b (momentum {momenta['b']}, restored after)",
              f"  {'statistic':<32}{'before recalculation':<32}after"]
    lines += [f"  {name:<32}{before:<32}{after}" for name, before, after in rows]
    c.free(m, p, b, q)
    return lines


EMA_DECAY = 0.9
"""Example 3's EMA decay after warm-up: with one update per epoch, about the last ten epochs count."""
EMA_LR = 1.0
"""Example 3's learning rate: high and constant, so the weights keep moving around a minimum and
their averages have something to smooth."""


def example_ema(c: Client, d: Dataset, epochs: int, seed: int) -> list[str]:
    """Example 3: one run of a linear model at a high constant learning rate, averaged by SWA (from a
    third of the way in) and by a float32 EMA with warm-up (from the start), all three tested."""
    features = d.x.shape[1]
    q = c.module(["linear", features, 10])
    m = c.model(q, c.loss("ce"), c.opt("sgd", q, EMA_LR))
    c.train(m, batchsize=100, shuffle=True, seed=seed)
    c.train(m, d.x, d.y)
    probe_module = c.module(["linear", features, 10])  # the averages are copied in here to be tested
    probe = c.model(probe_module, c.loss("ce"), c.opt("sgd", probe_module, 0.0))
    ema = c.copyparms(m, dtype="float32")
    swa = None
    swa_start = max(1, epochs // 3)
    every = max(1, epochs // 6)
    lines = [
        f"Example 3: one run averaged two ways; linear {features}->10, SGD lr {EMA_LR:g} (high, constant), batch 100",
        f"  SWA: equal-weight mean of the weights after each epoch from epoch {swa_start} on (avgparms)",
        f"  EMA: float32, decay {EMA_DECAY:g} with timm's warm-up, updated after every epoch (ema)",
        f"  {'epoch':>5}{'model':>10}{'SWA':>10}{'mean of':>9}{'EMA':>10}{'EMA decay':>11}",
    ]

    def tested(average: Any) -> float:
        c.copyparms(probe, average)
        return accuracy(c, probe, d.X, d.Y)

    bar = Progress("swa and ema", epochs)
    bar.update(0)
    for epoch in range(1, epochs + 1):
        loss = c.run(m)
        step = c.ema(m, ema, decay=EMA_DECAY, warmup=True)
        if epoch == swa_start:
            swa = c.copyparms(m)
        elif swa is not None:
            c.avgparms(m, swa)
        bar.update(epoch, f"loss {loss:.4f}")
        if epoch % every and epoch != epochs:
            continue
        shown = EmaSchedule(decay=EMA_DECAY, warmup=True).decay_at(step)  # the server's own schedule
        swa_cells = (f"{tested(swa):>9.2f}%{int(c.dict(swa, '.n')) if epoch > swa_start else 1:>9}"
                     if swa is not None else f"{'-':>10}{'-':>9}")
        lines.append(f"  {epoch:>5}{accuracy(c, m, d.X, d.Y):>9.2f}%{swa_cells}{tested(ema):>9.2f}%{shown:>11.3f}")
    c.free(*(h for h in (m, probe, ema, swa) if h is not None))
    return lines


def _fmt(values: np.ndarray) -> str:
    return " ".join(f"{v:.3f}" for v in values)


SWA = demo_swa.Recipe()
REFERENCE = {"epochs": 20, "hidden": 800}
"""The reference examples' defaults where they differ from the averaging demo's."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="weightavg demo",
        description="Show whether weight averaging helps (stochastic weight averaging over several seeds), or with "
                    "--reference run the reference's two weight-averaging examples, against an embedded weightavg server.",
    )
    p.add_argument("--mnist", type=Path, metavar="DIR",
                   help="read MNIST IDX files (gzipped or not) from DIR instead of scikit-learn's digits")
    p.add_argument("--seeds", type=int, default=5, help="seeds to train, 0 to N-1 (default 5)")
    p.add_argument("--epochs", type=int,
                   help=f"epochs before averaging (default {SWA.epochs}; {REFERENCE['epochs']} with --reference)")
    p.add_argument("--swa-epochs", type=int, default=SWA.swa_epochs,
                   help=f"epochs averaged, at the high constant rate (default {SWA.swa_epochs})")
    p.add_argument("--lr", type=float, default=SWA.lr, help=f"learning rate before averaging (default {SWA.lr:g})")
    p.add_argument("--swa-lr", type=float, default=SWA.swa_lr,
                   help=f"the high constant learning rate while averaging (default {SWA.swa_lr:g})")
    p.add_argument("--hidden", type=int,
                   help=f"hidden width (default {SWA.hidden}; {REFERENCE['hidden']} with --reference, as the reference)")
    p.add_argument("--reference", action="store_true", help="run the reference's two examples instead")
    p.add_argument("--avg-epochs", type=int, default=10, help="--reference: epochs in each averaging run (default 10)")
    p.add_argument("--avg-runs", type=int, default=2, help="--reference: averaging runs in example 1 (default 2)")
    p.add_argument("--seed", type=int, default=0, help="--reference: seed for weights and shuffling (default 0)")
    p.add_argument("--ema-epochs", type=int, default=30,
                   help="--reference: epochs of example 3, one run averaged by SWA and by EMA (default 30)")
    p.add_argument("--device", default="cpu", help="server device: cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--address", type=_address, help="use a running server at HOST:PORT instead of an embedded one")
    p.add_argument("--token", type=_token, default=os.environ.get("WEIGHTAVG_TOKEN"),
                   help="--address: bearer token of that server (default: $WEIGHTAVG_TOKEN)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `weightavg demo`: one line on stderr and exit status 1 for a failure it can
    name (a --device this machine lacks, a server at --address that is not there, wants a token
    or refuses a setting such as --lr nan); each printed a traceback (found by review)."""
    args = build_parser().parse_args(argv)
    mode = REFERENCE if args.reference else {"epochs": SWA.epochs, "hidden": SWA.hidden}
    args.epochs = mode["epochs"] if args.epochs is None else args.epochs
    args.hidden = mode["hidden"] if args.hidden is None else args.hidden
    for name in ("seeds", "epochs", "swa_epochs", "avg_epochs", "avg_runs", "hidden", "ema_epochs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    dataset = load_mnist(args.mnist) if args.mnist else load_digits()
    try:
        run(args, dataset)
    except (WeightavgError, CallFailed) as exc:  # the embedded server's refusal, or the client's
        raise SystemExit(f"weightavg demo: {exc}") from None


def run(args: argparse.Namespace, dataset: Dataset) -> None:
    """The demo on `dataset` against --address, or against an embedded server it starts and stops."""
    server = None
    address = args.address
    if address is None:
        server, port, health = create_server(ServerConfig(host="127.0.0.1", port=0, device=args.device))
        server.start()
        set_serving(health, True)
        address = f"127.0.0.1:{port}"
    started = time.monotonic()
    try:
        # The session frees what the demo made; the token is only for a server at --address.
        with Client(address, timeout=3600, session=True, token=args.token if server is None else None) as c:
            info = c.info()
            what = "the reference's weight-averaging examples" if args.reference else "stochastic weight averaging"
            print(f"weightavg demo: {what} on {dataset.name}, {len(dataset.x)} train / {len(dataset.X)} test")
            print(f"server {address} ({'embedded' if server else 'remote'}), device {info['device']}, "
                  f"torch {info['torch_version']}", flush=True)
            if args.reference:
                _reference(c, dataset, args, seeded=server is not None)
            else:
                recipe = demo_swa.Recipe(hidden=args.hidden, lr=args.lr, epochs=args.epochs, swa_lr=args.swa_lr,
                                         swa_epochs=args.swa_epochs)
                result = demo_swa.run(c, dataset, recipe, range(args.seeds), _seeder(server is not None))
                print("\n" + "\n".join(demo_swa.render(result)), flush=True)
            print(f"\ndone in {time.monotonic() - started:.1f} s")
    finally:
        if server is not None:
            server.stop(grace=None)


def _seeder(embedded: bool) -> Callable[[int], None]:
    """Seeds weight initialisation: the embedded server builds modules in this process. A remote
    server's generator is its own, so there only shuffling follows the seed."""
    def seed(value: int) -> None:
        if embedded:
            import torch

            torch.manual_seed(value)

    return seed


def _reference(c: Client, dataset: Dataset, args: argparse.Namespace, seeded: bool) -> None:
    _seeder(seeded)(args.seed)
    sys.stderr.write("Example 1\n")
    lines = example_linear(c, dataset, args.epochs, args.avg_epochs, args.avg_runs, args.seed)
    print("\n" + "\n".join(lines), flush=True)
    sys.stderr.write("Example 2\n")
    lines = example_batchnorm(c, dataset, args.epochs, args.avg_epochs, args.hidden, args.seed)
    print("\n" + "\n".join(lines), flush=True)
    sys.stderr.write("Example 3\n")
    lines = example_ema(c, dataset, args.ema_epochs, args.seed)
    print("\n" + "\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
