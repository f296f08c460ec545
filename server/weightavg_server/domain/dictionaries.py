"""Dictionaries of named tensors: plain copies, or live views onto a module's own tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import flat
from .ema import EmaState
from .errors import InvalidArgument, NotFound, did_you_mean

COUNT_KEY = ".n"
"""The running average's sample count; '.' cannot start a parameter name, so it never clashes."""


class Count:
    """A running average's own '.n' tensor (0-dim float64 on the CPU) and a numpy view of its memory.

    The count is read and written through the view: one Python step each, where `item()` and
    `fill_` are torch calls of 2-4 us (and release the GIL) on every small average.
    """

    __slots__ = ("tensor", "_view")

    def __init__(self, value: float) -> None:
        self.tensor = torch.tensor(value, dtype=torch.float64)
        self._view = self.tensor.numpy()

    @property
    def value(self) -> float:
        return float(self._view)

    def set(self, value: float) -> None:
        """Write the count into the tensor's memory, as `fill_` would."""
        self._view[()] = value


@dataclass
class TensorDict:
    """Named tensors. A live dictionary's tensors are a module's own: updates copy into them in place.

    A dictionary that holds an exponential moving average also keeps its schedule and last step
    (`ema`, set by its first EMA update); a running average (SWA) keeps its count as the '.n' entry.
    """

    entries: dict[str, torch.Tensor] = field(default_factory=dict)
    live: bool = False
    ema: EmaState | None = None
    version: int = field(default=0, compare=False, repr=False)
    """Bumped by every change to which tensors the entries are (`changed`); not by in-place writes."""
    plans: dict[object, object] = field(default_factory=dict, compare=False, repr=False)
    """Checked averaging plans with a source, valid while neither side's tensors change (`averaging`),
    and the last merge plan made with this dictionary first (`merging.plan`)."""
    own_count: Count | None = field(default=None, compare=False, repr=False)
    """The '.n' a running average made for this dictionary (`averaging.apply`): while its tensor is
    still the entry, later averages write the count into it in place rather than replacing it, so
    the change reaches no new storage. A '.n' set from outside (an upload) is replaced by the first
    average, never written, since its memory may be shared with the bytes it came from. A snapshot
    restores an average's own count as a new one (`store.snapshot.load_dictionary`)."""

    def changed(self) -> None:
        """Record that entries were added, removed or replaced: every cached plan is stale, and an
        own count that is no longer the '.n' entry (deleted, or replaced by an upload) is let go.

        Kept, that count's tensor stayed alive with no entry reaching it, so the store, which charges
        what the entries reach, held it uncharged until the dictionary was freed (found by review:
        8 bytes per dictionary, but memory the caps did not see all the same).
        """
        self.version += 1
        self.plans.clear()
        if self.own_count is not None and self.entries.get(COUNT_KEY) is not self.own_count.tensor:
            self.own_count = None


def check_copyable(target: torch.Tensor, source: torch.Tensor) -> None:
    """Raise InvalidArgument with PyTorch's own message unless target.copy_(source) would succeed
    (and keep every value: a complex source into a real target is refused too).

    The check runs the real op on meta tensors, so shapes and dtypes are judged exactly as PyTorch
    judges them, without touching any data. Tensors of one shape skip it: copy_ converts any dtype
    the wire carries into any other, on any device, so the trial could only pass, and it cost 7 us a
    tensor (a load of 800 tensors spent most of its time there).
    """
    if source.is_complex() and not target.is_complex():
        # copy_ would keep the real part and only warn, in the server's log (found by review)
        raise InvalidArgument("a complex value cannot go into a real tensor: its imaginary part would be lost")
    if target.shape == source.shape:
        return
    try:
        torch.empty_like(target, device="meta").copy_(torch.empty_like(source, device="meta"))
    except RuntimeError as exc:
        raise InvalidArgument(str(exc).split("\n")[0]) from None


