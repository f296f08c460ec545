"""Helpers for the in-process tests of the store and the service (no gRPC, no sockets).

They look at the store only through what it offers callers (held_bytes, reserve, items), so a
test that uses them checks behaviour, not the ledger's private fields.
"""

from __future__ import annotations

import contextlib
import gc
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch

from weightavg_server.domain import footprint, shm
from weightavg_server.domain.dictionaries import TensorDict
from weightavg_server.domain.errors import ResourceExhausted
from weightavg_server.domain.tensors import Bytes, storage_bytes, storages, tensors_of
from weightavg_server.service import OnHeader, Service, Settings
from weightavg_server.store import accounting
from weightavg_server.store.limits import Limits
from weightavg_server.store.registry import CALLER_SESSION, Kind, Registry


def walked_bytes(store: Registry) -> dict[str, int]:
    """Bytes of distinct storage reachable from every live object, found apart from the ledger."""
    keys = set().union(*(storages(tensors_of(entry.obj)) for _, entry in store.items()))
    return {device: n for device, n in storage_bytes(keys).items() if n}


_NOT_STATE = (
    type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.CodeType,
    str, bytes, int, float, torch.device, torch.dtype, torch.Generator,
)
"""What the reference walk does not go into: code and types (whose globals reach every module's
state), and values that hold no tensor."""


def referenced_tensors(obj: object) -> list[torch.Tensor]:
    """Every tensor that Python references from `obj` keep alive (with each one's `.grad`), found by
    following `gc.get_referents` rather than by asking the object what it holds (`tensors_of`): a
    tensor an object keeps without listing it (a view's gradients, a count no entry holds) shows here
    and not in the store's charge."""
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    stack: list[object] = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, _NOT_STATE):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            found.append(o)
            if o.grad is not None:
                found.append(o.grad)
            continue
        stack.extend(gc.get_referents(o))
    return found


def referenced_bytes(store: Registry) -> dict[str, int]:
    """Bytes of distinct storage that the live objects keep alive through any reference, by device:
    what the store's charge must equal."""
    keys = set().union(*(storages(referenced_tensors(entry.obj)) for _, entry in store.items()))
    return {device: n for device, n in storage_bytes(keys).items() if n}


def fits(store: Registry, nbytes: int = 0, handles: int = 0, device: str = "cpu") -> bool:
    """Whether a reservation of `handles` handles and `nbytes` bytes would be granted now (and
    give it straight back)."""
    try:
        with store.reserve(handles=handles, nbytes={device: nbytes}):
            return True
    except ResourceExhausted:
        return False


def assert_nothing_pending(store: Registry, device: str = "cpu") -> None:
    """The byte cap's whole room above what is held is free: no reservation was left behind."""
    room = store.limits.max_device_bytes - store.held_bytes().get(device, 0)
    assert fits(store, nbytes=room, device=device), "less room than cap - held: bytes still reserved"
    assert not fits(store, nbytes=room + 1, device=device)


def assert_no_handle_pending(store: Registry) -> None:
    """The handle cap's whole room above the live handles is free."""
    room = store.limits.max_handles - len(store)
    assert fits(store, handles=room), "less room than cap - live: handle slots still reserved"
    assert not fits(store, handles=room + 1)


def f32(*shape: int, start: float = 0.0) -> torch.Tensor:
    """A float32 tensor of distinct values, so a wrong copy or average shows."""
    n = 1
    for s in shape:
        n *= s
    return (torch.arange(n, dtype=torch.float32) + start).reshape(shape)


def tensor_dict(**entries: torch.Tensor) -> TensorDict:
    return TensorDict(dict(entries))


State = dict[str, tuple[Kind, list[torch.Tensor], list[str] | None]]


def state_of(store: Registry) -> State:
    """Everything a failed call must not change: the handles, each one's tensors (full copies) and
    a dictionary's keys."""
    return {
        handle: (
            entry.kind,
            [t.detach().clone() for t in tensors_of(entry.obj)],
            list(entry.obj.entries) if entry.kind is Kind.DICTIONARY else None,
        )
        for handle, entry in store.items()
    }


def assert_same_state(before: State, after: State) -> None:
    assert before.keys() == after.keys()
    for handle, (kind, tensors, keys) in before.items():
        kind2, tensors2, keys2 = after[handle]
        assert (kind, keys) == (kind2, keys2), handle
        assert len(tensors) == len(tensors2), handle
        for a, b in zip(tensors, tensors2):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), handle


