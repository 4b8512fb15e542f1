"""Keep freed host memory for reuse instead of handing it back to the kernel after every tensor.

Why: glibc's ``malloc`` maps an allocation above its threshold (128 KiB at first, raised to the size of
the largest freed mapping, at most 32 MiB) with ``mmap`` and unmaps it on free, and it hands the top
of its heap back once 2x that threshold is free there. An image pipeline allocates and frees tensors
of 5-30 MB (a preprocessed image, a batch's mask) many times a second; each one is then mapped anew
and every page of it faults on first touch, which on the 2-core bench machine cost more than the copy
that filled it (``bench/pipeline_efficiency.py``: about a third of the CPU time beside a 30 img/s
device went to the kernel). A worker process calls :func:`keep_freed_memory` once at start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
"""Allocations up to this size come from the heap (glibc's largest allowed value on 64-bit)."""
TRIM_THRESHOLD = 256 * 2**20
"""Free memory kept at the top of a heap before it is handed back: a few batches' worth."""


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Serve allocations up to ``mmap_threshold`` from the heap and keep up to ``trim_threshold`` bytes
    freed there. The process's resident memory then stays near its peak instead of following each
    batch. Returns False where the C library has no ``mallopt`` (not glibc) or refused a value."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        log.info("no mallopt in this C library: freed memory is handled by its defaults")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    if not done:
        log.warning("mallopt refused mmap threshold %d / trim threshold %d", mmap_threshold, trim_threshold)
    return done
