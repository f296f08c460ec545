"""Averaging and merging across models: a weighted mean of N dictionaries (federated averaging) and
the model-merging methods (`METHODS`: linear, slerp, task arithmetic, TIES, DARE, DELLA, breadcrumbs,
multislerp, Karcher, SCE, RAM, Model Stock, NearSwap, Arcee Fusion), one tensor at a time.

A call is planned first (`plan`): every dictionary is checked (same names, shapes that broadcast,
one device, floating or integer entries, options through the options engine) before anything is
allocated or changed, and the plan says what the call will allocate: the result's tensors and one
scratch buffer sized for the largest tensor's working set (`Slot.buffers`, `Slot.internal`), which
`footprint.merge_bytes` turns into the reservation. `run` then allocates the scratch and the result
before it writes anything, so running out of memory changes nothing either.

Arithmetic happens in float32, or float64 where an entry is float64 (the slot's `work` dtype),
whatever the entries' dtypes (slerp sums the norms and dot product of its angle in float64 either
way); the result is cast to the first dictionary's dtype (the base's, for methods with a base), or
to the dtype of the entry it is written into. Where a sum is divided by the weights' sum, weights
that would overflow or underflow it are first rescaled by a power of two (`normalizing`), which
leaves the mean as it is. The running-average count '.n' takes no part. Integer and bool entries are
never averaged: they must agree in dtype and shape, and the `integers` option picks the first
dictionary's value ("first", the default; the base's for methods with a base) or the elementwise
maximum ("max", e.g. for batchnorm's num_batches_tracked).
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import dtypes, flat, selection, weighted_sum
from .averaging import broadcast_shape
from .dictionaries import COUNT_KEY, TensorDict
from .errors import InvalidArgument
from .options import (
    UNIT_INTERVAL, Check, NON_NEGATIVE, Opt, Value, Values, ValueType, Wording, bool_value, float_value, int_value,
    numbers, resolve, str_value,
)

SLERP_EPS = 1e-8
"""A tensor whose norm is at most this is not normalised before SLERP's angle is taken."""

SLERP_COLINEAR = 2.0**-44
"""A cosine within this of 1 in absolute value is taken as colinear tensors, where sin(theta) is 0 and
SLERP falls back to the line whatever its threshold: the float64 cosine of two colinear tensors comes
out a few ulps short of +-1 (up to 2.4e-15 for x and k x at 2^24 elements; 2^-44 is 5.7e-14). Near
theta = pi the arc divides by sin(theta), 1e-16..1e-7 there (float64's pi has a sine of 1.2e-16), and
with threshold 1 opposite tensors took an "arc" up to 5e16 times their size; near theta = 0 the arc
and the line differ by under 1e-13 of the tensors' size."""

SLERP_CHUNK = 1 << 16
"""Elements per float64 chunk in which SLERP sums the norms and the dot product of its angle."""

SLERP_SUMS = 3 * 3 * 8
"""Bytes `_cosine` allocates beside its chunks: the three float64 sums, and a chunk's three dot
products and their stack (left out of the plan before: 72 bytes over, found by review)."""

SLERP_VECTORS = ("tensor", "rows", "columns")
"""What slerp takes as one vector: the whole tensor, each slice along its last dimension (a matrix's
rows: mergekit's nuslerp with nuslerp_flatten false), or each slice along its first dimension (its
columns: nuslerp_row_wise). A tensor of one dimension (or none) is one vector either way."""
RESCALE_NORMS = {"l1": 1.0, "l2": 2.0, "linf": math.inf}
"""DARE's rescales that match a norm of the dropped-out delta to the delta's (mergekit's
`rescaled_masked_tensor`; its dare_linear and dare_ties take "l1"), by the norm's order."""
NORM_EPS = 1e-7
"""mergekit's: where either norm is below it, the dropped-out delta is kept unscaled."""
NORM_BYTES = 4 * 8
"""What a norm rescale allocates: the two norms, their ratio (each a 0-dim tensor of the work dtype,
at most float64) and a comparison's bool (25 bytes measured in float64 under `footprint._PeakBytes`)."""

PerTensor = Sequence[tuple[str, Sequence[tuple[str, Value]]]]
"""Option overrides by entry-name pattern (fnmatch: '*', '?', '[ab]'), in order: the first pattern
that matches an entry's name gives its overrides."""

Weight = float | tuple[float, ...]
"""One dictionary's weight: a number, or mergekit's gradient (values spread evenly from the first
layer to the last, linear in between: `at_fraction`), so a model can count for more in some layers."""

TensorWeights = Sequence[tuple[str, Sequence[Weight]]]
"""Weights by entry-name pattern, one per dictionary, in order: the first of these patterns that
matches an entry's name gives its weights; an entry no pattern matches keeps the call's (mergekit's
`weight` with a filter, e.g. other weights for the attention tensors than for the MLPs)."""

_INTEGERS = Opt("integers", ValueType.STR, "first", choices=("first", "max", "mean"))
"""How integer (and bool) entries combine: the first input's value, the elementwise maximum (what most
libraries keep of num_batches_tracked), or Flower's FedAvg of them (`_integer_mean`)."""
_DENSITY = Opt(
    "density", ValueType.FLOAT, required=True,
    check=Check(lambda v: all(0 < x <= 1 for x in numbers(v)), "in (0, 1]", trailing=True), gradient=True,
)
_LAM = Opt("lam", ValueType.FLOAT, 1.0, gradient=True)
_RESCALE = Opt("rescale", ValueType.BOOL, False)
_RESCALE_NORM = Opt("rescale_norm", ValueType.STR, "l1", choices=tuple(RESCALE_NORMS))
"""TIES and breadcrumbs: with rescale=True a trimmed delta is scaled so that this norm of it is the
untrimmed delta's (mergekit's `rescale` of its magnitude sparsifications, which takes "l1")."""


@dataclass(frozen=True)
class Method:
    """A way of combining dictionaries: its options, whether it takes a base and weights, and how
    many dictionaries it takes (0: any number from one)."""

    name: str
    options: tuple[Opt, ...]
    base: bool = False
    unweighted: str = ""
    """Why the method takes no weights, as the refusal of weights says it ("": it takes them)."""
    count: int = 0
    sparsify: str = ""
    """"" (none), "magnitude" (TIES: keep the top density share of |delta|), "random" (DARE),
    "outliers" (breadcrumbs: drop the top gamma share of |delta|, then keep the next density share) or
    "ranked" (DELLA: keep each element with a probability that grows with its magnitude's rank)."""
    minimum: int = 1
    """The fewest dictionaries it takes (Model Stock needs two offsets to measure an angle)."""
    optional_base: bool = False
    """It takes a base or none (multislerp: with one, the offsets from it are interpolated)."""
    convex: bool = False
    """Its weights must be non-negative with a positive sum at every entry (a mean of directions)."""

    @property
    def weights(self) -> bool:
        """Whether it takes one weight per dictionary."""
        return not self.unweighted


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("average", (_INTEGERS,)),
        Method("linear", (Opt("normalize", ValueType.BOOL, True), _INTEGERS)),
        Method("slerp", (Opt("t", ValueType.FLOAT, check=UNIT_INTERVAL, required=True, gradient=True),
                         Opt("threshold", ValueType.FLOAT, 0.9995, UNIT_INTERVAL),
                         Opt("vectors", ValueType.STR, "tensor", choices=SLERP_VECTORS), _INTEGERS),
               unweighted="it interpolates by 't'", count=2, optional_base=True),
        Method("task_arithmetic", (_LAM, Opt("normalize", ValueType.BOOL, False), _INTEGERS), base=True),
        Method("ties", (_DENSITY, _LAM, Opt("normalize", ValueType.BOOL, True), _RESCALE, _RESCALE_NORM, _INTEGERS),
               base=True, sparsify="magnitude"),
        Method("dare", (_DENSITY, Opt("seed", ValueType.INT, 0, NON_NEGATIVE), Opt("rescale", ValueType.BOOL, True),
                        Opt("rescale_norm", ValueType.STR, "density", choices=("density", *RESCALE_NORMS)),
                        Opt("consensus", ValueType.BOOL, False), Opt("normalize", ValueType.BOOL, False), _LAM,
                        _INTEGERS),
               base=True, sparsify="random"),
        Method("della", (_DENSITY, Opt("epsilon", ValueType.FLOAT, 0.15, NON_NEGATIVE, gradient=True),
                         Opt("seed", ValueType.INT, 0, NON_NEGATIVE), Opt("rescale", ValueType.BOOL, True),
                         Opt("rescale_norm", ValueType.STR, "probability", choices=("probability", *RESCALE_NORMS)),
                         Opt("consensus", ValueType.BOOL, False), Opt("normalize", ValueType.BOOL, False), _LAM,
                         _INTEGERS),
               base=True, sparsify="ranked"),
        Method("breadcrumbs", (_DENSITY, Opt("gamma", ValueType.FLOAT, 0.01, UNIT_INTERVAL, gradient=True),
                               Opt("consensus", ValueType.BOOL, False), Opt("normalize", ValueType.BOOL, False), _LAM,
                               _RESCALE, _RESCALE_NORM, _INTEGERS),
               base=True, sparsify="outliers"),
        Method("multislerp", (Opt("normalize", ValueType.BOOL, True), _INTEGERS), optional_base=True),
        Method("model_stock", (Opt("filter_wise", ValueType.BOOL, False), _INTEGERS), base=True,
               unweighted="it weighs the models by the angle between them", minimum=2),
        Method("karcher", (Opt("max_iter", ValueType.INT, 10, NON_NEGATIVE), Opt("tol", ValueType.FLOAT, 1e-5, NON_NEGATIVE),
                           _INTEGERS), convex=True),
        Method("sce", (Opt("select_topk", ValueType.FLOAT, 1.0, UNIT_INTERVAL, gradient=True), _INTEGERS), base=True,
               unweighted="it weighs each model by its delta's mean square"),
        Method("nearswap", (Opt("t", ValueType.FLOAT, check=NON_NEGATIVE, required=True, gradient=True), _INTEGERS),
               base=True, unweighted="each element moves from the base by 't' over their distance there", count=1),
        Method("ram", (Opt("epsilon", ValueType.FLOAT, 1e-5, NON_NEGATIVE, gradient=True),
                       Opt("r", ValueType.FLOAT, 0.0, NON_NEGATIVE, gradient=True),
                       Opt("alpha", ValueType.FLOAT, 0.2, NON_NEGATIVE, gradient=True), _INTEGERS),
               base=True, unweighted="each element averages the models that changed it by more than epsilon"),
        Method("arcee_fusion", (_INTEGERS,), base=True, count=1,
               unweighted="each element of the model is kept or dropped by its importance"),
    )
}
MERGE_METHODS = tuple(name for name in METHODS if name != "average")
"""The methods `merge` takes; "average" is the weighted mean of its own verb."""

SAME_SHAPES = {"model_stock": "takes the angle between whole tensors", "della": "ranks each row of the tensors",
               "karcher": "takes the angle between whole tensors", "sce": "ranks each element's variance across the models",
               "arcee_fusion": "compares the rows of the model and the base"}
"""Methods whose inputs must have one shape (no broadcast), and why."""

STOCK_EPS = 1e-6
"""Model Stock's floors (mergekit's): a product of two offsets' norms below it is taken as it, and a
denominator 1 + (N - 1) cos below it in size keeps the base (t = 0) rather than divide by it."""
STOCK_TEMPS = 8
"""Row-sized float64 temporaries torch makes at once while Model Stock turns a block's sums into t
(`_stock_t`: the norms' product, the cosines, the denominator and its mask, the quotient)."""
STOCK_CHUNK = 1 << 18
"""Elements of each offset held in float64 at a time while Model Stock sums its dot products."""


@dataclass(frozen=True)
class Slot:
    """One entry of the result: its name, shape, dtype and device, the options in force for it, the
    dtype it is computed in (None for an integer entry) and the scratch it needs: `buffers` (one
    tensor of the result's shape per dtype listed) and `internal` bytes torch allocates by itself."""

    name: str
    method: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    options: Values
    work: torch.dtype | None
    direct: bool = False
    """The result entry itself can be the accumulator (the work dtype, and no input shares it)."""
    buffers: tuple[torch.dtype, ...] = ()
    internal: int = 0
    weights: tuple[float, ...] = ()
    """The dictionaries' weights for this entry: the call's, a pattern's, or a gradient's value at the
    entry's layer (1 each where none were given, and for slerp)."""
    densities: tuple[float, ...] = ()
    """TIES and DARE: each dictionary's density for this entry, from the `density` option or the
    per-dictionary densities (a pattern's, a gradient's value at the entry's layer); () otherwise."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the result's tensor for this slot."""
        return self.numel * _size(self.dtype)


@dataclass(frozen=True)
class Plan:
    """A checked call: the method and one slot per entry (each with its weights), in the first
    dictionary's order."""

    method: Method
    slots: tuple[Slot, ...]
    into: bool
    device: torch.device | None = None
    fused: list[list[flat.Run]] = field(default_factory=list, compare=False, repr=False)
    """The runs `run` found over `into` and the inputs (`flat.fuse_groups`), kept with a plan that is
    kept (`plan`): it is reused only while every one of those tensors lies where it lay."""

    def buffer_bytes(self) -> int:
        """Bytes of the one scratch buffer `run` allocates: the largest slot's buffers."""
        return max((sum(s.numel * _size(d) for d in s.buffers) for s in self.slots), default=0)


