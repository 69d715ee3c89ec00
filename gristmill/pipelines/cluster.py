"""The Dask cluster a stage may spread a whole-dataset job over, when the run has one.

On the Dask runner the flow runs each global stage inside `running_on(DaskCluster(addr))`;
`Pipeline.context` then hands the cluster to the stage as `ctx.cluster`, and a stage that
can use it (exact and MinHash dedup) runs as Dask dataframe jobs on that scheduler. Stages
never import the flows: this module is all they see. Elsewhere `ctx.cluster` is None.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DaskCluster:
    """A running Dask scheduler, by address (`tcp://host:8786`)."""

    address: str

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        """A `distributed.Client` on the scheduler for the length of a job.

        Inside a Dask task (a global stage run by the Dask runner) this is the worker's
        client, and the task leaves its thread to the job while it waits.
        """
        from distributed import Client, get_worker, worker_client

        try:
            get_worker()
        except ValueError:  # not inside a worker: connect from here
            with Client(self.address) as client:
                yield client
            return
        with worker_client() as client:
            yield client


_CURRENT: ContextVar[DaskCluster | None] = ContextVar("gristmill_dask_cluster", default=None)


@contextlib.contextmanager
def running_on(cluster: DaskCluster | None) -> Iterator[None]:
    """Stage contexts made inside this block carry `cluster` (None: no cluster)."""
    token = _CURRENT.set(cluster)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_cluster() -> DaskCluster | None:
    """The cluster of the innermost `running_on` block, or None."""
    return _CURRENT.get()
