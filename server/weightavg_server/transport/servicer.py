"""The gRPC servicer: a translator. Each method decodes its request, makes one service call, and
encodes the result; errors become statuses through the one table in status.py."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TypeVar

import grpc
import torch
from google.protobuf.message import Message

from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc
from weightavg.wire import ChunkView, unpacked

from ..domain.errors import Cancelled, DeadlineExceeded, InvalidArgument
from .stats import RpcStats
from ..service import OnHeader, Placement, RankInfo, Ref, Service, StopCheck, Upload
from ..store.requests import RequestKey
from . import codec, convert, requests as ids
from .status import translate_errors

Context = grpc.ServicerContext

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["WeightAveragingService"].full_name
"""The fully qualified service name, from the descriptor: the one place it is computed."""


class _Streamed(Protocol):
    """A request message of an upload stream: it carries one chunk."""

    @property
    def chunk(self) -> pb.TensorChunk: ...


R = TypeVar("R", bound=_Streamed)


class _KeyedStream(_Streamed, Protocol):
    """A request message of an upload stream that changes state: the first may carry a request ID."""

    @property
    def request_id(self) -> str: ...


K = TypeVar("K", bound=_KeyedStream)


SETTLE_SECONDS = 0.02
"""How long an upload whose stream declared nothing waits, once its stream has ended, to learn whether
the client ended it or went away. gRPC ends the server's request stream alike for the client's last
message and for a cancel or a deadline, and marks the call inactive only a moment later (0.03 to
0.2 ms on loopback; in one of three cancels the stream ended first): without the wait, a cancelled
undeclared upload committed what had arrived. A declared stream (every weightavg client's) says
itself whether it is whole, and does not wait; nor does a stream of no tensor (RunForward on an
input handle), whose end carries nothing that could be cut: it is the same late cancel as a unary
call's."""


def _first(requests: Iterator[R], what: str) -> R:
    """The first message of a client stream, which carries the request's header fields."""
    try:
        return next(requests)
    except StopIteration:
        raise InvalidArgument(f"empty {what} stream: the first message must name the target") from None


def _stream_chunks(
    message_type: type[Message], first: R, requests: Iterator[R]
) -> Iterator[pb.TensorChunk | ChunkView]:
    """The chunks of a client stream whose first message has been read for its header fields (the
    target, rank, placement, request ID...), each message's packed chunks after its own
    (TensorChunk.packed). Header fields belong on the first message: a later one may repeat
    them unchanged, but one that sets them otherwise is refused, where it used to be ignored (a
    request ID there gave no exactly-once call, another handle there was not the target)."""
    return unpacked(_message_chunks(message_type, first, requests), InvalidArgument)


def _message_chunks(
    message_type: type[Message], first: R, requests: Iterator[R]
) -> Iterator[pb.TensorChunk | ChunkView]:
    header = _header_fields(first)
    yield first.chunk
    for n, request in enumerate(requests, start=2):
        for name, value in _header_fields(request).items():
            if header.get(name) != value:
                raise InvalidArgument(
                    f"message {n} of the {message_type.DESCRIPTOR.name} stream sets {name} otherwise than the "
                    f"first message: set {name} on the first message only (later ones carry chunks)"
                )
        yield request.chunk


def _header_fields(message: object) -> dict[str, object]:
    """What a stream message sets besides its chunk: the set fields of a protobuf message, the
    non-empty strings of one decoded by hand (codec.request_decoder)."""
    if isinstance(message, Message):
        return {field.name: value for field, value in message.ListFields() if field.name != "chunk"}
    return {name: value for name, value in vars(message).items() if name != "chunk" and value}


def _should_stop(context: Context) -> StopCheck:
    """True once the caller has gone: cancelled, disconnected or past its deadline."""
    return lambda: not context.is_active()


@contextlib.contextmanager
def _stopping(context: Context) -> Iterator[None]:
    """A loop stopped by should_stop answers DEADLINE_EXCEEDED when the deadline passed, else CANCELLED."""
    try:
        yield
    except Cancelled as exc:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(str(exc)) from None
        raise


def _handle(ref: Ref) -> pb.Handle:
    return convert.handle(ref.id, ref.kind)


class WeightAveragingServicer(pb_grpc.WeightAveragingServiceServicer):
    """Implements weightavg.v1.WeightAveragingService over one Service."""

    def __init__(
        self, service: Service, *, max_message_bytes: int, chunk_bytes: int, max_upload_bytes: int,
        stats: RpcStats | None = None,
    ) -> None:
        self.service = service
        self.max_message_bytes = max_message_bytes
        self.chunk_bytes = chunk_bytes
        self.max_upload_bytes = max_upload_bytes
        self.stats = stats if stats is not None else RpcStats()

    def _upload(self, chunks: Iterable[pb.TensorChunk | ChunkView], context: Context) -> Upload:
        """An upload the service receives when it is ready, reserving as each header arrives."""
        ended = threading.Event()
        context.add_callback(ended.set)  # runs when the call ends: a cancel, a deadline, or the answer

        def receive(on_header: OnHeader) -> list[tuple[str, torch.Tensor]]:
            assembler = codec.TensorAssembler(
                self.max_upload_bytes, on_header, self.service.shared_region, self.service.staging_buffer,
                self.service.upload_arena(),
            )
            for chunk in chunks:
                assembler.feed(chunk)
            tensors = assembler.finish()
            if tensors and not assembler.declared:
                ended.wait(SETTLE_SECONDS)
            if not context.is_active():
                # grpc ends the request stream quietly when it fails the call (a message over the size
                # cap, the client gone): what arrived is incomplete and must change nothing.
                raise Cancelled("the call ended before its request stream was complete; nothing changed")
            return tensors

        return receive

    def _rest(self, message_type: type[Message], first: R, requests: Iterator[R], context: Context) -> Upload:
        """The upload of a stream whose first message has been read for its header fields."""
        return self._upload(_stream_chunks(message_type, first, requests), context)

    def _keyed(
        self, message_type: type[Message], first: K | None, requests: Iterator[K], context: Context
    ) -> tuple[Upload, RequestKey | None]:
        """The upload of a stream whose first message (None: the stream is empty) has been read, and
        its request key, whose digest hashes the upload as it is received."""
        if first is None:
            return self._upload(iter(()), context), None
        chunks, key = ids.stream_key(
            first, message_type, _stream_chunks(message_type, first, requests), self.service.shared_region
        )
        return self._upload(chunks, context), key

    def _chunks(self, named: list[tuple[str, torch.Tensor]], chunk_bytes: int) -> Iterator[pb.TensorChunk]:
        return codec.tensors_chunks(named, chunk_bytes)

    # -- the server ---------------------------------------------------------------------------------

    @translate_errors
    def Ping(self, request: pb.PingRequest, context: Context) -> pb.PingResponse:
        return pb.PingResponse()

    @translate_errors
    def GetServerInfo(self, request: pb.GetServerInfoRequest, context: Context) -> pb.GetServerInfoResponse:
        info = self.service.server_info()
        return pb.GetServerInfoResponse(
            version=info.version, torch_version=info.torch_version, grpc_version=grpc.__version__,
            device=info.device, layer_types=info.layer_types, dtypes=convert.dtype_codes(info.dtypes),
            max_message_bytes=self.max_message_bytes, chunk_bytes=self.chunk_bytes,
            max_spec_depth=info.max_spec_depth, cuda_memory_allocated=info.cuda_memory_allocated,
            max_spec_layers=info.max_spec_layers, packed_chunks=True,
            **_cluster_fields(self.service.cluster_info()),
        )

    @translate_errors
    def GetServerStats(self, request: pb.GetServerStatsRequest, context: Context) -> pb.GetServerStatsResponse:
        usage = self.service.device_usage()
        calls = self.stats.tenants()
        return pb.GetServerStatsResponse(
            uptime_seconds=self.stats.uptime(),
            methods=[convert.method_stats(name, s) for name, s in self.stats.snapshot().items()]
            if self.service.sees_server_wide() else [],
            devices=[pb.DeviceUsage(device=d, handles=u.handles, bytes=u.bytes) for d, u in usage.items()],
            request_ids=convert.request_id_stats(self.service.request_id_stats()),
            tenants=convert.tenant_stats(self.service.tenant_usage(calls), calls),
        )

    # -- modules ------------------------------------------------------------------------------------

    @translate_errors
    def CreateModule(self, request: pb.CreateModuleRequest, context: Context) -> pb.CreateModuleResponse:
        settings = self.service.settings
        spec = convert.layer_spec(request.spec, settings.max_spec_depth, settings.max_spec_layers)
        ref = self.service.create_module(spec, placement=_placement(request), request=ids.key(request))
        return pb.CreateModuleResponse(module=_handle(ref))

    @translate_errors
    def DescribeModule(self, request: pb.DescribeModuleRequest, context: Context) -> pb.DescribeModuleResponse:
        return pb.DescribeModuleResponse(rows=convert.module_rows(self.service.describe_module(request.handle)))

    @translate_errors
    def ListParameterNames(
        self, request: pb.ListParameterNamesRequest, context: Context
    ) -> pb.ListParameterNamesResponse:
        return pb.ListParameterNamesResponse(names=self.service.parameter_names(request.handle, request.child))

    @translate_errors
    def ListBufferNames(self, request: pb.ListBufferNamesRequest, context: Context) -> pb.ListBufferNamesResponse:
        return pb.ListBufferNamesResponse(names=self.service.buffer_names(request.handle, request.child))

    @translate_errors
    def SetParameter(
        self, request_iterator: Iterator[pb.SetParameterRequest], context: Context
    ) -> pb.SetParameterResponse:
        first = _first(request_iterator, "SetParameter")
        upload, key = self._keyed(pb.SetParameterRequest, first, request_iterator, context)
        created = self.service.set_parameter(
            first.handle, first.name, upload, rank=_rank(first), etag=first.etag, request=key
        )
        return pb.SetParameterResponse(created=created)

    @translate_errors
    def ViewParameters(self, request: pb.ViewParametersRequest, context: Context) -> pb.ViewParametersResponse:
        ref = self.service.view_parameters(request.handle, request.child, request=ids.key(request))
        return pb.ViewParametersResponse(dictionary=_handle(ref))

    @translate_errors
    def ViewBuffers(self, request: pb.ViewBuffersRequest, context: Context) -> pb.ViewBuffersResponse:
        ref = self.service.view_buffers(request.handle, request.child, request=ids.key(request))
        return pb.ViewBuffersResponse(dictionary=_handle(ref))

    @translate_errors
    def CopyParameters(self, request: pb.CopyParametersRequest, context: Context) -> pb.CopyParametersResponse:
        dtype = codec.torch_dtype(request.dtype) if request.dtype != pb.DTYPE_UNSPECIFIED else None
        ref = self.service.copy_parameters(request.handle, dtype, request.buffers, request=ids.key(request))
        return pb.CopyParametersResponse(dictionary=_handle(ref))

    @translate_errors
    def LoadParameters(self, request: pb.LoadParametersRequest, context: Context) -> pb.LoadParametersResponse:
        copied = self.service.load_parameters(
            request.handle, request.dictionary, etag=request.etag, request=ids.key(request)
        )
        return pb.LoadParametersResponse(copied=copied, names=list(copied))

    @translate_errors
    def AverageParameters(
        self, request: pb.AverageParametersRequest, context: Context
    ) -> pb.AverageParametersResponse:
        buffers = convert.buffer_mode(request.buffers)
        count = self.service.average_parameters(
            request.handle, request.dictionary, buffers, etag=request.etag, request=ids.key(request)
        )
        return pb.AverageParametersResponse(count=count)

    @translate_errors
    def UpdateMovingAverage(
        self, request: pb.UpdateMovingAverageRequest, context: Context
    ) -> pb.UpdateMovingAverageResponse:
        result = self.service.update_moving_average(
            request.handle, request.dictionary, convert.schedule_change(request),
            request.step if request.HasField("step") else None, convert.buffer_mode(request.buffers),
            etag=request.etag, request=ids.key(request),
        )
        return pb.UpdateMovingAverageResponse(step=result.step, decay=result.decay)

    @translate_errors
    def ResetBatchNorm(self, request: pb.ResetBatchNormRequest, context: Context) -> pb.ResetBatchNormResponse:
        momenta = self.service.reset_batchnorm(request.handle, request=ids.key(request))
        return pb.ResetBatchNormResponse(momenta=convert.momenta_messages(momenta), names=list(momenta))

    @translate_errors
    def RestoreMomentum(self, request: pb.RestoreMomentumRequest, context: Context) -> pb.RestoreMomentumResponse:
        self.service.restore_momentum(request.handle, convert.momenta(dict(request.momenta)), request=ids.key(request))
        return pb.RestoreMomentumResponse()

    # -- dictionaries and tensors -------------------------------------------------------------------

    @translate_errors
    def CreateDictionary(
        self, request_iterator: Iterator[pb.CreateDictionaryRequest], context: Context
    ) -> pb.CreateDictionaryResponse:
        first = next(request_iterator, None)
        upload, key = self._keyed(pb.CreateDictionaryRequest, first, request_iterator, context)
        placement = _placement(first)
        return pb.CreateDictionaryResponse(
            dictionary=_handle(self.service.create_dictionary(upload, placement=placement, request=key))
        )

    @translate_errors
    def UpdateDictionary(
        self, request_iterator: Iterator[pb.UpdateDictionaryRequest], context: Context
    ) -> pb.UpdateDictionaryResponse:
        first = _first(request_iterator, "UpdateDictionary")
        upload, key = self._keyed(pb.UpdateDictionaryRequest, first, request_iterator, context)
        names = self.service.update_dictionary(first.dictionary, upload, rank=_rank(first), etag=first.etag, request=key)
        return pb.UpdateDictionaryResponse(names=names)

    @translate_errors
    def DeleteEntries(self, request: pb.DeleteEntriesRequest, context: Context) -> pb.DeleteEntriesResponse:
        self.service.delete_entries(request.dictionary, list(request.names), etag=request.etag, request=ids.key(request))
        return pb.DeleteEntriesResponse()

    @translate_errors
    def CreateTensor(
        self, request_iterator: Iterator[pb.CreateTensorRequest], context: Context
    ) -> pb.CreateTensorResponse:
        upload, key = self._keyed(pb.CreateTensorRequest, next(request_iterator, None), request_iterator, context)
        return pb.CreateTensorResponse(tensor=_handle(self.service.create_tensor(upload, request=key)))

    def FetchTensors(
        self, request: pb.FetchTensorsRequest, context: Context
    ) -> Iterator[pb.FetchTensorsResponse]:
        """The generated signature, for a server that registers only the generated handlers: the
        encoded messages parsed back (a copy more than the path `add_to_server` registers)."""
        for encoded in self.FetchTensorsEncoded(request, context):
            yield pb.FetchTensorsResponse.FromString(encoded.message)

    @translate_errors
    def FetchTensorsEncoded(self, request: pb.FetchTensorsRequest, context: Context) -> Iterator[codec.Encoded]:
        """FetchTensors, answered with pre-encoded FetchTensorsResponse messages (one copy a byte):
        `add_to_server` registers it under FetchTensors with the serializer that passes them on."""
        chunk_bytes = reply_chunk_bytes(request.max_chunk_bytes, self.chunk_bytes)
        # reused: the copies are read only while the reply is encoded, inside the block
        with self.service.fetch(request.handle, list(request.names), rank=_rank(request), reused=True) as copies:
            lead = pb.FetchTensorsResponse(etag=copies.etag).SerializeToString() if request.with_etag else b""
            yield from codec.encoded_chunks(copies, chunk_bytes, pack=request.packed_chunks, lead=lead)

    @translate_errors
    def GetSize(self, request: pb.GetSizeRequest, context: Context) -> pb.GetSizeResponse:
        return convert.size_message(self.service.size(request.handle))

    @translate_errors
    def FreeHandles(self, request: pb.FreeHandlesRequest, context: Context) -> pb.FreeHandlesResponse:
        freed = self.service.free(
            list(request.handles), request.all, request.tenant, request.purge, request=ids.key(request)
        )
        return pb.FreeHandlesResponse(freed=freed)

    @translate_errors
    def AddReference(self, request: pb.AddReferenceRequest, context: Context) -> pb.AddReferenceResponse:
        return pb.AddReferenceResponse(handle=_handle(self.service.addref(request.handle, request=ids.key(request))))

    @translate_errors
    def ListHandles(self, request: pb.ListHandlesRequest, context: Context) -> pb.ListHandlesResponse:
        listed = self.service.list_handles(request.all_tenants)
        return pb.ListHandlesResponse(handles=[convert.handle_info(_handle(ref), s, ref.tenant) for ref, s in listed])

    @translate_errors
    def MoveHandle(self, request: pb.MoveHandleRequest, context: Context) -> pb.MoveHandleResponse:
        dtype = codec.torch_dtype(request.dtype) if request.dtype != pb.DTYPE_UNSPECIFIED else None
        ref = self.service.move(request.handle, request.device, dtype, request=ids.key(request))
        return pb.MoveHandleResponse(handle=_handle(ref))

    # -- losses, optimizers, models -----------------------------------------------------------------

    @translate_errors
    def CreateLoss(self, request: pb.CreateLossRequest, context: Context) -> pb.CreateLossResponse:
        args, kwargs = convert.option_args(request.args, request.options)
        ref = self.service.create_loss(request.type, args, kwargs, request=ids.key(request))
        return pb.CreateLossResponse(loss=_handle(ref))

    @translate_errors
    def CreateOptimizer(self, request: pb.CreateOptimizerRequest, context: Context) -> pb.CreateOptimizerResponse:
        args, kwargs = convert.option_args(request.args, request.options)
        ref = self.service.create_optimizer(request.module, request.type, args, kwargs, request=ids.key(request))
        return pb.CreateOptimizerResponse(optimizer=_handle(ref))

    @translate_errors
    def GetLearningRate(self, request: pb.GetLearningRateRequest, context: Context) -> pb.GetLearningRateResponse:
        return pb.GetLearningRateResponse(lr=self.service.learning_rate(request.handle))

    @translate_errors
    def SetLearningRate(self, request: pb.SetLearningRateRequest, context: Context) -> pb.SetLearningRateResponse:
        self.service.set_learning_rate(request.handle, request.lr, request=ids.key(request))
        return pb.SetLearningRateResponse()

    @translate_errors
    def CreateModel(self, request: pb.CreateModelRequest, context: Context) -> pb.CreateModelResponse:
        ref = self.service.create_model(request.module, request.loss, request.optimizer, request=ids.key(request))
        return pb.CreateModelResponse(model=_handle(ref))

    @translate_errors
    def UpdateModel(self, request: pb.UpdateModelRequest, context: Context) -> pb.UpdateModelResponse:
        ref = self.service.update_model(request.model, list(request.parts), request=ids.key(request))
        return pb.UpdateModelResponse(model=_handle(ref))

    @translate_errors
    def DescribeModel(self, request: pb.DescribeModelRequest, context: Context) -> pb.DescribeModelResponse:
        return convert.model_description(self.service.describe_model(request.model))

    @translate_errors
    def GetModelOptions(self, request: pb.GetModelOptionsRequest, context: Context) -> pb.GetModelOptionsResponse:
        options = self.service.model_options(request.model, convert.split(request.split))
        return pb.GetModelOptionsResponse(options=convert.options_message(options))

    @translate_errors
    def SetModelOptions(self, request: pb.SetModelOptionsRequest, context: Context) -> pb.SetModelOptionsResponse:
        _, values = convert.option_args((), request.options)
        options = self.service.set_model_options(
            request.model, convert.split(request.split), values, request=ids.key(request)
        )
        return pb.SetModelOptionsResponse(options=convert.options_message(options))

    @translate_errors
    def SetModelData(
        self, request_iterator: Iterator[pb.SetModelDataRequest], context: Context
    ) -> pb.SetModelDataResponse:
        first = _first(request_iterator, "SetModelData")
        split = convert.split(first.split)
        upload, key = self._keyed(pb.SetModelDataRequest, first, request_iterator, context)
        batches = self.service.set_model_data(
            first.model, split, upload, shard=bool(getattr(first, "shard", False)), rank=_rank(first), request=key
        )
        return pb.SetModelDataResponse(batches=batches)

    @translate_errors
    def RunEpoch(self, request: pb.RunEpochRequest, context: Context) -> Iterator[pb.RunEpochResponse]:
        chunk_bytes = reply_chunk_bytes(request.max_chunk_bytes, self.chunk_bytes)  # refused before the epoch
        with contextlib.ExitStack() as held:  # the metrics' outputs stay reserved as they stream
            with _stopping(context):
                metrics = self.service.run_epoch(
                    request.model, _should_stop(context), request=ids.key(request), held=held
                )
            for rank, named in convert.metrics_by_rank(metrics):
                for chunk in self._chunks(named, chunk_bytes):
                    yield pb.RunEpochResponse(chunk=chunk, rank=rank)

    @translate_errors
    def RunTest(self, request: pb.RunTestRequest, context: Context) -> Iterator[pb.RunTestResponse]:
        chunk_bytes = reply_chunk_bytes(request.max_chunk_bytes, self.chunk_bytes)
        with contextlib.ExitStack() as held:  # the metrics' outputs stay reserved as they stream
            with _stopping(context):
                metrics = self.service.run_test(request.model, _should_stop(context), held)
            for rank, named in convert.metrics_by_rank(metrics):
                for chunk in self._chunks(named, chunk_bytes):
                    yield pb.RunTestResponse(chunk=chunk, rank=rank)

    @translate_errors
    def EvaluateModel(
        self, request_iterator: Iterator[pb.EvaluateModelRequest], context: Context
    ) -> Iterator[pb.EvaluateModelResponse]:
        first = _first(request_iterator, "EvaluateModel")
        chunk_bytes = reply_chunk_bytes(first.max_chunk_bytes, self.chunk_bytes)
        upload = self._rest(pb.EvaluateModelRequest, first, request_iterator, context)
        with _stopping(context), contextlib.ExitStack() as held:  # the output stays reserved as it streams
            output = self.service.evaluate(first.model, upload, _should_stop(context), held)
            for chunk in self._chunks([("", output)], chunk_bytes):
                yield pb.EvaluateModelResponse(chunk=chunk)

    @translate_errors
    def RunForward(self, request_iterator: Iterator[pb.RunForwardRequest], context: Context) -> pb.RunForwardResponse:
        first = _first(request_iterator, "RunForward")
        mode = convert.forward_mode(first.mode)
        upload, key = self._keyed(pb.RunForwardRequest, first, request_iterator, context)
        ref = self.service.forward(first.handle, mode, first.input, upload, request=key)
        return pb.RunForwardResponse(output=_handle(ref))

    @translate_errors
    def GetModelInput(self, request: pb.GetModelInputRequest, context: Context) -> pb.GetModelInputResponse:
        ref = self.service.model_input(request.model, request=ids.key(request))
        return pb.GetModelInputResponse(tensor=_handle(ref))

    @translate_errors
    def RestoreModelData(
        self, request: pb.RestoreModelDataRequest, context: Context
    ) -> pb.RestoreModelDataResponse:
        split = convert.split_or_none(request.split) or "train"
        size = self.service.restore_data(request.model, split, request=ids.key(request))
        return pb.RestoreModelDataResponse(size=size)

    @translate_errors
    def NextBatch(self, request: pb.NextBatchRequest, context: Context) -> pb.NextBatchResponse:
        split = convert.split_or_none(request.split)
        more = self.service.next_batch(request.handle, split, request.size, request=ids.key(request))
        return pb.NextBatchResponse(more=more)

    @translate_errors
    def RecalculateBatchNorm(
        self, request: pb.RecalculateBatchNormRequest, context: Context
    ) -> pb.RecalculateBatchNormResponse:
        with _stopping(context):
            momenta = self.service.recalculate_batchnorm(request.model, _should_stop(context), request=ids.key(request))
        return pb.RecalculateBatchNormResponse(momenta=convert.momenta_messages(momenta), names=list(momenta))

    # -- sessions and snapshots ---------------------------------------------------------------------

    @translate_errors
    def CreateSession(self, request: pb.CreateSessionRequest, context: Context) -> pb.CreateSessionResponse:
        session, lease = self.service.create_session(request.lease_seconds, request=ids.key(request))
        return pb.CreateSessionResponse(session=session, lease_seconds=lease)

    @translate_errors
    def KeepAliveSession(
        self, request: pb.KeepAliveSessionRequest, context: Context
    ) -> pb.KeepAliveSessionResponse:
        return pb.KeepAliveSessionResponse(lease_seconds=self.service.keep_alive(request.session))

    @translate_errors
    def CloseSession(self, request: pb.CloseSessionRequest, context: Context) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse(freed=self.service.close_session(request.session, request=ids.key(request)))

    @translate_errors
    def Snapshot(self, request: pb.SnapshotRequest, context: Context) -> pb.SnapshotResponse:
        result = self.service.snapshot()
        return pb.SnapshotResponse(
            directory=result.directory, handles=result.handles, tensor_bytes=result.tensor_bytes, skipped=result.skipped
        )

    # -- averaging across models --------------------------------------------------------------------

    @translate_errors
    def AverageDictionaries(
        self, request: pb.AverageDictionariesRequest, context: Context
    ) -> pb.AverageDictionariesResponse:
        _, options = convert.option_args((), request.options)
        ref = self.service.average(
            list(request.dictionaries), list(request.weights), request.into, options, etag=request.etag,
            request=ids.key(request),
        )
        return pb.AverageDictionariesResponse(dictionary=_handle(ref))

    @translate_errors
    def MergeDictionaries(
        self, request: pb.MergeDictionariesRequest, context: Context
    ) -> pb.MergeDictionariesResponse:
        _, options = convert.option_args((), request.options)
        ref = self.service.merge(
            request.method, list(request.dictionaries), request.base,
            convert.merge_weights(request.weights, request.weight_gradients), options,
            convert.tensor_options(request.tensor_options), convert.tensor_weights(request.tensor_options),
            convert.layer_values(request.densities), convert.tensor_densities(request.tensor_options),
            request=ids.key(request),
        )
        return pb.MergeDictionariesResponse(dictionary=_handle(ref))

    @translate_errors
    def ApplyOuterStep(self, request: pb.ApplyOuterStepRequest, context: Context) -> pb.ApplyOuterStepResponse:
        norm = self.service.outer_step(request.optimizer, request.average, request=ids.key(request))
        return pb.ApplyOuterStepResponse(gradient_norm=norm)

    @translate_errors
    def BuildGreedySoup(self, request: pb.BuildGreedySoupRequest, context: Context) -> pb.BuildGreedySoupResponse:
        _, options = convert.option_args((), request.options)
        with _stopping(context):
            made = self.service.soup(
                request.model, list(request.ingredients), options, _should_stop(context), request=ids.key(request)
            )
        return pb.BuildGreedySoupResponse(
            soup=_handle(made.dictionary), metric=made.metric, scores=made.scores, order=made.order, tried=made.tried,
            kept=made.kept, score=made.score,
        )


    # -- shared memory --------------------------------------------------------------------------------

    @translate_errors
    def RegisterSharedMemory(
        self, request: pb.RegisterSharedMemoryRequest, context: Context
    ) -> pb.RegisterSharedMemoryResponse:
        cuda = convert.cuda_region(request.cuda) if request.HasField("cuda") else None
        size = self.service.register_shared_memory(
            request.name, request.key, request.byte_size, cuda, request=ids.key(request)
        )
        return pb.RegisterSharedMemoryResponse(byte_size=size)

    @translate_errors
    def UnregisterSharedMemory(
        self, request: pb.UnregisterSharedMemoryRequest, context: Context
    ) -> pb.UnregisterSharedMemoryResponse:
        return pb.UnregisterSharedMemoryResponse(count=self.service.unregister_shared_memory(request.name, request=ids.key(request)))

    @translate_errors
    def ListSharedMemory(self, request: pb.ListSharedMemoryRequest, context: Context) -> pb.ListSharedMemoryResponse:
        return pb.ListSharedMemoryResponse(regions=[
            convert.region_info(name, region) for name, region in self.service.list_shared_memory(request.name)
        ])

    @translate_errors
    def FetchTensorsToSharedMemory(
        self, request: pb.FetchTensorsToSharedMemoryRequest, context: Context
    ) -> pb.FetchTensorsToSharedMemoryResponse:
        placements, needed, region, etag = self.service.fetch_to_shared_memory(
            request.handle, list(request.names), request.region, request.offset, request.max_bytes,
            request.overflow_region,
        )
        return pb.FetchTensorsToSharedMemoryResponse(
            tensors=[convert.shared_tensor(p) for p in placements], needed_bytes=needed, region=region, etag=etag
        )

    @translate_errors
    def CreateDictionaryFromSharedMemory(
        self, request: pb.CreateDictionaryFromSharedMemoryRequest, context: Context
    ) -> pb.CreateDictionaryFromSharedMemoryResponse:
        placements = [convert.placement(t) for t in request.tensors]
        key = ids.shared_key(request, self.service.shared_region)
        ref = self.service.create_dictionary_from_shared_memory(request.region, placements, request=key)
        return pb.CreateDictionaryFromSharedMemoryResponse(dictionary=_handle(ref))

    # -- the cluster ----------------------------------------------------------------------------------

    @translate_errors
    def AllReduce(self, request: pb.AllReduceRequest, context: Context) -> pb.AllReduceResponse:
        reduced = self.service.allreduce(
            request.handle, convert.reduce_op(request.op), list(request.weights), request.group_size,
            request=ids.key(request),
        )
        return pb.AllReduceResponse(tensors=reduced.tensors, buckets=reduced.buckets)

    @translate_errors
    def Broadcast(self, request: pb.BroadcastRequest, context: Context) -> pb.BroadcastResponse:
        tensors = self.service.broadcast(request.handle, request.rank, request=ids.key(request))
        return pb.BroadcastResponse(tensors=tensors)


# Upload streams' messages that hold only a chunk and strings arrive decoded by hand (codec.request_decoder),
# without the cluster's fields: unset there, so read with defaults.


def _placement(request: Any) -> Placement:
    p = getattr(request, "placement", None)
    if p is None:
        return Placement()
    return Placement(replicate=p.replicate, rank=p.rank if p.HasField("rank") else None)


MIN_REPLY_CHUNK_BYTES = 1 << 10
"""The smallest max_chunk_bytes taken (FetchTensors, RunEpoch, RunTest, EvaluateModel): smaller chunks would multiply a reply's
messages (a 1 GB tensor in a million of them) for no receive limit any gRPC library has."""


def reply_chunk_bytes(requested: int, server_chunk_bytes: int) -> int:
    """The chunk size of a streamed reply (FetchTensors, RunEpoch, RunTest, EvaluateModel): the server's own, or the caller's max_chunk_bytes where
    that is smaller (0: none given). Without it, a caller whose receive limit was below the server's
    --chunk-bytes could fetch no tensor larger than that limit (RESOURCE_EXHAUSTED "Received message
    larger than max" on its side, every time). InvalidArgument below MIN_REPLY_CHUNK_BYTES."""
    if requested == 0:
        return server_chunk_bytes
    if requested < MIN_REPLY_CHUNK_BYTES:
        raise InvalidArgument(
            f"max_chunk_bytes ({requested}) is below the smallest chunk the server sends "
            f"({MIN_REPLY_CHUNK_BYTES} bytes): give at least {MIN_REPLY_CHUNK_BYTES}, or 0 for the server's own "
            f"chunk size ({server_chunk_bytes})"
        )
    return min(requested, server_chunk_bytes)


def _rank(request: Any) -> int | None:
    return request.rank if hasattr(request, "HasField") and request.HasField("rank") else None


def _cluster_fields(ranks: list[RankInfo]) -> dict[str, Any]:
    return {
        "world_size": len(ranks),
        "ranks": [pb.RankInfo(rank=r.rank, device=r.device, handles=r.handles, bytes=r.bytes) for r in ranks],
    }


def add_to_server(servicer: WeightAveragingServicer, server: grpc.Server) -> None:
    """Register the servicer, with the tensor streams encoded and decoded by hand (one copy a byte).

    FetchTensors sends the pre-encoded chunks of `FetchTensorsEncoded` (`codec.serialize` passes them on);
    the upload streams decode chunks as views into the received bytes (`codec.request_decoder`). The
    overrides are offered both ways the server looks methods up: as a generic handler ahead of the
    generated one, and as registered handlers that replace the generated ones.
    """
    overrides: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "FetchTensors": grpc.unary_stream_rpc_method_handler(
            servicer.FetchTensorsEncoded,
            request_deserializer=pb.FetchTensorsRequest.FromString,
            response_serializer=codec.serialize,
        ),
        "CreateDictionary": grpc.stream_unary_rpc_method_handler(
            servicer.CreateDictionary,
            request_deserializer=codec.request_decoder(pb.CreateDictionaryRequest),
            response_serializer=pb.CreateDictionaryResponse.SerializeToString,
        ),
        "UpdateDictionary": grpc.stream_unary_rpc_method_handler(
            servicer.UpdateDictionary,
            request_deserializer=codec.request_decoder(pb.UpdateDictionaryRequest),
            response_serializer=pb.UpdateDictionaryResponse.SerializeToString,
        ),
        "CreateTensor": grpc.stream_unary_rpc_method_handler(
            servicer.CreateTensor,
            request_deserializer=codec.request_decoder(pb.CreateTensorRequest),
            response_serializer=pb.CreateTensorResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, overrides),))
    pb_grpc.add_WeightAveragingServiceServicer_to_server(servicer, server)
    server.add_registered_method_handlers(SERVICE_NAME, overrides)

