"""Translation between protobuf messages and domain values (specs, options, momenta, devices)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from google.protobuf import struct_pb2


from weightavg.v1 import weightavg_pb2 as pb

from ..domain import cuda_ipc, dtypes, shm, specs
from ..domain.averaging import BufferMode
from ..domain.ema import EmaState, ScheduleChange
from ..domain.errors import InvalidArgument
from ..domain.tensors import HandleSummary
from . import codec
from .stats import MethodStats, TenantCalls
from ..service import Metrics, ModelDescription, Named, RankMetrics, Size
from ..store.registry import Kind, TenantUsage
from ..store.requests import RequestStats

KINDS = {
    Kind.MODULE: pb.HANDLE_KIND_MODULE,
    Kind.MODEL: pb.HANDLE_KIND_MODEL,
    Kind.OPTIMIZER: pb.HANDLE_KIND_OPTIMIZER,
    Kind.LOSS: pb.HANDLE_KIND_LOSS,
    Kind.DICTIONARY: pb.HANDLE_KIND_DICTIONARY,
    Kind.TENSOR: pb.HANDLE_KIND_TENSOR,
}


def handle(handle_id: str, kind: Kind) -> pb.Handle:
    """The Handle message for a registry entry."""
    return pb.Handle(id=handle_id, kind=KINDS[kind])


def metrics_by_rank(metrics: Metrics) -> list[tuple[int | None, Named]]:
    """A metrics stream's parts: (None, the metrics), or each rank's of a replicated model as (rank, its metrics)."""
    if isinstance(metrics, RankMetrics):
        return list(enumerate(metrics.ranks))
    return [(None, metrics)]


_VALUE_FIELDS = ", ".join(field.name for field in pb.OptionValue.DESCRIPTOR.oneofs_by_name["kind"].fields)
"""The fields of OptionValue's one-of, named in the refusal of a value that sets none of them."""


def option_value(value: pb.OptionValue, where: str = "option") -> specs.OptionValue:
    """A Python option value from its message; unset is an error, not a silent None.

    `where` names the value in the refusal ("linear: args[1]", "option 'lr'"): an OptionValue with
    nothing set is what a client gets from a default-constructed message (Go's `&OptionValue{}`,
    JSON's `"value": {}`) or from an Option whose value it forgot, so the message says which one and
    what to set.
    """
    which = value.WhichOneof("kind")
    if which == "null_value":
        return None
    if which == "bool_value":
        return value.bool_value
    if which == "int_value":
        return value.int_value
    if which == "float_value":
        return value.float_value
    if which == "string_value":
        return value.string_value
    if which == "int_list":
        return tuple(value.int_list.values)
    if which == "float_list":
        return tuple(value.float_list.values)
    raise InvalidArgument(f"{where} has no value: set one of OptionValue's fields ({_VALUE_FIELDS})")


def option_message(value: specs.OptionValue) -> pb.OptionValue:
    """The message for a Python option value."""
    if value is None:
        return pb.OptionValue(null_value=struct_pb2.NULL_VALUE)
    if isinstance(value, bool):
        return pb.OptionValue(bool_value=value)
    if isinstance(value, int):
        return pb.OptionValue(int_value=value)
    if isinstance(value, float):
        return pb.OptionValue(float_value=value)
    if isinstance(value, str):
        return pb.OptionValue(string_value=value)
    if any(isinstance(v, float) for v in value):
        return pb.OptionValue(float_list=pb.FloatList(values=[float(v) for v in value]))
    return pb.OptionValue(int_list=pb.IntList(values=[int(v) for v in value]))


def layer_spec(message: pb.LayerSpec, max_depth: int, max_layers: int = specs.MAX_SPEC_LAYERS) -> specs.LayerSpec:
    """A domain LayerSpec from its message, refusing more than max_layers layers before converting
    any (a request's worth of children would otherwise all be made) and nesting deeper than max_depth."""
    count, pending = 1, [message]
    while pending:
        children = pending.pop().children
        count += len(children)
        if count > max_layers:
            raise specs.too_many_layers(max_layers)
        pending.extend(children)
    return _layer_spec(message, max_depth, 0)


