"""The cluster: under torchrun, rank 0's service fans calls out to the other ranks over the process group.

Every rank holds its own registry. Rank 0 serves the API; a call on an object that lives on other
ranks (replicated on every rank, or placed on one) becomes a `Command`, broadcast over a gloo group
to every rank and executed by each in the order rank 0 sent them (one at a time), with the results
gathered back to rank 0. Objects on rank 0 alone (the default placement) never touch the process
group, so a call on them runs as on a one-rank server. Replicated objects get the same handle on
every rank: rank 0 seeds each command's handle IDs with fresh random bits (`HANDLE_BITS`).

Commands go over a gloo group even when tensors move over NCCL: pickled commands are host data, and
a control group of its own keeps its timeouts and ordering apart from the data collectives. When a
collective fails (a rank died: its sockets close; or it went silent past the timeout), the cluster
is broken for good: health says NOT_SERVING and every call is answered UNAVAILABLE until torchrun
restarts the group (--max-restarts) and every rank restores its snapshot.

Known limits: handles on other ranks do not belong to sessions; a command that fails on some ranks
after others changed state is undone only for the objects it created; a command may run at most the
collective timeout (--cluster-timeout-seconds), as rank 0 waits that long for the others' results.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import itertools
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import PrefixStore
from torch.distributed.rendezvous import rendezvous

from .domain import collectives, specs
from .domain.errors import FailedPrecondition, InvalidArgument, Unavailable, WeightavgError
from .service import (
    NOTHING, Named, Placement, RankInfo, Reduced, Ref, Service, Settings, StopCheck, Upload, OnHeader,
)
from .store import snapshot
from .store.snapshot import SnapshotResult
from .store.registry import CALLER_SESSION, HANDLE_BITS, Registry
from .store.requests import RequestKey
from .store.tenants import CALLER, Caller

log = logging.getLogger("weightavg.cluster")

ALL = -1
"""Placement of a replicated object: every rank."""

DEFAULT_TIMEOUT_SECONDS = 300.0
"""How long a rank waits on a collective (a command, its results, a bucket) before the cluster is
declared broken; also the longest one command may run on the other ranks."""

_HANDLE = re.compile(r"^[a-z]+_[0-9a-f]{32}$")
"""The shape of a handle ID (store/registry.py): what routing takes for a handle among the arguments."""


@dataclass(frozen=True)
class Fabric:
    """This process's place in the cluster, and the groups it talks over."""

    rank: int
    world_size: int
    device: torch.device
    devices: tuple[str, ...]
    """Each rank's device, in rank order."""
    backend: str
    """The data backend: "nccl" when every rank has a GPU of its own, else "gloo"."""
    control: Any
    """A gloo group for commands and results (a `dist.ProcessGroup`)."""
    timeout: float


