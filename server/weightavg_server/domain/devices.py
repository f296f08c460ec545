"""Devices by name: the ones this server has, and the server's own from --device."""

from __future__ import annotations

import torch

from .errors import InvalidArgument


def check(name: str) -> torch.device:
    """The torch device `name` spells, checked to exist on this machine, the index of "cuda" left
    unset. It only counts the CUDA devices, making no CUDA context: under torchrun every rank checks
    --device before it picks its own GPU (one context per rank on GPU 0 otherwise).

    Raises:
        InvalidArgument: not a device name, a type other than cpu and cuda, no CUDA here (saying
            why: a torch built without it, or none visible), or an index past the last device.
    """
    try:
        dev = torch.device(name)
    except RuntimeError:  # torch's message lists every device type it knows, most of which this server refuses
        raise InvalidArgument(f"unknown device '{name}'; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgument(f"device '{name}' requested but this server has no CUDA device ({_no_cuda()}); use cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InvalidArgument(
                f"device '{name}' does not exist: this server has {count} CUDA device(s); use cuda:0 to cuda:{count - 1}"
            )
    elif dev.type != "cpu":
        raise InvalidArgument(f"device '{name}' is not supported; use cpu, cuda or cuda:N")
    return dev


def _no_cuda() -> str:
    """Why torch sees no CUDA device, in words that say where to look."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no device: check the driver "
            "(nvidia-smi) and CUDA_VISIBLE_DEVICES")


def parse(name: str) -> torch.device:
    """A torch device from a user string, checking that it exists on this server, named as its
    tensors' devices are named: "cpu:0" is the CPU, "cuda" the current CUDA device. The store
    reserves by that name, so a spelling the tensors do not use reserved against nothing: moves to
    "cpu:0" went past every byte cap (found by review)."""
    dev = check(name)
    if dev.type == "cpu":
        return torch.device("cpu")
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def server_device(name: str) -> torch.device:
    """The server's device from --device: auto picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return parse(name)


def allocated(device: torch.device) -> int:
    """Bytes torch's allocator has handed out on a CUDA device (0 for the CPU)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
