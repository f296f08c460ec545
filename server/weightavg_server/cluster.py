"""The cluster: under torchrun, rank 0's service fans calls out to the other ranks over the process group.

Every rank holds its own registry. Rank 0 serves the API; a call on an object that lives on other
ranks (replicated on every rank, or placed on one) becomes a `Command`, broadcast over a gloo group
to every rank and executed by each in the order rank 0 sent them (one at a time), with the results
gathered back to rank 0, each with the bytes that rank holds afterwards. A new object without a
placement goes to the rank holding the fewest bytes (`least_held`); objects on rank 0 alone never
touch the process group, so a call on them runs as on a one-rank server. Replicated objects get the
same handle on every rank: rank 0 seeds each command's handle IDs with fresh random bits
(`HANDLE_BITS`). A verb whose source lives on another rank than its target (avgparms, ema, average,
copyparms into a module) moves the source's values to the target's rank inside one command
(`_across`), where they stand in for the source for that call only. An upload for other ranks
(`Relayed`), a fetch from another rank (`_fetch`) and evaluate's outputs (`_tensor_back`) go point
to point over the data backend, not among the results, after the ranks that receive them have reserved
room (one control exchange, so a refusal stops every rank first); metrics, handles and counts travel
among the results (encoded by `control_wire`, never pickled).

Commands go over a gloo group even when tensors move over NCCL: encoded commands are host data, and
a control group of its own keeps its timeouts and ordering apart from the data collectives. When a
collective fails (a rank died: its sockets close; or it went silent past the timeout), the cluster
is broken for good: health says NOT_SERVING and every call is answered UNAVAILABLE until torchrun
restarts the group (--max-restarts) and every rank restores its snapshot.

A session's objects beyond rank 0 are rank 0's to track (`_sessions_of`): closing the session, or its
lease running out on rank 0, frees them on every rank.

Known limits: a handle placed on one other rank alone forgets its session across a restart; a command
that fails on some ranks after others changed state is undone only for the objects it created; a
rank may wait on another at most the collective timeout (--cluster-timeout-seconds): a command on
objects of one other rank may run that long (rank 0 waits for its result all along), and the ranks'
parts of a command on replicated objects may end that far apart (a 44 s replicated epoch under an
8 s timeout ran through, its ranks alike; ranks with data of different sizes did not).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import itertools
import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.distributed_c10d import PrefixStore
from torch.distributed.rendezvous import rendezvous

from . import control_wire
from .domain import collectives, footprint, hostcache, modules, shm, specs, training
from .domain.dictionaries import TensorDict
from .domain.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable, WeightavgError
from .domain.averaging import BufferMode
from .domain.ema import ScheduleChange
from .domain.options import Value
from .domain.tensors import HandleSummary
from .service import (
    NOTHING, EmaResult, Fetched, Metrics, Named, Placement, RankInfo, RankMetrics, Reduced, Ref, Service, Settings,
    Size, StopCheck, Upload, OnHeader, source_of,
)
from .store import snapshot
from .store.snapshot import SnapshotError, SnapshotResult
from .store.registry import CALLER_SESSION, HANDLE_BITS, Entry, Kind, Registry
from .store.versions import GroupLock
from .store.requests import RequestKey
from .store.tenants import CALLER, Caller, Quota

log = logging.getLogger("weightavg.cluster")

ALL = -1
"""Placement of a replicated object: every rank."""

DEFAULT_TIMEOUT_SECONDS = 300.0
"""How long a rank waits on a collective (a command, its results, a bucket) before the cluster is
declared broken; also the longest a command on objects of one other rank may run (rank 0 waits for
it all along), and how far apart the ranks' parts of one command may end."""

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
    store: Any = None
    """The rendezvous store of this attempt (a `dist.Store`): where rank 0 tells the ranks running a
    command that its caller has gone (`watching`, `remote_stop`); None where there is none (a stop then never comes)."""
    subgroups: dict[int, Any] = field(default_factory=dict, compare=False, repr=False)
    """This rank's data subgroup by group size (`data_group`), made the first time a size is asked for."""

    def data_group(self, group_size: int) -> Any:
        """The data group this rank reduces in with groups of `group_size` consecutive ranks
        (collectives.subgroup; 0 or the world size: None, the default group). Every rank makes every
        subgroup of a size together (torch's `dist.new_subgroups`, one `new_group` per subgroup on every
        rank, in the same order), so this runs inside a command all ranks execute, on each the first
        time that size is asked for; the groups are kept for the process's life (at most one set per
        divisor of the world size)."""
        if group_size in (0, self.world_size):
            return None
        if group_size not in self.subgroups:
            mine, _ = dist.new_subgroups(group_size=group_size, timeout=timedelta(seconds=self.timeout))  # type: ignore[no-untyped-call]
            self.subgroups[group_size] = mine
        return self.subgroups[group_size]


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


def agree_backend(store: Any, rank: int, world: int, mine: str) -> str:
    """The data backend all ranks use: NCCL only where every rank chose it (each node decides from its
    own GPUs, and ranks on different backends would never meet), else gloo. Votes go through the
    rendezvous store, before the process group exists."""
    store.set(f"backend/{rank}", mine)
    votes = [bytes(store.get(f"backend/{r}")).decode() for r in range(world)]
    return "nccl" if all(v == "nccl" for v in votes) else "gloo"


def data_backend(backend: str) -> str:
    """What init_process_group is given: with NCCL, gloo beside it for host tensors (a dictionary's
    '.n' count lives on the CPU), so every collective finds a backend for its tensors' device."""
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo"


