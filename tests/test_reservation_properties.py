"""Epochs, tests, merges, forward passes and averages of drawn inputs against what they reserve, in process.

tests/test_reservation_audit.py checks one call of each kind; here hypothesis draws the model (an
MLP of drawn widths, with batchnorm or dropout), the loss, the optimizer and its options, the metrics,
the rows, batch size, shuffle and droplast, and each draw's epoch and test must allocate no more than
`footprint.epoch_bytes` / `testing_pass_bytes` and `metrics_bytes` reserve, measured by
`footprint._PeakBytes` as the storages torch makes. The combinations a review checked one at a time
(an optimizer's temporaries beside a batch's scoring over single-column outputs, say) meet here.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inprocess import LedgerPeak, cpu_service, no_upload, upload
from weightavg_server.domain import footprint, lerp, losses, merging, optimizers, selection, specs, training, weighted_sum
from weightavg_server.domain.averaging import BufferMode
from weightavg_server.domain.dictionaries import TensorDict
from weightavg_server.domain.ema import ScheduleChange
from weightavg_server.domain.errors import InvalidArgument

DRAWS = settings(
    max_examples=int(os.environ.get("WEIGHTAVG_RESERVATION_EXAMPLES", "60")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
OPTIMIZERS = {
    "sgd": st.fixed_dictionaries({}, optional={"momentum": st.sampled_from([0.0, 0.9]), "nesterov": st.booleans(),
                                               "decay": st.sampled_from([0.0, 0.01])}),
    "adam": st.fixed_dictionaries({}, optional={"amsgrad": st.booleans(), "decay": st.sampled_from([0.0, 0.1])}),
    "adamw": st.fixed_dictionaries({}, optional={"amsgrad": st.booleans()}),
    "rmsprop": st.fixed_dictionaries({}, optional={"centered": st.booleans(), "momentum": st.sampled_from([0.0, 0.5]),
                                                   "decay": st.sampled_from([0.0, 0.1])}),
    "adagrad": st.fixed_dictionaries({}, optional={"decay": st.sampled_from([0.0, 0.1])}),
    "fedadam": st.fixed_dictionaries({}, optional={"beta1": st.sampled_from([0.0, 0.9]), "tau": st.sampled_from([1e-3, 1e-2])}),
    "fedyogi": st.fixed_dictionaries({}, optional={"beta2": st.sampled_from([0.5, 0.99])}),
    "fedadagrad": st.fixed_dictionaries({}, optional={"tau": st.sampled_from([1e-3, 1e-2])}),
}
METRICS = ("loss", "batchloss", "accuracy", "matches", "predict", "output")


@st.composite
def models(draw: st.DrawFn) -> tuple[training.Model, str]:
    """A model with train and test data of the drawn shapes, and the split's metrics."""
    features = draw(st.integers(1, 24))
    hidden = draw(st.integers(1, 48))
    loss = draw(st.sampled_from(["ce", "nll", "mse", "smoothl1", "bcelogits"]))
    classes = draw(st.integers(1, 12)) if loss != "nll" else draw(st.integers(2, 12))
    middle = draw(st.sampled_from([(), (("batchnorm1d", (hidden,)),), (("drop", (0.2,)),), (("relu", ()),)]))
    layers = (("linear", (features, hidden)), *middle, ("linear", (hidden, classes)))
    if loss == "nll":
        layers = (*layers, ("logsoftmax", (1,)))
    module = specs.build_module(specs.LayerSpec("sequential", children=tuple(
        specs.LayerSpec(kind, f"l{i}", args) for i, (kind, args) in enumerate(layers)  # type: ignore[arg-type]
    )))
    name = draw(st.sampled_from(sorted(OPTIMIZERS)))
    options = draw(OPTIMIZERS[name])
    if options.get("nesterov"):
        options["momentum"] = 0.9
    optimizer = optimizers.create_optimizer(name, module, (0.01,), tuple(options.items()))
    model = training.create_model(module, losses.create_loss(loss), optimizer)
    rows = draw(st.integers(1, 300))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if loss in ("ce", "nll"):
        y = torch.randint(0, classes, (rows,), generator=g)
    else:
        y = torch.randint(0, 2, (rows, classes), generator=g).float()
    metrics = draw(st.lists(st.sampled_from(METRICS), min_size=1, max_size=4, unique=True))
    options_of_split = [("batchsize", draw(st.integers(1, 120))), ("metrics", ",".join(metrics)),
                        ("droplast", draw(st.booleans()))]
    for split in ("train", "test"):
        training.set_data(model, split, torch.randn(rows, features, generator=g), y.clone(), torch.device("cpu"))
        training.set_options(model, split, options_of_split + ([("shuffle", draw(st.booleans()))] if split == "train" else []))
    return model, ",".join(metrics)


