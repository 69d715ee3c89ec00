"""Spreading independent pieces of one stage's work over threads, one per CPU.

Polars, Parquet I/O and numpy's array loops release the GIL, so pieces of text work (chunks
of a part's rows) proceed side by side on several cores; the results come back in order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Threads used at most, however many CPUs there are.
MAX_THREADS = 4


def worker_threads() -> int:
    """Threads for CPU work here: one per CPU, at most MAX_THREADS."""
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def thread_map(fn: Callable[[T], R], items: Iterable[T], *, threads: int | None = None) -> list[R]:
    """`[fn(x) for x in items]`, up to `threads` (default `worker_threads()`) at a time."""
    work = list(items)
    count = min(threads or worker_threads(), len(work))
    if count <= 1:
        return [fn(x) for x in work]
    with ThreadPoolExecutor(count, thread_name_prefix="gristmill") as pool:
        return list(pool.map(fn, work))
