"""A steady C heap for timing on CPU: glibc's trimming and mmap threshold turned off.

With its defaults, glibc returns large freed blocks to the operating system (a trim of the heap
top, or an ``munmap`` of a block above the mmap threshold) and the next allocation of that size is
faulted back in page by page. When runs alternate in one process, which run pays those faults
depends on what its neighbours freed: on the side-by-side models, 3,000-10,000 minor faults per
batch (about 2 us each) moved between the compared runs and shifted their ratios by up to 10%.
With the heap kept (``mallopt``: no trim, no mmap for blocks below 1 GiB, 64 MiB top pad), no run
faults after warm-up and the ratios compare the work only. Memory figures are unaffected (they
count live tensors, not the heap).
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = ((M_TRIM_THRESHOLD, 1 << 30), (M_MMAP_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))


def keep_heap() -> bool:
    """Apply :data:`SETTINGS` to this process's C allocator; False where it is not glibc's."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(option, value) == 1 for option, value in SETTINGS)


def describe(kept: bool) -> str:
    """The allocator line of the report's machine table."""
    return "glibc, heap kept (no trim, mmap threshold 1 GiB)" if kept else "default"
