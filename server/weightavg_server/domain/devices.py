"""Devices by name: the ones this server has, and the server's own from --device."""

from __future__ import annotations

import torch

from .errors import InvalidArgument


def parse(name: str) -> torch.device:
    """A torch device from a user string, checking that it exists on this server, named as its
    tensors' devices are named: "cpu:0" is the CPU, "cuda" the current CUDA device. The store
    reserves by that name, so a spelling the tensors do not use reserved against nothing: moves to
    "cpu:0" went past every byte cap (found by review)."""
    try:
        dev = torch.device(name)
    except RuntimeError:  # torch's message lists every device type it knows, most of which this server refuses
        raise InvalidArgument(f"unknown device '{name}'; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgument(f"device '{name}' requested but this server has no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgument(f"device '{name}' does not exist: {torch.cuda.device_count()} CUDA device(s)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type == "cpu":
        dev = torch.device("cpu")
    else:
        raise InvalidArgument(f"device '{name}' is not supported; use cpu, cuda or cuda:N")
    return dev


def server_device(name: str) -> torch.device:
    """The server's device from --device: auto picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return parse(name)


def allocated(device: torch.device) -> int:
    """Bytes torch's allocator has handed out on a CUDA device (0 for the CPU)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