def does_not_fit(reason: str, target: str, a: torch.Tensor, b: torch.Tensor, value: str) -> InvalidArgument:
    """The one wording, in every verb, of a value that does not fit one of a module's tensors: PyTorch's
    reason (its "tensor a" is the module's, "tensor b" the value), both shapes, and that nothing changed.

    Example: "The size of tensor a (4) must match the size of tensor b (3) at non-singleton dimension
    1 (a: parameter 'weight', shape [2, 4]; b: the dictionary's 'weight', shape [2, 3]); nothing changed".
    """
    return InvalidArgument(
        f"{reason} (a: {target}, shape {list(a.shape)}; b: {value}, shape {list(b.shape)}); nothing changed"
    )


def placement(name: str, device: torch.device) -> torch.device:
    """Where a new entry lives: the count stays on the CPU (read without a device sync), others on device."""
    return torch.device("cpu") if name == COUNT_KEY else device


def place(name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A new entry's tensor on its device (see placement)."""
    return tensor if name == COUNT_KEY else tensor.to(device)


def set_entries(d: TensorDict, values: list[tuple[str, torch.Tensor]], device: torch.device) -> list[str]:
    """Set entries all or nothing: a live view copies in place, a plain dictionary replaces entries."""
    names = [name for name, _ in values]
    seen: set[str] = set()
    for name in names:
        if not name:
            raise InvalidArgument("dictionary keys must not be empty")
        if name in seen:  # the answer listed it twice and the first value was lost
            raise InvalidArgument(f"'{name}' is given twice; send each entry once per call")
        seen.add(name)
    if d.live:
        for name, value in values:
            if name not in d.entries:
                raise NotFound(f"'{name}' is not a tensor of the module this view shows; nothing set")
            try:
                check_copyable(d.entries[name], value)
            except InvalidArgument as exc:
                raise does_not_fit(str(exc), f"the module's '{name}'", d.entries[name], value, f"the value for '{name}'") from None
        with torch.no_grad():
            for name, value in values:
                d.entries[name].copy_(value)
        return names
    placed = [(name, place(name, value, device)) for name, value in values]
    for name, value in placed:
        d.entries[name] = value
    d.changed()
    return names


def delete_entries(d: TensorDict, names: list[str]) -> None:
    """Remove keys all or nothing; a live view's keys belong to its module and cannot be removed."""
    if d.live:
        raise InvalidArgument("cannot delete entries of a live view of a module's tensors")
    for name in names:
        if name not in d.entries:
            raise NotFound(f"dictionary has no entry '{name}'; nothing deleted{did_you_mean(name, d.entries)}")
    for name in dict.fromkeys(names):
        del d.entries[name]
    d.changed()


def select(d: TensorDict, names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """The named entries in request order, or every entry when names is empty."""
    if not names:
        return list(d.entries.items())
    for name in names:
        if name not in d.entries:
            raise NotFound(f"dictionary has no entry '{name}'{did_you_mean(name, d.entries)}")
    return [(name, d.entries[name]) for name in names]


def sizes(d: TensorDict) -> list[tuple[str, tuple[int, ...]]]:
    """Each entry's shape, in dictionary order."""
    return [(name, tuple(t.shape)) for name, t in d.entries.items()]


def converts(t: torch.Tensor) -> bool:
    """Which entries a move with a dtype converts: the floating-point ones."""
    return t.is_floating_point()


def move(d: TensorDict, device: torch.device | None, dtype: torch.dtype | None) -> None:
    """Move every entry (the count stays a CPU float64) and convert floating entries to dtype.

    Every entry is converted before any is replaced, so running out of memory changes nothing.
    Entries that change are copied back to back into one new buffer per device and dtype (see
    `flat`), so a moved dictionary averages as fast as a fresh copy; the others stay as they are.
    """
    if d.live:
        raise InvalidArgument("a live view moves with its module: move the module instead")

    def target(t: torch.Tensor) -> tuple[torch.device, torch.dtype]:
        return (device if device is not None else t.device, dtype if dtype is not None and converts(t) else t.dtype)

    changing = [(name, t) for name, t in d.entries.items() if name != COUNT_KEY and target(t) != (t.device, t.dtype)]
    if not changing:
        return
    copies = flat.flat_copies([t for _, t in changing], target)
    d.entries.update(zip([name for name, _ in changing], copies))
    d.changed()
