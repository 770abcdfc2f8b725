"""Choosing the compute device and a batch size that fits it."""

from __future__ import annotations

import os

import torch

from calid.errors import InputError


def resolve_device(name: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this process's CUDA device when there is one, else the CPU; or a named device.

    Asking for a CUDA device that does not exist is an input error (with the
    devices that do exist), not a crash deep inside PyTorch.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InputError("--device", f"{name!r} is not a device name; use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError("--device", f"{name} was asked for but no CUDA device is available; use cpu or auto")
        if device.index is None:  # plain "cuda": this process's GPU (torchrun's LOCAL_RANK, else the first)
            device = torch.device(f"cuda:{local_rank}")
        if device.index is not None and device.index >= count:
            raise InputError("--device", f"{name} does not exist; this machine has cuda:0 .. cuda:{count - 1}")
    elif device.type not in ("cpu", "mps"):
        raise InputError("--device", f"{name} is not supported; use auto, cpu or cuda:N")
    return device


def available_memory_bytes(device: torch.device) -> int:
    """Free memory the computation may use: free GPU memory, or available system RAM."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a modest 4 GiB
        return 4 * 1024**3


def describe_device(device: torch.device) -> str:
    """``cpu (8 threads)`` or ``cuda:0 (NVIDIA H100, 80 GiB)`` for summaries and logs."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"cuda:{index} ({props.name}, {props.total_memory / 1024**3:.0f} GiB)"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'' if threads == 1 else 's'})"
    return str(device)
