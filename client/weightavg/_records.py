"""The plain records the client hands out: a handle, a row of a module's table, a live handle's facts.

Frozen dataclasses without behaviour, in a module of their own so that the verbs (`_client`) and the
objects over them (`_objects`) both use them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Handle:
    """A server object: its opaque id and its kind ("module", "dictionary", ...)."""

    id: str
    kind: str

    def __repr__(self) -> str:
        return f"<{self.kind} {self.id}>"


@dataclass(frozen=True)
class ModuleRow:
    """One row of a module's options table."""

    depth: int
    module: str
    name: str
    options: dict[str, Any]


@dataclass(frozen=True)
class HandleInfo:
    """What ListHandles reports for one live handle; `ema` is a moving average's schedule and last
    step (as in size()'s '.ema'), None for other handles."""

    handle: Handle
    device: str
    dtype: str | None
    bytes: int
    tensor_count: int
    ema: dict[str, Any] | None = None
    tenant: str = ""
    """The tenant that owns the handle ("default" on a server without a tokens file)."""
    etag: str = ""
    """The object's etag when it was listed (as Client.etag reads it; "" where the server keeps none)."""


@dataclass(frozen=True)
class SharedRegion:
    """A shared memory region the session has registered, as ListSharedMemory reports it (never its key)."""

    name: str
    byte_size: int
    device: str
    """Where its bytes lie: "cpu" for a /dev/shm region, the CUDA device for a CUDA buffer."""
    locked_for: str
    """The CUDA device a host region's pages are locked for; "" when pageable."""
    usable: bool
    """False once its file was truncated or lost memory: the region refuses copies (register it again)."""


@dataclass(frozen=True)
class Soup:
    """A greedy soup made by Client.soup: the soup's dictionary and every score on the way.

    scores: each ingredient alone, in the order given. order: ingredient indices from best to worst,
    the order they were tried. tried: the score of each soup tried in that order (the first is the
    best ingredient alone). kept: the ingredients in the soup. score: the soup's score.
    """

    soup: Handle
    metric: str
    scores: list[float]
    order: list[int]
    tried: list[float]
    kept: list[int]
    score: float
