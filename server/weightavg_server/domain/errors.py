"""Domain exceptions: each names the gRPC status code it maps to, without importing grpc."""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Iterable


class WeightavgError(Exception):
    """Base of every error the domain raises on purpose; `code` is a grpc.StatusCode name."""

    code = "INTERNAL"


class InvalidArgument(WeightavgError):
    """The request is malformed or does not fit the objects it names (spec, shape, dtype, name)."""

    code = "INVALID_ARGUMENT"


class NotFound(WeightavgError):
    """A handle, key or module path that the request names does not exist."""

    code = "NOT_FOUND"


class FailedPrecondition(WeightavgError):
    """The objects exist but are not in a state that allows the call (e.g. no training data)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(WeightavgError):
    """A configured cap or the device's memory would be exceeded."""

    code = "RESOURCE_EXHAUSTED"


class Cancelled(WeightavgError):
    """The caller went away or its deadline passed; long loops stop between batches."""

    code = "CANCELLED"


class DeadlineExceeded(WeightavgError):
    """The caller's deadline passed while a long loop ran; it stopped between batches."""

    code = "DEADLINE_EXCEEDED"


class Aborted(WeightavgError):
    """A conditional change found its object changed since the client read it (an etag that is no
    longer the object's, AIP-154): read again and retry."""

    code = "ABORTED"


class PermissionDenied(WeightavgError):
    """The caller's token does not allow the call (a reader changing something, a user asking for
    what only an admin may do)."""

    code = "PERMISSION_DENIED"


class DataLoss(WeightavgError):
    """Uploaded tensor data arrived corrupted: its checksum does not match the sender's."""

    code = "DATA_LOSS"


def did_you_mean(given: str, valid: Iterable[str]) -> str:
    """"; did you mean 'x'?" naming the valid names closest to `given` (difflib, at most three),
    or "" when none is close; refusals of unknown names append it.

    Example: did_you_mean("batchnorm", LAYER_TYPES) is
    "; did you mean 'batchnorm1d', 'batchnorm2d' or 'batchnorm3d'?". A valid name that is `given` in
    another Unicode normalization form (a client on another platform or in another language may send
    'é' as e and a combining accent) is named alone, with both spelled out in escapes: otherwise the
    suggestion looks exactly like the name refused.
    """
    names = list(valid)
    twin = next((name for name in names if name != given and _nfc(name) == _nfc(given)), None)
    if twin is not None:
        # "did you mean 'maské'?" for 'maské' read as a wrong suggestion: the two differ only in code points.
        return (
            f"; did you mean '{twin}'? It is the name given in another Unicode normalization form ("
            f"'{_escaped(given)}' given, '{_escaped(twin)}' held): names match code point for code point, never "
            "normalized"
        )
    matches = difflib.get_close_matches(given, names, n=3, cutoff=0.6)
    matches.sort(key=lambda name: (-difflib.SequenceMatcher(None, name, given).ratio(), name))  # ties in order
    close = [f"'{name}'" for name in matches]
    if not close:
        return ""
    return "; did you mean " + (close[0] if len(close) == 1 else ", ".join(close[:-1]) + " or " + close[-1]) + "?"


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _escaped(name: str) -> str:
    """The name with its non-ASCII characters as escapes ('mask\\u00e9'), so that two forms that
    look alike in a message can be told apart."""
    return "".join(c if c.isascii() else f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}" for c in name)


class Unavailable(WeightavgError):
    """The server cannot serve the call now (a rank of its cluster died); retrying later, once the
    cluster has restarted, may succeed."""

    code = "UNAVAILABLE"