def _layer_spec(message: pb.LayerSpec, max_depth: int, depth: int) -> specs.LayerSpec:
    if depth > max_depth:
        raise InvalidArgument(f"layer spec nested deeper than {max_depth} levels")
    return specs.LayerSpec(
        type=message.type,
        name=message.name or None,
        args=tuple(option_value(v, f"{message.type}: args[{i}]") for i, v in enumerate(message.args)),
        options=tuple((o.name, option_value(o.value, f"{message.type}: option '{o.name}'")) for o in message.options),
        children=tuple(_layer_spec(c, max_depth, depth + 1) for c in message.children),
    )


def module_rows(rows: list[specs.OptionRow]) -> list[pb.ModuleRow]:
    """Options-table rows as messages."""
    return [
        pb.ModuleRow(
            depth=row.depth,
            module=row.type,
            name=row.name,
            options=[pb.Option(name=k, value=option_message(v)) for k, v in row.options],
        )
        for row in rows
    ]


def momentum_message(value: float | None) -> pb.Momentum:
    """A momentum that may be None."""
    return pb.Momentum() if value is None else pb.Momentum(value=value)


def momenta(messages: dict[str, pb.Momentum]) -> dict[str, float | None]:
    """Domain momenta from the request map."""
    return {name: (m.value if m.HasField("value") else None) for name, m in messages.items()}


SPLITS = {pb.DATA_SPLIT_TRAIN: "train", pb.DATA_SPLIT_TEST: "test"}
FORWARD_MODES = {
    pb.FORWARD_MODE_TRAIN: "forward",
    pb.FORWARD_MODE_TRAIN_NO_GRAD: "nforward",
    pb.FORWARD_MODE_EVAL: "eforward",
}


def split(value: pb.DataSplit.ValueType) -> str:
    """"train" or "test" from a DataSplit; unset is an error."""
    if value not in SPLITS:
        raise InvalidArgument("split must be DATA_SPLIT_TRAIN or DATA_SPLIT_TEST")
    return SPLITS[value]


def forward_mode(value: pb.ForwardMode.ValueType) -> str:
    """The reference's forward verb for a ForwardMode; unset is an error."""
    if value not in FORWARD_MODES:
        raise InvalidArgument("mode must be FORWARD_MODE_TRAIN, FORWARD_MODE_TRAIN_NO_GRAD or FORWARD_MODE_EVAL")
    return FORWARD_MODES[value]


BUFFER_MODES = {
    pb.BUFFER_MODE_UNSPECIFIED: BufferMode.EXCLUDE,
    pb.BUFFER_MODE_EXCLUDE: BufferMode.EXCLUDE,
    pb.BUFFER_MODE_AVERAGE: BufferMode.AVERAGE,
    pb.BUFFER_MODE_COPY: BufferMode.COPY,
}


def buffer_mode(value: pb.BufferMode.ValueType) -> BufferMode:
    """What an average does with buffers; an unknown value (a newer client's) is an error."""
    if value not in BUFFER_MODES:
        raise InvalidArgument(f"unknown buffer mode {value}: use BUFFER_MODE_EXCLUDE, _AVERAGE or _COPY")
    return BUFFER_MODES[value]


REDUCE_OPS = {pb.REDUCE_OP_UNSPECIFIED: "mean", pb.REDUCE_OP_MEAN: "mean", pb.REDUCE_OP_SUM: "sum"}


def reduce_op(value: pb.ReduceOp.ValueType) -> str:
    """How AllReduce combines ranks ("mean" when unset); an unknown value (a newer client's) is an error."""
    if value not in REDUCE_OPS:
        raise InvalidArgument(f"unknown reduce op {value}: set op to REDUCE_OP_MEAN or REDUCE_OP_SUM")
    return REDUCE_OPS[value]


def schedule_change(r: pb.UpdateMovingAverageRequest) -> ScheduleChange:
    """The schedule fields a request sets (unset ones keep the dictionary's)."""
    return ScheduleChange(
        decay=r.decay if r.HasField("decay") else None,
        warmup=r.warmup if r.HasField("warmup") else None,
        warmup_gamma=r.warmup_gamma if r.HasField("warmup_gamma") else None,
        warmup_power=r.warmup_power if r.HasField("warmup_power") else None,
        min_decay=r.min_decay if r.HasField("min_decay") else None,
        update_after_step=r.update_after_step if r.HasField("update_after_step") else None,
    )


