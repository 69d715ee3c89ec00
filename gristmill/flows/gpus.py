"""One GPU slice per local Dask worker: which devices each worker process may see.

With `--gpus-per-worker N`, local worker k gets `CUDA_VISIBLE_DEVICES` set to the k-th
group of N visible devices before it builds an engine, so the workers' vLLM engines run
side by side, one per GPU (data parallel across processes). The visible devices are the
parent's `CUDA_VISIBLE_DEVICES` when set, else what `nvidia-smi -L` lists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

PLUGIN_NAME = "gristmill-gpus"


def visible_gpus() -> list[str]:
    """The devices this process may use, as `CUDA_VISIBLE_DEVICES` entries."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [m.group(1) for m in re.finditer(r"^GPU (\d+):", listing, flags=re.MULTILINE)]


def gpu_slices(visible: list[str], workers: int, per_worker: int) -> list[str]:
    """`CUDA_VISIBLE_DEVICES` for each of `workers` workers: consecutive groups of
    `per_worker` devices; an error when there are not enough devices."""
    if per_worker < 1:
        raise ValueError(f"gpus per worker must be >= 1, got {per_worker}")
    need = workers * per_worker
    if len(visible) < need:
        raise ValueError(
            f"{workers} workers × {per_worker} GPUs need {need} GPUs, but "
            f"{len(visible)} are visible ({','.join(visible) or 'none'})"
        )
    return [",".join(visible[k * per_worker : (k + 1) * per_worker]) for k in range(workers)]


class GpuSlice(WorkerPlugin):
    """Sets the worker's `CUDA_VISIBLE_DEVICES` from its name (a LocalCluster numbers its
    workers 0, 1, ...) when it starts, before any task builds an engine."""

    name = PLUGIN_NAME

    def __init__(self, slices: list[str]) -> None:
        self.slices = slices

    def setup(self, worker: Any) -> None:
        """Called by Dask on each worker as the plugin is registered."""
        index = int(worker.name)
        os.environ["CUDA_VISIBLE_DEVICES"] = self.slices[index]
