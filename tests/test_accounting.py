"""The books against the memory, after long mixed sequences of calls through a real server.

After every call the store's charge must equal three things found apart from it: the walk of every
live object (`walked_bytes`), the storage those objects keep alive through any Python reference
(`referenced_bytes`, which does not ask the objects what they hold), and the default tenant's usage;
no reservation may be left behind; a call refused at a squeezed cap, or failed for any reason,
changes no object; and once everything is freed both come back to nothing.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from conftest import LiveServer, assert_unchanged, snapshot
from inprocess import assert_nothing_pending, referenced_bytes, walked_bytes
from weightavg import Client, ResourceExhaustedError, WeightavgError
from weightavg_server.store.limits import Limits
from weightavg_server.store.registry import Registry

ROOM = 10**9
"""The cap between calls: far above what the tests hold, so that `assert_nothing_pending` can see
the whole room above the charge."""


def assert_books_exact(registry: Registry) -> None:
    registry.set_limits(Limits(max_device_bytes=ROOM))
    held = registry.held_bytes()
    assert held == walked_bytes(registry) == referenced_bytes(registry)
    usage = registry.tenant_usage().get("default")
    assert (usage.nbytes if usage is not None else {}) == held
    assert_nothing_pending(registry)


@pytest.fixture
def server(start_server: Callable[..., LiveServer]) -> LiveServer:
    return start_server()


def test_a_view_charges_the_gradients_its_parameters_keep(server: LiveServer) -> None:
    """A view of a module's parameters holds the parameters, and each keeps its `.grad`: once the
    model is freed the view alone keeps the gradients the last epoch left. They went uncharged (found
    by review: 420 bytes charged, 840 held)."""
    layer = (20 * 5 + 5) * 4
    with Client(server.address, timeout=60) as c:
        q = c.module(["linear", 20, 5])
        m = c.model(q, c.loss("ce"), c.opt("sgd", q, 0.1))
        c.train(m, np.ones((10, 20), np.float32), np.zeros(10, np.int64))
        c.run(m)
        c.parms(m)
        c.free(m)
        assert server.registry.held_bytes() == {"cpu": 2 * layer}
        assert_books_exact(server.registry)
        c.purge()
    assert server.registry.held_bytes() == {} == referenced_bytes(server.registry)


def test_a_running_average_s_count_goes_with_its_entry(server: LiveServer) -> None:
    """An average keeps its own '.n' to write counts into; deleted, or replaced by an upload, the
    entry was gone but the dictionary still kept the old tensor alive, uncharged (found by review)."""
    with Client(server.address, timeout=60) as c:
        q = c.module(["linear", 20, 5])
        d = c.copyparms(q)
        assert c.avgparms(q, d) == 2 and c.avgparms(q, d) == 3
        c.delete(d, ".n")
        assert_books_exact(server.registry)
        assert c.avgparms(q, d) == 2
        c.dict(d, ".n", 7.0)
        assert_books_exact(server.registry)
        assert c.avgparms(q, d) == 8
        assert_books_exact(server.registry)


Array = npt.NDArray[np.generic]
FEATURES, CLASSES, ROWS = 12, 4, 64
SPECS = [
    ["linear", FEATURES, CLASSES],
    ["sequential", ["linear", "a", FEATURES, 8], ["batchnorm1d", "b", 8], ["relu", "r"], ["linear", "c", 8, CLASSES]],
    ["sequential", ["linear", "a", FEATURES, 8], ["drop", "d", 0.2], ["linear", "c", 8, CLASSES]],
]
OPTIMIZERS: list[tuple[str, tuple[float, ...], dict[str, object]]] = [
    ("sgd", (0.1,), {}), ("sgd", (0.1, 0.9), {"nesterov": True}), ("adam", (0.01,), {}),
    ("adamw", (0.01,), {"amsgrad": True}), ("rmsprop", (0.01,), {"momentum": 0.5, "centered": True}),
    ("adagrad", (0.1,), {}), ("fedyogi", (), {}),
]
SEVERAL_CALLS = {"module", "model", "optimizer", "update model"}
"""Steps made of more than one call: a refusal may come after an earlier call of the step succeeded."""


class Mix:
    """Random calls of every kind over the handles they made, from one seed."""

    def __init__(self, c: Client, seed: int) -> None:
        self.c = c
        self.rand = random.Random(seed)
        self.rng = np.random.default_rng(seed)
        self.handles: dict[str, list[object]] = {"module": [], "model": [], "dict": [], "tensor": [], "opt": []}

    def x(self, n: int = ROWS, dtype: type = np.float32) -> Array:
        return self.rng.standard_normal((n, FEATURES)).astype(dtype)

    def y(self, n: int = ROWS) -> Array:
        return self.rng.integers(0, CLASSES, n).astype(np.int64)

    def pick(self, *kinds: str) -> object:
        """A live handle of one of the kinds (LookupError when there is none: the step is skipped)."""
        choices = [h for kind in kinds for h in self.handles[kind]]
        if not choices:
            raise LookupError(kinds)
        return self.rand.choice(choices)

    def some(self, n: int) -> list[object]:
        return self.rand.sample(self.handles["dict"], min(n, len(self.handles["dict"])))

    def keep(self, kind: str, handle: object) -> None:
        self.handles[kind].append(handle)

    def module(self) -> None:
        q = self.c.module(self.rand.choice(SPECS))
        self.keep("module", q)
        if self.rand.random() < 0.3:
            self.c.to(q, dtype=self.rand.choice(["bfloat16", "float64"]))

    def model(self) -> None:
        c, (name, args, options) = self.c, self.rand.choice(OPTIMIZERS)
        q = c.module(self.rand.choice(SPECS))
        m = c.model(q, c.loss("ce"), c.opt(name, q, *args, **options))
        self.keep("model", m)
        c.train(m, self.x(), self.y())
        if self.rand.random() < 0.5:
            c.test(m, self.x(32), self.y(32))
        if self.rand.random() < 0.3:
            c.train(m, shuffle=True, batchsize=self.rand.choice([8, 64]))

    def steps(self) -> dict[str, Callable[[], object]]:
        c, r = self.c, self.rand
        some_module = lambda: self.pick("module", "model")  # noqa: E731
        return {
            "module": self.module,
            "model": self.model,
            "optimizer": lambda: self.keep("opt", c.opt("sgd", self.pick("module"), 0.5, 0.9)),
            "update model": lambda: (lambda q: c.model(self.pick("model"), q, c.opt("adam", q)))(c.module(r.choice(SPECS))),
            "run": lambda: c.run(self.pick("model")),
            "testrun": lambda: c.testrun(self.pick("model")),
            "evaluate": lambda: c.evaluate(self.pick("model"), self.x(r.choice([5, 100]))),
            "batchnorm": lambda: c.batchnorm(self.pick("model")),
            "new data": lambda: c.train(self.pick("model"), self.x(16, r.choice([np.float32, np.float64, np.uint8])), self.y(16)),
            "restore": lambda: c.restore(self.pick("model")),
            "copyparms": lambda: self.keep("dict", c.copyparms(
                some_module(), dtype=r.choice([None, "float64", "bfloat16"]), buffers=r.random() < 0.5)),
            "avgparms": lambda: c.avgparms(self.pick("module", "model", "dict"), self.pick("dict"), buffers=r.random() < 0.3),
            "ema": lambda: c.ema(self.pick("module", "model", "dict"), self.pick("dict"), decay=0.9),
            "load": lambda: c.copyparms(some_module(), self.pick("dict")),
            "upload": lambda: self.keep("dict", c.dict({"w": self.x(r.choice([3, 30])), "n": self.y(5)})),
            "set entry": lambda: c.dict(self.pick("dict"), r.choice(["w", "v", ".n"]), self.x(3, r.choice([np.float32, np.float64]))),
            "delete entry": lambda: c.delete(self.pick("dict"), r.choice(["w", "n", "v", ".n"])),
            "fetch": lambda: c.dict(self.pick("dict")),
            "average": lambda: self.keep("dict", c.average(self.some(r.choice([1, 2, 3])))),
            "average into": lambda: c.average(self.some(2), into=self.pick("dict", "module")),
            "merge": lambda: self.keep("dict", c.merge(r.choice(["ties", "dare", "task_arithmetic"]), self.some(2),
                                                       base=self.pick("dict"), density=0.5)),
            "view": lambda: self.keep("dict", (c.parms if r.random() < 0.5 else c.buffers)(some_module())),
            "addref": lambda: self.keep("dict", c.addref(self.pick("dict"))),
            "tensor": lambda: self.keep("tensor", c.tensor(self.x(r.choice([2, 20])))),
            "forward": lambda: self.keep("tensor", getattr(c, r.choice(["forward", "nforward", "eforward"]))(
                some_module(), self.pick("tensor"))),
            "input": lambda: self.keep("tensor", c.input(self.pick("model"))),
            "batch": lambda: c.batch(self.pick("tensor"), 3),
            "move": lambda: c.to(self.pick("dict", "module", "model", "tensor"), dtype=r.choice(["float64", "float32", "bfloat16"])),
            "outer step": lambda: c.outer_step(self.pick("opt", "model"), self.pick("dict")),
            "soup": lambda: self.keep("dict", c.soup(self.pick("model"), self.some(2)).dictionary),
            "free": self.free,
        }

    def free(self) -> None:
        kind = self.rand.choice([k for k, hs in self.handles.items() if hs] or ["dict"])
        handle = self.pick(kind)
        self.c.free(handle)
        self.handles[kind].remove(handle)


@pytest.mark.parametrize("seed", [4, 6])
def test_a_long_mixed_sequence_keeps_the_books_exact(server: LiveServer, seed: int) -> None:
    """200 random calls of every kind, four in ten under a cap a little above what is held. Without
    the two fixes above, seed 4 found the view's gradients and seed 6 both leaks."""
    registry = server.registry
    refused = 0
    with Client(server.address, timeout=60) as c:
        mix = Mix(c, seed)
        steps = mix.steps()
        names = sorted(steps)
        for _ in range(200):
            name = mix.rand.choice(names)
            squeezed = name not in SEVERAL_CALLS and mix.rand.random() < 0.4
            held = registry.held_bytes().get("cpu", 0)
            if squeezed:  # the cap a little above what is held: most allocating calls are refused
                registry.set_limits(Limits(max_device_bytes=held + mix.rand.choice([1, 100, 1000])))
            before = snapshot(registry)
            try:
                steps[name]()
            except LookupError:
                pass
            except WeightavgError as exc:
                assert exc.code not in ("UNKNOWN", "INTERNAL"), (name, exc)
                if isinstance(exc, ResourceExhaustedError):
                    assert squeezed and "--max-device-bytes" in exc.message, (name, exc)
                    refused += 1
                if name not in SEVERAL_CALLS:
                    assert_unchanged(before, snapshot(registry))
                    assert registry.held_bytes().get("cpu", 0) == held, name
            assert_books_exact(registry)
        assert refused >= 5, refused
        c.purge()
    assert registry.held_bytes() == {} == referenced_bytes(registry) and len(registry) == 0