def moving_average(state: EmaState) -> pb.MovingAverageState:
    """An EMA's schedule and last step as a message."""
    s = state.schedule
    return pb.MovingAverageState(
        decay=s.decay, warmup=s.warmup, warmup_gamma=s.warmup_gamma, warmup_power=s.warmup_power,
        min_decay=s.min_decay, update_after_step=s.update_after_step, step=state.step,
    )


def option_args(
    args: Iterable[pb.OptionValue], options: Iterable[pb.Option]
) -> tuple[tuple[specs.OptionValue, ...], tuple[tuple[str, specs.OptionValue], ...]]:
    """Positional and keyword option values from their messages."""
    return (
        tuple(option_value(a, f"args[{i}]") for i, a in enumerate(args)),
        tuple((o.name, option_value(o.value, f"option '{o.name}'")) for o in options),
    )


def tensor_options(messages: Iterable[pb.TensorOptions]) -> list[tuple[str, tuple[tuple[str, specs.OptionValue], ...]]]:
    """Per-entry option overrides of a merge: (pattern, named values), in order. A pattern that gives
    weights or densities and no options overrides no option (`tensor_weights`, `tensor_densities`)."""
    return [
        (m.pattern, tuple((o.name, option_value(o.value, f"tensor_options[{i}] option '{o.name}'")) for o in m.options))
        for i, m in enumerate(messages) if m.options or not (m.weights or m.densities)
    ]


def tensor_weights(messages: Iterable[pb.TensorOptions]) -> list[tuple[str, tuple[float | tuple[float, ...], ...]]]:
    """Per-entry weights of a merge: (pattern, one weight per dictionary), in order, for the patterns
    that give weights."""
    return [(m.pattern, layer_values(m.weights)) for m in messages if m.weights]


def tensor_densities(messages: Iterable[pb.TensorOptions]) -> list[tuple[str, tuple[float | tuple[float, ...], ...]]]:
    """Per-entry densities of a merge: (pattern, one density per dictionary), in order, for the
    patterns that give densities."""
    return [(m.pattern, layer_values(m.densities)) for m in messages if m.densities]


def merge_weights(
    weights: Sequence[float], gradients: Sequence[pb.LayerValues]
) -> Sequence[float | tuple[float, ...]]:
    """A merge's weights: the plain ones, or one gradient per dictionary (`LayerValues`)."""
    if weights and gradients:
        raise InvalidArgument("give weights or weight_gradients, not both")
    return layer_values(gradients) if gradients else list(weights)


def layer_values(messages: Iterable[pb.LayerValues]) -> tuple[float | tuple[float, ...], ...]:
    """Each dictionary's value: its one value as a number, several as a gradient (an empty list stays
    one, for the domain to refuse by its position)."""
    return tuple(m.values[0] if len(m.values) == 1 else tuple(m.values) for m in messages)


def options_message(values: Mapping[str, specs.OptionValue]) -> list[pb.Option]:
    """Named option values as messages, in order."""
    return [pb.Option(name=name, value=option_message(value)) for name, value in values.items()]


# -- service results as messages ---------------------------------------------------------------------


def split_or_none(value: pb.DataSplit.ValueType) -> str | None:
    """"train" or "test" from a DataSplit, None when unset."""
    return None if value == pb.DATA_SPLIT_UNSPECIFIED else split(value)


def dtype_codes(names: Iterable[str]) -> list[pb.Dtype.ValueType]:
    """Wire codes of dtypes given by name, in code order."""
    return sorted(codec.dtype_code(dtypes.by_name(name)) for name in names)


def momenta_messages(momenta: Mapping[str, float | None]) -> dict[str, pb.Momentum]:
    """A momentum map as messages."""
    return {name: momentum_message(m) for name, m in momenta.items()}


def size_message(size: Size) -> pb.GetSizeResponse:
    """A handle's size in the response's one-of: dictionary shapes, a tensor's shape, or a count."""
    if size.entries is not None:
        entries = [pb.NamedShape(name=name, shape=pb.Shape(dims=shape)) for name, shape in size.entries]
        sizes = pb.DictionarySizes(entries=entries)
        if size.ema is not None:
            sizes.moving_average.CopyFrom(moving_average(size.ema))
        return pb.GetSizeResponse(dictionary=sizes, etag=size.etag)
    if size.shape is not None:
        return pb.GetSizeResponse(tensor=pb.Shape(dims=size.shape), etag=size.etag)
    return pb.GetSizeResponse(parameter_count=size.parameter_count or 0, etag=size.etag)


