"""Device and precision choice, in one place so detector and embedder agree."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks the first CUDA GPU when there is one, else the CPU; anything else is explicit."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return device


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which ``taskset`` and containers narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed precision for ``bf16``/``fp16``; ``fp32`` runs as is. fp16 is refused on the CPU."""
    if precision == "fp32":
        yield
        return
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of fp32, bf16, fp16; got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 is for GPUs; use bf16 on the CPU")
    with torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision]):
        yield