def _within(run: object, reserved: int) -> None:
    meter = footprint._PeakBytes()
    try:
        with meter:
            run()  # type: ignore[operator]
    except InvalidArgument:
        return  # a draw the call refuses (a metric that does not fit the loss's targets): nothing to measure
    assert meter.peak <= reserved, (meter.peak, reserved)


@DRAWS
@given(models())
def test_a_drawn_epoch_allocates_no_more_than_it_reserves(drawn: tuple[training.Model, str]) -> None:
    model, _ = drawn
    reserved = footprint.add_bytes(footprint.epoch_bytes(model), footprint.metrics_bytes(model, "train"))
    _within(lambda: training.run_epoch(model), reserved.get("cpu", 0))


@DRAWS
@given(models())
def test_a_drawn_test_allocates_no_more_than_it_reserves(drawn: tuple[training.Model, str]) -> None:
    model, _ = drawn
    reserved = footprint.add_bytes(
        footprint.testing_pass_bytes(model), footprint.metrics_bytes(model, "test"),
        footprint.forward_copy_bytes(model.module), footprint.batch_copy_bytes(model, "test"),
    )
    _within(lambda: training.test_epoch(model), reserved.get("cpu", 0))


MERGE_OPTIONS = {
    "average": st.just({}),
    "linear": st.fixed_dictionaries({}, optional={"normalize": st.booleans()}),
    "slerp": st.fixed_dictionaries({"t": st.sampled_from([0.0, 0.3, 1.0])},
                                   optional={"vectors": st.sampled_from(["tensor", "rows", "columns"])}),
    "task_arithmetic": st.fixed_dictionaries({}, optional={"lam": st.sampled_from([0.5, 1.0]), "normalize": st.booleans()}),
    "ties": st.fixed_dictionaries({"density": st.sampled_from([0.0, 0.2, 1.0])}, optional={"normalize": st.booleans()}),
    "dare": st.fixed_dictionaries({"seed": st.integers(0, 9), "density": st.sampled_from([0.2, 0.9])}, optional={
        "rescale": st.booleans(), "rescale_norm": st.sampled_from(["density", "l1", "l2", "linf"]),
        "consensus": st.booleans(), "normalize": st.booleans()}),
    "della": st.fixed_dictionaries({"seed": st.integers(0, 9), "density": st.sampled_from([0.3, 1.0]),
                                    "epsilon": st.sampled_from([0.0, 0.1])}, optional={
        "rescale_norm": st.sampled_from(["probability", "l1"]), "consensus": st.booleans()}),
    "breadcrumbs": st.fixed_dictionaries({"density": st.sampled_from([0.3, 1.0]), "gamma": st.sampled_from([0.0, 0.2])},
                                         optional={"consensus": st.booleans(), "rescale": st.booleans()}),
    "multislerp": st.fixed_dictionaries({}, optional={"normalize": st.booleans()}),
    "model_stock": st.fixed_dictionaries({}, optional={"filter_wise": st.booleans()}),
    "karcher": st.fixed_dictionaries({}, optional={"max_iter": st.sampled_from([0, 3]), "tol": st.sampled_from([0.0, 1e-3])}),
    "sce": st.fixed_dictionaries({}, optional={"select_topk": st.sampled_from([0.0, 0.4, 1.0])}),
    "nearswap": st.fixed_dictionaries({"t": st.sampled_from([0.0, 0.5, 10.0])}),
    "ram": st.fixed_dictionaries({}, optional={"epsilon": st.sampled_from([0.0, 0.5]), "r": st.sampled_from([0.0, 0.3])}),
    "arcee_fusion": st.just({}),
}
COUNTS = {"slerp": (2, 2), "nearswap": (1, 1), "arcee_fusion": (1, 1), "model_stock": (2, 4)}
"""How many dictionaries a method takes (besides a base), where not 1 to 4."""
FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@st.composite
def merges(draw: st.DrawFn) -> tuple[str, list[TensorDict], TensorDict | None, dict[str, object], bool]:
    """A merge method, its dictionaries (drawn shapes, each entry's dtype drawn per dictionary), a base
    where the method takes one, its options, and whether it writes into the first dictionary."""
    method = draw(st.sampled_from(sorted(MERGE_OPTIONS)))
    count = draw(st.integers(*COUNTS.get(method, (1, 4))))
    shapes = draw(st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=3), min_size=1, max_size=4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def dictionary() -> TensorDict:
        return TensorDict({f"e{i}": torch.randn(shape, generator=g).to(draw(st.sampled_from(FLOATS)))
                           for i, shape in enumerate(shapes)})

    dicts = [dictionary() for _ in range(count)]
    base = dictionary() if merging.METHODS[method].base else None
    options = draw(MERGE_OPTIONS[method])
    if draw(st.booleans()):  # an integer entry too, combined by a drawn rule
        shape = draw(st.lists(st.integers(1, 40), min_size=0, max_size=2))
        dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool]))
        for d in [*dicts, *([base] if base is not None else [])]:
            d.entries["k"] = torch.randint(0, 2 if dtype is torch.bool else 100, shape, generator=g).to(dtype)
        options = {**options, "integers": draw(st.sampled_from(["first", "max", "mean"]))}
    into = method in ("average", "linear") and draw(st.booleans())
    return method, dicts, base, options, into