def region_info(name: str, region: shm.Region) -> pb.SharedMemoryRegionInfo:
    """One row of a shared memory listing (never the key)."""
    return pb.SharedMemoryRegionInfo(
        name=name, byte_size=region.byte_size, device=str(region.device),
        locked_for="" if region.locked_for is None else str(region.locked_for), usable=region.usable(),
    )


def handle_info(handle_message: pb.Handle, summary: HandleSummary, tenant: str = "") -> pb.HandleInfo:
    """One row of a handle listing."""
    dtype = codec.dtype_code(summary.dtype) if summary.dtype is not None else pb.DTYPE_UNSPECIFIED
    info = pb.HandleInfo(
        handle=handle_message, device=summary.device, dtype=dtype, bytes=summary.nbytes,
        tensor_count=summary.tensor_count, tenant=tenant, etag=summary.etag,
    )
    if summary.ema is not None:
        info.moving_average.CopyFrom(moving_average(summary.ema))
    return info


def tenant_stats(usage: Mapping[str, TenantUsage], calls: Mapping[str, TenantCalls]) -> list[pb.TenantStats]:
    """One record per tenant in `usage` (the tenants the caller may see), with its calls, sorted."""
    rows = []
    for name, u in sorted(usage.items()):
        c = calls.get(name)
        rows.append(pb.TenantStats(
            tenant=name, calls=c.calls if c else 0, failures=c.failures if c else 0, handles=u.handles,
            bytes=dict(u.nbytes), max_device_bytes=u.quota.max_device_bytes, max_handles=u.quota.max_handles,
            sessions=u.sessions, max_sessions=u.quota.max_sessions,
        ))
    return rows


def model_description(d: ModelDescription) -> pb.DescribeModelResponse:
    """A model's parts, options and data sizes."""
    return pb.DescribeModelResponse(
        module=module_rows(d.module),
        loss=pb.Component(type=d.loss_type, options=options_message(d.loss_options)),
        optimizer=pb.Component(type=d.optimizer_type, options=options_message(d.optimizer_options)),
        train=options_message(d.train), test=options_message(d.test),
        train_size=d.train_size, test_size=d.test_size,
    )


def method_stats(name: str, s: MethodStats) -> pb.MethodStats:
    """One method's call statistics."""
    return pb.MethodStats(
        method=name, count=s.finished, in_flight=s.in_flight, failures=s.failures, codes=dict(s.codes),
        total_seconds=s.seconds_total, max_seconds=s.seconds_max,
        bytes_received=s.bytes_received, bytes_sent=s.bytes_sent,
    )


def request_id_stats(stats: RequestStats) -> pb.RequestIdStats:
    """The request ID table's accounting as its message."""
    return pb.RequestIdStats(
        remembered=stats.remembered, duplicates_answered=stats.duplicates_answered, dropped=stats.dropped
    )


# -- shared memory ------------------------------------------------------------------------------------


def shared_tensor(p: shm.Placement) -> pb.SharedTensor:
    """Where a fetched tensor was written in a region."""
    return pb.SharedTensor(
        name=p.name, dtype=codec.dtype_code(p.dtype), shape=list(p.shape), offset=p.offset, byte_size=p.nbytes
    )


def placement(t: pb.SharedTensor) -> shm.Placement:
    """Where an uploaded tensor lies in a region (checked against the region by the domain)."""
    return shm.Placement(t.name, codec.torch_dtype(t.dtype), tuple(int(d) for d in t.shape), t.offset, t.byte_size)


def cuda_region(r: pb.CudaIpcRegion) -> cuda_ipc.CudaIpc:
    """A registration's CUDA buffer: the fields of torch's `_share_cuda_()`, as sent."""
    return cuda_ipc.CudaIpc(
        r.device_uuid, r.device_index, r.handle, r.storage_size_bytes, r.storage_offset_bytes, r.ref_counter_handle,
        r.ref_counter_offset, r.event_handle, r.event_sync_required,
    )
