"""Give the memory a finished stage freed back to the operating system.

A global stage allocates its working set (texts, signatures, an LSH index of small Python
objects, some in reference cycles) and drops it when it returns, but until the cycle
collector runs the objects stay, and glibc's allocator keeps most freed pages for reuse, so
the process stays as large as the stage's peak through every later stage and the run's peak
adds up. `release_freed_memory` collects garbage and asks glibc to return what it can
(`malloc_trim`); elsewhere (no glibc) it only collects. The pipeline calls it after each
global stage's `select` and at the end of each map stage.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, if this process runs on it (it has `malloc_trim`)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """Collect garbage, then return the allocator's free pages to the OS where it can."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
