"""Every allocating service call, run in process: what it allocates against what it reserved.

The promise is that every allocation is reserved against the caps before it happens. Each case
below runs one call on a CPU Service with room to spare and measures two things:

- reserved: the most the store's ledger was asked to hold at once during the call (held, pending
  reservations and the bytes being asked for, at every check), less what was held before;
- allocated: the most bytes of CPU storages that torch ops made during the call and that lived at
  once (`footprint._PeakBytes`, real CPU storages only: the footprints' own meta passes make meta
  ones), the call's results included.

allocated <= reserved for every case. A case's setup makes its tensors and uploads: the call then
counts only what the service makes, the uploads' received copies (`inprocess.RecordingUpload` clones
each tensor after its header, as the transport allocates its buffer) among them. Reviews found each of the gaps this catches one at a time (an
optimizer step's temporaries, a batch's scoring, slerp's sums, a module's build, epoch scalars); a new
verb, kernel or metric that allocates past its reservation fails here. Blocks taken from the host
cache (numpy memory under `torch.from_numpy`: uploads, flat copies) are reserved before they are
taken and do not pass through torch's dispatch; tests/test_caps.py checks those charges exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from inprocess import LedgerPeak, cpu_service, no_upload, upload
from weightavg_server.domain.averaging import BufferMode
from weightavg_server.domain.ema import ScheduleChange
from weightavg_server.domain.specs import LayerSpec
from weightavg_server.service import Service

ROWS, FEATURES, CLASSES = 64, 32, 10


def _rows(seed: int, rows: int = ROWS, features: int = FEATURES) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed))


def _dictionary(s: Service, seed: int, dtype: torch.dtype = torch.float32) -> str:
    bias = torch.randn(FEATURES, generator=torch.Generator().manual_seed(seed + 50))
    return s.create_dictionary(upload(("a", _rows(seed).to(dtype)), ("b", bias.to(dtype)))).id


def _linear(s: Service, classes: int = CLASSES) -> str:
    return s.create_module(LayerSpec("linear", args=(FEATURES, classes))).id


def _mlp(s: Service) -> str:
    return s.create_module(LayerSpec("sequential", children=(
        LayerSpec("linear", "l0", (FEATURES, 64)), LayerSpec("batchnorm1d", "bn", (64,)), LayerSpec("relu", "r", ()),
        LayerSpec("linear", "l1", (64, CLASSES)),
    ))).id


def _model(s: Service, module: str | None = None, loss: str = "ce", optimizer: str = "sgd",
           args: tuple[Any, ...] = (0.1,), options: tuple[tuple[str, Any], ...] = ()) -> str:
    q = module or _linear(s)
    return s.create_model(q, s.create_loss(loss, (), ()).id, s.create_optimizer(q, optimizer, args, options).id).id


def _with_data(s: Service, m: str, split: str, rows: int = 300, classes: int = CLASSES, column: bool = False,
               **options: Any) -> str:
    """Training or test data for m: class indices, or (`column`) a float column of them, as mse reads them."""
    y = torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(2))
    y = y.float().reshape(rows, 1) if column else y
    s.set_model_data(m, split, upload(("x", _rows(1, rows)), ("y", y)))
    if options:
        s.set_model_options(m, split, list(options.items()))
    return m


def _never() -> bool:
    return False


def _fetched(s: Service, handle: str) -> int:
    """A fetch's host copies, held as a reply holds them while it streams."""
    with s.fetch(handle, []) as copies:
        return len(copies)


Setup = Callable[[Service], Any]
Call = Callable[[Service, Any], object]

