"""weightavg: a thin client for the weightavg server (stochastic weight averaging over gRPC)."""

from ._client import Client, Handle, HandleInfo, ModuleRow
from ._errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    WeightavgError,
)

__version__ = "0.1.0"

__all__ = [
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "Handle",
    "HandleInfo",
    "InternalError",
    "InvalidArgumentError",
    "ModuleRow",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "WeightavgError",
    "__version__",
]