def join(requested_device: str, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> Fabric | None:
    """Join torchrun's process group (env://), or None when not under torchrun with several ranks.

    Raises:
        ValueError: a timeout that is not a positive number of seconds (0 or less failed every rank in
            c10d with 'timed out after 0ms', NaN with 'cannot convert float NaN to integer').
        TimeoutError: the ranks did not all meet within the timeout (naming --cluster-timeout-seconds).
    """
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(
            f"--cluster-timeout-seconds must be a positive number of seconds (how long a rank waits for "
            f"another), given {timeout}"
        )
    place = world_from_env()
    if place is None:
        return None
    rank, world, local_rank, local_world = place
    device, backend = rank_device(requested_device, local_rank, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    wait = timedelta(seconds=timeout)
    control_wire.install()  # before the first object collective: the ranks' own format, no pickle
    try:
        store, _, _ = next(rendezvous("env://", timeout=wait))
        # torchrun (2.4 and later) keeps one TCPStore for all rounds of its rendezvous, and init_process_group
        # writes its keys (each rank's gloo address) under the same names every round: after a restart the
        # new ranks would read the dead ranks' addresses and time out in gloo's connectFullMesh. Every
        # attempt gets keys of its own; all ranks of a round share its restart count.
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        store = PrefixStore(f"weightavg/attempt-{attempt}", store)
        backend = agree_backend(store, rank, world, backend)
        dist.init_process_group(backend=data_backend(backend), store=store, rank=rank, world_size=world, timeout=wait)
        control = dist.new_group(backend="gloo", timeout=wait)
        devices = _gathered_devices(control, world, device)
    except RuntimeError as exc:  # torch's DistStoreError and DistBackendError are RuntimeErrors
        said = str(exc).splitlines()[0] if str(exc) else ""
        # A rank that timed out first exits, and one still waiting on it reads that its peer left (found
        # in CI: rank 1 gave up in the first exchange, rank 0 read 'Connection reset by peer').
        if not (timed_out(said) or peer_left(said)):
            raise
        # A traceback ending in 'DistStoreError: wait timeout after 1ms, keys: ...', naming no flag (found by review).
        raise TimeoutError(
            f"rank {rank}: the ranks did not all meet within --cluster-timeout-seconds ({timeout:g} s) ({said}); "
            "start every rank within that time of the others (each imports torch first, and on a GPU starts "
            "CUDA), or raise --cluster-timeout-seconds"
        ) from None
    log.info("rank %d of %d joined on %s (data backend %s)", rank, world, device, backend)
    return Fabric(rank, world, device, devices, backend, control, timeout, store)


def _gathered_devices(control: Any, world: int, device: torch.device) -> tuple[str, ...]:
    """Each rank's device, in rank order (at join: a malformed one stops every rank before serving).

    Raises:
        MalformedExchange: a rank sent something other than its device's name.
    """
    devices: list[Any] = [None] * world
    dist.all_gather_object(devices, str(device), group=control)
    return tuple(_as_sent(devices, lambda v: type(v) is str, "its device's name (a str)"))


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
    generation = common_generation(_as_sent(held, _is_generations, "the snapshot generations it holds (ints)"))
    prune(directory, generation)
    if generation:
        log.info("rank %d restores snapshot generation %d", fabric.rank, generation)
    return generation


AGENT_POLL_SECONDS = 1.0
"""How often a rank checks that the torchrun agent that started it is still its parent."""


def watch_agent(on_gone: Callable[[], None], poll: float = AGENT_POLL_SECONDS) -> threading.Thread:
    """Call `on_gone` once if this rank's parent (torchrun's agent) dies: a SIGKILLed agent leaves its
    ranks to init, which would otherwise serve (rank 0) and wait (the others) forever on a shared box,
    holding the port, the memory and the GPU, with nothing left to restart them."""
    agent = os.getppid()

    def watch() -> None:
        while os.getppid() == agent:
            time.sleep(poll)
        log.error("the torchrun agent (pid %d) is gone: stopping this rank", agent)
        on_gone()

    thread = threading.Thread(target=watch, name="weightavg-agent-watch", daemon=True)
    thread.start()
    return thread


def exit_after(seconds: float) -> None:
    """End this process in `seconds` unless it ended before (a follower whose agent died gives rank 0
    that long to stop it cleanly, with a snapshot)."""
    time.sleep(seconds)
    log.error("no stop from rank 0 within %.0f s of losing the agent: exiting", seconds)
    os._exit(1)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def lost_rank(op: str, exc: BaseException, elapsed: float, timeout: float) -> str:
    """Why the cluster broke, for rank 0's UNAVAILABLE answers and logs: the failed command and what
    torch said, and, where a rank went silent past --cluster-timeout-seconds, the flag and its value
    in force, so that an operator whose call ran that long knows what to raise. torch says only
    'Timed out waiting 6000ms for send operation to complete' (found by review). A rank that times out
    first exits, and rank 0 then reads 'Connection closed by peer': a command that failed `elapsed`
    seconds after it was sent, as long as the timeout or longer, counts as timed out too (the other
    ranks start waiting after rank 0 sends it)."""
    said = str(exc).splitlines()[0] if str(exc) else ""
    reason = f"{op}: {type(exc).__name__}: {said}"
    if timed_out(said) or elapsed >= timeout:
        reason += f"; {silent_past(timeout)}"
    return reason


def timed_out(said: str) -> bool:
    """Whether torch's words say a wait ran past its timeout: gloo's 'Timed out waiting 6000ms', the
    store's 'wait timeout after 1ms' and 'Timed out after 4 seconds waiting for clients'."""
    said = said.lower()
    return "timed out" in said or "timeout" in said


def peer_left(said: str) -> bool:
    """Whether gloo's words say the rank at the other end went away: 'Connection reset by peer',
    'Connection closed by peer'."""
    said = said.lower()
    return "reset by peer" in said or "closed by peer" in said


def silent_past(timeout: float) -> str:
    """What to do when a rank waited on another past the timeout (`lost_rank`; a rank that gave up on
    rank 0 says it in its log)."""
    return (
        f"a rank waited on another longer than --cluster-timeout-seconds ({timeout:g} s): where one rank's part "
        "of a command outlasts another's by that much (an epoch of a model on another rank; epochs of a "
        "replicated model on data of different sizes; a larger snapshot to restore at start), restart the "
        "cluster with a higher --cluster-timeout-seconds"
    )


# -- what the ranks receive from one another ----------------------------------------------------------


class MalformedExchange(ValueError):
    """A value a rank received in a control exchange decodes (`control_wire` checks its own format and
    a data class's field types) but is not what this code sends there: a rank running other code, or a
    stream not from a rank. Unchecked, it failed the receiving code as a TypeError, IndexError or
    KeyError: INTERNAL to a client on rank 0 while the other ranks went on to the next exchange, out
    of step. It is never a rank's answer (`_answered` lets it through): rank 0 breaks the cluster with
    UNAVAILABLE (`ClusterService._send`, as for a lost rank); a rank before serving, or another rank
    in a command, stops with it as a ValueError ("weightavg serve: rank 1 sent ...", exit status 1,
    `ops.cli.main`), so that torchrun restarts the group."""


def _as_sent(values: list[Any], fits: Callable[[Any], bool], what: str) -> list[Any]:
    """`values`, one per rank in rank order as an object collective leaves them, once each `fits` what
    this code sends at that point (`what`, for the message). One check per rank: the row-by-row checks
    of a layout walk the rows the receiving code walks next anyway.

    Raises:
        MalformedExchange: naming the first rank whose value does not fit.
    """
    for rank, value in enumerate(values):
        if not fits(value):
            raise MalformedExchange(
                f"rank {rank} sent a {type(value).__name__} where {what} was expected: every rank must run the "
                "same weightavg, and the process group's network admit only the server's ranks "
                "(docs/cluster.md, \"Security\")"
            )
    return values


def _is_generations(value: object) -> bool:
    """`generations`' answer: the generation numbers a rank holds."""
    return type(value) is list and all(type(g) is int and g >= 0 for g in value)


def _is_fetch_layout(value: object) -> bool:
    """`_fetch`'s layout: None, or a (name, shape, dtype) row per tensor, each shape one torch allocates."""
    return value is None or (
        control_wire.conforms(value, list[tuple[str, tuple[int, ...], torch.dtype]])
        and all(control_wire.shape_fits(row[1]) for row in cast(list[tuple[Any, ...]], value))
    )


def _is_signature(value: object) -> bool:
    """`_broadcast`'s signature: None, or a (name, shape, dtype name) row per tensor."""
    return value is None or control_wire.conforms(value, list[tuple[str, tuple[int, ...], str]])


_ROLES = {"dictionary": frozenset({"entry"}), "module": frozenset({"parameter", "buffer"})}
"""The roles of a move's rows (`_layout`), by the source's kind."""


def _is_move_layout(value: object) -> bool:
    """`_moved`'s layout: None, or a Layout of a kind `_layout` makes, each row's role one of that
    kind's and its shape one torch allocates (the decoder already checked the rows' types)."""
    if value is None:
        return True
    if type(value) is not Layout or value.kind not in _ROLES:
        return False
    roles = _ROLES[value.kind]
    return all(role in roles and control_wire.shape_fits(shape) for _, role, shape, _, _ in value.rows)


def _is_byte_count(value: object) -> bool:
    """A number of bytes (not a bool, never below 0)."""
    return type(value) is int and value >= 0


def _is_tensor_meta(value: object) -> bool:
    """`_tensor_back`'s meta: None, or a tensor answer's (shape, dtype)."""
    return value is None or (
        type(value) is tuple and len(value) == 2 and control_wire.shape_fits(value[0])
        and isinstance(value[1], torch.dtype)
    )


def _is_command(value: object, world_size: int) -> bool:
    """A Command (the decoder checked its fields' types) whose ranks are ranks of this cluster."""
    return type(value) is Command and (value.ranks is None or all(0 <= r < world_size for r in value.ranks))


def _is_reply(value: object) -> bool:
    """`follow`'s reply: (result, held bytes, kept bytes)."""
    return type(value) is tuple and len(value) == 3 and _is_byte_count(value[1]) and _is_byte_count(value[2])


# -- commands ---------------------------------------------------------------------------------------


@dataclass
class Sink:
    """Where tensors from another rank land on rank 0 (a fetch's copies, evaluate's outputs): the
    tensors received, and the stack that holds their reservation until the reply has gone (neither
    is sent: only rank 0 uses them). An epoch's or a test's metrics (`_rank_metrics`) and a
    replicated model's evaluate (`_holding`) keep rank 0's reservations in `held` too."""

    held: contextlib.ExitStack | None = None
    named: Named = field(default_factory=list)

    def __getstate__(self) -> dict[str, Any]:
        return {"held": None, "named": []}


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
    sink: Sink | None = None
    """For a verb that answers a tensor (TENSOR_RESULTS): where rank 0 receives it (`_tensor_back`)."""


TENSOR_RESULTS = frozenset({"evaluate"})
"""Service methods whose answer is a tensor, received by rank 0 point to point after a reservation
(`_tensor_back`) rather than among the encoded results."""


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


@dataclass
class Relayed:
    """An upload rank 0 received from a client, for other ranks to use: a command carries only its
    headers; the bytes follow over the data backend once every receiving rank has reserved room for
    them (`_received`). Encoded into the command whole, an upload was decoded on every rank before
    any cap was asked: a 300 MB upload to a rank under a 10 MB cap peaked at 1.2 GB there, and 0.9 GB
    on rank 0, before the refusal (found by review)."""

    headers: list[tuple[str, tuple[int, ...], torch.dtype]]
    tensors: Named = field(default_factory=list)
    """Rank 0's own tensors (never encoded: the other ranks receive them by `dist.send`)."""
    held: contextlib.ExitStack | None = None
    """Rank 0's reservation of the tensors while it relays them (never encoded)."""

    @staticmethod
    def of(named: Named, held: contextlib.ExitStack | None = None) -> Relayed:
        return Relayed([(n, tuple(t.shape), t.dtype) for n, t in named], named, held)

    def __getstate__(self) -> dict[str, Any]:
        return {"headers": self.headers, "tensors": [], "held": None}

    def nbytes(self) -> int:
        return sum(torch.Size(shape).numel() * dtype.itemsize for _, shape, dtype in self.headers)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous host tensor's memory as a flat uint8 tensor (a view): every dtype travels alike."""
    return t.reshape(-1).view(torch.uint8)


def _sent(t: torch.Tensor) -> torch.Tensor:
    """What goes over the wire of a tensor: its bytes in host memory (gloo sends point to point only
    from the host; a tensor decoded into a CUDA region or computed on a GPU is copied there first)."""
    return _as_bytes(t.detach().cpu().contiguous())


def _received(service: Service, fabric: Fabric, command: Command) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """This rank's arguments of a command, with each relayed upload replaced by a Replay of its tensors.

    Every rank takes part when the command relays an upload: the receiving ranks reserve the bytes and
    allocate them, all ranks agree that every receiver could (one control exchange, so a refusal
    anywhere stops every rank before any byte moves), then rank 0 sends each receiver its tensors. The
    reservations end before the verb runs, which reserves the tensors it keeps as for any upload (the
    other ranks change only through these commands, one at a time, so nothing takes the room between).

    Raises:
        WeightavgError: this rank could not take its part.
        _Abandoned: another rank could not; nothing was received.
    """
    args = command.per_rank.get(fabric.rank, command.args) if command.per_rank else command.args
    kwargs = command.kwargs
    if not any(isinstance(v, Relayed) for v in (*args, *kwargs.values())):
        return args, kwargs
    targets = [r for r in range(1, fabric.world_size) if command.ranks is None or r in command.ranks]
    receiving = fabric.rank in targets
    error: WeightavgError | None = None
    buffers: dict[int, list[torch.Tensor]] = {}
    with contextlib.ExitStack() as held:
        if receiving:
            relayed = [v for v in (*args, *kwargs.values()) if isinstance(v, Relayed)]
            try:
                held.enter_context(service.store.reserve(nbytes={"cpu": sum(r.nbytes() for r in relayed)}))
                buffers = {id(r): [_host_empty(shape, dtype) for _, shape, dtype in r.headers] for r in relayed}
            except WeightavgError as exc:
                error = exc
            except (torch.OutOfMemoryError, MemoryError) as exc:  # this rank must still answer the exchange
                error = ResourceExhausted(f"rank {fabric.rank}: out of memory for an upload relayed by rank 0 ({exc})")
            except Exception as exc:  # noqa: BLE001 - whatever it is, the other ranks wait for this rank's answer
                error = WeightavgError(f"rank {fabric.rank}: receiving an upload failed: {type(exc).__name__}: {exc}")
        _agree(fabric, error)
        for dst in targets:
            if fabric.rank == 0:
                theirs = command.per_rank.get(dst, command.args) if command.per_rank else command.args
                for value in (*theirs, *kwargs.values()):
                    if isinstance(value, Relayed):
                        for _, t in value.tensors:
                            if t.numel():
                                dist.send(_sent(t), dst=dst)
            elif fabric.rank == dst:
                for value in (*args, *kwargs.values()):
                    if isinstance(value, Relayed):
                        for t in buffers[id(value)]:
                            if t.numel():
                                dist.recv(_as_bytes(t), src=0)

    def replay(value: Any) -> Any:
        if not isinstance(value, Relayed):
            return value
        if value.held is not None:  # rank 0: the relay is done, the verb reserves what it keeps
            value.held.close()
        if fabric.rank == 0:
            return Replay(value.tensors)
        return Replay([(name, t) for (name, _, _), t in zip(value.headers, buffers.get(id(value), []))])

    return tuple(replay(v) for v in args), {k: replay(v) for k, v in kwargs.items()}


def never() -> bool:
    """The stop check of a command: every rank runs it to the end, so replicated objects stay alike."""
    return False


STOP_POLL_SECONDS = 0.25
"""How often rank 0 asks whether a caller has gone, and a rank running its epoch whether rank 0 said so."""


def _stop_key(token: str) -> str:
    return f"stop/{token}"


@contextlib.contextmanager
def watching(fabric: Fabric, token: str, should_stop: StopCheck) -> Iterator[None]:
    """On rank 0, while a command on another rank runs: once `should_stop` turns true (the caller
    cancelled, or its deadline passed), set the command's stop key in the store, which `remote_stop`
    reads on the running rank. Without it an epoch of a model on rank 1 ran to its end after its client
    had gone, holding the command channel meanwhile (and, longer than --cluster-timeout-seconds,
    breaking the cluster), while the same epoch on one server stops between batches (found by review)."""
    if fabric.store is None:
        yield
        return
    done = threading.Event()

    told: list[bool] = []

    def watch() -> None:
        while not done.wait(STOP_POLL_SECONDS):
            if should_stop():
                with contextlib.suppress(Exception):  # a store gone with its agent: the command ends anyway
                    fabric.store.set(_stop_key(token), "1")
                    told.append(True)
                return

    thread = threading.Thread(target=watch, name="weightavg-stop-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if told:  # the command has ended on every rank: nobody reads the key again
            with contextlib.suppress(Exception):
                fabric.store.delete_key(_stop_key(token))


@dataclass(frozen=True)
class RemoteStop:
    """Stands for a caller's stop check in a command routed to one other rank: that rank checks the
    command's stop key (`remote_stop`) where the caller's call checked `should_stop` (evaluate,
    batchnorm)."""

    token: str


def _stopping(fabric: Fabric, values: Any) -> Any:
    """`values` (args or kwargs) with each RemoteStop replaced by its stop check on this rank."""
    if isinstance(values, dict):
        return {k: remote_stop(fabric, v.token) if isinstance(v, RemoteStop) else v for k, v in values.items()}
    return tuple(remote_stop(fabric, v.token) if isinstance(v, RemoteStop) else v for v in values)


def remote_stop(fabric: Fabric, token: str) -> StopCheck:
    """The stop check of a command on a rank other than 0: true once rank 0 set the command's stop key
    (`watching`), read at most every STOP_POLL_SECONDS (a store round trip per batch cost more than a
    small batch)."""
    if fabric.store is None or not token:
        return never
    key = _stop_key(token)
    last = [time.monotonic()]
    stopped = [False]

    def check() -> bool:
        now = time.monotonic()
        if not stopped[0] and now - last[0] >= STOP_POLL_SECONDS:
            last[0] = now
            with contextlib.suppress(Exception):  # an unreachable store stops nothing
                stopped[0] = bool(fabric.store.check([key]))
        return stopped[0]

    return check


def seeded_bits(seed: str) -> Callable[[], str]:
    """32 hex digits per handle, the same sequence on every rank for the same seed."""
    counter = itertools.count()
    return lambda: hashlib.sha256(f"{seed}:{next(counter)}".encode()).hexdigest()[:32]


def _fetch(service: Service, fabric: Fabric, handle: str, names: list[str], src: int, sink: Sink) -> None:
    """Rank src's host copies of what a fetch names, sent to rank 0 into `sink`. Every rank takes part
    in two control exchanges (what the copies are; whether rank 0 could reserve room for them), so a
    refusal on either side stops both before any byte moves. The copies used to come back pickled in
    the command's results, never reserved on rank 0: a fetch from rank 1 went through where the same
    fetch on rank 0 was refused by its cap, and raised rank 0's peak memory by 4.7 times the bytes
    fetched (found by review)."""
    error: WeightavgError | None = None
    layout: list[tuple[str, tuple[int, ...], torch.dtype]] | None = None
    copies: Named = []
    with contextlib.ExitStack() as copying:
        if fabric.rank == src:
            try:
                copies = copying.enter_context(Service.fetch(service, handle, names))
                layout = [(n, tuple(t.shape), t.dtype) for n, t in copies]
            except WeightavgError as exc:
                error = exc
            except (torch.OutOfMemoryError, MemoryError) as exc:  # rank 0 waits in the exchange below
                error = ResourceExhausted(f"out of memory for the copies of '{handle}' ({exc})")
        layouts: list[Any] = [None] * fabric.world_size
        dist.all_gather_object(layouts, layout, group=fabric.control)
        layout = _as_sent(layouts, _is_fetch_layout, "a fetch's layout (None or [(name, shape, dtype)])")[src]
        if layout is None:
            if error is not None:
                raise error
            raise _Abandoned()
        received: list[torch.Tensor] = []
        if fabric.rank == 0 and sink.held is not None:
            nbytes = sum(torch.Size(shape).numel() * dtype.itemsize for _, shape, dtype in layout)
            try:
                sink.held.enter_context(service.store.reserve(nbytes={"cpu": nbytes}))
                received = [_host_empty(shape, dtype) for _, shape, dtype in layout]
            except WeightavgError as exc:
                error = type(exc)(f"{exc} (rank 0 holds a copy of what it fetches from rank {src} until the reply has gone)")
            except (torch.OutOfMemoryError, MemoryError) as exc:  # rank src must still hear of it
                error = ResourceExhausted(f"rank 0: out of memory for a fetch from rank {src} ({exc})")
        _agree(fabric, error)
        for i, (_, shape, _) in enumerate(layout):
            if not torch.Size(shape).numel():
                continue
            if fabric.rank == src:
                dist.send(_sent(copies[i][1]), dst=0)
            elif fabric.rank == 0:
                dist.recv(_as_bytes(received[i]), src=src)
    if fabric.rank == 0:
        sink.named = [(name, t) for (name, _, _), t in zip(layout, received)]


def _digest(value: Any) -> int:
    """A signed 64-bit digest of a plain value's repr (tuples, lists, ints, strings), for ranks to
    compare what they hold in one tensor collective."""
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little", signed=True)


def _allreduce(
    service: Service, fabric: Fabric, handle: str, op: str, weights: list[float], group_size: int = 0
) -> Reduced:
    """Reduce on every rank, within groups of `group_size` consecutive ranks (0: all of them): first
    agree on what is reduced and that every rank could reserve the reduction's copies (a control
    collective that completes even when a rank lacks the handle or the room), so no rank is left
    waiting in a data collective and a refusal anywhere changes nothing.
    A rank that could take part, where another could not, answers nothing (`_Abandoned`): the error
    the client sees is the refusing rank's own.

    Each rank reserves the copies of reducing its memory runs as they lie (none for a module built
    flat), and tries to reserve the more that going tensor by tensor takes, which the ranks need only
    where their layouts differ: reserved outright, it refused a flat module's
    allreduce, which copies nothing, near the cap."""
    with contextlib.ExitStack() as held:
        spare: WeightavgError | None = None
        try:
            entry, _ = service._source(handle)
            # Locked before its tensors are read: a rank-local call (rank=) may change them until then.
            held.enter_context(service.store.mutate(entry, need=NOTHING))
            named = service._reduced_of(entry)
            tensors = [t for _, t in named]
            scale = collectives.rank_scale(op, weights, fabric.rank, fabric.world_size, group_size)
            mine: Any = [(n, tuple(t.shape), str(t.dtype)) for n, t in named]
            groups = collectives.adjacent_groups(tensors)
            joined = collectives.reduce_bytes(collectives.joined(tensors, groups))
            held.enter_context(service.store.reserve(nbytes=joined))
            alone = collectives.reduce_bytes(tensors)
            try:
                held.enter_context(service.store.reserve(nbytes={d: n - joined.get(d, 0) for d, n in alone.items()}))
            except WeightavgError as exc:
                spare = exc
        except WeightavgError as exc:
            mine, error = None, exc
        # One fixed-size tensor collective (not an object one: no pickling, one collective instead of two):
        # whether this rank can take part, digests of its names, shapes and dtypes and of its memory runs,
        # and whether it could also reduce tensor by tensor.
        ok = [1, _digest(mine), _digest(groups), int(spare is None)] if mine is not None else [0, 0, 0, 0]
        state = torch.tensor(ok, dtype=torch.int64)
        gathered = [torch.empty_like(state) for _ in range(fabric.world_size)]
        dist.all_gather(gathered, state, group=fabric.control)
        if mine is None:
            raise error
        if any(int(g[0]) != 1 for g in gathered):
            raise _Abandoned()
        if any(int(g[1]) != int(state[1]) for g in gathered):
            raise FailedPrecondition(
                "allreduce needs the same tensor names, shapes and dtypes on every rank; per-rank values set "
                "with rank= differ in name, shape or dtype. Set them alike, then allreduce again; nothing changed"
            )
        if any(int(g[2]) != int(state[2]) for g in gathered):
            if spare is not None:
                raise spare
            if any(int(g[3]) != 1 for g in gathered):
                raise _Abandoned()
            groups = [[i] for i in range(len(tensors))]  # laid out differently somewhere: tensor by tensor
        if collectives.subgroup(fabric.rank, fabric.world_size, group_size) == range(fabric.rank, fabric.rank + 1):
            return Reduced(len(tensors), 0)  # groups of one rank: each keeps its values, nothing to send
        # One collective per flat buffer where every rank holds the tensors back to back alike (a
        # module built flat), else per tensor or bucket; the data group (NCCL on GPUs, else gloo) or
        # this rank's subgroup of it. The subgroups are made (once) after the agreement, by every rank.
        group = fabric.data_group(group_size)
        issued = collectives.all_reduce_(collectives.joined(tensors, groups), scale, group)
    return Reduced(len(tensors), issued)


def _broadcast(service: Service, fabric: Fabric, handle: str, src: int = 0) -> int:
    """Every rank takes rank src's parameters and buffers (a module) or entries (a dictionary) of a
    replicated object. As for _allreduce, the ranks first agree over the control group that they all
    hold the same names, shapes and dtypes, so that a refusal changes nothing anywhere. Each rank
    locks its copy before it reads the tensors, as `_allreduce` does."""
    with contextlib.ExitStack() as held:
        try:
            entry, _ = service._source(handle)
            held.enter_context(service.store.mutate(entry, need=NOTHING))
            named = service._replicated_of(entry)
            mine: Any = [(n, tuple(t.shape), str(t.dtype)) for n, t in named]
        except WeightavgError as exc:
            mine, error = None, exc
        signatures: list[Any] = [None] * fabric.world_size
        dist.all_gather_object(signatures, mine, group=fabric.control)
        _as_sent(signatures, _is_signature, "a broadcast's signature (None or [(name, shape, dtype name)])")
        if mine is None:
            raise error
        differing = [r for r, s in enumerate(signatures) if s != mine]
        if differing:
            raise FailedPrecondition(
                f"broadcast needs the same tensor names, shapes and dtypes on every rank; rank {differing[0]} holds "
                f"other ones (per-rank values set with rank= differ in shape or dtype, or entries differ). Set them "
                "alike on every rank, then broadcast again; nothing changed"
            )
        for _, t in named:
            collectives.broadcast_(t, src)
        return len(named)


@dataclass(frozen=True)
class Move:
    """A source of a verb that lives on another rank than the verb's target: its values go from rank
    `src` to `dst` (a rank, or ALL: every rank but src) for the length of the verb."""

    handle: str
    src: int
    dst: int
    buffers: bool = False
    """A module's buffers go too (an average that folds buffers in); parameters always do."""


class _Abandoned(Exception):
    """Another rank refused its part of a move: this rank stops too, having changed nothing."""


def _host_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A host tensor to receive a tensor from another rank into, from this rank's host cache (a
    large one over memory a freed tensor left): uploads relayed to the other ranks, and what rank 0
    fetches from them, took new memory each time and faulted every page in (left open by review)."""
    return hostcache.empty_as(math.prod(shape), dtype).reshape(tuple(shape))


def _agree(fabric: Fabric, error: WeightavgError | None) -> None:
    """Every rank says whether it refuses its part (every rank must call this, refused or not):
    this rank's own refusal is raised, and `_Abandoned` where only another rank refused, so no
    rank goes on to move data that some rank will not take."""
    refusals: list[Any] = [None] * fabric.world_size
    dist.all_gather_object(refusals, error is not None, group=fabric.control)
    _as_sent(refusals, lambda v: type(v) is bool, "whether it refuses its part (a bool)")
    if error is not None:
        raise error
    if any(refusals):
        raise _Abandoned()


def _layout(source: nn.Module | TensorDict, buffers: bool) -> tuple[Layout, Named]:
    """What a move sends of a source, and its tensors: a dictionary's entries, or a module's
    parameters (and with `buffers` its buffers), each row (name, role, shape, dtype, device type)."""
    if isinstance(source, TensorDict):
        named = list(source.entries.items())
        return Layout("dictionary", [(n, "entry", tuple(t.shape), t.dtype, t.device.type) for n, t in named]), named
    params = [(n, p.detach()) for n, p in source.named_parameters()]
    extra = list(source.named_buffers()) if buffers else []
    rows = [(n, "parameter", tuple(t.shape), t.dtype, t.device.type) for n, t in params]
    rows += [(n, "buffer", tuple(t.shape), t.dtype, t.device.type) for n, t in extra]
    return Layout("module", rows), params + extra


@dataclass(frozen=True)
class Layout:
    """What a move sends: the source's kind ("module" or "dictionary") and one row per tensor."""

    kind: str
    rows: list[tuple[str, str, tuple[int, ...], torch.dtype, str]]

    def stand_in(self, tensors: list[torch.Tensor]) -> Entry:
        """The entry a receiving rank lends for the source: a dictionary of the entries, or a
        module with no layers holding the parameters and buffers under their names."""
        named = [(row[0], row[1], t) for row, t in zip(self.rows, tensors)]
        if self.kind == "dictionary":
            obj: Any = TensorDict({n: t for n, _, t in named})
            kind = Kind.DICTIONARY
        else:
            obj = modules.skeleton([(n, t) for n, r, t in named if r == "parameter"],
                                   [(n, t) for n, r, t in named if r == "buffer"])
            kind = Kind.MODULE
        return Entry(kind, obj, GroupLock(), tenant=CALLER.get().tenant)


def _moved(service: Service, fabric: Fabric, move: Move, held: contextlib.ExitStack) -> Entry | None:
    """Bring a source's values to the ranks of `move.dst`; there, the entry that stands in for it,
    whose bytes stay reserved until `held` closes. Every rank takes part in the two control exchanges
    (what moves; whether every receiver could reserve it), so a refusal anywhere stops every rank
    before any data moves. The source stays locked for reading while its values go out."""
    error: WeightavgError | None = None
    layout: Layout | None = None
    named: Named = []
    receiving = fabric.rank != move.src and move.dst in (ALL, fabric.rank)
    with contextlib.ExitStack() as reading:
        if fabric.rank == move.src:
            try:
                entry, _ = service._source(move.handle)
                reading.enter_context(service.store.reading(entry))
                layout, named = _layout(source_of(entry), move.buffers)  # read under the lock
            except WeightavgError as exc:
                error = exc
        layouts: list[Any] = [None] * fabric.world_size
        dist.all_gather_object(layouts, layout, group=fabric.control)
        layout = _as_sent(layouts, _is_move_layout, "a move's layout (None or a Layout)")[move.src]
        if layout is None:
            if error is not None:
                raise error
            raise _Abandoned()
        received: list[torch.Tensor] = []
        if receiving:
            places = [torch.device("cpu") if kind == "cpu" else service.device for *_, kind in layout.rows]
            need: dict[str, int] = {}
            for (_, _, shape, dtype, _), place in zip(layout.rows, places):
                need[str(place)] = need.get(str(place), 0) + torch.Size(shape).numel() * dtype.itemsize
            if fabric.backend == "gloo":  # a CUDA tensor arrives through a host copy (collectives.transfer_)
                staged = [torch.Size(r[2]).numel() * r[3].itemsize for r, p in zip(layout.rows, places) if p.type == "cuda"]
                need["cpu"] = need.get("cpu", 0) + max(staged, default=0)
            try:
                held.enter_context(service.store.reserve(nbytes=need))
                received = [torch.empty(r[2], dtype=r[3], device=p) for r, p in zip(layout.rows, places)]
            except WeightavgError as exc:
                error = exc
            except (torch.OutOfMemoryError, MemoryError) as exc:  # this rank must still answer the exchange below
                error = ResourceExhausted(f"rank {fabric.rank}: out of memory for a copy of '{move.handle}' ({exc})")
        _agree(fabric, error)
        dst = None if move.dst == ALL else move.dst
        for i in range(len(layout.rows)):
            if fabric.rank == move.src:
                collectives.transfer_(named[i][1], move.src, dst, fabric.rank, fabric.backend == "gloo")
            elif receiving:
                collectives.transfer_(received[i], move.src, dst, fabric.rank, fabric.backend == "gloo")
    return layout.stand_in(received) if receiving else None


def _across(
    service: Service, fabric: Fabric, op: str, args: tuple[Any, ...], kwargs: dict[str, Any], where: int,
    moves: list[Move],
) -> Any:
    """A verb whose sources live on other ranks than its target (`where`): each source's values are
    moved to the target's rank(s), where they stand in for it under its own handle (`Registry.lend`),
    and the verb runs there as on one rank; the copies go when it ends."""
    if not runnable(op):
        raise InvalidArgument(f"rank {fabric.rank} was sent {op!r}, which is no operation of the cluster's")
    with contextlib.ExitStack() as held:
        try:
            for move in moves:
                lent = _moved(service, fabric, move, held)
                if lent is not None:
                    held.enter_context(service.store.lend(move.handle, lent))
        except _Abandoned:
            return None
        if where not in (ALL, fabric.rank):
            return None
        rank_op = RANK_OPS.get(op)  # a verb whose ranks agree before any changes (`_outer_step`)
        if rank_op is not None:
            return rank_op(service, fabric, *args, **kwargs)
        return getattr(Service, op)(service, *args, **kwargs)


def held_bytes(service: Service) -> int:
    """Bytes of tensor storage a rank holds, over all its devices and the host."""
    return sum(service.store.held_bytes().values())


def _rank_metrics(
    service: Service, fabric: Fabric, split: str, handle: str, where: int, sink: Sink, stop: str = "",
) -> Metrics | None:
    """An epoch (`split` "train") or a test ("test") of a model on rank `where`, or on every rank of a
    replicated one (ALL): its metrics there, None elsewhere. Every rank takes part, so that nothing
    runs before (1) each running rank holds its model's lock and has reserved the run's memory (an
    epoch: its training data too) and (2) rank 0 has reserved, in `sink.held` (the servicer's: until
    the reply has streamed), the metric tensors it will receive from the other running ranks
    (`footprint.metrics_reply_bytes`). A refusal anywhere stops every rank before any trains or tests.
    Those metrics came back to rank 0 unreserved: under a 30 MB cap, with rank 0 holding 15 MB, a
    model on rank 1 returned 20 MB of `output` there, held until the reply had streamed, and so did
    each rank of a replicated model (found by review). Before that, a rank without data, or whose cap refused the epoch,
    failed while the others trained, leaving the copies of a replicated model apart (found by review)."""
    runs = where in (ALL, fabric.rank)
    with contextlib.ExitStack() as ready:
        error: WeightavgError | None = None
        nbytes = 0
        model: training.Model | None = None
        if runs:
            held = sink.held if fabric.rank == 0 else None  # rank 0's own metrics: kept as long as its reply
            try:
                if split == "train":
                    model = ready.enter_context(service._epoch_ready(handle, held))
                    training.require_data(model, "train")
                else:
                    model = ready.enter_context(service._test_ready(handle, held))
                nbytes = footprint.metrics_reply_bytes(model, split)
            except WeightavgError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - whatever it is, the other ranks wait for this rank's answer
                error = WeightavgError(f"rank {fabric.rank}: preparing the {split} run failed: {type(exc).__name__}: {exc}")
        sizes: list[Any] = [None] * fabric.world_size
        dist.all_gather_object(sizes, None if error is not None else nbytes, group=fabric.control)
        _as_sent(sizes, lambda v: v is None or _is_byte_count(v), "the bytes of its metrics (None or an int >= 0)")
        if error is not None:
            raise error
        if any(n is None for n in sizes):
            raise _Abandoned()
        if fabric.rank == 0:
            error = _reserve_metrics(service, sink, {r: n for r, n in enumerate(sizes) if r and n})
        _agree(fabric, error)
        if model is None:
            return None
        check = remote_stop(fabric, stop) if where not in (ALL, 0) else never
        return training.run_epoch(model, check) if split == "train" else training.test_epoch(model, check)


def _reserve_metrics(service: Service, sink: Sink, nbytes: dict[int, int]) -> WeightavgError | None:
    """Rank 0's reservation of the metrics the other ranks (`nbytes`: their bytes by rank) will send
    it, kept in `sink.held` until the reply has streamed; the refusal, if it does not fit."""
    if not nbytes or sink.held is None:
        return None
    try:
        sink.held.enter_context(service.store.reserve(nbytes={"cpu": sum(nbytes.values())}))
    except WeightavgError as exc:
        ranks = ", ".join(f"rank {r}: {n} bytes" for r, n in nbytes.items())
        return type(exc)(
            f"{exc} (rank 0 receives the metrics of the other ranks and holds them until the reply has "
            f"streamed: {ranks}; ask for fewer per-sample metrics such as output or predict, or raise the cap)"
        )
    return None


def _outer_step(service: Service, fabric: Fabric, handle: str, average: str) -> float:
    """A replicated optimizer's outer step on every rank, once every rank has checked the average and
    reserved the step's memory: a rank whose cap refused the step answered RESOURCE_EXHAUSTED while
    rank 0 had stepped, and the copies of the 'replicated' model differed from then on (found by
    review). A refusal anywhere stops every rank before any steps."""
    with contextlib.ExitStack() as ready:
        try:
            step = ready.enter_context(service._outer_step_ready(handle, average))
        except WeightavgError as exc:
            _agree(fabric, exc)  # raises it, once every rank has heard that this rank refuses
            raise
        _agree(fabric, None)
        return step()


def _listed(service: Service, fabric: Fabric, all_tenants: bool) -> list[tuple[Ref, HandleSummary]]:
    """The caller's handles on this rank (none from rank 0, which lists its own in the calling thread)."""
    return Service.list_handles(service, all_tenants) if fabric.rank else []


def _inventory(service: Service, fabric: Fabric) -> RankInfo:
    return RankInfo(fabric.rank, str(fabric.device), len(service.store), held_bytes(service))


def _handles(service: Service, fabric: Fabric) -> list[tuple[str, str]]:
    """Every handle this rank holds, with its tenant."""
    return [(h, entry.tenant) for h, entry in service.store.items()]


def _snapshot(service: Service, fabric: Fabric, generation: int, copy: bool) -> snapshot.SnapshotResult:
    return snapshot.save(service.store, generation_dir(service.settings.state_dir, generation), copy=copy)


def _commit(service: Service, fabric: Fabric, generation: int) -> None:
    prune(service.settings.state_dir, generation)


def _release(service: Service, fabric: Fabric, handles: list[str]) -> list[str]:
    """Free whichever of these handles this rank holds (an ended session's); the ones freed."""
    return service.store.release(handles)


def _quotas(service: Service, fabric: Fabric, quotas: dict[str, Quota]) -> None:
    """Rank 0's tenant quotas (its tokens file), in force on this rank too: every rank reserves against
    them, each for what its own devices hold."""
    service.store.set_quotas(quotas)


RANK_OPS: dict[str, Callable[..., Any]] = {
    "_ping": lambda service, fabric: None,
    "_fetch": _fetch,
    "_allreduce": _allreduce,
    "_inventory": _inventory,
    "_listed": _listed,
    "_rank_metrics": _rank_metrics,
    "_outer_step": _outer_step,
    "_broadcast": _broadcast,
    "_across": _across,
    "_handles": _handles,
    "_snapshot": _snapshot,
    "_commit": _commit,
    "_quotas": _quotas,
    "_release": _release,
}
"""Operations only ranks perform (rank 0 included), beside the Service methods."""


def _answered(fabric: Fabric, op: str, run: Callable[[], Any]) -> Any:
    """What this rank answers for one step of a command: run's result, a Failure in place of an
    error (every rank answers, or rank 0 waits for nothing), or None where another rank refused its
    part of an exchange."""
    try:
        return run()
    except _Abandoned:
        return None
    except WeightavgError as exc:
        return Failure(exc)
    except MalformedExchange:  # every rank of the exchange saw it, or only this one: the cluster stops
        raise
    except Exception as exc:  # noqa: BLE001 - a rank answers every command, or rank 0 waits for nothing
        log.exception("rank %d: %s failed", fabric.rank, op)
        return Failure(WeightavgError(f"rank {fabric.rank}: {op} failed: {type(exc).__name__}: {exc}"))


def runnable(op: str) -> bool:
    """Whether a command may name `op`: a `RANK_OPS` entry or a public method of Service. A rank runs
    what its command names, so a stream forged from allowed classes (control_wire.SENT) could
    otherwise have called any attribute of Service, its private helpers included (found by review)."""
    return op in RANK_OPS or (not op.startswith("_") and inspect.isfunction(vars(Service).get(op)))


@functools.cache
def answer_hint(op: str) -> Any:
    """What a rank answers for `op` when it succeeds: the annotation of the Service method's return,
    or of the `RANK_OPS` function's (Any where it has none). One table for every verb, read from the
    code that answers, so a new verb is checked without a line here."""
    answer = RANK_OPS.get(op) or getattr(Service, op)
    return typing.get_type_hints(answer).get("return", Any)


def is_answer(command: Command, value: object) -> bool:
    """Whether `value` is what a rank may answer for `command`: None (it took no part, or sent its
    tensor answer apart: `_tensor_back`), a Failure, or a value of the verb's annotated result (for
    `_across`, the verb it runs: its first argument, which rank 0 itself put there)."""
    if value is None or type(value) is Failure:
        return True
    op = command.op
    if op == "_across" and command.args and isinstance(command.args[0], str) and runnable(command.args[0]):
        op = command.args[0]
    return control_wire.conforms(value, answer_hint(op))


def _executed(service: Service, fabric: Fabric, command: Command) -> Any:
    """The command's result on this rank (None where it takes no part); errors raised."""
    if not runnable(command.op):
        raise InvalidArgument(f"rank {fabric.rank} was sent {command.op!r}, which is no operation of the cluster's")
    args, kwargs = _received(service, fabric, command)  # before the ranks check: rank 0 sends to them
    if command.ranks is not None and fabric.rank not in command.ranks:
        return None
    op = RANK_OPS.get(command.op)
    if op is not None:
        return op(service, fabric, *args, **kwargs)
    args, kwargs = _stopping(fabric, args), _stopping(fabric, kwargs)
    # The plain Service method, also on rank 0 (whose ClusterService method routed it here).
    if fabric.rank == 0 and command.sink is not None and command.sink.held is not None:
        args, kwargs = _holding(command.op, args, kwargs, command.sink.held)
    return getattr(Service, command.op)(service, *args, **kwargs)


def _holding(
    op: str, args: tuple[Any, ...], kwargs: dict[str, Any], held: contextlib.ExitStack
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Rank 0's arguments of a verb with a tensor answer, its `held` set to the caller's (the
    servicer's, open until the reply has streamed): on a replicated model rank 0 answers its own
    output, which the command's `held=None` released when the verb returned, before the reply had
    streamed (found by review)."""
    signature = inspect.signature(getattr(Service, op))
    if "held" not in signature.parameters:
        return args, kwargs
    bound = signature.bind(None, *args, **kwargs)
    bound.arguments["held"] = held
    return tuple(bound.args[1:]), dict(bound.kwargs)


def _tensor_back(service: Service, fabric: Fabric, command: Command, result: Any) -> Any:
    """A tensor answer of one other rank, brought to rank 0's `command.sink` (every rank takes part):
    rank 0 reserves room for it first, and refuses (RESOURCE_EXHAUSTED) before any byte moves. Other
    ranks' answers, which rank 0 does not use (a replicated model's: rank 0 answers), are dropped.
    Pickled among the results, a 100 MB output of evaluate on rank 1 raised rank 0's peak memory by
    470 MB, never reserved, while rank 0 held 250 of its 300 MB (found by review)."""
    src = command.ranks[0] if command.ranks is not None and len(command.ranks) == 1 else None
    if src is None or src == 0:
        return result if fabric.rank == 0 or isinstance(result, Failure) else None
    meta = (tuple(result.shape), result.dtype) if fabric.rank == src and isinstance(result, torch.Tensor) else None
    metas: list[Any] = [None] * fabric.world_size
    dist.all_gather_object(metas, meta, group=fabric.control)
    _as_sent(metas, _is_tensor_meta, "a tensor answer's (shape, dtype) or None")
    if metas[src] is None:
        return result  # a Failure, or no tensor: it goes back as it is
    shape, dtype = metas[src]
    error: WeightavgError | None = None
    received: torch.Tensor | None = None
    if fabric.rank == 0 and command.sink is not None and command.sink.held is not None:
        try:
            command.sink.held.enter_context(
                service.store.reserve(nbytes={"cpu": torch.Size(shape).numel() * dtype.itemsize})
            )
            received = _host_empty(shape, dtype)
        except WeightavgError as exc:
            error = type(exc)(f"{exc} (rank 0 holds the answer of rank {src} while it replies)")
        except (torch.OutOfMemoryError, MemoryError) as exc:  # rank src must still hear of it
            error = ResourceExhausted(f"out of memory for the answer of rank {src} ({exc})")
    _agree(fabric, error)  # a refusal here: _answered makes it this rank's answer
    if torch.Size(shape).numel():
        if fabric.rank == src:
            dist.send(_sent(result), dst=0)
        elif fabric.rank == 0 and received is not None:
            dist.recv(_as_bytes(received), src=src)
    if fabric.rank == 0 and command.sink is not None and received is not None:
        command.sink.named = [("", received)]
    return None if fabric.rank == src else result


def execute(service: Service, fabric: Fabric, command: Command) -> Any:
    """Run a command on this rank: its result, a Failure, or None where this rank takes no part.
    A tensor answer's exchange (`_tensor_back`) runs even after a failure, as every rank takes part."""
    bits = HANDLE_BITS.set(seeded_bits(command.seed))
    caller = CALLER.set(command.caller) if command.caller is not None else None
    try:
        result = _answered(fabric, command.op, lambda: _executed(service, fabric, command))
        if command.sink is None:
            return result
        return _answered(fabric, command.op, lambda: _tensor_back(service, fabric, command, result))
    finally:
        if caller is not None:
            CALLER.reset(caller)
        HANDLE_BITS.reset(bits)


HOUSEKEEPING = frozenset({"_ping", "_snapshot", "_commit"})
"""Commands rank 0 sends of its own accord while no client calls: its pings to idle ranks and its
periodic snapshots. A rank counts every other command as use (`ops.app.FollowerReaper`)."""


def follow(service: Service, fabric: Fabric, between: Callable[[str], object] = lambda op: None) -> None:
    """A rank other than 0: execute rank 0's commands in order until it says stop, calling
    `between(op)` after each (the rank's reaper: it runs between commands, never beside one). Each
    answer carries the bytes this rank holds and its host cache keeps idle (rank 0's metrics).

    Raises:
        RuntimeError: rank 0 is gone, or silent past the timeout (it pings while idle).
        MalformedExchange: rank 0 sent something other than a command (anything but a Command was
            taken for a stop, logged as one), or a rank sent what this code never sends in a command's
            exchange: this rank stops, and rank 0 breaks the cluster.
    """
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=fabric.control)
        command = _as_sent(box, lambda v: _is_command(v, fabric.world_size), "a command")[0]
        if command.op == "_stop":
            log.info("rank %d: stop from rank 0", fabric.rank)
            return
        result = execute(service, fabric, command)
        dist.gather_object((result, held_bytes(service), kept_bytes()), None, dst=0, group=fabric.control)
        del result, box  # what the command answered or brought is freed before the reaper looks
        between(command.op)


def kept_bytes() -> int:
    """Bytes of freed host memory this rank's host cache keeps idle (`hostcache`)."""
    return hostcache.cache().stats().idle_bytes


# -- rank 0 -----------------------------------------------------------------------------------------

LOCAL_ONLY = frozenset({
    "server_info", "device_usage", "request_id_stats", "tenant_usage", "create_session",
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
        self._owners: dict[str, str] = {}
        """The tenant of each handle in _placements: to a caller that may not see it, the handle is
        unknown, routed to rank 0 like any id that never existed (`where`)."""
        self._sessions_of: dict[str, str] = {}
        """The session that made each handle in _placements, where one did: when the session ends (closed,
        or its lease ran out on rank 0), the handle is freed on every rank (`_take_session`)."""
        self._session_handles: dict[str, set[str]] = {}
        """The same, by session: an ending session finds its handles without a walk of every handle."""
        self._expired: list[tuple[str, int]] = []
        """Handles beyond rank 0 of sessions whose lease ran out, for the pinging thread to free: an
        expiry runs inside any caller's call, which must not wait for the command channel."""
        self._expiry_due = threading.Event()
        store.on_expiry.append(self._session_expired)
        self._placements_lock = threading.Lock()
        self._held = [0] * fabric.world_size
        """Bytes each rank held after the last command (another rank changes only through commands)."""
        self._kept = [0] * fabric.world_size
        """Bytes each rank's host cache kept idle after the last command (its reaper runs after each:
        while idle, the pings bring the figure every few seconds)."""
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
        owners: dict[str, str] = {}
        for rank, handles in enumerate(found):
            for h, tenant in handles:
                held.setdefault(h, []).append(rank)
                owners[h] = tenant
        # A replicated handle's session is known from rank 0's copy; one placed on another rank alone
        # restores without its session (docs/cluster.md, "Limits").
        sessions = {h: entry.session for h, entry in self.store.items() if entry.session is not None}
        with self._placements_lock:
            for h, ranks in held.items():
                if len(ranks) == self.fabric.world_size:
                    self._placements[h] = ALL
                    if h in sessions:
                        self._own(h, sessions[h])
                elif ranks != [0]:
                    self._placements[h] = ranks[0]
                else:
                    continue
                self._owners[h] = owners[h]
        self.set_quotas(self.store.quotas)
        self._pinger.start()

    def set_quotas(self, quotas: Mapping[str, Quota]) -> None:
        """Tenant quotas on every rank (at start, and when SIGHUP rereads the tokens file): only rank 0
        reads the tokens file, and a rank without them let a tenant place any amount beyond its quota
        there (found by review)."""
        self._call("_quotas", ALL, (dict(quotas),))

    def _ping(self) -> None:
        """Ping the idle ranks, and free on every rank what sessions whose lease ran out made there."""
        interval = max(0.5, min(5.0, self.fabric.timeout / 4))
        while True:
            expired = self._expiry_due.wait(interval)
            if self._stop.is_set():
                return
            if expired and self._channel.locked():  # a long command runs: try again soon, never block a stop
                self._stop.wait(0.5)
            elif expired:
                self._expiry_due.clear()
                self._release_expired()
            elif self._channel.acquire(blocking=False):  # a command in flight says as much as a ping
                self._channel.release()
                with contextlib.suppress(Unavailable):
                    self._send(Command("_ping"))

    def _release_expired(self) -> None:
        """Free on every rank what the sessions whose lease ran out made there (`_session_expired`)."""
        with self._placements_lock:
            handles, self._expired = self._expired, []
        self._release(handles)

    def _session_expired(self, session: str) -> None:
        """A session's lease ran out on rank 0 (its handles there are freed): queue what it made on the
        other ranks for the pinging thread."""
        handles = self._take_session(session)
        if handles:
            with self._placements_lock:
                self._expired.extend(handles)
            self._expiry_due.set()

    def _take_session(self, session: str | None) -> list[tuple[str, int]]:
        """Forget the handles beyond rank 0 that `session` made; them, with where they live, to free."""
        if session is None:
            return []
        with self._placements_lock:
            handles = [(h, self._placements.get(h, 0)) for h in self._session_handles.get(session, ())]
            for h, _ in handles:
                self._forget(h)
        return handles

    def _forget(self, handle: str) -> None:
        """Drop a handle beyond rank 0 from rank 0's books (placements lock held)."""
        self._placements.pop(handle, None)
        self._owners.pop(handle, None)
        session = self._sessions_of.pop(handle, None)
        if session is not None:
            owned = self._session_handles[session]
            owned.discard(handle)
            if not owned:
                del self._session_handles[session]

    def _own(self, handle: str, session: str) -> None:
        """Note that `session` made a handle beyond rank 0 (placements lock held)."""
        self._sessions_of[handle] = session
        self._session_handles.setdefault(session, set()).add(handle)

    def _release(self, handles: list[tuple[str, int]]) -> int:
        """Free these handles (with where they live) on every rank that holds one: the server's own
        clean-up of an ended session's; how many of those placed on one other rank were freed (rank 0
        counted the replicated ones with its own). A broken cluster frees nothing more: its restart
        restores the last snapshot."""
        if not handles:
            return 0
        try:
            freed = self._call("_release", ALL, ([h for h, _ in handles],))
        except Unavailable:
            return 0
        done = {h for rank, gone in enumerate(freed) if rank and isinstance(gone, list) for h in gone}
        return sum(1 for h, where in handles if where != ALL and h in done)

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
            sent = time.monotonic()
            try:
                dist.broadcast_object_list([command], src=0, group=self.fabric.control)
            except control_wire.ControlEncodeError as exc:
                # The source encodes before any byte moves (torch encodes every object first): the other
                # ranks still wait for a command, and nothing ran. A spec nested past what they read
                # (--max-spec-depth over 64) used to break the cluster for good.
                raise InvalidArgument(f"rank 0 cannot send {command.op} to the other ranks: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError subclasses, or whatever gloo says
                self._lost(command, exc, sent)
            try:
                mine = execute(self, self.fabric, command)
                replies: list[Any] = [None] * self.fabric.world_size
                dist.gather_object((mine, held_bytes(self), 0), replies, dst=0, group=self.fabric.control)
                _as_sent(replies, _is_reply, "follow's (result, held bytes, kept bytes)")
                # Rank 0's own result is what this code made; each other rank's must be what the verb answers,
                # or a forged one reaches the caller's reply as INTERNAL, or as a wrong value.
                _as_sent([None, *(r[0] for r in replies[1:])], lambda v: is_answer(command, v),
                         f"what {command.op} answers ({answer_hint(command.op)}), a Failure or None")
            except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError subclasses, or whatever gloo says
                self._lost(command, exc, sent)
            results = [result for result, _, _ in replies]
            with self._placements_lock:
                self._held = [held for _, held, _ in replies]
                self._kept = [kept for _, _, kept in replies]
            return results

    def _lost(self, command: Command, exc: BaseException, sent: float) -> NoReturn:
        """The cluster is broken for good: a collective of `command` failed, or a rank answered what
        this code never sends. Raises UNAVAILABLE."""
        self._broken = lost_rank(command.op, exc, time.monotonic() - sent, self.fabric.timeout)
        log.error("cluster broken: %s", self._broken)
        self.on_broken(self._broken)
        self._check()
        raise AssertionError("unreachable: _check raises once the cluster is broken")

    def _call(
        self, op: str, where: int, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
        per_rank: dict[int, tuple[Any, ...]] | None = None, sink: Sink | None = None,
    ) -> list[Any]:
        """Every rank's result of a command on `where` (ALL or one rank); the first rank's error is raised
        after the handles the command created on the other ranks are freed again."""
        ranks = None if where == ALL else (where,)
        command = Command(op, args, kwargs or {}, ranks, secrets.token_hex(16), CALLER.get(), per_rank, sink)
        results = self._send(command)
        failed = [(r, x.error) for r, x in enumerate(results) if isinstance(x, Failure)]
        if failed:
            # A verb may answer a handle it was given (move, update_model): that one existed before, so
            # it stays (freed, a move refused on one rank destroyed the object on every rank).
            given = set(_handles_among(args, kwargs or {}))
            made = sorted({x.id for x in results if isinstance(x, Ref)} - given)
            if made:
                with contextlib.suppress(Unavailable):
                    self._send(Command("free", (made, False), {}, ranks, "", CALLER.get()))
            rank, error = failed[0]
            if not isinstance(error, WeightavgError):  # what only a stream not from a rank would carry
                raise Unavailable(
                    f"rank {rank} answered a {type(error).__name__} in place of an error: the process group's "
                    "network must admit only the server's ranks (docs/cluster.md, \"Security\")"
                )
            raise type(error)(f"rank {rank}: {error}") if self.fabric.world_size > 1 else error
        return results

    def _keyed(self, name: str, key: RequestKey | None, run: Callable[[], Any]) -> Any:
        """Once per request ID on rank 0, which alone remembers answers."""
        if key is None:
            return run()
        return self.store.requests.answer(key, name, CALLER_SESSION.get(), run, CALLER.get().tenant)

    def _record(self, value: Any, where: int) -> None:
        """Note where a new handle beyond rank 0 lives, its tenant and its session.

        Raises:
            NotFound: the caller's session ended while the command ran; the handle is freed again, as
                one server refuses to create an object for an ended session.
        """
        if not isinstance(value, Ref) or where == 0:
            return
        session = CALLER_SESSION.get()
        with self._placements_lock:
            if value.id in self._placements:
                # A verb that answers the handle it was given (move, update_model): it keeps its tenant and
                # session. Taken over by the caller's, closing the caller's session freed another
                # session's object on its rank, and an admin's move hid a tenant's handle from it.
                return
            self._placements[value.id] = where
            self._owners[value.id] = CALLER.get().tenant
            if session is not None:
                self._own(value.id, session)
        if session is not None and not self.store.has_session(session):
            self._release(self._take_session(session))
            raise NotFound(f"session '{session}' has ended (lease expired or closed); nothing created")

    def where(self, handle: str) -> int:
        """Where a handle lives: ALL, or a rank (0 for rank 0's own and for unknown handles).

        Another tenant's handle is unknown to the caller: it goes to rank 0 too, which answers NOT_FOUND
        as for an id that never existed. Routed to its rank, it answered 'rank 1: unknown handle',
        FAILED_PRECONDITION 'this object lives on rank 1', and so on, telling another tenant that the
        handle exists and where (found by review)."""
        with self._placements_lock:
            where = self._placements.get(handle, 0)
            owner = self._owners.get(handle, "")
        return where if where == 0 or CALLER.get().may_see(owner) else 0

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
                "(rank=) or replicated (replicate=True; Placement's fields), or bring one's values over first: "
                "copyparms, avgparms, ema and average (CopyParameters, AverageParameters, UpdateMovingAverage, "
                "AverageDictionaries) take handles on different ranks"
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

    def _handle_target(self, handle: str, rank: int | None) -> int:
        """The rank(s) a per-rank call on a handle runs on; NOT_FOUND first for a handle rank 0 does not
        know (FAILED_PRECONDITION 'lives on rank 0, not rank 1' answered rank=1 on an unknown id)."""
        where = self.where(handle)
        if where == 0 and rank:
            self.store.get(handle)
        return self._target(where, rank)

    def _placement(self, placement: Placement) -> int:
        if placement.replicate:
            if placement.rank is not None:
                raise InvalidArgument("give replicate=True or rank=, not both")
            return ALL
        return self._target(ALL, placement.rank) if placement.rank is not None else self.least_held()

    def rank_bytes(self) -> list[int]:
        """Each rank's bytes without a command (a scrape must not wait behind an epoch): rank 0's read
        live, the others' as their last command left them, which is exact (only commands change them)."""
        with self._placements_lock:
            held = list(self._held)
        held[0] = held_bytes(self)
        return held

    def rank_kept_bytes(self) -> list[int]:
        """Each rank's freed host memory kept idle (`hostcache`), without a command: rank 0's read live,
        the others' as of their last answer (a ping's at most a few seconds ago while idle)."""
        with self._placements_lock:
            kept = list(self._kept)
        kept[0] = kept_bytes()
        return kept

    def least_held(self) -> int:
        """Where a new object without a placement goes: the rank holding the fewest bytes of tensor
        storage now (the lowest such rank on a tie, so rank 0 while the ranks are even; `rank_bytes`)."""
        held = self.rank_bytes()
        return min(range(len(held)), key=lambda r: (held[r], r))

    def _routed(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], where: int,
        every: Callable[[list[Any]], Any] | None = None,
    ) -> Any:
        """Run Service.<name> where its handles live (rank 0's own: here, as on a one-rank server).
        On every rank (ALL) the answer is rank 0's, or `every` of all ranks' answers."""
        key = kwargs.pop("request", None)
        if where == 0:
            keyed = {"request": key} if key is not None else {}
            return getattr(Service, name)(self, *args, **keyed, **kwargs)
        bound = inspect.signature(getattr(Service, name)).bind(self, *args, **kwargs)
        with contextlib.ExitStack() as held:
            for pname, value in list(bound.arguments.items()):
                if pname == "upload":
                    bound.arguments[pname] = Relayed.of(self._relay_upload(value, held), held)
                elif pname == "should_stop" and where == ALL:
                    bound.arguments[pname] = never  # every copy of a replicated object runs to the end alike
                elif pname == "should_stop":  # one other rank stops once the caller has gone
                    token = secrets.token_hex(16)
                    bound.arguments[pname] = RemoteStop(token)
                    held.enter_context(watching(self.fabric, token, value))

            # A caller's own `held` (the servicer's, open until the reply has streamed) keeps what rank 0
            # reserves for another rank's answer; the ranks get None, as on a one-rank call.
            outer = bound.arguments.get("held")
            if "held" in bound.arguments:
                bound.arguments["held"] = None
            sink = Sink(outer if isinstance(outer, contextlib.ExitStack) else held) if name in TENSOR_RESULTS else None

            def run() -> Any:
                values = self._call(name, where, tuple(bound.args[1:]), dict(bound.kwargs), sink=sink)
                if every is not None:
                    return every(values)
                value = values[0 if where == ALL else where]
                if sink is not None and where != ALL:
                    value = sink.named[0][1]
                self._record(value, where)
                return value

            return self._keyed(name, key, run)

    def _relay_upload(self, upload: Upload, held: contextlib.ExitStack) -> Named:
        """An upload for other ranks, received here first: each tensor reserved on rank 0 from its header,
        before its buffer is allocated, for as long as `held` (until it has been sent on)."""
        reservation = held.enter_context(self.store.reserve())

        def on_header(name: str, nbytes: int) -> None:
            try:
                self.store.grow(reservation, nbytes={"cpu": nbytes})
            except ResourceExhausted as exc:
                raise ResourceExhausted(f"rank 0 (which receives every upload for the other ranks): {exc}") from None

        return upload(on_header)

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
        self, handle: str, name: str, upload: Upload, *, rank: int | None = None, etag: str = "",
        request: RequestKey | None = None,
    ) -> bool:
        self._check()
        where = self._handle_target(handle, rank)
        self._conditional(etag, where)
        return self._routed(  # type: ignore[no-any-return]
            "set_parameter", (handle, name, upload), {"request": request, "etag": etag}, where
        )

    def update_dictionary(
        self, handle: str, upload: Upload, *, rank: int | None = None, etag: str = "",
        request: RequestKey | None = None,
    ) -> list[str]:
        self._check()
        where = self._handle_target(handle, rank)
        self._conditional(etag, where)
        return self._routed(  # type: ignore[no-any-return]
            "update_dictionary", (handle, upload), {"request": request, "etag": etag}, where
        )

    def set_model_data(
        self, handle: str, split: str, upload: Upload, *, shard: bool = False, rank: int | None = None,
        request: RequestKey | None = None,
    ) -> int:
        self._check()
        if shard and rank is not None:
            raise InvalidArgument("shard=True gives every rank a part of the rows, rank= one rank all of them: give one")
        where = self._handle_target(handle, rank)
        if not shard:
            return self._routed("set_model_data", (handle, split, upload), {"request": request}, where)  # type: ignore[no-any-return]
        if where != ALL:
            raise FailedPrecondition("shard=True splits data across the ranks of a replicated model; create its "
                                     "module with replicate=True")
        with contextlib.ExitStack() as held:
            named = self._relay_upload(upload, held)
            world = self.fabric.world_size
            _check_shardable(named, world)
            parts = [torch.tensor_split(t, world) for _, t in named]
            per_rank: dict[int, tuple[Any, ...]] = {
                r: (handle, split, Relayed.of([(n, p[r]) for (n, _), p in zip(named, parts)], held))
                for r in range(world)
            }

            def run() -> int:
                return int(self._call("set_model_data", ALL, (handle, split, None), {}, per_rank)[0])

            return self._keyed("set_model_data", request, run)  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def fetch(
        self, handle: str, names: Sequence[str], *, rank: int | None = None, reused: bool = False
    ) -> Iterator[Fetched]:
        """With an etag only for an object held on rank 0 alone (`_etag_kept`)."""
        self._check()
        where = self._handle_target(handle, rank)
        if where in (0, ALL) and rank in (None, 0):
            with Service.fetch(self, handle, names, reused=reused) as copies:
                yield copies if self._etag_kept(handle) else Fetched.of(copies, "")
            return
        with contextlib.ExitStack() as held:  # the copies stay reserved on rank 0 until the reply has gone
            sink = Sink(held)
            self._call("_fetch", ALL, (handle, list(names), where, sink))
            yield Fetched.of(sink.named, "")

    def fetch_to_shared_memory(
        self, handle: str, names: Sequence[str], region: str, offset: int, max_bytes: int = 0, overflow: str = ""
    ) -> tuple[list[shm.Placement], int, str, str]:
        """The session's regions are rank 0's: an object of another rank is fetched here first (reserved
        as any fetch from another rank), then written. Routed to the object's rank(s), the call failed
        there ('rank 1: no shared memory region ... is registered by this session') for every object
        on another rank or replicated, so a client with shm=True could not read them (found by review)."""
        self._check()
        if self.where(handle) in (0, ALL):
            placements, needed, target, etag = Service.fetch_to_shared_memory(
                self, handle, names, region, offset, max_bytes, overflow
            )
            return placements, needed, target, etag if self._etag_kept(handle) else ""
        with self.fetch(handle, names) as named:
            placements, needed, target = self._write_shared(named, region, offset, max_bytes, overflow)
            return placements, needed, target, ""

    def size(self, handle: str) -> Size:
        """Routed as any call on one handle; its etag only where it is kept (`_etag_kept`)."""
        self._check()
        s: Size = self._routed("size", (handle,), {}, self._where_of([handle]))
        return s if self._etag_kept(handle) else replace(s, etag="")

    # -- etags (store/versions.py) ----------------------------------------------------------------------

    def _etag_kept(self, handle: str) -> bool:
        """Whether the handle's etag stands for its values: only for an object held on rank 0 alone.
        Each rank's store counts its own versions, and a replicated object's copy on another rank
        changes by calls addressed to that rank alone, which rank 0's version does not see."""
        return self.where(handle) == 0

    @staticmethod
    def _conditional(etag: str, where: int, moves: Sequence[Move] = ()) -> None:
        """FAILED_PRECONDITION for a change made conditional on an etag (`etag` given) that would not
        run on rank 0 alone, over objects held there (`_etag_kept`), before anything runs."""
        if etag and (where != 0 or moves):
            raise FailedPrecondition(
                "a change conditional on an etag needs an object held on rank 0 alone: this one is replicated "
                "or held by another rank, whose versions rank 0 does not keep; make the change without etag"
            )

    def allreduce(
        self, handle: str, op: str, weights: Sequence[float], group_size: int = 0, *,
        request: RequestKey | None = None,
    ) -> Reduced:
        self._check()
        where = self.where(handle)
        if where == 0:
            self._source(handle)  # NOT_FOUND or INVALID_ARGUMENT first, if it is that
        if where != ALL:  # (one placed on another rank is not in rank 0's store: not NOT_FOUND)
            raise FailedPrecondition("allreduce averages an object across ranks: create it with replicate=True")
        # bad weights (every group's sum) or group size refused before any rank acts
        collectives.rank_scale(op, weights, 0, self.fabric.world_size, group_size)
        return self._keyed(  # type: ignore[no-any-return]
            "allreduce", request,
            lambda: self._call("_allreduce", ALL, (handle, op, list(weights), group_size))[0],
        )

    def broadcast(self, handle: str, rank: int, *, request: RequestKey | None = None) -> int:
        self._check()
        if not 0 <= rank < self.fabric.world_size:
            raise InvalidArgument(f"rank {rank} does not exist: the cluster has ranks 0 to {self.fabric.world_size - 1}")
        where = self.where(handle)
        if where == 0:
            self._source(handle)  # NOT_FOUND or INVALID_ARGUMENT first, if it is that
        if where != ALL:
            raise FailedPrecondition(
                f"broadcast copies one rank's values to the other ranks' copies of a replicated object; this one "
                f"lives on rank {where} alone. Create it with replicate=True (Placement.replicate), or bring its "
                "values to another rank's object with copyparms or average (CopyParameters, AverageDictionaries)"
            )
        return self._keyed(  # type: ignore[no-any-return]
            "broadcast", request, lambda: self._call("_broadcast", ALL, (handle, rank))[0]
        )

    # -- verbs whose sources may live on other ranks than their target --------------------------------

    def _across_ranks(
        self, name: str, args: tuple[Any, ...], request: RequestKey | None, target: int, sources: Sequence[str],
        buffers: bool = False, etag: str = "",
    ) -> Any:
        """Run a verb on `target` (a rank, or ALL) with its sources' values brought there: a source on
        another rank is sent over (collectives.transfer_) and stands in under its handle for the
        verb's length (`_across`); replicated sources are used where they are. An `etag` only where
        it runs on rank 0 alone (`_conditional`)."""
        moves = [
            Move(h, src, target, buffers) for h in dict.fromkeys(sources)
            if isinstance(h, str) and (src := self.where(h)) not in (ALL, target)
        ]
        self._conditional(etag, target, moves)
        if not moves:
            return self._routed(name, args, {"request": request, **({"etag": etag} if etag else {})}, target)

        def run() -> Any:
            value = self._call("_across", ALL, (name, args, {}, target, moves))[0 if target == ALL else target]
            self._record(value, target)
            return value

        return self._keyed(name, request, run)

    def average_parameters(
        self, handle: str, dictionary: str, buffers: BufferMode = BufferMode.EXCLUDE, *, etag: str = "",
        request: RequestKey | None = None,
    ) -> int:
        """The dictionary (the target) may live on another rank than the source."""
        self._check()
        return self._across_ranks(  # type: ignore[no-any-return]
            "average_parameters", (handle, dictionary, buffers), request, self.where(dictionary), [handle],
            buffers is not BufferMode.EXCLUDE, etag,
        )

    def update_moving_average(
        self, handle: str, dictionary: str, change: ScheduleChange, step: int | None,
        buffers: BufferMode = BufferMode.EXCLUDE, *, etag: str = "", request: RequestKey | None = None,
    ) -> EmaResult:
        """The dictionary (the target) may live on another rank than the source."""
        self._check()
        return self._across_ranks(  # type: ignore[no-any-return]
            "update_moving_average", (handle, dictionary, change, step, buffers), request, self.where(dictionary),
            [handle], buffers is not BufferMode.EXCLUDE, etag,
        )

    def load_parameters(
        self, handle: str, dictionary: str, *, etag: str = "", request: RequestKey | None = None
    ) -> dict[str, bool]:
        """The module (the target) may live on another rank than the dictionary."""
        self._check()
        return self._across_ranks(  # type: ignore[no-any-return]
            "load_parameters", (handle, dictionary), request, self.where(handle), [dictionary], etag=etag
        )

    def average(
        self, handles: Sequence[str], weights: Sequence[float] | None, into: str,
        options: Sequence[tuple[str, Value]] = (), *, etag: str = "", request: RequestKey | None = None,
    ) -> Ref:
        """The inputs may live on several ranks: the mean is made where `into` lives, else (a new
        dictionary) on the rank of the first input that lives on one rank (every rank when all
        inputs are replicated)."""
        self._check()
        if into:
            target = self.where(into)
        else:
            placed = [w for w in (self.where(h) for h in handles) if w != ALL]
            target = placed[0] if placed else (ALL if handles else 0)
        return self._across_ranks(  # type: ignore[no-any-return]
            "average", (list(handles), weights, into, list(options)), request, target, list(handles), etag=etag
        )

    # -- verbs that take their parts' handles -------------------------------------------------------------

    def create_model(self, module: str, loss: str, optimizer: str, *, request: RequestKey | None = None) -> Ref:
        """The model takes its parts' handles; a replicated part (a loss) taken on one rank goes on every rank."""
        self._check()
        return self._taking("create_model", (module, loss, optimizer), request, [module, loss, optimizer])  # type: ignore[no-any-return]

    def update_model(self, handle: str, parts: Sequence[str], *, request: RequestKey | None = None) -> Ref:
        """The model takes the new parts' handles; a replicated one taken on one rank goes on every rank."""
        self._check()
        return self._taking("update_model", (handle, list(parts)), request, [handle, *parts])  # type: ignore[no-any-return]

    def _taking(self, name: str, args: tuple[Any, ...], request: RequestKey | None, handles: list[str]) -> Any:
        """Run a verb that frees the part handles it is given (create_model, update_model) where they live.
        On one rank, it freed that rank's copy of a replicated part alone: the others' copies stayed,
        counted against the handle caps and listed by handles() for good (every c.model(m, c.loss(..), o)
        of a module beyond rank 0 left a loss on rank 0), and free() of the handle then failed on the
        rank that had none after the others had freed theirs. Those copies now go too, and the parts leave
        rank 0's books (left there, a replicated model's parts counted as replicated handles in a snapshot's
        reply, and free(h, part) freed h before answering NOT_FOUND for the part)."""
        where = self._where_of(handles)
        parts = [h for h in dict.fromkeys(handles[1:] if name == "update_model" else handles) if self.where(h) != 0]
        elsewhere = [h for h in parts if self.where(h) == ALL] if where != ALL else []
        if not parts:
            return self._routed(name, args, {"request": request}, where)

        def run() -> Any:
            value = self._routed(name, args, {}, where)
            with self._placements_lock:  # gone where the verb ran: a later free() of one is NOT_FOUND on rank 0
                for h in parts:
                    self._forget(h)
            self._release([(h, ALL) for h in elsewhere])
            return value

        return self._keyed(name, request, run)

    # -- per-rank metrics ------------------------------------------------------------------------------

    def run_epoch(
        self, handle: str, should_stop: StopCheck, *, request: RequestKey | None = None,
        held: contextlib.ExitStack | None = None,
    ) -> Metrics:
        """On a replicated model every rank runs an epoch on its own data: each rank's metrics, once
        every rank holds training data (`_rank_metrics`). `held` keeps the metrics reserved on rank 0
        (its own, and those it receives from the other ranks) until it closes."""
        self._check()
        return self._per_rank("train", handle, should_stop, held, request)

    def outer_step(self, handle: str, average: str, *, request: RequestKey | None = None) -> float:
        """On a replicated optimizer every rank steps, once every rank can (`_outer_step`), with an
        average that lives on one rank sent to the others first (as avgparms does for a replicated
        target): routed to the average's rank, the step changed that rank's copy of the model alone,
        and answered as if it had stepped them all (found by review). Elsewhere the step runs where its
        handles live."""
        self._check()
        if self.where(handle) != ALL:
            where = self._where_of([handle, average])
            return self._routed("outer_step", (handle, average), {"request": request}, where)  # type: ignore[no-any-return]
        src = self.where(average)
        moves = [] if src == ALL else [Move(average, src, ALL)]
        return self._keyed(  # type: ignore[no-any-return]
            "outer_step", request, lambda: self._call("_across", ALL, ("_outer_step", (handle, average), {}, ALL, moves))[0]
        )

    def run_test(self, handle: str, should_stop: StopCheck, held: contextlib.ExitStack | None = None) -> Metrics:
        """On a replicated model every rank tests its own data: each rank's metrics. `held` keeps the
        metrics reserved on rank 0 (its own, and those it receives from the other ranks) until it
        closes."""
        self._check()
        return self._per_rank("test", handle, should_stop, held)

    def _per_rank(
        self, split: str, handle: str, should_stop: StopCheck, held: contextlib.ExitStack | None,
        request: RequestKey | None = None,
    ) -> Metrics:
        """An epoch or a test where the model lives: rank 0's own as on one server; on another rank, or
        replicated, through `_rank_metrics`, which reserves on rank 0 the metrics it will receive
        before any rank runs, and keeps them reserved for as long as `held` (else the call) lasts."""
        where = self.where(handle)
        if where == 0:
            keyed = {"request": request} if request is not None else {}
            if split == "train":
                return Service.run_epoch(self, handle, should_stop, held=held, **keyed)
            return Service.run_test(self, handle, should_stop, held)

        def run() -> Metrics:
            with contextlib.ExitStack() as call:
                sink = Sink(held if held is not None else call)
                token = secrets.token_hex(16) if where != ALL else ""
                stopping = watching(self.fabric, token, should_stop) if token else contextlib.nullcontext()
                with stopping:
                    values = self._call("_rank_metrics", ALL, (split, handle, where, sink, token))
            return RankMetrics(values) if where == ALL else values[where]

        return self._keyed("run_epoch", request, run) if split == "train" else run()

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
                    gone = list(self._placements) if purge else [h for h, o in self._owners.items() if o == tenant]
                    copies = sum(1 for h in gone if self._placements.get(h) == ALL) * (self.fabric.world_size - 1)
                    for h in gone:
                        self._forget(h)
                # Each rank counted its copy of a replicated handle: the handle counts once, as in free().
                return int(sum(c for c in counts if isinstance(c, int))) - copies
            by_rank: dict[int, list[str]] = {}
            for h in handles:
                by_rank.setdefault(self.where(h), []).append(h)
            freed = Service.free(self, by_rank.pop(0, []), every) if (0 in by_rank or every) else 0
            if every:  # the session's handles: those beyond rank 0 too
                freed += self._release(self._take_session(CALLER_SESSION.get()))
            for where, group in by_rank.items():
                freed += int(self._call("free", where, (group, False))[0 if where == ALL else where])
                with self._placements_lock:
                    for h in group:
                        self._forget(h)
            return freed

        return self._keyed("free", request, run)  # type: ignore[no-any-return]

    def list_handles(self, all_tenants: bool = False) -> list[tuple[Ref, HandleSummary]]:
        """The caller's handles on every rank, each once (a replicated one with rank 0's figures), rank 0's
        first. Rank 0's store alone left out every object the default placement had put elsewhere
        (found by review). A caller that may not list every tenant is refused here first."""
        self._check()
        listed = Service.list_handles(self, all_tenants)
        seen = {ref.id for ref, _ in listed}
        session = CALLER_SESSION.get()
        for rank, handles in enumerate(self._call("_listed", ALL, (all_tenants,))):
            for ref, summary in handles if rank else []:
                # The other ranks know no sessions (rank 0 keeps their handles' `_sessions_of`): they listed
                # every handle of the caller's tenant, other sessions' too, where one server lists the
                # caller's session's (or, without one, those of no session).
                with self._placements_lock:
                    owner = self._sessions_of.get(ref.id)
                if ref.id not in seen and (all_tenants or owner == session):
                    seen.add(ref.id)
                    listed.append((ref, summary))
        # Etags only for objects on rank 0 alone (`_etag_kept`); the other ranks' versions are their own.
        return [(ref, s if not s.etag or self._etag_kept(ref.id) else replace(s, etag="")) for ref, s in listed]

    def cluster_info(self) -> list[RankInfo]:
        """Each rank's device and what it holds; a caller that does not see server-wide figures gets
        the devices only (the ranks count every tenant's objects)."""
        self._check()
        ranks = [x for x in self._call("_inventory", ALL, ()) if isinstance(x, RankInfo)]
        return ranks if self.sees_server_wide() else [RankInfo(r.rank, r.device, 0, 0) for r in ranks]

    def snapshot(self) -> SnapshotResult:
        """Every rank writes its own snapshot (its --state-dir/rank-N/gen-G); what they wrote together."""
        CALLER.get().require_admin("a snapshot")
        if not self.settings.state_dir:
            raise FailedPrecondition("this server was started without --state-dir; there is nowhere to write a snapshot")
        self._check()
        return self.save_all()

    def save_all(self, copy: bool = True) -> SnapshotResult:
        """Every rank writes the next generation; once all have, each removes the older ones (the
        commit), so the newest generation every rank holds is always a whole cluster snapshot."""
        with self._saving:
            # Expired sessions' handles still queued for the pinging thread first: saved, rank 0 having freed
            # its copies, a restart found them on the other ranks alone and kept them with no session.
            self._release_expired()
            generation = self.generation + 1
            results: list[SnapshotResult] = self._call("_snapshot", ALL, (generation, copy))
            self._call("_commit", ALL, (generation,))
            self.generation = generation
            return self._whole(results)

    def _whole(self, results: list[SnapshotResult]) -> SnapshotResult:
        """The cluster's snapshot as a client sees its objects: the state directory, each handle once (a
        replicated one is saved by every rank), and the tensor bytes every rank wrote. Rank 0's own
        figures undercounted a cluster whose objects mostly live on other ranks."""
        with self._placements_lock:
            replicated = sum(1 for where in self._placements.values() if where == ALL)
        return SnapshotResult(
            os.path.dirname(self.settings.state_dir),  # --state-dir: each rank's is its rank-N below it
            sum(r.handles for r in results) - (len(results) - 1) * replicated,
            sum(r.tensor_bytes for r in results),
            sorted({item for r in results for item in r.skipped}),
        )

    def close_session(self, session: str, *, request: RequestKey | None = None) -> int:
        """End the session on rank 0, then free what it made on the other ranks; how many handles."""
        self._check()

        def run() -> int:
            sid = self._session(session)
            freed = Service.close_session(self, sid)
            return freed + self._release(self._take_session(sid))

        return self._keyed("close_session", request, run)  # type: ignore[no-any-return]

    def shutdown(self, save: bool) -> None:
        """Stop pinging; unless broken, have every rank snapshot (with a state directory) and stop.

        Raises:
            SnapshotError: some rank could not write the shutdown snapshot (every rank stopped all the same).
        """
        self._stop.set()
        self._expiry_due.set()  # wakes the pinging thread
        if self._pinger.is_alive():
            self._pinger.join()
        if self._broken:
            log.warning("cluster broken (%s): no shutdown snapshot, the last complete one stays", self._broken)
            return
        self._release_expired()  # before the snapshot, which would keep them with no session to end them
        failed: WeightavgError | None = None
        if save:
            try:
                self.save_all(copy=False)
            except WeightavgError as exc:  # the ranks still stop: else they waited out the timeout, then failed
                failed = exc
        try:
            self._stop_ranks()
        except WeightavgError as exc:
            log.error("cluster shutdown: %s", exc)
        if failed is not None:  # as on one server: `weightavg serve` says so and exits 1
            raise failed if isinstance(failed, SnapshotError) else SnapshotError(str(failed))

    def _stop_ranks(self) -> None:
        """Tell the other ranks to stop: a broadcast alone, since they leave without answering (sent as a
        command, rank 0 ran '_stop' itself, logging a failure with its traceback, then waited for
        answers that never came and declared the cluster broken on every clean stop)."""
        with self._channel:
            self._check()
            try:
                dist.broadcast_object_list([Command("_stop")], src=0, group=self.fabric.control)
            except Exception as exc:  # noqa: BLE001 - a rank gone: nothing left to stop there
                log.error("cluster shutdown: the stop did not reach every rank: %s", exc)


def _handles_among(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Iterator[str]:
    """The handle IDs among a command's arguments (also inside lists, and an `_across` verb's own)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, str) and _HANDLE.match(value):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _handles_among(value, {})
        elif isinstance(value, dict):
            yield from _handles_among((), value)


def _check_shardable(named: Named, world: int) -> None:
    """Refuse, before any rank loads its block, inputs and targets that some rank's block would refuse:
    a rank left with no rows, or blocks of inputs and targets of different lengths, failed there after
    the other ranks had loaded theirs (found by review: one row over two ranks loaded rank 0's block
    and answered 'rank 1: ... given shape [0, 3]').

    Raises:
        InvalidArgument: a scalar, fewer rows than ranks, or inputs and targets of different row counts.
    """
    if len(named) != 2:
        return  # every rank refuses the count alike, as on one server
    if any(t.dim() == 0 for _, t in named):
        raise InvalidArgument("shard=True splits inputs and targets by their first dimension; give tensors with rows, not scalars")
    rows = [t.shape[0] for _, t in named]
    if rows[0] != rows[1]:
        raise InvalidArgument(
            f"shard=True splits inputs and targets into blocks of rows, one per rank: give them the same number of "
            f"rows (given {rows[0]} and {rows[1]})"
        )
    if rows[0] < world:
        raise InvalidArgument(
            f"shard=True gives each of the {world} ranks a block of rows: give at least {world} rows (given "
            f"{rows[0]}), or load one rank's data with rank="
        )


def _route(name: str) -> Callable[..., Any]:
    base = getattr(Service, name)

    @functools.wraps(base)
    def call(self: ClusterService, *args: Any, **kwargs: Any) -> Any:
        self._check()
        where = self._where_of(list(args) + list(kwargs.values()))
        self._conditional(kwargs.get("etag", ""), where)
        return self._routed(name, args, kwargs, where)

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