def world_from_env(environ: dict[str, str] | None = None) -> tuple[int, int, int, int] | None:
    """(rank, world size, local rank, local world size) from torchrun's variables; None outside
    torchrun or with one rank (then the server is a plain one-rank server)."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank = int(env["RANK"])
    return rank, world, int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", world))


def rank_device(requested: str, local_rank: int, local_world: int) -> tuple[torch.device, str]:
    """This rank's device and the data backend: NCCL when each local rank has a GPU of its own;
    ranks that must share GPUs (NCCL refuses two ranks on one device) use gloo, on the GPU still."""
    if requested != "cpu" and torch.cuda.is_available():
        count = torch.cuda.device_count()
        return torch.device("cuda", local_rank % count), "nccl" if count >= local_world else "gloo"
    if requested.startswith("cuda"):
        raise ValueError(f"--device {requested}: CUDA is not available on this node")
    return torch.device("cpu"), "gloo"


def join(requested_device: str, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> Fabric | None:
    """Join torchrun's process group (env://), or None when not under torchrun with several ranks."""
    place = world_from_env()
    if place is None:
        return None
    rank, world, local_rank, local_world = place
    device, backend = rank_device(requested_device, local_rank, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    wait = timedelta(seconds=timeout)
    store, _, _ = next(rendezvous("env://", timeout=wait))
    # torchrun (2.4 and later) keeps one TCPStore for all rounds of its rendezvous, and init_process_group
    # writes its keys (each rank's gloo address) under the same names every round: after a restart the
    # new ranks would read the dead ranks' addresses and time out in gloo's connectFullMesh. Every
    # attempt gets keys of its own; all ranks of a round share its restart count.
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    store = PrefixStore(f"weightavg/attempt-{attempt}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=wait)
    control = dist.new_group(backend="gloo", timeout=wait)
    devices: list[Any] = [None] * world
    dist.all_gather_object(devices, str(device), group=control)
    log.info("rank %d of %d joined on %s (data backend %s)", rank, world, device, backend)
    return Fabric(rank, world, device, tuple(str(d) for d in devices), backend, control, timeout)


# -- snapshots ------------------------------------------------------------------------------------------
# Each rank writes its snapshot to --state-dir/rank-N/gen-G (a whole snapshot directory, store/snapshot.py)
# with a generation G that rank 0 chose for all ranks; the older generations are removed only once every
# rank wrote G. A restart restores the newest generation that every rank holds, so the ranks never
# come back from snapshots of different moments.

_GENERATION_DIR = re.compile(r"^gen-(\d+)$")


def generation_dir(directory: str, generation: int) -> str:
    return os.path.join(directory, f"gen-{generation}")


def generations(directory: str) -> list[int]:
    """The generations this rank wrote whole (gen-G holding its manifest, written last), oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = (_GENERATION_DIR.match(p.name) for p in root.iterdir())
    return sorted(int(m.group(1)) for m in found if m and (root / m.group(0) / snapshot.MANIFEST).is_file())


def common_generation(held: Sequence[Sequence[int]]) -> int:
    """The newest generation every rank holds; 0 when no rank holds any.

    Raises:
        SnapshotError: ranks hold snapshots but none in common (a state directory lost or replaced):
            restoring some ranks and not others would serve a mix, so the cluster does not start.
    """
    shared = set(held[0]).intersection(*held[1:]) if held else set()
    if shared:
        return max(shared)
    if any(held):
        raise snapshot.SnapshotError(
            f"the ranks hold snapshots of no common generation ({', '.join(f'rank {r}: {list(g)}' for r, g in enumerate(held))}); "
            "restore the missing rank-N directories, or move --state-dir away to start empty"
        )
    return 0


def prune(directory: str, keep: int) -> None:
    """Remove every generation but `keep` (older ones, and newer ones that not every rank finished)."""
    root = Path(directory)
    if root.is_dir():
        for p in root.iterdir():
            m = _GENERATION_DIR.match(p.name)
            if m and int(m.group(1)) != keep:
                shutil.rmtree(p, ignore_errors=True)


def restore_dir(directory: str) -> str:
    """The snapshot a rank restores after agree_on_snapshot left one generation (or none: nothing to restore)."""
    held = generations(directory)
    return generation_dir(directory, held[-1]) if held else os.path.join(directory, "gen-none")


def agree_on_snapshot(fabric: Fabric, directory: str) -> int:
    """Before any rank restores: the generation all restore (0: none), the others removed on every rank."""
    held: list[Any] = [None] * fabric.world_size
    dist.all_gather_object(held, generations(directory), group=fabric.control)
    generation = common_generation(held)
    prune(directory, generation)
    if generation:
        log.info("rank %d restores snapshot generation %d", fabric.rank, generation)
    return generation


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- commands ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One operation for the ranks: a Service method (or a `RANK_OPS` entry) and its arguments."""

    op: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    ranks: tuple[int, ...] | None = None
    """The ranks that execute it; None: every rank."""
    seed: str = ""
    caller: Caller | None = None
    per_rank: dict[int, tuple[Any, ...]] | None = None
    """Arguments that differ by rank (a sharded upload), replacing `args` there."""


@dataclass(frozen=True)
class Failure:
    """A rank's error, sent back in place of a result."""

    error: WeightavgError


@dataclass(frozen=True)
class Replay:
    """An upload received once on rank 0 and replayed on each rank: headers first (each rank reserves
    the bytes, as for an upload from the wire), then the tensors."""

    named: list[tuple[str, torch.Tensor]]

    def __call__(self, on_header: OnHeader) -> Named:
        for name, t in self.named:
            on_header(name, t.numel() * t.element_size())
        return list(self.named)


def never() -> bool:
    """The stop check of a command: every rank runs it to the end, so replicated objects stay alike."""
    return False


def seeded_bits(seed: str) -> Callable[[], str]:
    """32 hex digits per handle, the same sequence on every rank for the same seed."""
    counter = itertools.count()
    return lambda: hashlib.sha256(f"{seed}:{next(counter)}".encode()).hexdigest()[:32]


def _fetch(service: Service, fabric: Fabric, handle: str, names: list[str]) -> Named:
    with Service.fetch(service, handle, names) as copies:
        return list(copies)


def _allreduce(service: Service, fabric: Fabric, handle: str, op: str, weights: list[float]) -> Reduced:
    """Reduce on every rank: first agree on what is reduced (a control collective that completes even
    when a rank lacks the handle), so no rank is left waiting in a data collective."""
    try:
        entry, tensors = service._reduced_tensors(handle)
        scale = collectives.rank_scale(op, weights, fabric.rank, fabric.world_size)
        mine: Any = [(tuple(t.shape), str(t.dtype)) for t in tensors]
    except WeightavgError as exc:
        mine, error = None, exc
    signatures: list[Any] = [None] * fabric.world_size
    dist.all_gather_object(signatures, mine, group=fabric.control)
    if mine is None:
        raise error
    if any(s != mine for s in signatures):
        raise FailedPrecondition(
            "allreduce needs the same tensor names, shapes and dtypes on every rank; per-rank values set "
            "with rank= differ in shape or dtype. Set them alike, then allreduce again"
        )
    with service.store.mutate(entry, need=NOTHING):
        issued = collectives.all_reduce_(tensors, scale)  # the default group: NCCL on GPUs, else gloo
    return Reduced(len(tensors), issued)


def _broadcast(service: Service, fabric: Fabric, handle: str) -> None:
    """Every rank takes rank 0's parameters and buffers of a replicated module."""
    entry, module = service._module(handle)
    with service.store.mutate(entry, need=NOTHING), torch.no_grad():
        for t in itertools.chain(module.parameters(), module.buffers()):
            dist.broadcast(t.data, src=0)


def _inventory(service: Service, fabric: Fabric) -> RankInfo:
    return RankInfo(fabric.rank, str(fabric.device), len(service.store))


def _handles(service: Service, fabric: Fabric) -> list[str]:
    return [h for h, _ in service.store.items()]


def _snapshot(service: Service, fabric: Fabric, generation: int, copy: bool) -> snapshot.SnapshotResult:
    return snapshot.save(service.store, generation_dir(service.settings.state_dir, generation), copy=copy)


def _commit(service: Service, fabric: Fabric, generation: int) -> None:
    prune(service.settings.state_dir, generation)


RANK_OPS: dict[str, Callable[..., Any]] = {
    "_ping": lambda service, fabric: None,
    "_fetch": _fetch,
    "_allreduce": _allreduce,
    "_inventory": _inventory,
    "_broadcast": _broadcast,
    "_handles": _handles,
    "_snapshot": _snapshot,
    "_commit": _commit,
}
"""Operations only ranks perform (rank 0 included), beside the Service methods."""


def execute(service: Service, fabric: Fabric, command: Command) -> Any:
    """Run a command on this rank: its result, a Failure, or None where this rank takes no part."""
    if command.ranks is not None and fabric.rank not in command.ranks:
        return None
    args = command.per_rank.get(fabric.rank, command.args) if command.per_rank else command.args
    bits = HANDLE_BITS.set(seeded_bits(command.seed))
    caller = CALLER.set(command.caller) if command.caller is not None else None
    try:
        op = RANK_OPS.get(command.op)
        if op is not None:
            return op(service, fabric, *args, **command.kwargs)
        # The plain Service method, also on rank 0 (whose ClusterService method routed it here).
        return getattr(Service, command.op)(service, *args, **command.kwargs)
    except WeightavgError as exc:
        return Failure(exc)
    except Exception as exc:  # noqa: BLE001 - a rank answers every command, or rank 0 waits for nothing
        log.exception("rank %d: %s failed", fabric.rank, command.op)
        return Failure(WeightavgError(f"rank {fabric.rank}: {command.op} failed: {type(exc).__name__}: {exc}"))
    finally:
        if caller is not None:
            CALLER.reset(caller)
        HANDLE_BITS.reset(bits)


def follow(service: Service, fabric: Fabric) -> None:
    """A rank other than 0: execute rank 0's commands in order until it says stop.

    Raises:
        RuntimeError: rank 0 is gone, or silent past the timeout (it pings while idle).
    """
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=fabric.control)
        command = box[0]
        if not isinstance(command, Command) or command.op == "_stop":
            log.info("rank %d: stop from rank 0", fabric.rank)
            return
        result = execute(service, fabric, command)
        dist.gather_object(result, None, dst=0, group=fabric.control)


# -- rank 0 -----------------------------------------------------------------------------------------

LOCAL_ONLY = frozenset({
    "server_info", "device_usage", "request_id_stats", "list_handles", "tenant_usage", "create_session",
    "keep_alive", "close_session", "create_tensor",
})
"""Service methods that never leave rank 0."""


class ClusterService(Service):
    """Rank 0's service: calls on rank 0's own objects run here; calls on replicated or placed
    objects go to the ranks as commands, one at a time, in order."""

    def __init__(self, store: Registry, settings: Settings, fabric: Fabric) -> None:
        super().__init__(store, settings)
        self.fabric = fabric
        self.on_broken: Callable[[str], None] = lambda reason: None
        self._channel = threading.Lock()
        self._placements: dict[str, int] = {}
        """Handles that live beyond rank 0 alone: ALL, or the one rank. Absent: rank 0."""
        self._placements_lock = threading.Lock()
        self._broken = ""
        self._stop = threading.Event()
        self._pinger = threading.Thread(target=self._ping, name="weightavg-cluster-ping", daemon=True)
        self._saving = threading.Lock()
        self.generation = max(generations(settings.state_dir), default=0) if settings.state_dir else 0
        """The last snapshot generation every rank wrote (the one restored, after agree_on_snapshot)."""

    # -- the channel ------------------------------------------------------------------------------

    def start(self) -> None:
        """Learn where restored handles live (every rank has restored its snapshot), then keep the
        idle ranks' waits short with pings."""
        found = self._call("_handles", ALL, ())
        held: dict[str, list[int]] = {}
        for rank, handles in enumerate(found):
            for h in handles:
                held.setdefault(h, []).append(rank)
        with self._placements_lock:
            for h, ranks in held.items():
                if len(ranks) == self.fabric.world_size:
                    self._placements[h] = ALL
                elif ranks != [0]:
                    self._placements[h] = ranks[0]
        self._pinger.start()

    def _ping(self) -> None:
        interval = max(0.5, min(5.0, self.fabric.timeout / 4))
        while not self._stop.wait(interval):
            if self._channel.acquire(blocking=False):  # a command in flight says as much as a ping
                self._channel.release()
                with contextlib.suppress(Unavailable):
                    self._send(Command("_ping"))

    def _check(self) -> None:
        if self._broken:
            raise Unavailable(
                f"the cluster lost a rank ({self._broken}); torchrun restarts it when started with "
                "--max-restarts, restoring the last snapshot: retry (with the same request IDs) once health "
                "reports SERVING"
            )

    def _send(self, command: Command) -> list[Any]:
        """Broadcast a command, run rank 0's part, gather every rank's result; UNAVAILABLE for good
        when a collective fails."""
        with self._channel:
            self._check()
            try:
                dist.broadcast_object_list([command], src=0, group=self.fabric.control)
                mine = execute(self, self.fabric, command)
                results: list[Any] = [None] * self.fabric.world_size
                dist.gather_object(mine, results, dst=0, group=self.fabric.control)
            except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError subclasses, or whatever gloo says
                self._broken = f"{command.op}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log.error("cluster broken: %s", self._broken)
                self.on_broken(self._broken)
                self._check()
                raise
            return results

    def _call(
        self, op: str, where: int, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
        per_rank: dict[int, tuple[Any, ...]] | None = None,
    ) -> list[Any]:
        """Every rank's result of a command on `where` (ALL or one rank); the first rank's error is raised
        after the handles the command created on the other ranks are freed again."""
        ranks = None if where == ALL else (where,)
        command = Command(op, args, kwargs or {}, ranks, secrets.token_hex(16), CALLER.get(), per_rank)
        results = self._send(command)
        failed = [(r, x.error) for r, x in enumerate(results) if isinstance(x, Failure)]
        if failed:
            made = sorted({x.id for x in results if isinstance(x, Ref)})
            if made:
                with contextlib.suppress(Unavailable):
                    self._send(Command("free", (made, False), {}, ranks, "", CALLER.get()))
            rank, error = failed[0]
            raise type(error)(f"rank {rank}: {error}") if self.fabric.world_size > 1 else error
        return results

    def _keyed(self, name: str, key: RequestKey | None, run: Callable[[], Any]) -> Any:
        """Once per request ID on rank 0, which alone remembers answers."""
        if key is None:
            return run()
        return self.store.requests.answer(key, name, CALLER_SESSION.get(), run, CALLER.get().tenant)

    def _record(self, value: Any, where: int) -> None:
        if isinstance(value, Ref) and where != 0:
            with self._placements_lock:
                self._placements[value.id] = where

    def where(self, handle: str) -> int:
        """Where a handle lives: ALL, or a rank (0 for rank 0's own and for unknown handles)."""
        with self._placements_lock:
            return self._placements.get(handle, 0)

    def _where_of(self, values: Sequence[Any]) -> int:
        """Where a call on these arguments runs: the one rank its handles share (a replicated object
        is on every rank, so it goes with any), ALL when all are replicated, else rank 0."""
        handles = [v for v in values if isinstance(v, str) and _HANDLE.match(v)]
        handles += [x for v in values if isinstance(v, (list, tuple)) for x in v if isinstance(x, str) and _HANDLE.match(x)]
        wheres = {self.where(h) for h in handles}
        ranks = wheres - {ALL}
        if len(ranks) > 1:
            raise FailedPrecondition(
                f"the handles of this call live on different ranks ({sorted(ranks)}); create them on one rank "
                "(rank=) or replicated (replicate=True)"
            )
        if ranks:
            return ranks.pop()
        return ALL if wheres else 0

    def _target(self, where: int, rank: int | None) -> int:
        """The rank(s) a per-rank call (`rank=`) runs on."""
        if rank is not None and not 0 <= rank < self.fabric.world_size:
            raise InvalidArgument(f"rank {rank} does not exist: the cluster has ranks 0 to {self.fabric.world_size - 1}")
        if rank is None:
            return where
        if where not in (ALL, rank):
            raise FailedPrecondition(f"this object lives on rank {where}, not rank {rank}; leave rank= out")
        return rank

    def _placement(self, placement: Placement) -> int:
        if placement.replicate:
            if placement.rank is not None:
                raise InvalidArgument("give replicate=True or rank=, not both")
            return ALL
        return self._target(ALL, placement.rank) if placement.rank is not None else 0

    def _routed(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], where: int) -> Any:
        """Run Service.<name> where its handles live (rank 0's own: here, as on a one-rank server)."""
        key = kwargs.pop("request", None)
        if where == 0:
            keyed = {"request": key} if key is not None else {}
            return getattr(Service, name)(self, *args, **keyed, **kwargs)
        bound = inspect.signature(getattr(Service, name)).bind(self, *args, **kwargs)
        for pname, value in list(bound.arguments.items()):
            if pname == "upload":
                bound.arguments[pname] = Replay(value(lambda n, b: None))
            elif pname == "should_stop":
                bound.arguments[pname] = never

        def run() -> Any:
            value = self._call(name, where, tuple(bound.args[1:]), dict(bound.kwargs))[0 if where == ALL else where]
            self._record(value, where)
            return value

        return self._keyed(name, key, run)

    # -- calls with a placement or a rank ------------------------------------------------------------

    def create_module(
        self, spec: specs.LayerSpec, *, placement: Placement = Placement(), request: RequestKey | None = None
    ) -> Ref:
        self._check()
        where = self._placement(placement)
        if where != ALL:
            if where == 0:
                return Service.create_module(self, spec, request=request)
            return self._routed("create_module", (spec,), {"request": request}, where)  # type: ignore[no-any-return]

        def run() -> Ref:
            # Each rank initialized its copy from its own random state: rank 0's values go to all.
            ref: Ref = self._routed("create_module", (spec,), {}, ALL)
            self._call("_broadcast", ALL, (ref.id,))
            return ref

        return self._keyed("create_module", request, run)  # type: ignore[no-any-return]

    def create_dictionary(
        self, upload: Upload, *, placement: Placement = Placement(), request: RequestKey | None = None
    ) -> Ref:
        self._check()
        where = self._placement(placement)
        if where == 0:
            return Service.create_dictionary(self, upload, request=request)
        return self._routed("create_dictionary", (upload,), {"request": request}, where)  # type: ignore[no-any-return]

    def create_loss(self, *args: Any, **kwargs: Any) -> Ref:
        """Losses are small and stateless: in a cluster every rank gets each, so any model can use it."""
        self._check()
        return self._routed("create_loss", args, kwargs, ALL)  # type: ignore[no-any-return]

    def set_parameter(
        self, handle: str, name: str, upload: Upload, *, rank: int | None = None, request: RequestKey | None = None
    ) -> bool:
        self._check()
        where = self._target(self.where(handle), rank)
        return self._routed("set_parameter", (handle, name, upload), {"request": request}, where)  # type: ignore[no-any-return]

    def set_model_data(
        self, handle: str, split: str, upload: Upload, *, shard: bool = False, request: RequestKey | None = None
    ) -> int:
        self._check()
        where = self.where(handle)
        if not shard:
            return self._routed("set_model_data", (handle, split, upload), {"request": request}, where)  # type: ignore[no-any-return]
        if where != ALL:
            raise FailedPrecondition("shard=True splits data across the ranks of a replicated model; create its "
                                     "module with replicate=True")
        named = upload(lambda n, b: None)
        world = self.fabric.world_size
        parts = [torch.tensor_split(t, world) for _, t in named]
        per_rank = {
            r: (handle, split, Replay([(n, p[r]) for (n, _), p in zip(named, parts)])) for r in range(world)
        }

        def run() -> int:
            return int(self._call("set_model_data", ALL, (handle, split, None), {}, per_rank)[0])

        return self._keyed("set_model_data", request, run)  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def fetch(self, handle: str, names: Sequence[str], *, rank: int | None = None) -> Iterator[Named]:
        self._check()
        where = self._target(self.where(handle), rank)
        if where in (0, ALL) and rank in (None, 0):
            with Service.fetch(self, handle, names) as copies:
                yield copies
            return
        yield self._call("_fetch", where, (handle, list(names)))[where]

    def allreduce(
        self, handle: str, op: str, weights: Sequence[float], *, request: RequestKey | None = None
    ) -> Reduced:
        self._check()
        if self.where(handle) != ALL:
            self._reduced_tensors(handle)  # NOT_FOUND or INVALID_ARGUMENT first, if it is that
            raise FailedPrecondition("allreduce averages an object across ranks: create it with replicate=True")
        collectives.rank_scale(op, weights, 0, self.fabric.world_size)  # refuse bad weights before any rank acts
        return self._keyed(  # type: ignore[no-any-return]
            "allreduce", request, lambda: self._call("_allreduce", ALL, (handle, op, list(weights)))[0]
        )

    def free(
        self, handles: Sequence[str], every: bool, tenant: str = "", purge: bool = False, *,
        request: RequestKey | None = None,
    ) -> int:
        """Handles beyond rank 0 are freed where they live; purge and a tenant's handles on every rank."""
        self._check()

        def run() -> int:
            if purge or tenant:
                counts = self._call("free", ALL, (list(handles), every, tenant, purge))
                with self._placements_lock:
                    self._placements.clear() if purge else None
                return int(sum(c for c in counts if isinstance(c, int)))
            by_rank: dict[int, list[str]] = {}
            for h in handles:
                by_rank.setdefault(self.where(h), []).append(h)
            freed = Service.free(self, by_rank.pop(0, []), every) if (0 in by_rank or every) else 0
            for where, group in by_rank.items():
                freed += int(self._call("free", where, (group, False))[0 if where == ALL else where])
                with self._placements_lock:
                    for h in group:
                        self._placements.pop(h, None)
            return freed

        return self._keyed("free", request, run)  # type: ignore[no-any-return]

    def cluster_info(self) -> list[RankInfo]:
        self._check()
        return [x for x in self._call("_inventory", ALL, ()) if isinstance(x, RankInfo)]

    def snapshot(self) -> SnapshotResult:
        """Every rank writes its own snapshot (its --state-dir/rank-N/gen-G); rank 0's result."""
        CALLER.get().require_admin("a snapshot")
        if not self.settings.state_dir:
            raise FailedPrecondition("this server was started without --state-dir; there is nowhere to write a snapshot")
        self._check()
        return self.save_all()

    def save_all(self, copy: bool = True) -> SnapshotResult:
        """Every rank writes the next generation; once all have, each removes the older ones (the
        commit), so the newest generation every rank holds is always a whole cluster snapshot."""
        with self._saving:
            generation = self.generation + 1
            result: SnapshotResult = self._call("_snapshot", ALL, (generation, copy))[0]
            self._call("_commit", ALL, (generation,))
            self.generation = generation
            return result

    def shutdown(self, save: bool) -> None:
        """Stop pinging; unless broken, have every rank snapshot (with a state directory) and stop."""
        self._stop.set()
        if self._pinger.is_alive():
            self._pinger.join()
        if self._broken:
            log.warning("cluster broken (%s): no shutdown snapshot, the last complete one stays", self._broken)
            return
        try:
            if save:
                self.save_all(copy=False)
            self._send(Command("_stop"))
        except WeightavgError as exc:
            log.error("cluster shutdown: %s", exc)


def _route(name: str) -> Callable[..., Any]:
    base = getattr(Service, name)

    @functools.wraps(base)
    def call(self: ClusterService, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return self._routed(name, args, kwargs, self._where_of(list(args) + list(kwargs.values())))

    return call


def _checked(name: str) -> Callable[..., Any]:
    base = getattr(Service, name)

    @functools.wraps(base)
    def call(self: ClusterService, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return base(self, *args, **kwargs)

    return call


for _name, _member in inspect.getmembers(Service, inspect.isfunction):
    if _name.startswith("_") or _name in ClusterService.__dict__:
        continue
    setattr(ClusterService, _name, _checked(_name) if _name in LOCAL_ONLY else _route(_name))
