"""The gRPC servicer: decode each request, call one domain function under the right locks, encode."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import grpc
import torch

from weightavg.v1 import weightavg_pb2 as pb
from weightavg.v1 import weightavg_pb2_grpc as pb_grpc

from . import __version__, averaging, batchnorm, convert, dictionaries, handles, modules, specs, wire
from .config import ServerConfig
from .dictionaries import TensorDict
from .errors import InvalidArgument
from .registry import Kind, Registry, TensorHolder, locked
from .stats import RpcStats, live_objects
from .status import translate_errors

Context = grpc.ServicerContext


def _first(requests: Iterator[pb.Message], what: str):  # type: ignore[no-untyped-def]
    """The first message of a client stream, which carries the request's header fields."""
    try:
        return next(requests)
    except StopIteration:
        raise InvalidArgument(f"empty {what} stream: the first message must name the target") from None


class WeightAveragingServicer(pb_grpc.WeightAveragingServiceServicer):
    """Implements weightavg.v1.WeightAveragingService over one Registry."""

    def __init__(
        self, config: ServerConfig, registry: Registry, device: torch.device, stats: RpcStats | None = None
    ) -> None:
        self.config = config
        self.registry = registry
        self.device = device
        self.stats = stats if stats is not None else RpcStats()

    def _assemble(self, chunks: Iterable[pb.TensorChunk]) -> list[tuple[str, torch.Tensor]]:
        return wire.assemble(chunks, self.config.max_upload_bytes)

    def _fetch(self, named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[pb.FetchTensorsResponse]:
        for chunk in wire.tensors_chunks(named, self.config.chunk_bytes):
            yield pb.FetchTensorsResponse(chunk=chunk)

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
        module = specs.build_module(spec, max_depth=self.config.max_spec_depth).to(self.device)
        return pb.CreateModuleResponse(module=convert.handle(self.registry.add(Kind.MODULE, module), Kind.MODULE))

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
        chunks = [first.chunk] + [r.chunk for r in request_iterator]
        tensors = self._assemble(chunks)
        if len(tensors) != 1:
            raise InvalidArgument(f"SetParameter takes exactly one tensor, received {len(tensors)}")
        with locked(entry):
            created = modules.set_parameter(module, first.name, tensors[0][1])
        return pb.SetParameterResponse(created=created)

    @translate_errors
    def ViewParameters(self, request: pb.ViewParametersRequest, context: Context) -> pb.ViewParametersResponse:
        entry, module = self.registry.module(request.handle)
        with locked(entry):
            view = modules.view_parameters(module, request.child)
        handle_id = self.registry.add(Kind.DICTIONARY, view, entry.lock)
        return pb.ViewParametersResponse(dictionary=convert.handle(handle_id, Kind.DICTIONARY))

    @translate_errors
    def ViewBuffers(self, request: pb.ViewBuffersRequest, context: Context) -> pb.ViewBuffersResponse:
        entry, module = self.registry.module(request.handle)
        with locked(entry):
            view = modules.view_buffers(module, request.child)
        handle_id = self.registry.add(Kind.DICTIONARY, view, entry.lock)
        return pb.ViewBuffersResponse(dictionary=convert.handle(handle_id, Kind.DICTIONARY))

    @translate_errors
    def CopyParameters(self, request: pb.CopyParametersRequest, context: Context) -> pb.CopyParametersResponse:
        entry, module = self.registry.module(request.handle)
        with locked(entry):
            copy = averaging.copy_parameters(module)
        handle_id = self.registry.add(Kind.DICTIONARY, copy)
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
        tensors = self._assemble(r.chunk for r in request_iterator)
        d = TensorDict()
        dictionaries.set_entries(d, tensors, self.device)
        handle_id = self.registry.add(Kind.DICTIONARY, d)
        return pb.CreateDictionaryResponse(dictionary=convert.handle(handle_id, Kind.DICTIONARY))

    @translate_errors
    def UpdateDictionary(
        self, request_iterator: Iterator[pb.UpdateDictionaryRequest], context: Context
    ) -> pb.UpdateDictionaryResponse:
        first = _first(request_iterator, "UpdateDictionary")
        entry = self.registry.get(first.dictionary, Kind.DICTIONARY)
        tensors = self._assemble([first.chunk] + [r.chunk for r in request_iterator])
        with locked(entry):
            names = dictionaries.set_entries(entry.obj, tensors, self.device)
        return pb.UpdateDictionaryResponse(names=names)

    @translate_errors
    def DeleteEntries(self, request: pb.DeleteEntriesRequest, context: Context) -> pb.DeleteEntriesResponse:
        entry = self.registry.get(request.dictionary, Kind.DICTIONARY)
        with locked(entry):
            dictionaries.delete_entries(entry.obj, list(request.names))
        return pb.DeleteEntriesResponse()

    @translate_errors
    def CreateTensor(self, request_iterator: Iterator[pb.CreateTensorRequest], context: Context) -> pb.CreateTensorResponse:
        tensors = self._assemble(r.chunk for r in request_iterator)
        if len(tensors) != 1:
            raise InvalidArgument(f"CreateTensor takes exactly one tensor, received {len(tensors)}")
        holder = TensorHolder(tensors[0][1].to(self.device))
        return pb.CreateTensorResponse(tensor=convert.handle(self.registry.add(Kind.TENSOR, holder), Kind.TENSOR))

    @translate_errors
    def FetchTensors(self, request: pb.FetchTensorsRequest, context: Context) -> Iterator[pb.FetchTensorsResponse]:
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
            yield from self._fetch(named)

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
        for handle_id, entry in self.registry.items():
            with locked(entry):
                summary = handles.summarize(entry)
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
            handles.move(entry, device, dtype)
        return pb.MoveHandleResponse(handle=convert.handle(request.handle, entry.kind))

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
