"""The client's exceptions: one per gRPC status code, built once at the boundary from grpc.RpcError."""

from __future__ import annotations

import grpc


class WeightavgError(Exception):
    """A call failed. `code` is the gRPC status name (e.g. "NOT_FOUND"), `message` the server's text."""

    code = "UNKNOWN"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidArgumentError(WeightavgError):
    """The request was malformed or did not fit the objects it named."""

    code = "INVALID_ARGUMENT"


class NotFoundError(WeightavgError):
    """A handle, key or name does not exist (or was freed)."""

    code = "NOT_FOUND"


class FailedPreconditionError(WeightavgError):
    """The objects exist but are not in a state that allows the call."""

    code = "FAILED_PRECONDITION"


class ResourceExhaustedError(WeightavgError):
    """A size cap, a memory limit or the server's capacity was exceeded."""

    code = "RESOURCE_EXHAUSTED"


class UnavailableError(WeightavgError):
    """The server could not be reached or is shutting down."""

    code = "UNAVAILABLE"


class DeadlineExceededError(WeightavgError):
    """The call's deadline passed before it finished."""

    code = "DEADLINE_EXCEEDED"


class CancelledError(WeightavgError):
    """The call was cancelled."""

    code = "CANCELLED"


class UnauthenticatedError(WeightavgError):
    """The server requires credentials that were missing or wrong."""

    code = "UNAUTHENTICATED"


class PermissionDeniedError(WeightavgError):
    """The credentials do not allow this call."""

    code = "PERMISSION_DENIED"


class DataLossError(WeightavgError):
    """Tensor data was lost or corrupted on the way: a checksum did not match, or a declared stream
    carried less than it declared. Nothing was changed on the server; send or fetch again."""

    code = "DATA_LOSS"


class AbortedError(WeightavgError):
    """A change given an etag found its object changed since that etag was read (another client's
    change came first); nothing changed. Read the object again (with its etag) and retry."""

    code = "ABORTED"


class InternalError(WeightavgError):
    """The server failed unexpectedly; its log has the details."""

    code = "INTERNAL"


class UnimplementedError(WeightavgError):
    """The server does not implement this call (an older server?)."""

    code = "UNIMPLEMENTED"


_BY_CODE: dict[str, type[WeightavgError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError, NotFoundError, FailedPreconditionError, ResourceExhaustedError,
        UnavailableError, DeadlineExceededError, CancelledError, UnauthenticatedError,
        PermissionDeniedError, DataLossError, AbortedError, InternalError, UnimplementedError,
    )
}


def from_rpc_error(exc: grpc.RpcError) -> WeightavgError:
    """The weightavg exception for a failed call, chosen by its status code."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    return _BY_CODE.get(name, WeightavgError)(details or "(the server gave no details)", name)