@contextlib.contextmanager
def caller_session(session: str | None) -> Iterator[None]:
    """Serve the block as a call carrying `session` (what the session interceptor does)."""
    token = CALLER_SESSION.set(session)
    try:
        yield
    finally:
        CALLER_SESSION.reset(token)


class RecordingUpload:
    """An upload as the transport makes one: for each tensor, its header is announced through
    `on_header` and only then is its buffer allocated. Every step is recorded, so a test can see
    the order and that nothing was allocated once a header was refused."""

    def __init__(self, *named: tuple[str, torch.Tensor]) -> None:
        self.named = list(named)
        self.events: list[tuple[str, str]] = []
        self.calls = 0

    def __call__(self, on_header: OnHeader) -> list[tuple[str, torch.Tensor]]:
        self.calls += 1
        received = []
        for name, template in self.named:
            self.events.append(("header", name))
            try:
                on_header(name, template.numel() * template.element_size())
            except BaseException:
                self.events.append(("refused", name))
                raise
            self.events.append(("allocated", name))
            received.append((name, template.clone()))
        return received

    @property
    def allocated(self) -> list[str]:
        return [name for event, name in self.events if event == "allocated"]

    @property
    def refused(self) -> list[str]:
        return [name for event, name in self.events if event == "refused"]


def upload(*named: tuple[str, torch.Tensor]) -> RecordingUpload:
    return RecordingUpload(*named)


def no_upload() -> RecordingUpload:
    return RecordingUpload()


def names(named: Sequence[tuple[str, Any]]) -> list[str]:
    return [name for name, _ in named]


def counted_walks(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> list[set[int]]:
    """The store's recharge walks from now on (a change that replaced a tensor walks; one written in
    place does not): each walk's set of locks, appended as it happens."""
    walks: list[set[int]] = []
    recharge = registry._recharge

    def counted(locks: set[int]) -> None:
        walks.append(locks)
        recharge(locks)

    monkeypatch.setattr(registry, "_recharge", counted)
    return walks


class TensorRegion(shm.Region):
    """A shared memory region over a tensor's bytes (on any device), without /dev/shm: what the
    assembler and the service read; `settled` counts the waits for queued copies."""

    def __init__(self, data: torch.Tensor) -> None:  # no super().__init__: nothing is mapped
        self.data, self.byte_size, self.device, self.settled = data, data.numel(), data.device, 0
        self.address = data.data_ptr()  # the native copy out of a host region reads from here
        self._init_copies()

    def check_size(self) -> None:
        pass

    def bytes_at(self, offset: int, nbytes: int, what: str) -> torch.Tensor:
        return self.data[offset:offset + nbytes]

    def settle(self) -> None:
        self.settled += 1


class CpuPeak(footprint._PeakBytes):
    """`footprint._PeakBytes` of real CPU storages alone (a footprint's own meta passes inside the
    measured call make meta ones)."""

    def _count(self, t: torch.Tensor, given: set[int]) -> None:
        if t.device.type == "cpu":
            super()._count(t, given)


class LedgerPeak:
    """The most the store's ledger was asked to hold at once on the CPU (held, pending reservations
    and the bytes asked for, at every check), from `start()` on: what a call reserved at its widest.
    It wraps `accounting.Ledger.check`, which it calls through unchanged."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.most = 0
        real_check = accounting.Ledger.check

        def check(ledger: accounting.Ledger, live_handles: int, handles: int, nbytes: Bytes,
                  released: Bytes | None = None, released_handles: int = 0) -> None:
            n = nbytes.get("cpu", 0)
            if ledger.tenant is None and n > 0:
                held = ledger.in_use("cpu") - (released or {}).get("cpu", 0)
                self.most = max(self.most, held + n)
            real_check(ledger, live_handles, handles, nbytes, released, released_handles)

        monkeypatch.setattr(accounting.Ledger, "check", check)

    def measure(self, store: Registry, call: Callable[[], object]) -> tuple[int, int]:
        """(bytes reserved at the widest, bytes of CPU storages torch made at the widest) over `call`."""
        before = store.held_bytes().get("cpu", 0)
        self.most = before
        meter = CpuPeak()
        with meter:
            call()
        return self.most - before, meter.peak


def cpu_service(max_device_bytes: int = 10**10) -> Service:
    """A Service on the CPU over a fresh store, with room to spare unless told otherwise."""
    return Service(Registry(Limits(max_device_bytes=max_device_bytes)), Settings(
        device=torch.device("cpu"), max_spec_depth=32, session_lease_seconds=60.0, max_session_lease_seconds=86400.0,
    ))
