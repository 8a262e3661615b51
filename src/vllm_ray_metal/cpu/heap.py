"""Keep freed buffers in the process heap (glibc), so a step's arrays do not page-fault.

MLX's CPU allocator takes each array's buffer from ``malloc`` and gives it back when the
array dies. glibc serves blocks from 128 KiB up (its threshold moves, up to 32 MiB) with
a fresh ``mmap``, and trims freed memory at the heap's top, so the next step's arrays of
the same sizes fault their pages in again (the kernel zeroes every 4 KiB page). A decode
step of several sequences makes hundreds of such arrays (the gathered keys and values
among them). The memory stays with the process as free heap for the next step; arrays
above 32 MiB (weights, KV pools) still get their own mappings.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit
TRIM_THRESHOLD = 512 << 20  # free heap kept before glibc returns memory to the system


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
