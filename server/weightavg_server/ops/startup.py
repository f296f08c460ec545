"""SIGHUP while `weightavg serve` starts: recorded from its first line on, so that it is kept for when
the server serves rather than ending the process. Torch-free, so it runs before torch loads."""

from __future__ import annotations

import signal

_received = 0


def keep_sighup() -> None:
    """Record SIGHUP from now on; `take_sighups` hands the count to the serve loop.

    SIGHUP's default action ends a process. The server kept one only once `serve()` ran, after
    torch's import (a second or more): a SIGHUP sent right after the start (a tokens file edited
    as the server came up, a supervisor's reload) ended it without a word (found by review)."""
    signal.signal(signal.SIGHUP, _record)


def _record(signum: int, frame: object) -> None:
    global _received
    _received += 1  # only an attribute set: a handler that takes a lock can wait for itself (cli.Signals)


def take_sighups() -> int:
    """SIGHUPs recorded since keep_sighup and not yet taken; taking them resets the count."""
    global _received
    taken, _received = _received, 0
    return taken