CASES: dict[str, tuple[Setup, Call]] = {
    "create_module (an MLP)": (lambda s: None, lambda s, _: _mlp(s)),
    "create_dictionary": (lambda s: upload(("a", _rows(7)), ("b", torch.randn(FEATURES))),
                          lambda s, u: s.create_dictionary(u)),
    "copy_parameters": (_linear, lambda s, q: s.copy_parameters(q)),
    "copy_parameters float64 with buffers": (_mlp, lambda s, q: s.copy_parameters(q, torch.float64, True)),
    "average_parameters": (lambda s: (q := _linear(s), s.copy_parameters(q).id),
                           lambda s, st: s.average_parameters(*st)),
    "average_parameters with buffers": (lambda s: (q := _mlp(s), s.copy_parameters(q, None, True).id),
                                        lambda s, st: s.average_parameters(*st, BufferMode.AVERAGE)),
    "update_moving_average of bfloat16 into float32": (
        lambda s: (q := _linear(s), s.move(q, "cpu", torch.bfloat16), s.copy_parameters(q, torch.float32).id)[::2],
        lambda s, st: s.update_moving_average(*st, ScheduleChange(decay=0.9), None)),
    "average of four, weighted": (lambda s: [_dictionary(s, i) for i in range(4)],
                                  lambda s, ds: s.average(ds, [1.0, 2.0, 3.0, 4.0], "")),
    "average into an input": (lambda s: [_dictionary(s, i) for i in range(4)], lambda s, ds: s.average(ds, None, ds[0])),
    "average of bfloat16": (lambda s: [_dictionary(s, i, torch.bfloat16) for i in range(3)],
                            lambda s, ds: s.average(ds, None, "")),
    "merge linear": (lambda s: [_dictionary(s, i) for i in range(3)], lambda s, ds: s.merge("linear", ds, "", None, ())),
    "merge slerp": (lambda s: [_dictionary(s, i) for i in range(2)],
                    lambda s, ds: s.merge("slerp", ds, "", None, (("t", 0.3),))),
    "merge task_arithmetic": (lambda s: [_dictionary(s, i) for i in range(4)],
                              lambda s, ds: s.merge("task_arithmetic", ds[1:], ds[0], None, ())),
    "merge ties": (lambda s: [_dictionary(s, i) for i in range(4)],
                   lambda s, ds: s.merge("ties", ds[1:], ds[0], None, (("density", 0.3),))),
    "merge ties without normalize": (
        lambda s: [_dictionary(s, i) for i in range(4)],
        lambda s, ds: s.merge("ties", ds[1:], ds[0], None, (("density", 0.3), ("normalize", False)))),
    "merge ties over bfloat16": (lambda s: [_dictionary(s, i, torch.bfloat16) for i in range(4)],
                                 lambda s, ds: s.merge("ties", ds[1:], ds[0], None, (("density", 0.3),))),
    "merge dare": (lambda s: [_dictionary(s, i) for i in range(4)],
                   lambda s, ds: s.merge("dare", ds[1:], ds[0], None, (("density", 0.3),))),
    "merge dare with consensus": (
        lambda s: [_dictionary(s, i) for i in range(4)],
        lambda s, ds: s.merge("dare", ds[1:], ds[0], None, (("density", 0.3), ("consensus", True)))),
    "merge breadcrumbs with consensus": (
        lambda s: [_dictionary(s, i) for i in range(4)],
        lambda s, ds: s.merge("breadcrumbs", ds[1:], ds[0], None, (("density", 0.3), ("consensus", True)))),
    "merge della with consensus": (
        lambda s: [_dictionary(s, i) for i in range(4)],
        lambda s, ds: s.merge("della", ds[1:], ds[0], None, (("density", 0.4), ("consensus", True), ("normalize", True)))),
    "merge model_stock, filter-wise": (
        lambda s: [_dictionary(s, i) for i in range(4)],
        lambda s, ds: s.merge("model_stock", ds[1:], ds[0], None, (("filter_wise", True),))),
    "merge karcher of four": (lambda s: [_dictionary(s, i) for i in range(4)],
                              lambda s, ds: s.merge("karcher", ds, "", [1.0, 2.0, 0.5, 1.0], (("tol", 1e-9),))),
    "merge karcher of bfloat16 dictionaries": (
        lambda s: [_dictionary(s, i, torch.bfloat16) for i in range(3)],
        lambda s, ds: s.merge("karcher", ds, "", None, ())),
    "merge sce selecting": (lambda s: [_dictionary(s, i) for i in range(4)],
                            lambda s, ds: s.merge("sce", ds[1:], ds[0], None, (("select_topk", 0.3),))),
    "merge sce from a bfloat16 base": (
        lambda s: [_dictionary(s, 0, torch.bfloat16), *(_dictionary(s, i) for i in range(1, 4))],
        lambda s, ds: s.merge("sce", ds[1:], ds[0], None, (("select_topk", 0.5),))),
    "merge nearswap from a bfloat16 base": (
        lambda s: [_dictionary(s, 0, torch.bfloat16), _dictionary(s, 1)],
        lambda s, ds: s.merge("nearswap", ds[1:], ds[0], None, (("t", 0.3),))),
    "merge ram+ from a bfloat16 base": (
        lambda s: [_dictionary(s, 0, torch.bfloat16), *(_dictionary(s, i) for i in range(1, 4))],
        lambda s, ds: s.merge("ram", ds[1:], ds[0], None, (("epsilon", 0.5), ("r", 0.2)))),
    "merge arcee_fusion of a bfloat16 model": (
        lambda s: [_dictionary(s, 0), _dictionary(s, 1, torch.bfloat16)],
        lambda s, ds: s.merge("arcee_fusion", ds[1:], ds[0], None, ())),
    "merge multislerp from a base": (lambda s: [_dictionary(s, i) for i in range(4)],
                                     lambda s, ds: s.merge("multislerp", ds[1:], ds[0], [1.0, 2.0, 0.5], ())),
    "merge ties with densities and weights by layer": (
        lambda s: [_dictionary(s, i) for i in range(4)],
        lambda s, ds: s.merge("ties", ds[1:], ds[0], [(1.0, 0.5), 1.0, 2.0], (), densities=[0.3, (0.5, 0.9), 1.0])),
    "epoch, sgd": (lambda s: _with_data(s, _model(s), "train"), lambda s, m: s.run_epoch(m, _never)),
    "epoch, adam with decay": (
        lambda s: _with_data(s, _model(s, optimizer="adam", args=(), options=(("decay", 0.1),)), "train"),
        lambda s, m: s.run_epoch(m, _never)),
    "epoch, adam with decay, a wide layer in batches of 4 (its steps outgrow its passes)": (
        lambda s: _with_data(s, _model(s, _linear(s, 1024), optimizer="adam", args=(), options=(("decay", 0.1),)),
                             "train", rows=40, batchsize=4),
        lambda s, m: s.run_epoch(m, _never)),
    "epoch, batchnorm, accuracy and batch losses": (
        lambda s: _with_data(s, _model(s, _mlp(s)), "train", metrics="loss,accuracy,batchloss"),
        lambda s, m: s.run_epoch(m, _never)),
    "epoch keeping predictions and outputs": (
        lambda s: _with_data(s, _model(s, _mlp(s)), "train", metrics="predict,output"),
        lambda s, m: s.run_epoch(m, _never)),
    "epoch, mse with accuracy": (
        lambda s: _with_data(s, _model(s, _linear(s, 1), loss="mse"), "train", classes=2, column=True,
                             metrics="loss,accuracy"),
        lambda s, m: s.run_epoch(m, _never)),
    "test": (lambda s: _with_data(s, _model(s), "test"), lambda s, m: s.run_test(m, _never)),
    "test in batches of 7 with accuracy": (
        lambda s: _with_data(s, _model(s, _mlp(s)), "test", metrics="accuracy,loss", batchsize=7),
        lambda s, m: s.run_test(m, _never)),
    "test of 2 classes with accuracy": (lambda s: _with_data(s, _model(s, _linear(s, 2)), "test", metrics="accuracy"),
                                        lambda s, m: s.run_test(m, _never)),
    "evaluate": (lambda s: (_model(s, _mlp(s)), upload(("x", _rows(3, 250)))),
                 lambda s, st: s.evaluate(st[0], st[1], _never)),
    "recalculate_batchnorm": (lambda s: _with_data(s, _model(s, _mlp(s)), "train"),
                              lambda s, m: s.recalculate_batchnorm(m, _never)),
    "forward without gradients": (lambda s: (_mlp(s), s.create_tensor(upload(("", _rows(4)))).id),
                                  lambda s, st: s.forward(st[0], "eforward", st[1], no_upload())),
    "forward with gradients": (lambda s: (_mlp(s), s.create_tensor(upload(("", _rows(4)))).id),
                               lambda s, st: s.forward(st[0], "forward", st[1], no_upload())),
    "move to float64": (lambda s: _dictionary(s, 0), lambda s, d: s.move(d, "cpu", torch.float64)),
    "move to bfloat16": (lambda s: _dictionary(s, 0), lambda s, d: s.move(d, "cpu", torch.bfloat16)),
    "outer step, nesterov": (
        lambda s: (q := _linear(s), s.create_optimizer(q, "sgd", (0.7, 0.9), (("nesterov", True),)).id,
                   s.copy_parameters(q).id)[1:],
        lambda s, st: s.outer_step(*st)),
    "outer step, adam": (lambda s: (q := _linear(s), s.create_optimizer(q, "adam", (), ()).id, s.copy_parameters(q).id)[1:],
                         lambda s, st: s.outer_step(*st)),
    "set_parameter": (lambda s: (_linear(s), upload(("", _rows(5, CLASSES)))),
                      lambda s, st: s.set_parameter(st[0], "weight", st[1])),
    "update_dictionary, a new entry and a replaced one": (
        lambda s: (_dictionary(s, 0), upload(("a", _rows(6, ROWS, 2 * FEATURES)), ("c", _rows(7)))),
        lambda s, st: s.update_dictionary(*st)),
    "create_tensor": (lambda s: upload(("", _rows(8))), lambda s, u: s.create_tensor(u)),
    "load_parameters from float64": (lambda s: (q := _linear(s), s.copy_parameters(q, torch.float64).id),
                                     lambda s, st: s.load_parameters(*st)),
    "set_model_data": (lambda s: (_model(s), upload(("x", _rows(1, 300)), ("y", torch.zeros(300, dtype=torch.int64)))),
                       lambda s, st: s.set_model_data(st[0], "train", st[1])),
    "move a model to float64": (lambda s: _with_data(s, _model(s, optimizer="adam", args=()), "train"),
                                lambda s, m: s.move(m, "cpu", torch.float64)),
    "fetch": (lambda s: _dictionary(s, 0), lambda s, d: _fetched(s, d)),
    "greedy soup": (lambda s: (m := _with_data(s, _model(s), "test"), [s.copy_parameters(m).id, s.copy_parameters(m).id]),
                    lambda s, st: s.soup(st[0], st[1], (), _never)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_call_allocates_no_more_than_it_reserved(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = LedgerPeak(monkeypatch)
    setup, call = CASES[case]
    for _ in range(2):  # the first run warms what is made once per process (kernels' checks, kept passes)
        s = cpu_service()
        state = setup(s)
        reserved, allocated = ledger.measure(s.store, lambda: call(s, state))
    assert allocated <= reserved, f"{case}: allocated {allocated} bytes, reserved {reserved}"
    if case not in IN_PLACE:
        assert allocated > 0  # the call allocates: a case that does not measures nothing


IN_PLACE = {"update_moving_average of bfloat16 into float32", "load_parameters from float64"}
"""Cases that may allocate nothing: the native lerp casts each bfloat16 value as it reads it (torch's
path, without the native module, makes a float32 copy of a tensor at a time, which is reserved), and
`copy_` casts float64 into float32 parameters as it copies."""