@DRAWS
@given(merges())
def test_a_drawn_merge_allocates_no_more_than_its_plan_reserves(
    drawn: tuple[str, list[TensorDict], TensorDict | None, dict[str, object], bool]
) -> None:
    method, dicts, base, options, into = drawn
    for kernel in (lerp, weighted_sum, selection):
        kernel.native_state()  # each kernel's one check against torch, which a server runs as it starts
    target = dicts[0] if into else None
    try:
        plan = merging.plan(merging.METHODS[method], dicts, base=base, into=target,
                            kwargs=list(options.items()))  # type: ignore[arg-type]
    except InvalidArgument:
        return  # a draw the merge refuses (dtypes it will not mix, say): nothing allocated
    meter = footprint._PeakBytes()
    try:
        with meter:
            merging.run(plan, dicts, base=base, into=target)
    except InvalidArgument as exc:  # multislerp of balanced opposite directions (scalars of both signs)
        assert "has no direction" in str(exc)
        return
    assert meter.peak <= footprint.merge_bytes(plan).get("cpu", 0)


ACTIVATIONS = [("relu", ()), ("relu", (True,)), ("gelu", ()), ("silu", ()), ("tanh", ()), ("sigmoid", ()),
               ("leakyrelu", ()), ("softmax", (1,)), ("logsoftmax", (1,)), ("identity", ())]


@st.composite
def forwards(draw: st.DrawFn) -> tuple[specs.LayerSpec, torch.Tensor, str]:
    """A stack of allowlisted layers, dense or convolutional, an input for it and a forward mode."""
    rows = draw(st.integers(1, 16))
    act = draw(st.sampled_from(ACTIVATIONS))
    if draw(st.booleans()):  # dense: [N, F]
        features, hidden, out = draw(st.integers(1, 32)), draw(st.integers(1, 64)), draw(st.integers(1, 16))
        norm = draw(st.sampled_from([(), (("batchnorm1d", (hidden,)),), (("layernorm", (hidden,)),), (("drop", (0.3,)),)]))
        layers = (("linear", (features, hidden)), act, *norm, ("linear", (hidden, out)))
        x = torch.randn(rows, features)
    else:  # convolutional: [N, C, S, S]
        channels, maps, kernel = draw(st.integers(1, 4)), draw(st.integers(1, 8)), draw(st.integers(1, 3))
        size = draw(st.integers(kernel + 1, 16))
        norm = draw(st.sampled_from([(), (("batchnorm2d", (maps,)),), (("instancenorm2d", (maps,)),),
                                     (("groupnorm", (1, maps)),)]))
        pool = draw(st.sampled_from([(), (("maxpool2d", (2,)),), (("avgpool2d", (2,)),), (("adaptavg2d", (1,)),)]))
        layers = (("conv2d", (channels, maps, kernel)), *norm, act, *pool, ("flatten", ()))
        x = torch.randn(rows, channels, size, size)
    spec = specs.LayerSpec("sequential", children=tuple(
        specs.LayerSpec(kind, f"l{i}", args) for i, (kind, args) in enumerate(layers)  # type: ignore[arg-type]
    ))
    return spec, x, draw(st.sampled_from(["forward", "nforward", "eforward"]))


