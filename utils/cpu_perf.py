"""CPU speed settings for training and inference processes."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4


def keep_freed_memory_in_heap(top_pad_bytes: int = 256 * 2**20) -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (Linux only).

    Why: glibc serves every allocation above 32 MiB with a fresh ``mmap`` and returns it with
    ``munmap`` when freed, so each new activation tensor of a 3D network (tens to hundreds of MiB)
    costs page faults and kernel zeroing — several passes over memory before the first useful one.
    Serving them from the heap and never trimming it makes a CPU training step of the 3D U²-Net
    about 25 % faster (see docs/performance.md). The process keeps its peak memory until it ends,
    which is what a training or prediction run does anyway.

    Returns:
        True if the setting was applied (glibc found), False otherwise (nothing changed).
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    ok &= mallopt(_M_TOP_PAD, int(top_pad_bytes)) == 1
    return bool(ok)
