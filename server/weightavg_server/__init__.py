"""weightavg server: PyTorch objects kept under handles, driven over gRPC (see proto/)."""

__version__ = "0.1.0"