@DRAWS
@given(drawn=forwards())
def test_a_drawn_forward_allocates_no_more_than_it_reserves(drawn: tuple[specs.LayerSpec, torch.Tensor, str]) -> None:
    """Through the service, as RunForward runs: the output kept as a new handle, and the pass."""
    with pytest.MonkeyPatch.context() as patch:
        _forward_within(*drawn, LedgerPeak(patch))


def _forward_within(spec: specs.LayerSpec, x: torch.Tensor, mode: str, ledger: LedgerPeak) -> None:
    s = cpu_service()
    try:
        module = s.create_module(spec).id
    except InvalidArgument:
        return
    source = s.create_tensor(upload(("", x))).id
    try:
        reserved, allocated = ledger.measure(s.store, lambda: s.forward(module, mode, source, no_upload()))
    except InvalidArgument:
        return  # a drawn input the module refuses (a batch of one through batchnorm in train mode, say)
    assert allocated <= reserved


@st.composite
def averages(draw: st.DrawFn) -> tuple[specs.LayerSpec, torch.dtype, torch.dtype | None, bool, BufferMode, str]:
    """A module (linear layers, a batchnorm between), its dtype, the dtype of its copy (None: its
    own), whether the copy holds buffers, the buffer mode and the call: copyparms, then avgparms or ema."""
    width, hidden = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    spec = specs.LayerSpec("sequential", children=(
        specs.LayerSpec("linear", "a", (width, hidden)), specs.LayerSpec("batchnorm1d", "n", (hidden,)),
        specs.LayerSpec("linear", "b", (hidden, draw(st.integers(1, 8)))),
    ))
    dtype = draw(st.sampled_from(FLOATS))
    copied = draw(st.sampled_from([None, *FLOATS]))
    with_buffers = draw(st.booleans())
    return spec, dtype, copied, with_buffers, draw(st.sampled_from(list(BufferMode))), draw(st.sampled_from(["avg", "ema"]))


@DRAWS
@given(drawn=averages())
def test_a_drawn_average_allocates_no_more_than_it_reserves(
    drawn: tuple[specs.LayerSpec, torch.dtype, torch.dtype | None, bool, BufferMode, str]
) -> None:
    """copyparms of a module of a drawn dtype into a dictionary of another, then avgparms or ema over
    it in a drawn buffer mode, twice (the first makes a running average's count), each call within
    what it reserved."""
    spec, dtype, copied, with_buffers, mode, verb = drawn
    for kernel in (lerp, weighted_sum, selection):
        kernel.native_state()  # each kernel's one check against torch, which a server runs as it starts
    with pytest.MonkeyPatch.context() as patch:
        ledger = LedgerPeak(patch)
        s = cpu_service()
        module = s.create_module(spec).id
        s.move(module, "cpu", dtype)
        made: list[str] = []
        reserved, allocated = ledger.measure(s.store, lambda: made.append(s.copy_parameters(module, copied, with_buffers).id))
        assert allocated <= reserved
        for _ in range(2):
            if verb == "avg":
                step = lambda: s.average_parameters(module, made[0], mode)  # noqa: E731
            else:
                step = lambda: s.update_moving_average(module, made[0], ScheduleChange(decay=0.9), None, mode)  # noqa: E731
            try:
                reserved, allocated = ledger.measure(s.store, step)
            except InvalidArgument:
                return  # a buffer mode the copy does not fit (buffers averaged into a copy without them)
            assert allocated <= reserved
