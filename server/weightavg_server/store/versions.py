"""Versions of held objects, read as etags (AIP-154): a client that read an object can make its change
conditional on nobody having changed the object since, and is answered ABORTED otherwise.

A version belongs to a lock group (the objects that share tensors and one lock: a module, the
model and optimizers over it, live views of it), since a change through any of their handles can
change what the others hold. Every change goes through `Registry.mutate`, which gives the group a
new version once the change has run (made or failed: a failed change may have moved a batch
position); a read takes the version under the same lock as the values it returns, so an etag
always stands for the values read with it. Versions come from one counter for the whole server and
carry a tag drawn when the server starts, so an etag never names two states: not those of two
groups, nor a state from before a restart (snapshots restore objects, not their versions).

An etag may change with no visible change of values (a `testrun` moves the test data's batch
position; a loss replaced in a model changes the model's group): it says "possibly changed", never
"unchanged" when something changed.
"""

from __future__ import annotations

import _thread
import itertools
import secrets

from ..domain.errors import Aborted

_CLOCK = itertools.count(1)
"""The next version; next() on it is atomic under the GIL."""
_STARTED = secrets.token_hex(4)
"""This server run's tag, in every etag it gives."""


class GroupLock(_thread.RLock):  # type: ignore[misc]
    """A lock group's re-entrant lock, carrying the group's version."""

    __slots__ = ("version",)

    def __init__(self) -> None:
        super().__init__()
        self.version = next(_CLOCK)


def changed(lock: GroupLock) -> None:
    """The group behind `lock` has (possibly) changed: give it a new version (its lock held)."""
    lock.version = next(_CLOCK)


def etag(lock: GroupLock) -> str:
    """The etag of the group's current state (read with its lock held, beside the values)."""
    return f"{_STARTED}-{lock.version}"


def check(lock: GroupLock, given: str, what: str) -> None:
    """Aborted unless `given` (an etag the client read) is the group's current one; "" checks nothing.

    `what` names the object for the message ("dictionary", "module")."""
    if given and given != etag(lock):
        raise Aborted(
            f"the {what} changed since the etag given was read (given {given!r}, now {etag(lock)!r}): read it "
            "again, with its etag, and make the change from what you read; nothing changed"
        )
