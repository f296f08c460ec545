"""weightavg server: PyTorch objects kept under handles, driven over gRPC (see proto/)."""

from .ops.openmp import bound_idle_spin

__version__ = "0.1.0"

bound_idle_spin()  # before any module here imports torch: libgomp reads it once, at load
