"""The gRPC servicer: decode each request, call one domain function under the right locks, encode."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator

import grpc
import torch

from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc

from .. import __version__
from ..domain import averaging, batching, batchnorm, dictionaries, tensors as handles, losses, modules, optimizers, specs, training
from . import convert, codec as wire
from ..store import limits, snapshot
from ..ops.config import ServerConfig
from ..domain.dictionaries import TensorDict
from ..domain.errors import Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument
from ..store.registry import CALLER_SESSION, Entry, Kind, Registry, Reservation, TensorHolder, locked
from ..ops.stats import RpcStats, live_objects
from .status import translate_errors

Context = grpc.ServicerContext


def _first(requests: Iterator[pb.Message], what: str):  # type: ignore[no-untyped-def]
    """The first message of a client stream, which carries the request's header fields."""
    try:
        return next(requests)
    except StopIteration:
        raise InvalidArgument(f"empty {what} stream: the first message must name the target") from None


def _should_stop(context: Context) -> Callable[[], bool]:
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


class WeightAveragingServicer(pb_grpc.WeightAveragingServiceServicer):
    """Implements weightavg.v1.WeightAveragingService over one Registry."""

    def __init__(
        self, config: ServerConfig, registry: Registry, device: torch.device, stats: RpcStats | None = None
    ) -> None:
        self.config = config
        self.registry = registry
        self.device = device
        self.stats = stats if stats is not None else RpcStats()

    def _assemble(
        self,
        chunks: Iterable[pb.TensorChunk],
        reservation: Reservation,
        context: Context,
        where: Callable[[str], torch.device] | None = None,
    ) -> list[tuple[str, torch.Tensor]]:
        """Join an upload, reserving each tensor's bytes on its target device (`where(name)`, default
        the server's device) from its header, before its buffer is allocated."""

        def on_header(name: str, nbytes: int) -> None:
            device = where(name) if where is not None else self.device
            self.registry.grow(reservation, nbytes={str(device): nbytes})

        tensors = wire.assemble(chunks, self.config.max_upload_bytes, on_header)
        if not context.is_active():
            # grpc ends the request stream quietly when it fails the call (a message over the size
            # cap, the client gone): what arrived is incomplete and must change nothing.
            raise Cancelled("the call ended before its request stream was complete; nothing changed")
        return tensors

    def _entry_placement(self, name: str) -> torch.device:
        return dictionaries.placement(name, self.device)

    def _assemble_stream(self, first: pb.TensorChunk, rest: Iterable[pb.TensorChunk]) -> list[tuple[str, torch.Tensor]]:
        """Join chunks as they arrive, so a large upload is held once, not also as a list of messages."""
        assembler = wire.TensorAssembler(self.config.max_upload_bytes)
        assembler.feed(first)
        for chunk in rest:
            assembler.feed(chunk)
        return assembler.finish()

    def _fetch(self, named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[bytes]:
        """Encoded FetchTensorsResponse messages; `add_to_server` registers the serializer that passes them on."""
        return wire.encoded_chunks(named, self.config.chunk_bytes)

    @translate_errors
    def Ping(self, request: pb.PingRequest, context: Context) -> pb.PingResponse:
        return pb.PingResponse()

    @translate_errors
    def GetServerInfo(self, request: pb.GetServerInfoRequest, context: Context) -> pb.GetServerInfoResponse:
        allocated = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        return pb.GetServerInfoResponse(
            version=__version__,
            torch_version=torch.__version__,
            grpc_version=grpc.__version__,
            device=str(self.device),
            layer_types=list(specs.LAYER_TYPES),
            dtypes=sorted(wire.DTYPES),
            max_message_bytes=self.config.max_message_bytes,
            chunk_bytes=self.config.chunk_bytes,
            max_spec_depth=self.config.max_spec_depth,
            cuda_memory_allocated=allocated,
        )

    @translate_errors
    def CreateModule(self, request: pb.CreateModuleRequest, context: Context) -> pb.CreateModuleResponse:
        spec = convert.layer_spec(request.spec, self.config.max_spec_depth)
        need = {str(self.device): limits.module_bytes(spec, self.config.max_spec_depth)}
        with self.registry.reserve(handles=1, nbytes=need) as reservation:
            module = specs.build_module(spec, max_depth=self.config.max_spec_depth).to(self.device)
            handle_id = self.registry.add(
                Kind.MODULE, module, charge=handles.held_bytes(module), reservation=reservation
            )
        return pb.CreateModuleResponse(module=convert.handle(handle_id, Kind.MODULE))

    @translate_errors
    def DescribeModule(self, request: pb.DescribeModuleRequest, context: Context) -> pb.DescribeModuleResponse:
        entry, module = self.registry.module(request.handle)
        with locked(entry):
            return pb.DescribeModuleResponse(rows=convert.module_rows(specs.describe_module(module)))

    @translate_errors
    def ListParameterNames(
        self, request: pb.ListParameterNamesRequest, context: Context
    ) -> pb.ListParameterNamesResponse:
        entry, module = self.registry.module(request.handle)
        with locked(entry):
            return pb.ListParameterNamesResponse(names=modules.parameter_names(module, request.child))

    @translate_errors
    def ListBufferNames(self, request: pb.ListBufferNamesRequest, context: Context) -> pb.ListBufferNamesResponse:
        entry, module = self.registry.module(request.handle)
        with locked(entry):
            return pb.ListBufferNamesResponse(names=modules.buffer_names(module, request.child))

    @translate_errors
    def SetParameter(self, request_iterator: Iterator[pb.SetParameterRequest], context: Context) -> pb.SetParameterResponse:
        first = _first(request_iterator, "SetParameter")
        entry, module = self.registry.module(first.handle)
        with self.registry.reserve() as reservation:
            tensors = self._assemble(
                itertools.chain([first.chunk], (r.chunk for r in request_iterator)), reservation, context
            )
            if len(tensors) != 1:
                raise InvalidArgument(f"SetParameter takes exactly one tensor, received {len(tensors)}")
            with locked(entry):
                created = modules.set_parameter(module, first.name, tensors[0][1])
                self.registry.recharge(entry, handles.held_bytes(entry.owner), reservation)
        return pb.SetParameterResponse(created=created)

    @translate_errors
    def ViewParameters(self, request: pb.ViewParametersRequest, context: Context) -> pb.ViewParametersResponse:
        entry, module = self.registry.module(request.handle)
        with locked(entry):
            view = modules.view_parameters(module, request.child)
            handle_id = self.registry.add(Kind.DICTIONARY, view, entry.lock, owner=entry.owner)
        return pb.ViewParametersResponse(dictionary=convert.handle(handle_id, Kind.DICTIONARY))

    @translate_errors
    def ViewBuffers(self, request: pb.ViewBuffersRequest, context: Context) -> pb.ViewBuffersResponse:
        entry, module = self.registry.module(request.handle)
        with locked(entry):
            view = modules.view_buffers(module, request.child)
            handle_id = self.registry.add(Kind.DICTIONARY, view, entry.lock, owner=entry.owner)
        return pb.ViewBuffersResponse(dictionary=convert.handle(handle_id, Kind.DICTIONARY))

    @translate_errors
    def CopyParameters(self, request: pb.CopyParametersRequest, context: Context) -> pb.CopyParametersResponse:
        entry, module = self.registry.module(request.handle)
        with locked(entry):
            need = handles.tensor_bytes(module.parameters())
            with self.registry.reserve(handles=1, nbytes=need) as reservation:
                copy = averaging.copy_parameters(module)
                handle_id = self.registry.add(
                    Kind.DICTIONARY, copy, charge=handles.held_bytes(copy), reservation=reservation
                )
        return pb.CopyParametersResponse(dictionary=convert.handle(handle_id, Kind.DICTIONARY))

    @translate_errors
    def LoadParameters(self, request: pb.LoadParametersRequest, context: Context) -> pb.LoadParametersResponse:
        entry, module = self.registry.module(request.handle)
        source = self.registry.get(request.dictionary, Kind.DICTIONARY)
        with locked(entry, source):
            copied = averaging.load_parameters(module, source.obj)
        return pb.LoadParametersResponse(copied=copied, names=list(copied))

    @translate_errors
    def AverageParameters(
        self, request: pb.AverageParametersRequest, context: Context
    ) -> pb.AverageParametersResponse:
        entry, module = self.registry.module(request.handle)
        target = self.registry.get(request.dictionary, Kind.DICTIONARY)
        with locked(entry, target):
            count = averaging.average_parameters(module, target.obj)
            self.registry.recharge(target, handles.held_bytes(target.owner))
        return pb.AverageParametersResponse(count=count)

    @translate_errors
    def ResetBatchNorm(self, request: pb.ResetBatchNormRequest, context: Context) -> pb.ResetBatchNormResponse:
        entry, module = self.registry.module(request.handle)
        with locked(entry):
            momenta = batchnorm.reset_batchnorm(module)
        return pb.ResetBatchNormResponse(
            momenta={name: convert.momentum_message(m) for name, m in momenta.items()}, names=list(momenta)
        )

    @translate_errors
    def RestoreMomentum(self, request: pb.RestoreMomentumRequest, context: Context) -> pb.RestoreMomentumResponse:
        entry, module = self.registry.module(request.handle)
        with locked(entry):
            batchnorm.restore_momentum(module, convert.momenta(dict(request.momenta)))
        return pb.RestoreMomentumResponse()

    @translate_errors
    def CreateDictionary(
        self, request_iterator: Iterator[pb.CreateDictionaryRequest], context: Context
    ) -> pb.CreateDictionaryResponse:
        with self.registry.reserve(handles=1) as reservation:
            tensors = self._assemble(
                (r.chunk for r in request_iterator), reservation, context, self._entry_placement
            )
            d = TensorDict()
            dictionaries.set_entries(d, tensors, self.device)
            handle_id = self.registry.add(Kind.DICTIONARY, d, charge=handles.held_bytes(d), reservation=reservation)
        return pb.CreateDictionaryResponse(dictionary=convert.handle(handle_id, Kind.DICTIONARY))

    @translate_errors
    def UpdateDictionary(
        self, request_iterator: Iterator[pb.UpdateDictionaryRequest], context: Context
    ) -> pb.UpdateDictionaryResponse:
        first = _first(request_iterator, "UpdateDictionary")
        entry = self.registry.get(first.dictionary, Kind.DICTIONARY)
        with self.registry.reserve() as reservation:
            # Counted as additions: the old values are still held while the new ones arrive.
            tensors = self._assemble(
                itertools.chain([first.chunk], (r.chunk for r in request_iterator)),
                reservation, context, self._entry_placement,
            )
            with locked(entry):
                names = dictionaries.set_entries(entry.obj, tensors, self.device)
                self.registry.recharge(entry, handles.held_bytes(entry.owner), reservation)
        return pb.UpdateDictionaryResponse(names=names)

    @translate_errors
    def DeleteEntries(self, request: pb.DeleteEntriesRequest, context: Context) -> pb.DeleteEntriesResponse:
        entry = self.registry.get(request.dictionary, Kind.DICTIONARY)
        with locked(entry):
            dictionaries.delete_entries(entry.obj, list(request.names))
            self.registry.recharge(entry, handles.held_bytes(entry.owner))
        return pb.DeleteEntriesResponse()

    @translate_errors
    def CreateTensor(self, request_iterator: Iterator[pb.CreateTensorRequest], context: Context) -> pb.CreateTensorResponse:
        with self.registry.reserve(handles=1) as reservation:
            tensors = self._assemble((r.chunk for r in request_iterator), reservation, context)
            if len(tensors) != 1:
                raise InvalidArgument(f"CreateTensor takes exactly one tensor, received {len(tensors)}")
            holder = TensorHolder(tensors[0][1].to(self.device))
            handle_id = self.registry.add(
                Kind.TENSOR, holder, charge=handles.held_bytes(holder), reservation=reservation
            )
        return pb.CreateTensorResponse(tensor=convert.handle(handle_id, Kind.TENSOR))

    @translate_errors
    def FetchTensors(self, request: pb.FetchTensorsRequest, context: Context) -> Iterator[bytes]:
        entry = self.registry.get(request.handle)
        names = list(request.names)
        with locked(entry):
            if entry.kind is Kind.DICTIONARY:
                named = dictionaries.select(entry.obj, names)
            elif entry.kind is Kind.TENSOR:
                if names:
                    raise InvalidArgument("a tensor handle has no names; fetch it without names")
                named = [("", entry.obj.tensor)]
            else:
                _, module = self.registry.module(request.handle)
                if not names:
                    raise InvalidArgument("name the parameters to fetch from a module")
                named = [(name, modules.parameter(module, name).detach()) for name in names]
            copies = handles.snapshot(named)
        yield from self._fetch(copies)

    @translate_errors
    def GetSize(self, request: pb.GetSizeRequest, context: Context) -> pb.GetSizeResponse:
        entry = self.registry.get(request.handle)
        with locked(entry):
            if entry.kind is Kind.DICTIONARY:
                entries = [
                    pb.NamedShape(name=name, shape=pb.Shape(dims=shape))
                    for name, shape in dictionaries.sizes(entry.obj)
                ]
                return pb.GetSizeResponse(dictionary=pb.DictionarySizes(entries=entries))
            if entry.kind is Kind.TENSOR:
                return pb.GetSizeResponse(tensor=pb.Shape(dims=list(entry.obj.tensor.shape)))
            _, module = self.registry.module(request.handle)
            return pb.GetSizeResponse(parameter_count=modules.parameter_count(module))

    @translate_errors
    def FreeHandles(self, request: pb.FreeHandlesRequest, context: Context) -> pb.FreeHandlesResponse:
        if request.all:
            return pb.FreeHandlesResponse(freed=self.registry.free_all())
        return pb.FreeHandlesResponse(freed=self.registry.free(list(request.handles)))

    @translate_errors
    def AddReference(self, request: pb.AddReferenceRequest, context: Context) -> pb.AddReferenceResponse:
        entry = self.registry.get(request.handle)
        return pb.AddReferenceResponse(handle=convert.handle(self.registry.addref(request.handle), entry.kind))

    @translate_errors
    def ListHandles(self, request: pb.ListHandlesRequest, context: Context) -> pb.ListHandlesResponse:
        infos = []
        for handle_id, entry in self.registry.visible_items():
            summary = handles.describe(entry)
            if summary is None:
                continue  # freed since the listing began
            infos.append(
                pb.HandleInfo(
                    handle=convert.handle(handle_id, entry.kind),
                    device=summary.device,
                    dtype=wire.CODES.get(summary.dtype, pb.DTYPE_UNSPECIFIED) if summary.dtype else pb.DTYPE_UNSPECIFIED,
                    bytes=summary.nbytes,
                    tensor_count=summary.tensor_count,
                )
            )
        return pb.ListHandlesResponse(handles=infos)

    @translate_errors
    def MoveHandle(self, request: pb.MoveHandleRequest, context: Context) -> pb.MoveHandleResponse:
        entry = self.registry.get(request.handle)
        device = convert.device(request.device) if request.device else None
        dtype = wire.torch_dtype(request.dtype) if request.dtype != pb.DTYPE_UNSPECIFIED else None
        with locked(entry):
            with self.registry.reserve(nbytes=handles.move_bytes(entry, device, dtype)) as reservation:
                handles.move(entry, device, dtype)
                self.registry.recharge(entry, handles.held_bytes(entry.owner), reservation)
        return pb.MoveHandleResponse(handle=convert.handle(request.handle, entry.kind))

    # -- models and training ------------------------------------------------------------------------

    @translate_errors
    def CreateLoss(self, request: pb.CreateLossRequest, context: Context) -> pb.CreateLossResponse:
        args, kwargs = convert.option_args(request.args, request.options)
        loss = losses.create_loss(request.type, args, kwargs)
        loss.fn.to(self.device)
        return pb.CreateLossResponse(loss=convert.handle(self.registry.add(Kind.LOSS, loss), Kind.LOSS))

    @translate_errors
    def CreateOptimizer(self, request: pb.CreateOptimizerRequest, context: Context) -> pb.CreateOptimizerResponse:
        entry, module = self.registry.module(request.module)
        if entry.kind is Kind.OPTIMIZER:
            raise InvalidArgument("build an optimizer over a module or model, not over another optimizer")
        args, kwargs = convert.option_args(request.args, request.options)
        with locked(entry):
            optimizer = optimizers.create_optimizer(request.type, module, args, kwargs)
        handle_id = self.registry.add(Kind.OPTIMIZER, optimizer, entry.lock)
        return pb.CreateOptimizerResponse(optimizer=convert.handle(handle_id, Kind.OPTIMIZER))

    def _optimizer(self, handle: str) -> tuple[Entry, optimizers.Optimizer]:
        entry = self.registry.get(handle, Kind.OPTIMIZER, Kind.MODEL)
        return entry, entry.obj if entry.kind is Kind.OPTIMIZER else entry.obj.optimizer

    @translate_errors
    def GetLearningRate(self, request: pb.GetLearningRateRequest, context: Context) -> pb.GetLearningRateResponse:
        entry, optimizer = self._optimizer(request.handle)
        with locked(entry):
            return pb.GetLearningRateResponse(lr=optimizers.get_lr(optimizer))

    @translate_errors
    def SetLearningRate(self, request: pb.SetLearningRateRequest, context: Context) -> pb.SetLearningRateResponse:
        entry, optimizer = self._optimizer(request.handle)
        with locked(entry):
            optimizers.set_lr(optimizer, request.lr)
        return pb.SetLearningRateResponse()

    @translate_errors
    def CreateModel(self, request: pb.CreateModelRequest, context: Context) -> pb.CreateModelResponse:
        module = self.registry.get(request.module, Kind.MODULE)
        loss = self.registry.get(request.loss, Kind.LOSS)
        optimizer = self.registry.get(request.optimizer, Kind.OPTIMIZER)
        with locked(module, loss, optimizer):
            model = training.create_model(module.obj, loss.obj, optimizer.obj)
            self.registry.free([request.module, request.loss, request.optimizer])
        handle_id = self.registry.add(Kind.MODEL, model, module.lock)
        return pb.CreateModelResponse(model=convert.handle(handle_id, Kind.MODEL))

    def _model(self, handle: str) -> tuple[Entry, training.Model]:
        entry = self.registry.get(handle, Kind.MODEL)
        return entry, entry.obj

    @translate_errors
    def DescribeModel(self, request: pb.DescribeModelRequest, context: Context) -> pb.DescribeModelResponse:
        entry, model = self._model(request.model)
        with locked(entry):
            return pb.DescribeModelResponse(
                module=convert.module_rows(specs.describe_module(model.module)),
                loss=pb.Component(type=model.loss.type, options=convert.options_message(model.loss.options)),
                optimizer=pb.Component(
                    type=model.optimizer.type, options=convert.options_message(model.optimizer.describe())
                ),
                train=convert.options_message(model.train),
                test=convert.options_message(model.test),
                train_size=training.data_size(model, "train"),
                test_size=training.data_size(model, "test"),
            )

    @translate_errors
    def GetModelOptions(self, request: pb.GetModelOptionsRequest, context: Context) -> pb.GetModelOptionsResponse:
        entry, model = self._model(request.model)
        split = convert.split(request.split)
        with locked(entry):
            return pb.GetModelOptionsResponse(options=convert.options_message(training.get_options(model, split)))

    @translate_errors
    def SetModelOptions(self, request: pb.SetModelOptionsRequest, context: Context) -> pb.SetModelOptionsResponse:
        entry, model = self._model(request.model)
        split = convert.split(request.split)
        _, values = convert.option_args((), request.options)
        with locked(entry):
            return pb.SetModelOptionsResponse(options=convert.options_message(training.set_options(model, split, values)))

    @translate_errors
    def SetModelData(self, request_iterator: Iterator[pb.SetModelDataRequest], context: Context) -> pb.SetModelDataResponse:
        first = _first(request_iterator, "SetModelData")
        entry, model = self._model(first.model)
        split = convert.split(first.split)
        tensors = self._assemble_stream(first.chunk, (r.chunk for r in request_iterator))
        if len(tensors) != 2:
            raise InvalidArgument(f"SetModelData takes two tensors, inputs then targets; received {len(tensors)}")
        with locked(entry):
            count = training.set_data(model, split, tensors[0][1], tensors[1][1], self.device)
        return pb.SetModelDataResponse(batches=count)

    @translate_errors
    def RunEpoch(self, request: pb.RunEpochRequest, context: Context) -> Iterator[pb.RunEpochResponse]:
        entry, model = self._model(request.model)
        with locked(entry), _stopping(context):
            metrics = training.run_epoch(model, _should_stop(context))
        for chunk in wire.tensors_chunks(metrics, self.config.chunk_bytes):
            yield pb.RunEpochResponse(chunk=chunk)

    @translate_errors
    def RunTest(self, request: pb.RunTestRequest, context: Context) -> Iterator[pb.RunTestResponse]:
        entry, model = self._model(request.model)
        with locked(entry), _stopping(context):
            metrics = training.test_epoch(model, _should_stop(context))
        for chunk in wire.tensors_chunks(metrics, self.config.chunk_bytes):
            yield pb.RunTestResponse(chunk=chunk)

    @translate_errors
    def EvaluateModel(
        self, request_iterator: Iterator[pb.EvaluateModelRequest], context: Context
    ) -> Iterator[pb.EvaluateModelResponse]:
        first = _first(request_iterator, "EvaluateModel")
        entry, model = self._model(first.model)
        tensors = self._assemble_stream(first.chunk, (r.chunk for r in request_iterator))
        if len(tensors) != 1:
            raise InvalidArgument(f"EvaluateModel takes one input tensor, received {len(tensors)}")
        with locked(entry), _stopping(context):
            output = training.evaluate(model, tensors[0][1], _should_stop(context))
        for chunk in wire.tensor_chunks("", output, self.config.chunk_bytes):
            yield pb.EvaluateModelResponse(chunk=chunk)

    @translate_errors
    def RunForward(self, request_iterator: Iterator[pb.RunForwardRequest], context: Context) -> pb.RunForwardResponse:
        first = _first(request_iterator, "RunForward")
        entry, module = self.registry.module(first.handle)
        mode = convert.forward_mode(first.mode)
        tensors = self._assemble_stream(first.chunk, (r.chunk for r in request_iterator))
        if len(tensors) > 1 or (tensors and first.input):
            raise InvalidArgument("RunForward takes one input: a tensor handle or one streamed tensor")
        entries = [entry]
        if first.input:
            source = self.registry.get(first.input, Kind.TENSOR)
            entries.append(source)
        with locked(*entries):
            if first.input:
                x = source.obj.tensor
            elif tensors:
                x = tensors[0][1]
            elif entry.kind is Kind.MODEL:
                x = training.default_input(entry.obj, mode)
            else:
                raise InvalidArgument("RunForward needs an input: a tensor handle or a streamed tensor")
            output = training.forward(module, x, mode)
        holder = TensorHolder(output)
        return pb.RunForwardResponse(output=convert.handle(self.registry.add(Kind.TENSOR, holder), Kind.TENSOR))

    @translate_errors
    def GetModelInput(self, request: pb.GetModelInputRequest, context: Context) -> pb.GetModelInputResponse:
        entry, model = self._model(request.model)
        with locked(entry):
            holder = TensorHolder(training.input_tensor(model))
        handle_id = self.registry.add(Kind.TENSOR, holder, entry.lock)
        return pb.GetModelInputResponse(tensor=convert.handle(handle_id, Kind.TENSOR))

    @translate_errors
    def RestoreModelData(self, request: pb.RestoreModelDataRequest, context: Context) -> pb.RestoreModelDataResponse:
        entry, model = self._model(request.model)
        split = "test" if request.split == pb.DATA_SPLIT_TEST else "train"
        with locked(entry):
            return pb.RestoreModelDataResponse(size=training.restore_data(model, split))

    @translate_errors
    def NextBatch(self, request: pb.NextBatchRequest, context: Context) -> pb.NextBatchResponse:
        entry = self.registry.get(request.handle, Kind.TENSOR, Kind.MODEL)
        split = "test" if request.split == pb.DATA_SPLIT_TEST else "train"
        with locked(entry):
            if entry.kind is Kind.MODEL:
                if request.size:
                    raise InvalidArgument(
                        f"a model batches by its {split} batchsize; set it with {split}(m, batchsize=w)"
                    )
                more = training.next_model_batch(entry.obj, split)
            else:
                if request.split != pb.DATA_SPLIT_UNSPECIFIED:
                    raise InvalidArgument("a split names a model's train or test data; a tensor handle takes none")
                more = batching.next_batch(entry.obj.tensor, request.size)
        return pb.NextBatchResponse(more=more)

    @translate_errors
    def RecalculateBatchNorm(
        self, request: pb.RecalculateBatchNormRequest, context: Context
    ) -> pb.RecalculateBatchNormResponse:
        entry, model = self._model(request.model)
        with locked(entry), _stopping(context):
            momenta = training.recalculate_batchnorm(model, _should_stop(context))
        return pb.RecalculateBatchNormResponse(
            momenta={name: convert.momentum_message(m) for name, m in momenta.items()}, names=list(momenta)
        )

    # -- sessions and snapshots ---------------------------------------------------------------------

    def _session(self, given: str) -> str:
        """The session a request names, else the one its metadata carries."""
        session = given or CALLER_SESSION.get()
        if not session:
            raise InvalidArgument("name a session, or call with 'weightavg-session' metadata")
        return session

    @translate_errors
    def CreateSession(self, request: pb.CreateSessionRequest, context: Context) -> pb.CreateSessionResponse:
        lease = request.lease_seconds or self.config.session_lease_seconds
        if not 0 < lease <= self.config.max_session_lease_seconds:  # also refuses NaN
            raise InvalidArgument(
                f"lease of {request.lease_seconds} s is out of range: give 0 for the default "
                f"({self.config.session_lease_seconds} s) or up to {self.config.max_session_lease_seconds} s"
            )
        return pb.CreateSessionResponse(session=self.registry.create_session(lease), lease_seconds=lease)

    @translate_errors
    def KeepAliveSession(self, request: pb.KeepAliveSessionRequest, context: Context) -> pb.KeepAliveSessionResponse:
        return pb.KeepAliveSessionResponse(lease_seconds=self.registry.renew(self._session(request.session)))

    @translate_errors
    def CloseSession(self, request: pb.CloseSessionRequest, context: Context) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse(freed=self.registry.close_session(self._session(request.session)))

    @translate_errors
    def Snapshot(self, request: pb.SnapshotRequest, context: Context) -> pb.SnapshotResponse:
        if not self.config.state_dir:
            raise FailedPrecondition("this server was started without --state-dir; there is nowhere to write a snapshot")
        result = snapshot.save(self.registry, self.config.state_dir)
        return pb.SnapshotResponse(
            directory=result.directory, handles=result.handles, tensor_bytes=result.tensor_bytes, skipped=result.skipped
        )

    @translate_errors
    def GetServerStats(self, request: pb.GetServerStatsRequest, context: Context) -> pb.GetServerStatsResponse:
        methods = [
            pb.MethodStats(
                method=name, count=s.finished, in_flight=s.in_flight, failures=s.failures, codes=dict(s.codes),
                total_seconds=s.seconds_total, max_seconds=s.seconds_max,
                bytes_received=s.bytes_received, bytes_sent=s.bytes_sent,
            )
            for name, s in self.stats.snapshot().items()
        ]
        devices = [
            pb.DeviceUsage(device=device, handles=usage.handles, bytes=usage.bytes)
            for device, usage in live_objects(self.registry).items()
        ]
        return pb.GetServerStatsResponse(uptime_seconds=self.stats.uptime(), methods=methods, devices=devices)

    # -- models, continued --------------------------------------------------------------------------

    @translate_errors
    def UpdateModel(self, request: pb.UpdateModelRequest, context: Context) -> pb.UpdateModelResponse:
        entry, model = self._model(request.model)
        parts: dict[Kind, Entry] = {}
        for handle in request.parts:
            part = self.registry.get(handle, Kind.MODULE, Kind.LOSS, Kind.OPTIMIZER)
            if part.kind in parts:
                raise InvalidArgument(f"two {part.kind.value} handles given; give at most one of each part")
            parts[part.kind] = part
        given = [parts[k].obj if k in parts else None for k in (Kind.MODULE, Kind.LOSS, Kind.OPTIMIZER)]
        with locked(entry, *parts.values()):
            training.check_parts(model, *given)
            module = parts.get(Kind.MODULE)
            if module is not None and module.obj is not model.module:
                # The model keeps its own lock; a module that other handles (addref, views, other
                # optimizers) reach under the module's lock would then be guarded by two locks.
                others = [h for h, e in self.registry.items() if e.lock is module.lock and e not in parts.values()]
                if others:
                    raise InvalidArgument(
                        f"the new module has other handles ({', '.join(others)}); free them first, or build a new model"
                    )
            training.replace_parts(model, *given)
            self.registry.free(list(request.parts))
            self.registry.recharge(entry, handles.held_bytes(model))
        return pb.UpdateModelResponse(model=convert.handle(request.model, Kind.MODEL))


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WeightAveragingService"].full_name


def add_to_server(servicer: WeightAveragingServicer, server: grpc.Server) -> None:
    """Register the servicer, with the tensor streams encoded and decoded by hand (one copy a byte).

    FetchTensors sends the pre-encoded chunks `_fetch` makes (`wire.serialize` passes them on); the
    upload streams decode chunks as views into the received bytes (`wire.request_decoder`). The
    overrides are offered both ways the server looks methods up: as a generic handler ahead of the
    generated one, and as registered handlers that replace the generated ones.
    """
    overrides = {
        "FetchTensors": grpc.unary_stream_rpc_method_handler(
            servicer.FetchTensors,
            request_deserializer=pb.FetchTensorsRequest.FromString,
            response_serializer=wire.serialize,
        ),
        "CreateDictionary": grpc.stream_unary_rpc_method_handler(
            servicer.CreateDictionary,
            request_deserializer=wire.request_decoder(pb.CreateDictionaryRequest, 1, {}),
            response_serializer=pb.CreateDictionaryResponse.SerializeToString,
        ),
        "UpdateDictionary": grpc.stream_unary_rpc_method_handler(
            servicer.UpdateDictionary,
            request_deserializer=wire.request_decoder(pb.UpdateDictionaryRequest, 2, {1: "dictionary"}),
            response_serializer=pb.UpdateDictionaryResponse.SerializeToString,
        ),
        "CreateTensor": grpc.stream_unary_rpc_method_handler(
            servicer.CreateTensor,
            request_deserializer=wire.request_decoder(pb.CreateTensorRequest, 1, {}),
            response_serializer=pb.CreateTensorResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, overrides),))
    pb_grpc.add_WeightAveragingServiceServicer_to_server(servicer, server)
    server.add_registered_method_handlers(SERVICE_NAME, overrides)
