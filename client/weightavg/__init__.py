"""weightavg: a thin client for the weightavg server (stochastic weight averaging over gRPC)."""

from ._averagers import HierarchicalAverager, PeriodicAverager
from ._client import Client
from ._objects import Dictionary, Module, Remote
from ._records import Handle, HandleInfo, ModuleRow, SharedRegion, Soup
from ._retry import RetryPolicy
from ._errors import (
    AbortedError,
    CancelledError,
    DataLossError,
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
    "AbortedError",
    "CancelledError",
    "Client",
    "DataLossError",
    "DeadlineExceededError",
    "Dictionary",
    "FailedPreconditionError",
    "Handle",
    "HandleInfo",
    "HierarchicalAverager",
    "InternalError",
    "InvalidArgumentError",
    "Module",
    "ModuleRow",
    "NotFoundError",
    "PeriodicAverager",
    "PermissionDeniedError",
    "Remote",
    "ResourceExhaustedError",
    "RetryPolicy",
    "SharedRegion",
    "Soup",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "WeightavgError",
    "__version__",
]
