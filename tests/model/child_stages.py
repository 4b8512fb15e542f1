"""Preprocessing functions for the tests of preprocessing in processes, in a module of their own.

A child process imports the module of the function it is sent; this one imports torch only (which the
fork server has already), so a fresh child runs its first item at once, not after importing the tests.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def in_child(item: tuple[float, int]) -> tuple[torch.Tensor, tuple[float, int]]:
    """The Recorder's tensor, made wherever this runs; the meta says where (value, process id)."""
    value, side = item
    return torch.full((1, 1, side, side), float(value)), (value, os.getpid())


class Stall:
    """:func:`in_child`, except that an item of negative value hangs (a stuck decoder) after writing the
    process id to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, item: tuple[float, int]) -> tuple[torch.Tensor, tuple[float, int]]:
        if item[0] < 0:
            Path(self.path).write_text(str(os.getpid()))
            time.sleep(120)
        return in_child(item)


def with_nice_value(item: tuple[float, int]) -> tuple[torch.Tensor, tuple[float, int]]:
    """:func:`in_child`, the meta giving the nice value of the thread that ran it instead of its process."""
    tensor, (value, _) = in_child(item)
    return tensor, (value, os.getpriority(os.PRIO_PROCESS, 0))
