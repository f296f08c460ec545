"""Domain exceptions: each names the gRPC status code it maps to, without importing grpc."""

from __future__ import annotations


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


class PermissionDenied(WeightavgError):
    """The caller's token does not allow the call (a reader changing something, a user asking for
    what only an admin may do)."""

    code = "PERMISSION_DENIED"


class DataLoss(WeightavgError):
    """Uploaded tensor data arrived corrupted: its checksum does not match the sender's."""

    code = "DATA_LOSS"
