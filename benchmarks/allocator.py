"""A steady C heap for timing on CPU: glibc's trimming and mmap threshold turned off.

With its defaults, glibc returns large freed blocks to the operating system (a trim of the heap
top, or an ``munmap`` of a block above the mmap threshold) and the next allocation of that size is
faulted back in page by page. When runs alternate in one process, which run pays those faults
depends on what its neighbours freed: on the side-by-side models, 3,000-10,000 minor faults per
batch (about 2 us each) moved between the compared runs and shifted their ratios by up to 10%.
With the heap kept (``mallopt``: no trim, no mmap for blocks below 1 GiB or 32 MiB, 64 MiB top
pad), no run faults after warm-up and the ratios compare the work only. Memory figures are
unaffected (they count live tensors, not the heap).
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
#: Per setting, the values tried in order: older glibc versions refuse an mmap threshold above
#: 32 MiB (half their largest heap), which still keeps every block of the benchmarks' models.
SETTINGS = {"trim threshold": (M_TRIM_THRESHOLD, (1 << 30,)),
            "mmap threshold": (M_MMAP_THRESHOLD, (1 << 30, 32 << 20)),
            "top pad": (M_TOP_PAD, (64 << 20,))}


def keep_heap() -> dict[str, int] | None:
    """Apply :data:`SETTINGS` to this process's C allocator (process-wide, for the rest of the run);
    the values it took, or None where the allocator is not glibc's or refused one."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = {}
    for name, (option, values) in SETTINGS.items():
        taken = next((v for v in values if mallopt(option, v) == 1), None)
        if taken is None:
            return None
        applied[name] = taken
    return applied


def describe(applied: dict[str, int] | None) -> str:
    """The allocator line of the report's machine table."""
    if applied is None:
        return "default"
    return "glibc, heap kept: " + ", ".join(f"{name} {value >> 20} MiB" for name, value in applied.items())