def _size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _base(t: torch.Tensor) -> int | None:
    """Where a tensor's storage starts, or None when it holds no memory. Within one call, while every
    tensor involved is alive, two tensors share memory exactly when their storages start at one
    address; this reads it from the tensor (no storage object is made: a plan checks thousands)."""
    pointer = t.data_ptr()
    return pointer - int(t.storage_offset()) * t.element_size() if pointer else None


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """The bytes [start, end) a tensor's elements span (its storage may hold others too: a flat
    dictionary's entries are slices of one buffer)."""
    start = t.data_ptr()
    if not t.numel():
        return start, start
    last = sum((n - 1) * abs(stride) for n, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether writing a may change b: the same storage and overlapping bytes."""
    base = _base(a)
    return base is not None and base == _base(b) and _overlap(_extent(a), _extent(b))


# -- planning: every check before anything is allocated -----------------------------------------------


def method_named(name: str, *, merge: bool = True) -> Method:
    """The method by name; InvalidArgument listing the valid ones."""
    names = MERGE_METHODS if merge else tuple(METHODS)
    if name not in names:
        raise InvalidArgument(f"unknown merge method '{name}' (one of {', '.join(names)})")
    return METHODS[name]


_KEPT = "merge"
"""Where a dictionary keeps the last merge plan made with it first (`TensorDict.plans`)."""


@dataclass(frozen=True)
class _Kept:
    """A plan made before, with what it was checked over: the call's arguments other than the
    dictionaries (`key`), and each dictionary (base, inputs, `into`) as it was. It holds no tensor
    (nothing stays alive through it): weak references, versions and data pointers."""

    key: tuple[object, ...]
    dicts: tuple[weakref.ref[TensorDict], ...]
    versions: tuple[int, ...]
    swaps: int
    pointers: list[int]
    plan: Plan


def _pointers(dicts: Sequence[TensorDict]) -> list[int]:
    return [t.data_ptr() for d in dicts for t in d.entries.values()]


def _kept_key(
    method: Method, weights: Sequence[Weight] | None, kwargs: Sequence[tuple[str, Value]], per_tensor: PerTensor,
    tensor_weights: TensorWeights, densities: Sequence[Weight] | None, tensor_densities: TensorWeights, base: bool,
    into: bool,
) -> tuple[object, ...] | None:
    """What, besides the dictionaries, a plan depends on, as a hashable key; None when it cannot be one."""
    key = (
        method.name, None if weights is None else tuple(weights), tuple(kwargs),
        tuple((pattern, tuple(given)) for pattern, given in per_tensor),
        tuple((pattern, tuple(given)) for pattern, given in tensor_weights),
        None if densities is None else tuple(densities),
        tuple((pattern, tuple(given)) for pattern, given in tensor_densities), base, into,
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def plan(
    method: Method,
    dicts: Sequence[TensorDict],
    *,
    base: TensorDict | None = None,
    weights: Sequence[Weight] | None = None,
    into: TensorDict | None = None,
    kwargs: Sequence[tuple[str, Value]] = (),
    per_tensor: PerTensor = (),
    tensor_weights: TensorWeights = (),
    densities: Sequence[Weight] | None = None,
    tensor_densities: TensorWeights = (),
) -> Plan:
    """Check a call and work out what it will allocate (`check`); the plan made last time when
    nothing it was made over has changed since.

    Federated rounds and repeated merges make the same call over the same dictionaries again and
    again; checking 8 dictionaries of 160 entries took 2.1-2.3 ms of a 31 ms served average, and
    finding their runs 0.9 ms more (docs/perf.md, "Merge plans kept"). The first dictionary keeps
    its last plan with the call's other arguments and, for every dictionary, the very object, its
    `version` (bumped whenever its entries are set, replaced or removed) and each entry's data
    pointer; and `flat.swaps()`, bumped when a module's data is swapped in place. A plan is reused
    only when all of these match, so it is the plan `check` would make again. Live dictionaries (a
    module's parameters, made afresh each call) are always checked.
    """
    everything = ([base] if base is not None else []) + list(dicts) + ([into] if into is not None else [])
    key = _kept_key(method, weights, kwargs, per_tensor, tensor_weights, densities, tensor_densities, base is not None,
                    into is not None)
    if key is None or not dicts or any(d.live for d in everything):
        return check(
            method, dicts, base=base, weights=weights, into=into, kwargs=kwargs, per_tensor=per_tensor,
            tensor_weights=tensor_weights, densities=densities, tensor_densities=tensor_densities,
        )
    kept = dicts[0].plans.get(_KEPT)
    if (
        isinstance(kept, _Kept) and kept.key == key and len(kept.dicts) == len(everything)
        and all(ref() is d for ref, d in zip(kept.dicts, everything))
        and kept.versions == tuple(d.version for d in everything) and kept.swaps == flat.swaps()
        and kept.pointers == _pointers(everything)
    ):
        return kept.plan
    made = check(
        method, dicts, base=base, weights=weights, into=into, kwargs=kwargs, per_tensor=per_tensor,
        tensor_weights=tensor_weights, densities=densities, tensor_densities=tensor_densities,
    )
    dicts[0].plans[_KEPT] = _Kept(
        key, tuple(weakref.ref(d) for d in everything), tuple(d.version for d in everything), flat.swaps(),
        _pointers(everything), made,
    )
    return made


def check(
    method: Method,
    dicts: Sequence[TensorDict],
    *,
    base: TensorDict | None = None,
    weights: Sequence[Weight] | None = None,
    into: TensorDict | None = None,
    kwargs: Sequence[tuple[str, Value]] = (),
    per_tensor: PerTensor = (),
    tensor_weights: TensorWeights = (),
    densities: Sequence[Weight] | None = None,
    tensor_densities: TensorWeights = (),
) -> Plan:
    """Check a call and work out what it will allocate; nothing is allocated or changed.

    Raises:
        InvalidArgument: a wrong number of dictionaries, a base where none is taken (or none where
            one is needed), weights that do not fit the method, an unknown option or a bad value, a
            pattern that matches no entry, dictionaries whose names differ, shapes that do not
            broadcast, entries on different devices, complex entries, integer entries that differ
            in dtype or shape, an `into` dictionary without a fitting entry for every name, or a
            `lam` or DARE density that is no number in the work dtype (`_check_factors`).
    """
    what = method.name
    if not dicts:
        raise InvalidArgument(f"{what}: give at least one dictionary")
    if method.count and len(dicts) != method.count:
        besides = " besides the base" if method.base else ""
        raise InvalidArgument(
            f"{what} takes exactly {method.count} {'dictionary' if method.count == 1 else 'dictionaries'}{besides}, "
            f"given {len(dicts)}"
        )
    if len(dicts) < method.minimum:
        raise InvalidArgument(
            f"{what} takes at least {method.minimum} dictionaries besides the base, given {len(dicts)}; it measures "
            "the angle between the models' offsets from the base"
        )
    if method.base and base is None:
        raise InvalidArgument(f"{what} needs a base dictionary (the model the others were fine-tuned from)")
    if not method.base and not method.optional_base and base is not None:
        based = [m.name for m in METHODS.values() if m.base]
        hint = " (karcher averages it with the others: list it among the dictionaries)" if what == "karcher" else ""
        raise InvalidArgument(
            f"{what} takes no base{hint}; use {', '.join(based[:-1])} or {based[-1]} to merge against a base"
        )
    checked = _weights(method, len(dicts), weights)
    by_pattern = [(pattern, _pattern_weights(method, len(dicts), pattern, given)) for pattern, given in tensor_weights]
    own = _densities(method, len(dicts), densities, kwargs, per_tensor)
    own_by_pattern = [
        (pattern, _pattern_densities(method, len(dicts), pattern, given)) for pattern, given in tensor_densities
    ]
    if own is not None:  # the option is required by default: the per-dictionary densities stand in for it
        kwargs = [*kwargs, ("density", 1.0)]  # (never read: every slot carries its densities)
    try:
        values = resolve(what, method.options, (), kwargs, Wording.SETTING)
    except InvalidArgument as exc:  # (unknown names and bad values come first, as the engine words them)
        if method.sparsify and "option 'density' is required" in str(exc):
            raise InvalidArgument(f"{exc}; give density=, or one density per dictionary (densities=)") from None
        raise
    overrides = [(pattern, _override(method, kwargs, pattern, given)) for pattern, given in per_tensor]

    sources = ([base] if base is not None else []) + list(dicts)
    labels = (["the base"] if base is not None else []) + [f"dictionary {i + 1}" for i in range(len(dicts))]
    names = _same_names(sources, labels)
    for pattern in [p for p, _ in overrides] + [p for p, _ in by_pattern] + [p for p, _ in own_by_pattern]:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(f"'{n}'" for n in names[:3]) + (", ..." if len(names) > 3 else "")
            raise InvalidArgument(f"{what}: pattern '{pattern}' matches no entry (entries: {shown or 'none'})")
    devices = {d.entries[name].device for d in sources for name in names}
    if into is not None:
        devices |= {into.entries[n].device for n in names if n in into.entries}
    if len(devices) > 1:
        listed = ", ".join(sorted(str(d) for d in devices))
        raise InvalidArgument(f"{what}: the entries are on {listed}; move the dictionaries to one device with to()")
    read_by = _readers(names, sources, into) if into is not None else {}
    divisors: dict[tuple[float, ...], float] = {}  # what a normalised sum divides by, once per set of weights
    graded = any(isinstance(v, tuple) for o in (values, *(o for _, o in overrides)) for v in o.values()) or any(
        isinstance(w, tuple)
        for ws in (checked, own or (), *(ws for _, ws in by_pattern), *(ds for _, ds in own_by_pattern)) for w in ws
    )
    fractions = layer_fractions(names) if graded else {}  # only where a gradient was given
    constant = _constant(checked)
    slots = []
    for name in names:
        options = next((o for pattern, o in overrides if fnmatch.fnmatchcase(name, pattern)), values)
        given = next((ws for pattern, ws in by_pattern if fnmatch.fnmatchcase(name, pattern)), checked)
        if graded:
            options = {k: at_fraction(v, fractions[name]) if isinstance(v, tuple) else v for k, v in options.items()}
        used = constant if given is checked and constant is not None else _weights_at(given, fractions.get(name, 0.0))
        kept = _slot_densities(method, name, options, own, own_by_pattern, fractions, len(dicts))
        slots.append(_slot(method, name, [d.entries[name] for d in sources], labels, options, base is not None, into,
                           read_by, used, kept))
        if used not in divisors:
            divisors[used] = sum(normalizing(used)[0])
        _check_normalizable(method, options, used, divisors[used], slots[-1])
        _check_factors(method, options, slots[-1])
        _check_ranked(method, options, slots[-1])
        _check_convex(method, used, slots[-1])
        if slots[-1].work is None and method.weights and str_value(options, "integers") == "mean" \
                and not math.fsum(used) > 0:
            raise InvalidArgument(
                f"{what}: entry '{name}': integers='mean' divides by the sum of the weights, which is 0; give a "
                "positive weight, or integers='first' or 'max'"
            )
    return Plan(method, tuple(slots), into is not None, next(iter(devices), None))


def layer_fractions(names: Sequence[str]) -> dict[str, float]:
    """Where each entry lies in the model, from 0 to 1, as mergekit places a tensor for a gradient: a
    layer's tensors at i / (layers - 1) (1 when there is one layer), and every entry outside the layers
    (embeddings before them, the final norm and the head after them) at 0. mergekit plans its
    architecture's pre- and post-weights with the module's starting place, 0: `lm_head` takes a
    gradient's first value, not its last (mergekit 0.1.5's run_merge, `tests/test_mergekit.py`; this
    said 1 for the entries after the layers until that test ran mergekit itself). An entry's layer is
    the first all-digit part of its dotted name ('model.layers.7.mlp.w' is in layer 7, a sequential's
    '2.weight' in layer 2); the layers are the distinct such numbers, in order, so gaps (a
    sequential's parameterless activations) do not count. mergekit reads the layers from the model's
    architecture; here the names are all there is."""
    index = {name: next((int(part) for part in name.split(".") if part.isdigit()), None) for name in names}
    layers = sorted({i for i in index.values() if i is not None})
    rank = {layer: r for r, layer in enumerate(layers)}
    return {
        name: 0.0 if i is None else rank[i] / (len(layers) - 1) if len(layers) > 1 else 1.0
        for name, i in index.items()
    }


def at_fraction(gradient: tuple[float, ...], fraction: float) -> float:
    """mergekit's value of a gradient (a list of numbers spread evenly from the first layer to the
    last) at `fraction`: linear between the two nearest of them."""
    scaled = fraction * (len(gradient) - 1)
    low = int(scaled)
    high = min(len(gradient) - 1, low + 1)
    share = scaled - low
    return (1 - share) * float(gradient[low]) + share * float(gradient[high])


FLOAT32_MAX = torch.finfo(torch.float32).max

UNSCALED = (2.0**-64, 2.0**64)
"""Weights whose largest |w| lies in this range are divided by their sum as given, bit for bit;
others are rescaled first (`normalizing`). Within it, a float32 sum over 256 models of values |x| up to
2^56 stays inside float32's range (2^128), and products with |x| from 2^-62 stay among its normal
numbers: far past the values models hold."""


def normalizing(weights: tuple[float, ...]) -> tuple[tuple[float, ...], int]:
    """The weights a sum that is divided by the weights' own sum uses, and the power of two they were
    multiplied by (used = given * 2^shift): the given ones (shift 0) while the largest |w| lies in
    `UNSCALED`; otherwise every weight times the one power of two that brings the largest into [1, 2).

    Why: sum_i w_i x_i is summed in float32 (or float64) before the division, so weights near
    float32's limit overflowed it (weights [1e38, 1e38] gave inf, [3e38, 3e38] inf / inf = NaN), and
    tiny ones underflowed to 0 / 0. A power of two is exact: the ratios, hence the mean, are those of
    the given weights, and as long as nothing overflows or underflows every rounding is the same, so a
    rescaled mean has the bits the given weights would give with unlimited range. Weights inside the
    range are not touched, so ordinary ones keep their bits for certain. A weight so much smaller than
    the largest that, rescaled, it lies below the work dtype's smallest value (2^-149 in float32)
    counts as 0, as any such weight does without rescaling; its share of the mean is far below
    float32's precision."""
    largest = max((abs(w) for w in weights), default=0.0)
    if largest == 0.0 or UNSCALED[0] <= largest <= UNSCALED[1]:
        return weights, 0
    shift = 1 - math.frexp(largest)[1]
    return tuple(math.ldexp(w, shift) for w in weights), shift


def _divides(slot: Slot) -> bool:
    """Whether a floating slot's result is divided by the weights' sum: average, and normalize."""
    return slot.method == "average" or ("normalize" in slot.options and bool_value(slot.options, "normalize"))


def _weights(
    method: Method, count: int, weights: Sequence[Weight] | None, pattern: str | None = None
) -> tuple[Weight, ...]:
    """The call's (or, with `pattern`, a pattern's) weights checked: one per dictionary, each a finite
    number within float32's range or a gradient of one or more such numbers; 1 each when none are given."""
    what = method.name if pattern is None else f"{method.name} (pattern '{pattern}')"
    if weights is None or len(weights) == 0:
        return (1.0,) * count
    if not method.weights:
        raise InvalidArgument(f"{what} takes no weights; {method.unweighted}")
    if len(weights) != count:
        raise InvalidArgument(f"{what}: {len(weights)} weights for {count} dictionaries; give one weight per dictionary")
    graded = any(isinstance(w, tuple) for w in weights)
    if graded and method.name == "average":
        raise InvalidArgument("average takes one number per dictionary; use merge('linear', ...) for weights by layer")
    for i, w in enumerate(weights):
        if isinstance(w, tuple) and not w:
            raise InvalidArgument(
                f"{what}: dictionary {i + 1}'s weight is an empty list; give a number or a list of them"
            )
        for x in w if isinstance(w, tuple) else (w,):
            if not math.isfinite(x):
                raise InvalidArgument(f"{what}: weights must be finite, given {x}")
            if abs(x) > FLOAT32_MAX:  # torch refuses such an alpha for a float32 sum partway through a merge
                raise InvalidArgument(
                    f"{what}: weights must lie within float32's range (at most {FLOAT32_MAX:.4g} in size), given {x}; "
                    "scale them down"
                )
    if method.name == "average":
        plain = [float(w) for w in weights if not isinstance(w, tuple)]
        if any(w < 0 for w in plain) or sum(plain) <= 0:
            raise InvalidArgument(
                f"average: weights must be non-negative with a positive sum (e.g. example counts), given {plain}"
            )
    return tuple(tuple(float(x) for x in w) if isinstance(w, tuple) else float(w) for w in weights)


def _pattern_weights(method: Method, count: int, pattern: str, weights: Sequence[Weight]) -> tuple[Weight, ...]:
    """A pattern's weights checked (`_weights`); a pattern must be given and its weights too."""
    if not pattern:
        raise InvalidArgument(f"{method.name}: an empty pattern; use '*' to match every entry")
    if method.name == "average":
        raise InvalidArgument("average takes one weight per dictionary for every entry; use merge('linear', ...) for "
                              "weights by pattern")
    if not weights:
        raise InvalidArgument(f"{method.name}: pattern '{pattern}' gives no weights; give one per dictionary")
    return _weights(method, count, weights, pattern)


def _constant(weights: tuple[Weight, ...]) -> tuple[float, ...] | None:
    """The weights as plain numbers, or None where one is a gradient."""
    if any(isinstance(w, tuple) for w in weights):
        return None
    return weights  # type: ignore[return-value]  # every one a float, checked above


def _weights_at(weights: tuple[Weight, ...], fraction: float) -> tuple[float, ...]:
    """Each weight's value at an entry `fraction` of the way through the model: a number as it is, a
    gradient's value there (`at_fraction`)."""
    return tuple(at_fraction(w, fraction) if isinstance(w, tuple) else w for w in weights)


def _densities(
    method: Method, count: int, densities: Sequence[Weight] | None, kwargs: Sequence[tuple[str, Value]],
    per_tensor: PerTensor,
) -> tuple[Weight, ...] | None:
    """The call's per-dictionary densities checked (each in (0, 1], a number or a gradient), or None
    when none are given. They take the `density` option's place, so giving both is refused."""
    if not densities:
        return None
    what = method.name
    if not method.sparsify:
        raise InvalidArgument(f"{what} keeps every delta; per-dictionary densities are for ties, dare, della and breadcrumbs")
    if any(name == "density" for name, _ in kwargs) or any(n == "density" for _, given in per_tensor for n, _ in given):
        raise InvalidArgument(f"{what}: give the density option or per-dictionary densities, not both")
    return _density_values(what, count, densities)


def _pattern_densities(method: Method, count: int, pattern: str, densities: Sequence[Weight]) -> tuple[Weight, ...]:
    """A pattern's per-dictionary densities checked (`_densities`)."""
    what = f"{method.name} (pattern '{pattern}')"
    if not pattern:
        raise InvalidArgument(f"{method.name}: an empty pattern; use '*' to match every entry")
    if not method.sparsify:
        raise InvalidArgument(f"{what} keeps every delta; per-dictionary densities are for ties, dare, della and breadcrumbs")
    if not densities:
        raise InvalidArgument(f"{method.name}: pattern '{pattern}' gives no densities; give one per dictionary")
    return _density_values(what, count, densities)


def _density_values(what: str, count: int, densities: Sequence[Weight]) -> tuple[Weight, ...]:
    if len(densities) != count:
        raise InvalidArgument(
            f"{what}: {len(densities)} densities for {count} dictionaries; give one density per dictionary"
        )
    for i, d in enumerate(densities):
        values = d if isinstance(d, tuple) else (d,)
        if not values:
            raise InvalidArgument(
                f"{what}: dictionary {i + 1}'s density is an empty list; give a number or a list of them"
            )
        if not all(0 < x <= 1 for x in values):  # (NaN fails too)
            raise InvalidArgument(f"{what}: dictionary {i + 1}'s density must be in (0, 1], given {list(values)}")
    return tuple(tuple(float(x) for x in d) if isinstance(d, tuple) else float(d) for d in densities)


def _slot_densities(
    method: Method, name: str, options: Values, own: tuple[Weight, ...] | None,
    own_by_pattern: Sequence[tuple[str, tuple[Weight, ...]]], fractions: dict[str, float], count: int,
) -> tuple[float, ...]:
    """Each dictionary's density for an entry: the first pattern with densities that matches it, else
    the call's per-dictionary densities, else the `density` option for every dictionary; () for
    methods that keep every delta."""
    if not method.sparsify:
        return ()
    given = next((ds for pattern, ds in own_by_pattern if fnmatch.fnmatchcase(name, pattern)), own)
    if given is None:
        return (float_value(options, "density"),) * count
    return _weights_at(given, fractions.get(name, 0.0))


def _check_normalizable(
    method: Method, options: Values, weights: tuple[float, ...], divisor: float, slot: Slot
) -> None:
    """A plain weighted sum divided by the weights' sum needs a sum other than 0, and (weights of both
    signs) one not so near 0 against the largest weight that the sum of the weights used, `divisor`
    (`normalizing`), falls below the work dtype's normal numbers: dividing by it would lose its
    digits, or divide by 0 where it rounds to 0, and the normalised weights w_i / sum lie past the
    dtype's range. (Consensus divides each element by the weights that counted there, 1 where they
    sum to 0.)"""
    consensus = _elects(method.name, options)
    if "normalize" not in options or not bool_value(options, "normalize") or consensus:
        return
    total = sum(weights)
    if total == 0:
        raise InvalidArgument(
            f"{method.name}: the weights sum to 0, so entry '{slot.name}' cannot be normalised; give normalize=False"
        )
    if slot.work is not None and abs(divisor) < torch.finfo(slot.work).tiny:
        largest = max(abs(w) for w in weights)
        raise InvalidArgument(
            f"{method.name}: the weights sum to {total:.4g}, too near 0 against the largest ({largest:.4g}) to divide "
            f"by in {str(slot.work).removeprefix('torch.')}, so entry '{slot.name}' cannot be normalised; give "
            "normalize=False or other weights"
        )


def _check_factors(method: Method, options: Values, slot: Slot) -> None:
    """The factors a task-vector merge scales a floating entry by, in its work dtype, must be numbers
    there. `lam` past the dtype's largest value (3.4e38 in float32) is inf there, and lam * 0 made
    every unchanged element NaN instead of the base's value. DARE's rescale divides each kept delta by
    `density`: a density below the dtype's smallest normal number (1.2e-38 in float32) rounds to a
    subnormal or to 0, so every dropped delta became 0 / 0 = NaN and a kept one overflowed. Either
    came back as a merge full of NaN, answered OK."""
    if slot.work is None or not method.base or "lam" not in options:  # (model_stock scales by its angle)
        return
    work, info = str(slot.work).removeprefix("torch."), torch.finfo(slot.work)
    lam = float_value(options, "lam")
    if abs(lam) > info.max:
        raise InvalidArgument(
            f"{method.name}: lam {lam:.4g} lies past {work}'s range (at most {info.max:.4g} in size), where entry "
            f"'{slot.name}' is computed; give a smaller lam"
        )
    if method.sparsify != "random" or not bool_value(options, "rescale") or str_value(options, "rescale_norm") != "density":
        return
    density = min(slot.densities)
    if density < info.tiny:
        raise InvalidArgument(
            f"dare: density {density:.4g} is below {work}'s smallest normal number ({info.tiny:.4g}), so entry "
            f"'{slot.name}' cannot be rescaled by 1/density in {work}; give a larger density, or rescale=False"
        )


def _check_ranked(method: Method, options: Values, slot: Slot) -> None:
    """DELLA keeps an element with a probability from density - epsilon to density + epsilon: both must
    lie in (0, 1) for every model whose density is below 1 (mergekit refuses the same), and the
    smaller be a normal number of the work dtype, since "probability" divides by it."""
    if method.sparsify != "ranked" or slot.work is None:
        return
    epsilon = float_value(options, "epsilon")
    tiny = torch.finfo(slot.work).tiny
    for i, density in enumerate(slot.densities):
        if density < 1 and not (density - epsilon >= tiny and density + epsilon < 1):
            raise InvalidArgument(
                f"della: entry '{slot.name}': dictionary {i + 1}'s density {density:.4g} with epsilon {epsilon:.4g} "
                "gives keep probabilities outside (0, 1); give epsilon below min(density, 1 - density)"
            )


def _check_convex(method: Method, weights: tuple[float, ...], slot: Slot) -> None:
    """Karcher's weights at every entry: non-negative with a positive sum. The mean on the sphere
    minimises the weighted sum of squared angles to the models, which has no minimum with a negative
    weight (the point opposite that model is always better) and no meaning with all weights 0."""
    if not method.convex:
        return
    if any(w < 0 for w in weights) or not math.fsum(weights) > 0:
        listed = ", ".join(f"{w:g}" for w in weights)
        raise InvalidArgument(
            f"{method.name}: entry '{slot.name}' has weights [{listed}]; its weights must be non-negative with a "
            "positive sum at every entry (a gradient included)"
        )


def _override(
    method: Method, kwargs: Sequence[tuple[str, Value]], pattern: str, given: Sequence[tuple[str, Value]]
) -> Values:
    """The options for entries matching `pattern`: the call's options, with the pattern's on top."""
    if not pattern:
        raise InvalidArgument(f"{method.name}: an empty pattern; use '*' to match every entry")
    merged = dict(kwargs)
    seen: set[str] = set()
    for name, value in given:
        if name in seen:
            raise InvalidArgument(f"{method.name}: option '{name}' given twice for pattern '{pattern}'")
        seen.add(name)
        merged[name] = value
    return resolve(f"{method.name} (pattern '{pattern}')", method.options, (), list(merged.items()), Wording.SETTING)


def _names(d: TensorDict) -> list[str]:
    return [name for name in d.entries if name != COUNT_KEY]


def _same_names(sources: Sequence[TensorDict], labels: Sequence[str]) -> list[str]:
    """The entry names every source holds, in the first source's order; InvalidArgument naming the
    first difference otherwise."""
    names = _names(sources[0])
    wanted = set(names)
    for d, label in zip(sources[1:], labels[1:]):
        have = set(_names(d))
        if have != wanted:
            missing, extra = sorted(wanted - have), sorted(have - wanted)
            parts = ([f"lacks {_listed(missing)}"] if missing else []) + ([f"has {_listed(extra)} besides"] if extra else [])
            raise InvalidArgument(
                f"{label} {' and '.join(parts)} ({labels[0]}'s entries); every dictionary needs the same names"
            )
    return names


def _listed(names: list[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _slot(
    method: Method, name: str, tensors: list[torch.Tensor], labels: Sequence[str], options: Values, has_base: bool,
    into: TensorDict | None, read_by: dict[int, list[tuple[int, int, str]]], weights: tuple[float, ...],
    densities: tuple[float, ...] = (),
) -> Slot:
    """Check one entry across the sources and plan its computation."""
    what = f"{method.name}: entry '{name}'"
    first = tensors[0]
    held = [t.dtype for t in tensors]
    kinds = set(held)  # usually one dtype: each test below runs once per distinct dtype
    if any(d.is_complex for d in kinds):
        raise InvalidArgument(f"{what} is complex; only real entries can be merged: delete it or convert it")
    floating = [d.is_floating_point for d in held] if len(kinds) > 1 else [first.is_floating_point()] * len(held)
    if len(kinds) > 1 and any(floating) and not all(floating):
        label = labels[floating.index(not floating[0])]
        raise InvalidArgument(f"{what} is floating in {labels[0]} but not in {label}; give every dictionary the same kinds")
    shape = tuple(first.shape)
    for t, label in zip(tensors[1:], labels[1:]):
        if t.shape == shape:
            continue  # the usual case, without working out a broadcast
        try:
            shape = broadcast_shape(shape, tuple(t.shape))
        except InvalidArgument as exc:
            raise InvalidArgument(f"{what}: {exc} ({label})") from None
    if method.name in SAME_SHAPES and floating[0]:
        for t, label in zip(tensors[1:], labels[1:]):
            if tuple(t.shape) != tuple(first.shape):
                raise InvalidArgument(
                    f"{what} is {list(first.shape)} in {labels[0]} but {list(t.shape)} in {label}; {method.name} "
                    f"{SAME_SHAPES[method.name]}, so their shapes must be the same"
                )
    out = into.entries.get(name) if into is not None else None
    if into is not None:
        _check_into(what, out, shape, floating[0], first.dtype)
    readers: set[str] = set()
    if out is not None:
        extent = _extent(out)
        readers = {n for start, end, n in read_by.get(_base(out) or 0, ()) if _overlap(extent, (start, end))}
    if readers - {name}:
        # Writing this entry of `into` would change another entry that is still to be read.
        raise InvalidArgument(
            f"{what}: 'into' shares memory with the inputs' '{min(readers - {name})}'; merge into a new dictionary"
        )
    dtype = out.dtype if out is not None else first.dtype
    if not floating[0]:
        for t, label in zip(tensors[1:], labels[1:]):
            if t.dtype != first.dtype or t.shape != first.shape:
                raise InvalidArgument(
                    f"{what} is {dtypes.name(first.dtype)} {list(first.shape)} in {labels[0]} but {dtypes.name(t.dtype)} {list(t.shape)} in "
                    f"{label}; integer entries are not averaged and must agree"
                )
        if str_value(options, "integers") == "mean":  # a float64 sum and one input cast at a time
            return Slot(name, method.name, shape, dtype, first.device, options, None, buffers=(torch.float64,) * 2,
                        weights=weights, densities=densities)
        aside = (dtype,) if out is not None and name in readers and _overlaps_unlike(out, tensors) else ()
        return Slot(name, method.name, shape, dtype, first.device, options, None, buffers=aside, weights=weights,
                    densities=densities)
    wide = torch.float64 in kinds or dtype == torch.float64
    work = torch.float64 if wide else torch.float32
    shared = name in readers
    direct = dtype == work and not shared
    numel = math.prod(shape)
    buffers, internal = _scratch(method, options, work, direct, tensors, kinds, has_base, numel, first.device,
                                 densities)
    return Slot(name, method.name, shape, dtype, first.device, options, work, direct, buffers, internal, weights,
                densities)


def _overlaps_unlike(out: torch.Tensor, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether `out` shares memory with one of the tensors without being the very same view of it
    (an `into` entry one element on in an input's storage): writing it then changes elements of that
    input still to be read, so its value is made aside first (`_integer`)."""
    return any(
        _shares(out, t) and (t.data_ptr(), t.shape, t.stride()) != (out.data_ptr(), out.shape, out.stride())
        for t in tensors
    )


def _check_into(what: str, out: torch.Tensor | None, shape: tuple[int, ...], floating: bool, dtype: torch.dtype) -> None:
    if out is None:
        raise InvalidArgument(f"{what} is missing from 'into'; write into a dictionary that holds every entry "
                              "(e.g. one made by copyparms), or leave 'into' out for a new dictionary")
    if tuple(out.shape) != shape:
        raise InvalidArgument(f"{what}: 'into' holds shape {list(out.shape)}, the result has shape {list(shape)}")
    if 0 in out.stride() and any(stride == 0 and size > 1 for stride, size in zip(out.stride(), out.shape)):
        raise InvalidArgument(f"{what}: 'into' shares memory between its elements (an expanded tensor); set it to a full tensor")
    if floating and not out.is_floating_point():
        raise InvalidArgument(f"{what}: 'into' holds {dtypes.name(out.dtype)}; a merged entry needs a floating-point entry")
    if not floating and out.dtype != dtype:
        raise InvalidArgument(f"{what}: 'into' holds {dtypes.name(out.dtype)}, the inputs {dtypes.name(dtype)}; integer entries must agree")


def _readers(names: Sequence[str], sources: Sequence[TensorDict], into: TensorDict) -> dict[int, list[tuple[int, int, str]]]:
    """The entry names whose inputs live in each storage (by where it starts) that `into` also
    writes: only those inputs can be overwritten before they are read. Inputs elsewhere (the usual
    case: `into` is a dictionary of its own) are not listed, which spares an extent for each of them
    (2 of 3.8 ms of planning 8 dictionaries of 160 entries)."""
    written = {start for name in names if name in into.entries and (start := _base(into.entries[name])) is not None}
    read_by: dict[int, list[tuple[int, int, str]]] = {}
    for d in sources:
        entries = d.entries
        for name in names:
            t = entries[name]
            pointer = t.data_ptr()
            if pointer and (base := pointer - int(t.storage_offset()) * t.element_size()) in written:
                read_by.setdefault(base, []).append((*_extent(t), name))
    return read_by


def _scratch(
    method: Method, options: Values, work: torch.dtype, direct: bool, tensors: list[torch.Tensor],
    kinds: set[torch.dtype], has_base: bool, numel: int, device: torch.device, densities: tuple[float, ...] = (),
) -> tuple[tuple[torch.dtype, ...], int]:
    """The scratch tensors (each of the result's shape) a slot's kernel takes, in the order it takes
    them (every work-dtype buffer before the bool one, so each view is aligned), and the bytes torch
    allocates inside an operation."""
    acc = () if direct else (work,)
    if method.name in ("average", "linear"):
        cast = (work,) if kinds != {work} else ()
        return acc + cast, 0
    if method.name == "multislerp":
        # _sum_squares: a float64 chunk (none in float64) and its 0-dim sums; a copy of an input that is not
        # contiguous, where it is read as it is (no offset buffer).
        offsets = (work,) if has_base or kinds != {work} else ()
        chunk = 0 if work == torch.float64 else min(numel, STOCK_CHUNK) * _size(torch.float64)
        strided = [t.numel() * t.element_size() for t in tensors if not t.is_contiguous()]
        copies = 0 if offsets else max(strided, default=0)
        return acc + offsets, chunk + SLERP_SUMS + copies
    if method.name == "karcher":
        # _dot: two float64 chunks (none in float64) and a copy of an input that is not contiguous; the
        # tangent, and one input cast at a time where the inputs are of another dtype.
        cast = (work,) if kinds != {work} else ()
        strided = [t.numel() * t.element_size() for t in tensors if not t.is_contiguous()]
        return acc + (work,) + cast, _dot_bytes(numel, kinds | {work}) + max(strided, default=0)
    if method.name == "sce":
        # The delta, the mean then the majority's sign, the variance then the weights that counted;
        # the base cast, and where select_topk trims, the mask and the selection's own (`_threshold`).
        base_cast = (work,) if tensors[0].dtype != work else ()
        trims = float_value(options, "select_topk") < 1
        select = numel * (_size(work) + 8) if trims and not _selects_natively(device) else 0
        return acc + (work,) * 3 + base_cast + ((torch.bool,) if trims else ()), max(select, _dot_bytes(numel, {work}))
    if method.name == "nearswap":
        return acc + (work,) + ((work,) if tensors[0].dtype != work else ()), 0
    if method.name == "ram":
        # The delta, |delta|, the counts then factors, with r the unique elements' indicator; the base
        # cast; the mask; and `_dot`'s chunks for RAM+'s counts.
        unique = (work,) if float_value(options, "r") > 0 else ()
        base_cast = (work,) if tensors[0].dtype != work else ()
        return acc + (work,) * 3 + unique + base_cast + (torch.bool,), _dot_bytes(numel, {work})
    if method.name == "arcee_fusion":
        rows = _rows(tuple(tensors[0].shape))
        # Two softmaxes (the second then the KL terms, the first then the importance), the mask; torch
        # allocates each row's max and sum (twice), the KL per row, and kthvalue's copy and indices.
        return acc + (work, work, torch.bool), max(numel * (_size(work) + 8), 5 * rows * _size(work)) + FUSION_SCALARS
    if method.name == "model_stock":
        filter_wise = bool_value(options, "filter_wise")
        whole = _stock_layout(tuple(tensors[0].shape), len(tensors) - 1, filter_wise)[0] == 1
        cast = (work,) if whole and kinds != {work} else ()  # by_torch's cast of a bfloat16 input
        return acc + cast, _stock_bytes(tuple(tensors[0].shape), len(tensors) - 1, filter_wise, tensors)
    if method.name == "slerp":
        if str_value(options, "vectors") != "tensor":
            shape = tuple(tensors[0].shape)
            for t in tensors[1:]:  # the result's shape (`_slot` checked that they broadcast)
                shape = broadcast_shape(shape, tuple(t.shape))
            return (work, work), _vector_slerp_bytes(shape, str_value(options, "vectors"), work)
        # _cosine casts a chunk of each tensor to float64 at a time (views when work is float64).
        chunks = 0 if work == torch.float64 else 2 * min(numel, SLERP_CHUNK) * _size(torch.float64)
        return (work, work), chunks + SLERP_SUMS
    consensus = _elects(method.name, options)
    normalize = bool_value(options, "normalize")
    base_cast = (work,) if has_base and tensors[0].dtype != work else ()
    trims = method.sparsify in ("magnitude", "outliers") and any(d < 1 for d in densities)
    aside = (work,) if _takes_aside(method.name, consensus, normalize, trims, device) else ()
    draws = (work,) if method.sparsify == "ranked" else ()  # DELLA's keep probabilities beside its mask
    election = (work,) if consensus else ()
    divisor = (work,) if consensus and normalize else ()
    mask = (torch.bool,) if consensus or trims else ()
    # torch.kthvalue copies the values and keeps an int64 index per element while it selects. On the CPU,
    # where the native selection is on, it takes kthvalue's place and allocates nothing (`_selects_natively`);
    # CUDA, and a CPU where it is off, take kthvalue.
    internal = numel * (_size(work) + 8) if trims and not _selects_natively(device) else 0
    if method.sparsify and bool_value(options, "rescale") and str_value(options, "rescale_norm") not in (
            "density", "probability"):
        internal += NORM_BYTES
    if method.sparsify == "ranked" and any(d < 1 for d in densities):
        internal += _rank_bytes(max((tuple(t.shape) for t in tensors), key=math.prod), work)  # (shapes agree)
    return acc + (work,) + base_cast + aside + draws + election + divisor + mask, internal


def _selects_natively(device: torch.device) -> bool:
    """Whether TIES's threshold and trim run on the native kernels (`selection`), which need no
    scratch: on the CPU where they are on (the work dtype is always one of their kinds and the delta
    a contiguous scratch view, so every slot there takes them)."""
    return device.type == "cpu" and selection.active()


def _elects(method: str, options: Values) -> bool:
    """Whether a task-vector merge elects signs: TIES always; DARE and breadcrumbs with consensus=True."""
    return method == "ties" or ("consensus" in options and bool_value(options, "consensus"))


def _takes_aside(method: str, consensus: bool, normalize: bool, trims: bool, device: torch.device) -> bool:
    """Whether a task-vector slot (`_task_vectors`) takes the work-dtype buffer `aside`: DARE's
    drop mask, each delta's sign where consensus and normalize make the divisor, and |delta| where a
    TIES trim runs on torch's path. The plan and the kernel both ask here, so the buffers it carves
    are the ones the plan reserved. TIES without normalize on the native path took it unused: a
    buffer the size of the largest entry, reserved for nothing (a merge that fitted was refused)."""
    return (method in ("dare", "della") or (consensus and normalize) or (trims and not _selects_natively(device))
            or (method == "breadcrumbs" and trims))


# -- running a plan ------------------------------------------------------------------------------------


class Scratch:
    """Views carved, in order, from one preallocated byte buffer."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.offset = 0

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * _size(dtype)
        view = self.buffer[self.offset:self.offset + n].view(dtype).view(tuple(shape))
        self.offset += n
        return view

    def reset(self) -> None:
        self.offset = 0


def run(
    p: Plan, dicts: Sequence[TensorDict], *, base: TensorDict | None = None, into: TensorDict | None = None
) -> TensorDict:
    """Carry out a plan made over these same dictionaries: a new dictionary, or `into` rewritten.

    The scratch and (without `into`) every result tensor are allocated before anything is written;
    a new dictionary's entries lie back to back in one buffer per dtype (`flat.flat_empty`).
    """
    device = p.device or torch.device("cpu")
    scratch = Scratch(torch.empty(p.buffer_bytes(), dtype=torch.uint8, device=device))
    result = into if into is not None else TensorDict(  # flat, as copyparms' copies: later averages fuse
        dict(zip((s.name for s in p.slots), flat.flat_empty([(s.shape, (s.device, s.dtype)) for s in p.slots])))
    )
    kernel = _KERNELS[p.method.name]
    taken: set[int] = set()
    if base is None and kernel is _weighted_sum:
        groups = [[result.entries[slot.name], *(d.entries[slot.name] for d in dicts)] for slot in p.slots]
        if into is not None and p.fused:
            runs = p.fused[0]
        else:
            runs = flat.fuse_groups(groups)
            if into is not None:  # a new result lies elsewhere each call; `into` where it lay
                p.fused.append(runs)
        taken = _native_sums(p, groups, runs)
        if len(taken) < len(p.slots):
            taken |= _span_sums(p, groups, runs, taken)
    with torch.no_grad():
        for i, slot in enumerate(p.slots):
            if i in taken:
                continue
            scratch.reset()
            out = result.entries[slot.name]
            xs = [d.entries[slot.name] for d in dicts]
            b = base.entries[slot.name] if base is not None else None
            if slot.work is None and str_value(slot.options, "integers") == "mean":
                _integer_mean(slot, xs, slot.weights, out, scratch)
            elif slot.work is None:
                _integer(slot, xs if b is None else [b, *xs], out, scratch)
            else:
                kernel(slot, xs, b, slot.weights, out, scratch)
    return result


def _native_sums(p: Plan, groups: Sequence[Sequence[torch.Tensor]], runs: Sequence[flat.Run]) -> set[int]:
    """Average and linear merges on the CPU: every entry the native kernel can sum, in one call per
    dtype and division (`weighted_sum.native_weighted_sums`); the slots it took. A run of entries
    whose results and inputs lie back to back (flat dictionaries: `flat.fuse_groups`) goes as one
    span, any other entry as it is.

    One call rather than one per entry or run: the kernel starts its threads once and they share
    every entry's blocks, so a flat dictionary of 160 entries is one pass (8 x 25.6M float32 in
    process: 45.6 ms against 55.1 entry by entry, `python -m bench.native_micro`; docs/perf.md,
    "Averaging across models"), and uploaded dictionaries, a tensor per entry, merge about as fast.
    Entries it does not take go to `_span_sums`, then `_weighted_sum` one by one. `groups` holds each
    slot's result tensor then its inputs, `runs` their `flat.fuse_groups`."""
    if (p.device is not None and p.device.type != "cpu") or not weighted_sum.active():
        return set()
    terms: dict[tuple[tuple[float, ...], bool], tuple[tuple[float, ...], float | None]] = {}
    for slot in p.slots:  # once per set of weights (one, unless a gradient or a pattern gave others)
        if (slot.weights, _divides(slot)) not in terms:
            terms[slot.weights, _divides(slot)] = _terms(slot, slot.weights)
    keys = [(slot.work, slot.dtype, terms[slot.weights, _divides(slot)]) for slot in p.slots]
    jobs: list[weighted_sum.Job] = []
    used: list[tuple[float, ...]] = []
    covers: list[range] = []
    for start, stop, numel in runs:
        work, dtype, (weights, divisor) = keys[start]
        if stop - start > 1 and len(set(keys[start:stop])) == 1 and work == dtype:
            out, *xs = (flat.span(t, numel) for t in groups[start])
            jobs.append((out, xs, divisor))
            used.append(weights)
            covers.append(range(start, stop))
            continue
        for i in range(start, stop):
            work, dtype, (weights, divisor) = keys[i]
            if work == dtype:
                out, *xs = groups[i]
                jobs.append((out, xs, divisor))
                used.append(weights)
                covers.append(range(i, i + 1))
    left = set(weighted_sum.native_weighted_sums(jobs, used[0] if used else (), used))
    return {i for j, cover in enumerate(covers) if j not in left for i in cover}


def _span_sums(
    p: Plan, groups: Sequence[Sequence[torch.Tensor]], runs: Sequence[flat.Run], taken: set[int]
) -> set[int]:
    """Average and linear merges that the native kernel did not take (every one on CUDA): each run
    of entries whose result and inputs lie back to back (flat dictionaries: `flat.fuse_groups`) summed
    as one span by torch's own operations (`weighted_sum.by_torch`), so a flat dictionary of 160
    entries is `1 + len(dicts)` kernel launches rather than 160 times that; the slots it took.

    The operations are elementwise, so a span gives each element the bits it gets entry by entry.
    On an H200, 8 x 25.6M float32 in 160 entries: 10.8 ms entry by entry, 0.67 ms as one span, the same
    bits (docs/perf.md, "GPU"). A run goes as a span only when each of its entries can be written as
    it is summed (`Slot.direct`: the work dtype, sharing no input's memory) and every input has the
    result's dtype and shape; any other entry goes through `_weighted_sum` one by one."""
    spanned: set[int] = set()
    for start, stop, numel in runs:
        slots = p.slots[start:stop]
        out = groups[start][0]
        if (
            stop - start < 2 or any(i in taken for i in range(start, stop))
            or not all(slot.direct for slot in slots) or len({_terms(slot, slot.weights) for slot in slots}) != 1
            or any(x.dtype != out.dtype for x in groups[start])
        ):
            continue
        weights, divisor = _terms(slots[0], slots[0].weights)
        out_span, *xs = (flat.span(t, numel) for t in groups[start])
        with torch.no_grad():
            weighted_sum.by_torch(out_span, xs, weights, divisor)
        spanned.update(range(start, stop))
    return spanned


def _terms(slot: Slot, weights: tuple[float, ...]) -> tuple[tuple[float, ...], float | None]:
    """The weights a weighted sum multiplies by and what it divides by (None: no division): a mean's
    weights rescaled by a power of two where they would overflow or underflow (`normalizing`)."""
    if not _divides(slot):
        return weights, None
    scaled = normalizing(weights)[0]
    return scaled, sum(scaled)


def _integer(slot: Slot, tensors: list[torch.Tensor], out: torch.Tensor, scratch: Scratch) -> None:
    """Integer entries: the first's value, or the elementwise maximum. `out` may be one of the
    inputs (averaging into one of them), so it is never overwritten before it has been read. Where
    it overlaps an input without being it (the plan gave the slot a buffer: `_overlaps_unlike`) the
    value is made in the scratch and copied in: excluding that input from the maximum, as for one that
    `out` is, took out's own old elements in its place, and `copy_` refused the overlap (a RuntimeError)."""
    if slot.buffers:
        aside = scratch.take(slot.shape, slot.dtype)
        _combine_integers(slot, tensors, aside)
        out.copy_(aside)
        return
    _combine_integers(slot, tensors, out)


def _integer_mean(
    slot: Slot, tensors: list[torch.Tensor], weights: tuple[float, ...], out: torch.Tensor, scratch: Scratch
) -> None:
    """Integer entries as Flower's FedAvg combines them (`aggregate`: sum of value * weight over the sum
    of the weights, in float64), written into the entry's integer dtype as torch's `copy_` writes
    Flower's float64 result into a model's integer buffer (`load_state_dict`): truncated toward
    zero. Every input is read before `out` is written, so `out` may be one of them. The inputs (not
    a merge's base) with the call's weights; equal ones where the method takes none (slerp)."""
    total = math.fsum(weights)  # > 0: `check` refuses a mean over weights summing to 0
    acc = scratch.take(slot.shape, torch.float64)
    cast = scratch.take(slot.shape, torch.float64)
    acc.zero_()
    for t, w in zip(tensors, weights):
        cast.copy_(t)
        acc.add_(cast, alpha=w)
    acc.div_(total)
    out.copy_(acc)


def _combine_integers(slot: Slot, tensors: list[torch.Tensor], out: torch.Tensor) -> None:
    """`_integer` into an `out` that each input either is or does not touch."""
    if str_value(slot.options, "integers") == "first":
        out.copy_(tensors[0])
        return
    others = [t for t in tensors if not _shares(out, t)]
    if len(others) == len(tensors):
        out.copy_(others.pop(0))
    for t in others:
        torch.maximum(out, t, out=out)


Kernel = Callable[[Slot, list[torch.Tensor], torch.Tensor | None, tuple[float, ...], torch.Tensor, Scratch], None]


def _accumulator(slot: Slot, out: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    assert slot.work is not None
    return out if slot.direct else scratch.take(slot.shape, slot.work)


def _finish(acc: torch.Tensor, out: torch.Tensor) -> None:
    if acc is not out:
        out.copy_(acc)


def _weighted_sum(
    slot: Slot, xs: list[torch.Tensor], b: torch.Tensor | None, weights: tuple[float, ...], out: torch.Tensor,
    scratch: Scratch,
) -> None:
    """sum_i w_i x_i / sum_i w_i (the weighted mean; linear without normalize skips the division), the
    weights rescaled by a power of two where they would overflow or underflow the sum (`normalizing`).

    Large CPU entries of the work dtype go through the native kernel in one pass over the inputs
    (`weighted_sum`: the same operations and bits as below), straight into `out`."""
    assert slot.work is not None
    weights, divisor = _terms(slot, weights)
    if weighted_sum.native_weighted_sum(out, xs, weights, divisor):  # (the plan refused a sum of 0)
        return
    acc = _accumulator(slot, out, scratch)
    cast = scratch.take(slot.shape, slot.work) if any(x.dtype != slot.work for x in xs) else None
    weighted_sum.by_torch(acc, xs, weights, divisor, cast)
    _finish(acc, out)


def _slerp(
    slot: Slot, xs: list[torch.Tensor], b: torch.Tensor | None, weights: tuple[float, ...], out: torch.Tensor,
    scratch: Scratch,
) -> None:
    """Spherical interpolation from xs[0] (t=0) to xs[1] (t=1) over the angle between the whole
    tensors; nearly colinear tensors (|cos| above `threshold`) are interpolated linearly. With a base,
    between the two offsets from it, then plus the base (mergekit's nuslerp with a base)."""
    assert slot.work is not None
    t = float_value(slot.options, "t")
    v0, v1 = scratch.take(slot.shape, slot.work), scratch.take(slot.shape, slot.work)
    v0.copy_(xs[0])
    v1.copy_(xs[1])
    if b is not None:
        v0.sub_(b)
        v1.sub_(b)
    if str_value(slot.options, "vectors") != "tensor":
        _vector_slerp(slot, v0, v1, t)
        if b is not None:
            v0.add_(b)
        out.copy_(v0)
        return
    dot = _cosine(v0, v1)
    cosine = max(-1.0, min(1.0, dot)) if math.isfinite(dot) else 1.0
    theta = math.acos(cosine)
    sin_theta = math.sin(theta)
    # Also linear where the angle is unusable (threshold 1 lets every finite cosine through): a cosine
    # that is not a number (entries holding inf or NaN), or colinear tensors (`SLERP_COLINEAR`).
    if not abs(dot) <= float_value(slot.options, "threshold") or abs(cosine) >= 1.0 - SLERP_COLINEAR:
        v0.lerp_(v1, t)
    else:
        v0.mul_(math.sin((1 - t) * theta) / sin_theta).add_(v1, alpha=math.sin(t * theta) / sin_theta)
    if b is not None:
        v0.add_(b)
    out.copy_(v0)


def _vector_layout(shape: tuple[int, ...], vectors: str) -> tuple[int, int]:
    """(how many vectors, their length) when slerp takes `vectors` of a tensor of this shape."""
    numel = math.prod(shape)
    if len(shape) < 2 or numel == 0:
        return (1 if numel else 0), numel
    length = shape[-1] if vectors == "rows" else shape[0]
    return numel // length, length


def _vector_block(count: int, length: int) -> int:
    """Vectors whose float64 copies `_vector_slerp` holds at once: SLERP_CHUNK elements' worth, at
    least one vector."""
    return max(1, min(count, SLERP_CHUNK // max(length, 1)))


def _vector_slerp_bytes(shape: tuple[int, ...], vectors: str, work: torch.dtype) -> int:
    """What `_vector_slerp` allocates: three float64 blocks (the two vectors' copies and their product),
    three float64 sums per vector and the coefficients' float64 and work-dtype copies (a few per vector)."""
    count, length = _vector_layout(shape, vectors)
    block = _vector_block(count, length) * length
    return 3 * block * 8 + count * (8 * 8 + 2 * _size(work)) + SLERP_SUMS


def _as_vectors(t: torch.Tensor, vectors: str) -> torch.Tensor:
    """A (vectors, length) view of a contiguous tensor: rows as they lie; columns transposed (strided)."""
    if t.dim() < 2:
        return t.reshape(1, -1)
    return t.view(-1, t.shape[-1]) if vectors == "rows" else t.view(t.shape[0], -1).t()


def _vector_slerp(slot: Slot, v0: torch.Tensor, v1: torch.Tensor, t: float) -> None:
    """v0 := the slerp from v0 to v1 at t of each vector (`SLERP_VECTORS`: each row, or each column)
    on its own, with the whole tensor's rules per vector: the norms and dot product summed in float64
    (a block of vectors at a time), a norm of at most SLERP_EPS taken as 1, the line where |cos|
    passes the threshold, is within SLERP_COLINEAR of 1, or is not a number. mergekit's nuslerp
    with nuslerp_flatten false (and nuslerp_row_wise for columns) reads the same, in float32."""
    vectors = str_value(slot.options, "vectors")
    a, c = _as_vectors(v0, vectors), _as_vectors(v1, vectors)
    count, length = a.shape
    if count == 0 or length == 0:
        return
    f64 = torch.float64
    block = _vector_block(count, length)
    x, y, product = (torch.empty(block, length, dtype=f64, device=v0.device) for _ in range(3))
    sums = torch.empty(3, count, dtype=f64, device=v0.device)
    for start in range(0, count, block):
        n = min(block, count - start)
        xs, ys, ps = x[:n].copy_(a[start:start + n]), y[:n].copy_(c[start:start + n]), product[:n]
        for k, (p, q) in enumerate(((xs, xs), (ys, ys), (xs, ys))):
            torch.sum(torch.mul(p, q, out=ps), dim=1, out=sums[k, start:start + n])
    del x, y, product
    norms = sums[:2].sqrt_()
    norms.masked_fill_(norms <= SLERP_EPS, 1.0)
    cosine = sums[2].div_(norms[0]).div_(norms[1])
    threshold = float_value(slot.options, "threshold")
    line = ~(cosine.abs() <= threshold) | (cosine.abs() >= 1.0 - SLERP_COLINEAR)  # (NaN: not <= anything)
    theta = cosine.clamp_(-1.0, 1.0).acos_()
    sin_theta = theta.sin().masked_fill_(line, 1.0)
    first = torch.sin(theta * (1 - t)).div_(sin_theta).masked_fill_(line, 1 - t)
    second = torch.sin(theta * t).div_(sin_theta).masked_fill_(line, t)
    shape = (-1, 1)
    a.mul_(first.to(v0.dtype).view(shape)).add_(c.mul_(second.to(v0.dtype).view(shape)))


def _cosine(v0: torch.Tensor, v1: torch.Tensor) -> float:
    """<v0, v1> / (|v0| |v1|) over the whole (contiguous) tensors, a norm of at most SLERP_EPS taken as 1.

    The three sums are accumulated in float64, SLERP_CHUNK elements at a time so that the float64
    copies stay small (two chunks, which the plan reserves; none in float64, where the chunks are
    views): in float32, torch's CPU vector_norm is off by 2e-4 of the norm at 2^23 elements, which
    moves the angle (and the result) by more than float32 rounding of the result."""
    a, b = v0.view(-1), v1.view(-1)
    n, f64 = a.numel(), torch.float64
    buffers = None if v0.dtype == f64 else [torch.empty(min(n, SLERP_CHUNK), dtype=f64, device=v0.device) for _ in "xy"]
    sums = torch.zeros(3, dtype=f64, device=v0.device)
    for start in range(0, n, SLERP_CHUNK):
        x, y = a[start:start + SLERP_CHUNK], b[start:start + SLERP_CHUNK]
        if buffers is not None:
            x, y = buffers[0][:x.numel()].copy_(x), buffers[1][:y.numel()].copy_(y)
        sums += torch.stack((torch.dot(x, x), torch.dot(y, y), torch.dot(x, y)))
    aa, bb, ab = sums.tolist()
    n0, n1 = math.sqrt(aa), math.sqrt(bb)
    return float(ab / ((n0 if n0 > SLERP_EPS else 1.0) * (n1 if n1 > SLERP_EPS else 1.0)))


def seed_for(seed: int, index: int, name: str) -> int:
    """The seed of DARE's mask for dictionary `index` (0-based) and entry `name`: the first 8 bytes of
    sha256("{seed}/{index}/{name}"), big-endian, less the top bit. Each entry's mask depends only on
    these, never on the other entries or the order they are processed in."""
    digest = hashlib.sha256(f"{seed}/{index}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def _task_vectors(
    slot: Slot, xs: list[torch.Tensor], b: torch.Tensor | None, weights: tuple[float, ...], out: torch.Tensor,
    scratch: Scratch,
) -> None:
    """base + lam * combine_i(w_i * sparsify(x_i - base)): task arithmetic, TIES, DARE and breadcrumbs.

    With sign consensus (TIES; DARE with consensus=True), the elected sign of each element is that
    of sum_i w_i delta_i (+ when it is 0); only contributions w_i delta_i of that sign count, and with
    normalize the sum is divided by the sum of the weights that counted there (1 where none did).
    Without it, the contributions are summed and, with normalize, divided by sum_i w_i. The deltas
    are made twice with consensus (once to elect, once to sum), so memory does not grow with N.
    With normalize the weights are rescaled by a power of two where they would overflow or underflow
    the sums (`normalizing`), and so is that 1.
    """
    assert slot.work is not None and b is not None
    work, shape, options = slot.work, slot.shape, slot.options
    method = slot.method
    consensus = _elects(method, options)
    normalize = bool_value(options, "normalize")
    shift = 0
    if normalize:
        weights, shift = normalizing(weights)
    top = math.frexp(torch.finfo(work).max)[1] - 1  # the dtype's largest power of two: 2^127 in float32
    one = math.ldexp(1.0, min(shift, top))  # 1 given weight, in the weights used
    acc = _accumulator(slot, out, scratch)
    delta = scratch.take(shape, work)
    base = b
    if b.dtype != work:
        base = scratch.take(shape, work)
        base.copy_(b)
    densities = slot.densities or (1.0,) * len(xs)
    rescale = str_value(options, "rescale_norm") if method != "task_arithmetic" and bool_value(options, "rescale") else ""
    trims = method in ("ties", "breadcrumbs") and any(d < 1 for d in densities)
    aside = scratch.take(shape, work) if _takes_aside(method, consensus, normalize, trims, slot.device) else None
    draws = scratch.take(shape, work) if method == "della" else None
    election = scratch.take(shape, work) if consensus else None
    divisor = scratch.take(shape, work) if consensus and normalize else None
    mask = scratch.take(shape, torch.bool) if consensus or trims else None
    thresholds: dict[int, float] = {}
    bands: dict[int, tuple[float | None, float | None]] = {}

    def make_delta(i: int) -> None:
        delta.copy_(xs[i])
        delta.sub_(base)
        if method == "ties" and densities[i] < 1:
            assert mask is not None
            if i not in thresholds:
                thresholds[i] = _threshold(delta, densities[i], aside)
            before = _norm(delta, rescale)
            _trim(delta, thresholds[i], aside, mask)
            _rescale_to(delta, before, rescale)
        elif method == "breadcrumbs" and densities[i] < 1:
            assert mask is not None and aside is not None
            if i not in bands:
                bands[i] = _band(delta, densities[i], float_value(options, "gamma"), aside)
            before = _norm(delta, rescale)
            _keep_band(delta, bands[i], aside, mask)
            _rescale_to(delta, before, rescale)
        elif method == "dare":
            assert aside is not None
            generator = torch.Generator(device=slot.device).manual_seed(seed_for(int_value(options, "seed"), i, slot.name))
            aside.bernoulli_(densities[i], generator=generator)
            _drop_out(delta, aside, densities[i], rescale)
        elif method == "della" and densities[i] < 1:
            assert aside is not None and draws is not None
            _keep_probabilities(delta, densities[i], float_value(options, "epsilon"), aside)
            generator = torch.Generator(device=slot.device).manual_seed(seed_for(int_value(options, "seed"), i, slot.name))
            torch.bernoulli(aside, generator=generator, out=draws)
            before = _norm(delta, rescale)
            delta.mul_(draws)
            if rescale == "probability":
                delta.div_(aside)
            else:
                _rescale_to(delta, before, rescale)
        delta.mul_(weights[i])

    acc.zero_()
    if consensus:
        assert election is not None and mask is not None
        election.zero_()
        for i in range(len(xs)):
            make_delta(i)
            election.add_(delta)
        torch.ge(election, 0, out=mask)
        election.copy_(mask).mul_(2).sub_(1)  # the elected sign, +1 or -1
        if divisor is not None:
            divisor.zero_()
        for i in range(len(xs)):
            make_delta(i)
            delta.mul_(election).clamp_(min=0)  # |w delta| where its sign is the elected one, else 0
            if divisor is not None:
                assert aside is not None
                torch.sign(delta, out=aside)
                divisor.add_(aside, alpha=weights[i])
            acc.add_(delta.mul_(election))
        if divisor is not None:
            torch.eq(divisor, 0, out=mask)
            acc.div_(divisor.masked_fill_(mask, one))
    else:
        for i in range(len(xs)):
            make_delta(i)
            acc.add_(delta)
        if normalize:
            acc.div_(sum(weights))  # the plan refused a sum of 0
    acc.mul_(float_value(options, "lam")).add_(base)
    _finish(acc, out)


def _drop_out(delta: torch.Tensor, mask: torch.Tensor, density: float, rescale: str) -> None:
    """DARE's drop-out of a delta in place: delta * mask, then rescaled by `rescale`: "density"
    divides by it (the paper's 1/density), a norm of RESCALE_NORMS scales the dropped-out delta so
    that its norm is the delta's (mergekit's `rescaled_masked_tensor`: the ratio of the two norms,
    each a 0-dim tensor of the work dtype, unless either is below NORM_EPS), "" leaves it. The norms
    are torch.linalg.vector_norm's, which allocate no tensor of the delta's size (mergekit's
    `abs().sum()` and `abs().max()` do; the l1 sum may round differently in its last bits)."""
    before = _norm(delta, rescale)
    delta.mul_(mask)
    if rescale == "density":
        delta.div_(weighted_sum.true_divisor(delta, density))
    else:
        _rescale_to(delta, before, rescale)


def _rank_view(t: torch.Tensor) -> torch.Tensor:
    """The view DELLA ranks along dimension 1 of: a tensor of fewer than 2 dimensions as one row (as
    mergekit unsqueezes it)."""
    return t.reshape(1, -1) if t.dim() < 2 else t


def _rank_bytes(shape: tuple[int, ...], work: torch.dtype) -> int:
    """What `_keep_probabilities` allocates: the sort's values and int64 indices, and one row of ranks."""
    numel = math.prod(shape)
    along = (shape[1] if len(shape) >= 2 else numel) if numel else 0
    return numel * (_size(work) + 8) + along * _size(work)


def _keep_probabilities(delta: torch.Tensor, density: float, epsilon: float, out: torch.Tensor) -> None:
    """out := DELLA's keep probability of each element (mergekit's `della_magprune`): the elements'
    magnitudes ranked along dimension 1 (a vector as one row; stable, NaN largest), rank 0..n-1
    scaled to [0, 1], then density - epsilon + 2 epsilon times it: the largest magnitude is kept with
    density + epsilon, the smallest with density - epsilon. Where dimension 1 holds one element its
    rank is halfway (mergekit divides 0 by 0 there)."""
    magnitudes, probabilities = _rank_view(delta), _rank_view(out)
    along = magnitudes.shape[1]
    torch.abs(magnitudes, out=probabilities)
    order = torch.sort(probabilities, dim=1, stable=True).indices
    if along > 1:
        steps = torch.arange(along, dtype=out.dtype, device=out.device).div_(along - 1)
        shape = [1] * probabilities.dim()
        shape[1] = along
        probabilities.scatter_(1, order, steps.view(shape).expand_as(order))
    else:
        probabilities.fill_(0.5)
    probabilities.mul_(2 * epsilon).add_(density - epsilon)


def _norm(delta: torch.Tensor, rescale: str) -> torch.Tensor | None:
    """The delta's norm a rescale matches (`RESCALE_NORMS`; a 0-dim tensor of its dtype), or None."""
    order = RESCALE_NORMS.get(rescale)
    return torch.linalg.vector_norm(delta, order) if order is not None else None


def _rescale_to(delta: torch.Tensor, before: torch.Tensor | None, rescale: str) -> None:
    """delta *= before / its own norm now (mergekit's `rescaled_masked_tensor`), unless either norm is
    below NORM_EPS or there is no norm to match."""
    if before is None:
        return
    after = torch.linalg.vector_norm(delta, RESCALE_NORMS[rescale])
    if not (bool(before < NORM_EPS) or bool(after < NORM_EPS)):
        delta.mul_(before / after)


def _threshold(delta: torch.Tensor, density: float, aside: torch.Tensor | None) -> float:
    """The k-th largest |delta|, NaN counted largest: entries at or above it are kept (ties at the
    threshold all stay, `_trim`). k = max(1, int(density * numel)): as mergekit 0.1.5's `magnitude`,
    a positive density keeps at least one element, so a 4-element bias at density 0.2 keeps its
    largest change (it kept none, k = int(density * numel) = 0, until `tests/test_mergekit.py` ran
    mergekit's README TIES example, density 0.1 over 8-element norms). On the CPU a native radix
    selection finds it, elsewhere torch.kthvalue over |delta| in `aside` (None where the plan found
    the native selection on: `_takes_aside`): the same value (`selection`)."""
    n = delta.numel()
    k = max(1, int(density * n))
    if k >= n:
        return -math.inf
    return selection.kth_largest_magnitude(delta, k, aside)


def _band(delta: torch.Tensor, density: float, gamma: float, aside: torch.Tensor) -> tuple[float | None, float | None]:
    """Breadcrumbs' band of |delta| (mergekit's `magnitude_outliers`): of n elements, the int(gamma n)
    largest are dropped as outliers (fewer where that would leave under int(density n)), and of the
    rest the int(density n) largest kept. As (upper, lower): drop |delta| at or above upper (None:
    drop none), keep |delta| at or above lower (None: keep nothing, where int(density n) is 0, as
    mergekit keeps nothing there); NaN counted largest."""
    n = delta.numel()
    target = int(density * n)
    if target <= 0:
        return None, None
    dropped = min(int(gamma * n), n - target)
    upper = selection.kth_largest_magnitude(delta, dropped, aside) if dropped > 0 else None
    lower = selection.kth_largest_magnitude(delta, dropped + target, aside) if dropped + target < n else -math.inf
    return upper, lower


def _keep_band(
    delta: torch.Tensor, band: tuple[float | None, float | None], aside: torch.Tensor, mask: torch.Tensor
) -> None:
    """delta := +0 outside its band (`_band`): at or above the upper threshold (a NaN there drops the
    NaNs alone; inf drops the infinities and NaNs), and below the lower one (`_trim`)."""
    upper, lower = band
    if lower is None:
        delta.zero_()
        return
    if upper is not None:
        if math.isnan(upper):
            torch.ne(delta, delta, out=mask)  # the NaNs: a NaN is not equal to itself
        else:
            torch.abs(delta, out=aside)
            torch.lt(aside, upper, out=mask)
            mask.logical_not_()  # at or above upper, and NaN
        delta.masked_fill_(mask, 0)
    _trim(delta, lower, aside, mask)


def _trim(delta: torch.Tensor, threshold: float, aside: torch.Tensor | None, mask: torch.Tensor) -> None:
    """delta := +0 wherever |delta| is below `threshold` in the selection's order, NaN above inf: every
    number where it is a NaN (k NaNs or more: only the NaNs are kept), elsewhere what
    `selection.zero_below` zeroes. `|delta| < NaN`, false everywhere, kept every entry of a delta
    with k NaNs (found by review)."""
    if math.isnan(threshold):
        torch.eq(delta, delta, out=mask)  # the numbers: a NaN is not equal to itself
        delta.masked_fill_(mask, 0)
    else:
        selection.zero_below(delta, threshold, aside, mask)


MULTISLERP_EPS = 1e-8
"""mergekit's multislerp eps: added to each tensor's norm before it is made a unit vector, and the
weighted mean of the unit vectors shorter than it has no direction."""


def _multislerp(
    slot: Slot, xs: list[torch.Tensor], b: torch.Tensor | None, weights: tuple[float, ...], out: torch.Tensor,
    scratch: Scratch,
) -> None:
    """Spherical interpolation of N tensors (mergekit's `multislerp`): each tensor (or, with a base, its
    offset from the base) is made a unit vector, v_i / (|v_i| + eps); the result points along their
    weighted mean and is as long as the weighted mean of the |v_i| (weights divided by their sum with
    `normalize`), plus the base. mergekit then steps into the tangent space at that mean and back; the
    weighted tangent vectors there sum to exactly 0 (sum_i w_i (u_i - <u_i, m> m) = |M| m - <M, m> m
    with M = sum_i w_i u_i and m = M / |M|), so that step changes nothing but rounding and is left out.
    Where the weighted mean of the unit vectors is shorter than eps (opposite tensors of equal weight)
    there is no direction: two tensors are then combined linearly, as mergekit does, more refused.
    Where every tensor is 0 (an entry no model changed from the base, a frozen layer; an empty one)
    the result is the base (0 without one), where mergekit refuses three or more.

    One tensor is the result itself. The norms are summed in float64 (`_sum_squares`)."""
    assert slot.work is not None
    if len(xs) == 1:
        out.copy_(xs[0])
        return
    total = sum(weights)
    used = [w / total for w in weights] if bool_value(slot.options, "normalize") else list(weights)
    offset = scratch.take(slot.shape, slot.work) if b is not None or any(x.dtype != slot.work for x in xs) else None

    def vector(i: int) -> torch.Tensor:
        if offset is None:
            return xs[i]
        offset.copy_(xs[i])
        return offset.sub_(b) if b is not None else offset

    norms = [math.sqrt(_sum_squares(vector(i))) for i in range(len(xs))]
    acc = _accumulator(slot, out, scratch)
    acc.zero_()
    for i in range(len(xs)):
        acc.add_(vector(i), alpha=used[i] / (norms[i] + MULTISLERP_EPS))
    length = math.sqrt(_sum_squares(acc))
    if not any(norms):  # every tensor 0 (an entry no model changed from the base, an empty one)
        acc.zero_()
    elif length < MULTISLERP_EPS:
        if len(xs) != 2:
            raise InvalidArgument(
                f"multislerp: entry '{slot.name}': the weighted mean of the models' directions is 0 (opposite "
                "tensors whose weights balance), so it has no direction; give other weights"
            )
        acc.zero_()
        for i in range(2):
            acc.add_(vector(i), alpha=used[i])
    else:
        acc.mul_(sum(w * n for w, n in zip(used, norms)) / length)
    if b is not None:
        acc.add_(b)
    _finish(acc, out)


def _sum_squares(t: torch.Tensor) -> float:
    """sum(t^2) in float64 (`_dot`)."""
    return _dot(t)


def _dot(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """sum(a * b), or sum(a^2) without b, in float64, STOCK_CHUNK elements at a time (a float32 norm
    over millions of elements is off in its fourth digit; see `_cosine`): one float64 chunk for a
    square, two for a product (`_dot_bytes`), none where both are float64. A tensor that is not
    contiguous is copied first (`reshape`), which the plans reserve."""
    x = a.reshape(-1)
    y = x if b is None else b.reshape(-1)
    f64 = torch.float64
    if x.dtype == f64 and y.dtype == f64:
        return float(torch.dot(x, y))
    n = x.numel()
    chunks = [torch.empty(min(n, STOCK_CHUNK), dtype=f64, device=a.device) for _ in range(1 if b is None else 2)]
    total = torch.zeros((), dtype=f64, device=a.device)
    for start in range(0, n, STOCK_CHUNK):
        m = min(STOCK_CHUNK, n - start)
        px = chunks[0][:m].copy_(x[start:start + m])
        py = px if b is None else chunks[1][:m].copy_(y[start:start + m])
        total += torch.dot(px, py)
    return float(total)


def _dot_bytes(numel: int, dtypes: set[torch.dtype]) -> int:
    """What `_dot` over tensors of `numel` elements of these dtypes allocates: two float64 chunks
    (none where every one is float64), the 0-dim sum and each chunk's 0-dim dot product."""
    return (0 if dtypes == {torch.float64} else 2 * min(numel, STOCK_CHUNK) * _size(torch.float64)) + 2 * 8


def _karcher(
    slot: Slot, xs: list[torch.Tensor], b: torch.Tensor | None, weights: tuple[float, ...], out: torch.Tensor,
    scratch: Scratch,
) -> None:
    """The weighted Karcher (Riemannian) mean on the unit sphere (mergekit's `karcher`): each tensor is
    a direction x_i / |x_i| and a length; the result points along the direction m that minimises the
    weighted sum of squared angles to the models' directions, and is as long as the weighted mean of
    their lengths. Weights are divided by their sum (a, mergekit's alphas, 1/N each there); tensors no
    longer than `tol` take no part in the direction (their a still counts in the length).

    m starts as the normalised weighted mean of the directions (the first direction where that mean
    is shorter than `tol`), then up to `max_iter` Riemannian gradient steps: the tangent
    T = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m), theta_i the angle from m to u_i
    (models within `tol` of m skipped), stop when |T| < tol, else m := cos|T| m + sin|T| T/|T|,
    renormalised. T is summed as a weighted sum of the inputs less a multiple of m, so no unit
    tensor is made; the dot products and norms are float64 sums (`_dot`), where mergekit's are
    float32, so the two agree to float32 rounding. A model exactly at m (theta = 0, also with tol 0)
    or exactly opposite it (theta = pi: every direction leads to it, so none is taken) adds nothing
    to T; mergekit's term is 0 in both cases too (u_i - cos(theta) m = 0), so two opposite tensors of
    equal weight keep the first one's direction, and opposite scalars the heavier one's sign. One
    tensor is the result itself, as in mergekit."""
    assert slot.work is not None
    if len(xs) == 1:
        out.copy_(xs[0])
        return
    max_iter, tol = int_value(slot.options, "max_iter"), float_value(slot.options, "tol")
    total = math.fsum(weights)
    alphas = [w / total for w in weights]
    acc = _accumulator(slot, out, scratch)
    tangent = scratch.take(slot.shape, slot.work)
    cast = scratch.take(slot.shape, slot.work) if any(x.dtype != slot.work for x in xs) else None

    def vector(i: int) -> torch.Tensor:
        return xs[i] if cast is None else cast.copy_(xs[i])

    norms = [math.sqrt(_dot(x)) for x in xs]
    valid = [i for i, norm in enumerate(norms) if norm > tol]
    if not valid:
        acc.zero_()
        _finish(acc, out)
        return
    share = math.fsum(alphas[i] for i in valid)
    direction = {i: alphas[i] / share for i in valid}
    acc.zero_()
    for i in valid:
        acc.add_(vector(i), alpha=direction[i] / norms[i])
    length = math.sqrt(_dot(acc))
    if length < tol or length == 0.0:  # (tol may be 0)
        acc.copy_(vector(valid[0])).div_(norms[valid[0]])
    else:
        acc.div_(length)
    for _ in range(max_iter):
        tangent.zero_()
        along = 0.0
        for i in valid:
            x = vector(i)
            cosine = max(-1.0, min(1.0, _dot(acc, x) / norms[i]))
            theta = math.acos(cosine)
            if theta < tol or not 0.0 < theta < math.pi:  # at m, or opposite it: no direction to step in
                continue
            factor = direction[i] * theta / math.sin(theta)
            tangent.add_(x, alpha=factor / norms[i])
            along += factor * cosine
        tangent.sub_(acc, alpha=along)
        step = math.sqrt(_dot(tangent))
        if step < tol or step == 0.0:
            break
        acc.mul_(math.cos(step)).add_(tangent, alpha=math.sin(step) / step)
        unit = math.sqrt(_dot(acc))
        if unit > tol:
            acc.div_(unit)
    acc.mul_(math.fsum(a * norm for a, norm in zip(alphas, norms)))
    _finish(acc, out)


SCE_EPS = 1e-6
"""mergekit's SCE floors: models' mean squares summing below it are weighed equally, and each
element's sum of the agreeing models' weights is taken as at least it before dividing by it."""


def _sce(
    slot: Slot, xs: list[torch.Tensor], b: torch.Tensor | None, weights: tuple[float, ...], out: torch.Tensor,
    scratch: Scratch,
) -> None:
    """SCE (select, calculate, erase; mergekit's `sce`). With deltas d_i = x_i - base:
    select: with select_topk < 1, only the elements whose variance across the models (population
    variance) is among the int(select_topk * nonzero) largest keep their deltas (nonzero: the elements
    of non-zero variance; none kept where that is 0), ties at the threshold all kept;
    calculate: model i weighs w_i = mean(d_i^2) / sum_j mean(d_j^2) (1/N each where that sum is below
    SCE_EPS); erase: each element's elected sign is that of sum_i d_i (+ where it is 0), and only deltas of
    that sign count. The result is base + sum_i w_i d_i [agrees] / max(sum_i w_i [agrees], SCE_EPS).

    Memory: the delta, two tensors that hold the mean and variance while selecting and then the
    elected sign and the agreeing weights, a bool mask (when selecting) and a float64 chunk; each
    delta is recomputed from its model per pass rather than kept, so the models are read four times
    (six when selecting) and nothing grows with their number."""
    assert slot.work is not None and b is not None
    n, numel = len(xs), slot.numel
    topk = float_value(slot.options, "select_topk")
    acc = _accumulator(slot, out, scratch)
    delta, sign, counted = (scratch.take(slot.shape, slot.work) for _ in range(3))
    base = b if b.dtype == slot.work else scratch.take(slot.shape, slot.work).copy_(b)
    dropped = scratch.take(slot.shape, torch.bool) if topk < 1 else None
    if numel == 0:
        return

    def delta_of(i: int) -> torch.Tensor:
        torch.sub(delta.copy_(xs[i]) if xs[i].dtype != slot.work else xs[i], base, out=delta)
        if dropped is not None:
            delta.masked_fill_(dropped, 0)
        return delta

    if dropped is not None:
        _sce_select(xs, base, topk, delta, sign, counted, dropped)
    squares = []
    sign.zero_()
    for i in range(n):
        d = delta_of(i)
        squares.append(_dot(d) / numel)
        sign.add_(d)
    total = math.fsum(squares)
    used = [1.0 / n] * n if abs(total) < SCE_EPS else [q / total for q in squares]
    sign.sign_().add_(0.5).sign_()  # +1 where the sum is at least 0, -1 below
    acc.zero_()
    counted.zero_()
    for i in range(n):
        d = delta_of(i).mul_(sign).clamp_(min=0)  # |d_i| where it agrees with the elected sign, else 0
        acc.add_(d, alpha=used[i])
        counted.add_(d.sign_(), alpha=used[i])
    acc.mul_(sign).div_(counted.clamp_(min=SCE_EPS)).add_(base)
    _finish(acc, out)


def _sce_select(
    xs: list[torch.Tensor], base: torch.Tensor, topk: float, delta: torch.Tensor, mean: torch.Tensor,
    variance: torch.Tensor, dropped: torch.Tensor,
) -> None:
    """SCE's selection: `dropped` := True where an element's variance across the models' deltas is not
    among the int(topk * nonzero) largest (`_sce`); `mean` and `variance` are scratch."""
    n = len(xs)
    mean.zero_()
    for x in xs:
        mean.add_(torch.sub(delta.copy_(x) if x.dtype != delta.dtype else x, base, out=delta))
    mean.div_(n)
    variance.zero_()
    for x in xs:
        torch.sub(delta.copy_(x) if x.dtype != delta.dtype else x, base, out=delta).sub_(mean)
        variance.addcmul_(delta, delta)
    variance.div_(n)
    torch.ne(variance, 0, out=dropped)
    keep = int(int(dropped.sum()) * topk)
    if keep == 0:
        dropped.fill_(True)
        return
    threshold = selection.kth_largest_magnitude(variance, keep, None if _selects_natively(variance.device) else mean)
    torch.lt(variance, threshold, out=dropped)


def _ram(
    slot: Slot, xs: list[torch.Tensor], b: torch.Tensor | None, weights: tuple[float, ...], out: torch.Tensor,
    scratch: Scratch,
) -> None:
    """RAM (Reinforced Agent Merging; mergekit's `ram`, and with r > 0 its `ramplus_tl`). With deltas
    d_i = x_i - base, an element of d_i counts where |d_i| > epsilon; c is how many models count
    there. The result is base plus, per element, each counting delta divided by c where c > 1 (the
    models that share it are averaged) and taken whole where c = 1 (a change only one model made is
    kept at full strength, where a plain mean would dilute it). With r > 0 (RAM+), model i's unique
    changes are scaled by lambda_i = 1 + r clamp(shared_i / max(unique_i, epsilon), 0, alpha), shared_i
    and unique_i the counts of its elements that count with c > 1 and c = 1. r = 0 is RAM.

    Passes: the counts, (with r) each model's shared and unique counts (float64 sums of 0/1, exact),
    then the sum; each delta is remade from its model per pass. A NaN delta never counts (mergekit's
    multiplies it by 0, which leaves NaN)."""
    assert slot.work is not None and b is not None
    epsilon, r, alpha = (float_value(slot.options, k) for k in ("epsilon", "r", "alpha"))
    acc = _accumulator(slot, out, scratch)
    delta, size, factor = (scratch.take(slot.shape, slot.work) for _ in range(3))
    unique = scratch.take(slot.shape, slot.work) if r > 0 else None
    base = b if b.dtype == slot.work else scratch.take(slot.shape, slot.work).copy_(b)
    mask = scratch.take(slot.shape, torch.bool)

    def counting(i: int) -> torch.Tensor:
        """delta := d_i, and the mask of where it counts."""
        torch.sub(delta.copy_(xs[i]) if xs[i].dtype != slot.work else xs[i], base, out=delta)
        return torch.gt(torch.abs(delta, out=size), epsilon, out=mask)

    factor.zero_()
    for i in range(len(xs)):
        factor.add_(counting(i))
    scales = [1.0] * len(xs)
    if unique is not None:
        unique.copy_(torch.eq(factor, 1, out=mask))
        for i in range(len(xs)):
            ones = size.copy_(counting(i))
            alone = _dot(ones, unique)
            shared = _dot(ones) - alone
            if alone > 0:  # (with none alone its scale multiplies nothing; epsilon may be 0)
                scales[i] = 1.0 + r * min(max(shared / max(alone, epsilon), 0.0), alpha)
    factor.clamp_(min=1).reciprocal_()  # 1 / c, and 1 where c is 0 or 1
    acc.zero_()
    for i in range(len(xs)):
        counting(i).logical_not_()
        delta.masked_fill_(mask, 0)
        acc.addcmul_(delta, factor)
        if unique is not None and scales[i] != 1.0:
            acc.addcmul_(delta, unique, value=scales[i] - 1.0)
    acc.add_(base)
    _finish(acc, out)


FUSION_EPS = 1e-8
"""Arcee Fusion's floor (mergekit's): added to every softmax probability before the KL divergence."""
FUSION_QUANTILES = (0.25, 0.5, 0.75)
"""The importance quantiles Arcee Fusion's threshold is made of: median + 1.5 (q3 - q1)."""
FUSION_SCALARS = 8 * 8
"""The 0-dim work-dtype tensors the threshold is computed in."""


def _rows(shape: tuple[int, ...]) -> int:
    """Rows of a tensor taken along its last dimension (a 0-dim tensor as one row of one)."""
    return math.prod(shape[:-1]) if shape else 1


def _arcee_fusion(
    slot: Slot, xs: list[torch.Tensor], b: torch.Tensor | None, weights: tuple[float, ...], out: torch.Tensor,
    scratch: Scratch,
) -> None:
    """Arcee Fusion (mergekit's `arcee_fusion`): one model against the base. Each element's importance
    is |x - base| times its row's KL divergence sum p log(p / q) between the softmaxes (over the last
    dimension) of the model's and the base's row, each probability plus 1e-8; the model's change is
    kept where the importance is at least median + 1.5 (q3 - q1) of all the importances (quartiles
    sorted[floor(q (n - 1))]) and dropped elsewhere: base + (x - base) [kept].

    mergekit estimates the quartiles from a random sample of 1M elements when a tensor has more; the
    server takes them over every element, so it is exact and repeatable there (and the same below).
    The threshold is computed in the work dtype, as mergekit's float32 tensors do."""
    assert slot.work is not None and b is not None
    acc = _accumulator(slot, out, scratch)
    model, base = scratch.take(slot.shape, slot.work), scratch.take(slot.shape, slot.work)
    kept = scratch.take(slot.shape, torch.bool)
    n = slot.numel
    if n == 0:
        return
    cols = slot.shape[-1] if slot.shape else 1
    p, q = model.view(-1, cols), base.view(-1, cols)
    for probabilities, shaped, x in ((p, model, xs[0]), (q, base, b)):
        shaped.copy_(x)  # (a view of any layout, cast as it is copied)
        probabilities.sub_(probabilities.amax(dim=1, keepdim=True)).exp_()
        probabilities.div_(probabilities.sum(dim=1, keepdim=True)).add_(FUSION_EPS)
    kl = q.div_(p).log_().mul_(p).sum(dim=1, keepdim=True).neg_()  # sum p log(p / q) = -sum p log(q / p)
    model.copy_(xs[0]).sub_(b)
    importance = p.abs_().mul_(kl)
    del kl
    flat_importance = importance.view(-1)
    q1, median, q3 = (torch.kthvalue(flat_importance, int(f * (n - 1)) + 1).values for f in FUSION_QUANTILES)
    threshold = float(median + 1.5 * (q3 - q1))
    torch.lt(importance.view(slot.shape), threshold, out=kept)
    torch.sub(acc.copy_(xs[0]), b, out=acc).masked_fill_(kept, 0).add_(b)
    _finish(acc, out)


NEARSWAP_EPS = 1e-6
"""mergekit's nearswap floor: a distance below it is taken as it, so equal elements keep the base."""


def _nearswap(
    slot: Slot, xs: list[torch.Tensor], b: torch.Tensor | None, weights: tuple[float, ...], out: torch.Tensor,
    scratch: Scratch,
) -> None:
    """NearSwap (mergekit's `nearswap`): each element moves from the base towards the model by
    w = clamp(t / max(|x - base|, NEARSWAP_EPS), 0, 1): where the two are within t of each other the
    model's value is taken, further apart the base's value moves by t towards it. So a small t
    keeps the base except where the model barely differs from it. Elementwise torch.lerp(base, x, w),
    which is the base itself at w = 0 and the model itself at w = 1 (mergekit's w x + (1 - w) base)."""
    assert slot.work is not None and b is not None
    t = float_value(slot.options, "t")
    acc = _accumulator(slot, out, scratch)
    model = scratch.take(slot.shape, slot.work).copy_(xs[0])
    base = b if b.dtype == slot.work else scratch.take(slot.shape, slot.work).copy_(b)
    torch.sub(model, base, out=acc).abs_().clamp_(min=NEARSWAP_EPS).reciprocal_().mul_(t).clamp_(0.0, 1.0)
    torch.lerp(base, model, acc, out=acc)
    _finish(acc, out)


def _stock_layout(shape: tuple[int, ...], models: int, filter_wise: bool) -> tuple[int, int, int, int, int]:
    """How Model Stock walks an entry: as R rows of K elements (one row of all of them, or with
    `filter_wise` a row per output filter: the last dimension is reduced, as mergekit's dim=-1), in
    blocks of r rows by c columns, with P sums per row (each pair of offsets' dot product, and each
    offset's own). A block holds at most STOCK_CHUNK elements, and r * P at most STOCK_CHUNK sums."""
    numel = math.prod(shape)
    rows = numel // shape[-1] if filter_wise and len(shape) > 1 and shape[-1] else 1
    cols = numel // rows if rows else 0
    pairs = models * (models + 1) // 2
    block_cols = max(1, min(cols, STOCK_CHUNK))
    block_rows = max(1, min(rows, STOCK_CHUNK // block_cols, STOCK_CHUNK // pairs))
    return rows, cols, block_rows, block_cols, pairs


def _stock_bytes(
    shape: tuple[int, ...], models: int, filter_wise: bool, tensors: Sequence[torch.Tensor]
) -> int:
    """What `_model_stock` allocates besides its accumulator: one float64 workspace (each model's
    offset over a block, their product, the block's sums, each row's cosine and t and 1 - t), and a
    contiguous copy of each input that is not contiguous."""
    rows, _, r, c, pairs = _stock_layout(shape, models, filter_wise)
    workspace = (models * r * c + r * c + pairs * r + r + 2 * rows) * _size(torch.float64)
    copies = sum(t.numel() * t.element_size() for t in tensors if not t.is_contiguous())
    return workspace + copies + STOCK_TEMPS * r * _size(torch.float64)


def _model_stock(
    slot: Slot, xs: list[torch.Tensor], b: torch.Tensor | None, weights: tuple[float, ...], out: torch.Tensor,
    scratch: Scratch,
) -> None:
    """Model Stock (mergekit's `model_stock`): with cos the mean over pairs of models of the cosine
    between their offsets x_i - base (over the whole tensor, or each output filter's row with
    `filter_wise`), t = N cos / (1 + (N - 1) cos), 0 where that denominator is within STOCK_EPS of 0,
    and the result t * mean(x) + (1 - t) * base.

    The cosines' sums are taken in float64 a block at a time (`_stock_layout`), so memory does not
    grow with the number of models beyond one block each, and the float32 rounding of a long dot
    product does not move t; the mean and the final interpolation are in the work dtype."""
    assert slot.work is not None and b is not None
    n = len(xs)
    rows, cols, r, c, pairs = _stock_layout(tuple(b.shape), n, bool_value(slot.options, "filter_wise"))
    f64 = torch.float64
    ws = torch.empty(n * r * c + r * c + pairs * r + r + 2 * rows, dtype=f64, device=b.device)
    offsets = ws[: n * r * c].view(n, r, c)
    at = n * r * c
    product, at = ws[at:at + r * c].view(r, c), at + r * c
    sums, at = ws[at:at + pairs * r].view(pairs, r), at + pairs * r
    cosine, at = ws[at:at + r], at + r
    t_rows, at = ws[at:at + rows], at + rows
    rest_rows = ws[at:at + rows]
    flat = [(x if x.is_contiguous() else x.contiguous()).view(rows, cols) for x in (b, *xs)]
    pair_of = [(i, j) for i in range(n) for j in range(i, n)]
    exact = all(x.dtype in (torch.float32, f64) and x.dtype == b.dtype for x in xs)
    for r0 in range(0, rows, r):
        rr = min(r, rows - r0)
        sums[:, :rr].zero_()
        for c0 in range(0, cols, c):
            cc = min(c, cols - c0)
            base_block = flat[0][r0:r0 + rr, c0:c0 + cc]
            for i in range(n):
                if exact:  # x - base in float32 (or 64) is what mergekit takes, written straight as float64
                    torch.sub(flat[i + 1][r0:r0 + rr, c0:c0 + cc], base_block, out=offsets[i, :rr, :cc])
                else:  # bfloat16 and float16 offsets would round: subtract in float64
                    offsets[i, :rr, :cc].copy_(flat[i + 1][r0:r0 + rr, c0:c0 + cc]).sub_(base_block)
            if rows == 1:  # one row: each pair's dot product (torch.dot: no product tensor, one pass)
                for k, (i, j) in enumerate(pair_of):
                    sums[k, 0] += torch.dot(offsets[i, 0, :cc], offsets[j, 0, :cc])
                continue
            for k, (i, j) in enumerate(pair_of):
                torch.mul(offsets[i, :rr, :cc], offsets[j, :rr, :cc], out=product[:rr, :cc])
                sums[k, :rr].add_(product[:rr, :cc].sum(dim=1))
        _stock_t(sums[:, :rr], pair_of, n, cosine[:rr], t_rows[r0:r0 + rr])
    torch.sub(1.0, t_rows, out=rest_rows)
    acc = _accumulator(slot, out, scratch)
    if rows == 1:  # t/N of each model and 1 - t of the base: N + 1 passes, not the mean's and then two more
        t = float(t_rows[0])
        terms = [*xs, b]
        cast = scratch.take(slot.shape, slot.work) if any(x.dtype != slot.work for x in terms) else None
        weighted_sum.by_torch(acc, terms, [t / n] * n + [1.0 - t], None, cast)
        _finish(acc, out)
        return
    acc.copy_(xs[0])
    for x in xs[1:]:
        acc.add_(x)
    acc.div_(n)
    shaped = acc.view(rows, cols)
    shaped.mul_(t_rows.view(rows, 1)).addcmul_(flat[0], rest_rows.view(rows, 1))
    _finish(acc, out)


def _stock_t(sums: torch.Tensor, pair_of: Sequence[tuple[int, int]], n: int, cosine: torch.Tensor,
             t: torch.Tensor) -> None:
    """t for a block of rows from its sums (`_model_stock`): each pair's cosine dot / max(|a| |b|,
    STOCK_EPS) clamped to [-1, 1], their mean, then N cos / (1 + (N - 1) cos), 0 where that
    denominator is within STOCK_EPS of 0. All 0-dim and row-sized float64 operations."""
    index = {pair: k for k, pair in enumerate(pair_of)}
    cosine.zero_()
    count = 0
    for i in range(n):
        for j in range(i + 1, n):
            norms = (sums[index[i, i]].sqrt() * sums[index[j, j]].sqrt()).clamp_(min=STOCK_EPS)
            cosine.add_((sums[index[i, j]] / norms).clamp_(-1.0, 1.0))
            count += 1
    cosine.div_(count)
    denominator = cosine * (n - 1) + 1
    singular = denominator.abs() < STOCK_EPS
    t.copy_(torch.where(singular, torch.zeros_like(cosine), cosine * n / denominator.masked_fill(singular, 1.0)))


_KERNELS: dict[str, Kernel] = {
    "average": _weighted_sum,
    "linear": _weighted_sum,
    "slerp": _slerp,
    "task_arithmetic": _task_vectors,
    "ties": _task_vectors,
    "dare": _task_vectors,
    "breadcrumbs": _task_vectors,
    "della": _task_vectors,
    "model_stock": _model_stock,
    "multislerp": _multislerp,
    "karcher": _karcher,
    "sce": _sce,
    "nearswap": _nearswap,
    "ram": _ram,
    "arcee_fusion": _arcee_fusion,
}
