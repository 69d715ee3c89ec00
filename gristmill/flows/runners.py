"""Which Prefect task runner spreads a recipe's stage parts: threads, Dask or Ray.

Threads (the default) share one engine in the flow's process. Dask and Ray run parts in
worker processes; each worker rebuilds the pipeline and its engine once (both are cached per
process, see `flows.ref` and `engines.factory`) and reuses them for every part it runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from gristmill.pipelines.pipeline import PARTS_IN_FLIGHT

RUNNERS = ("threads", "dask", "ray")

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RunnerSpec:
    """A task-runner choice: kind, local workers and threads, or an existing cluster."""

    kind: str = "threads"
    #: Threads (threads runner) or local worker processes (dask, ray).
    workers: int = 1
    #: Threads inside each Dask worker process; they share that worker's engine.
    threads_per_worker: int = 1
    #: An existing cluster: a Dask scheduler (`tcp://host:8786`) or a Ray address.
    address: str | None = None
    #: Threads runner, recipe not `deterministic`, some map stage calls an LLM: at least this
    #: many parts run at once, so their requests share the engine's continuous batch.
    parts_in_flight: int = PARTS_IN_FLIGHT
    #: Local Dask workers: GPUs each worker process gets (its own CUDA_VISIBLE_DEVICES
    #: slice, see `flows.gpus`); 0 leaves the environment as it is.
    gpus_per_worker: int = 0

    def __post_init__(self) -> None:
        if self.kind not in RUNNERS:
            raise ValueError(f"runner must be one of {list(RUNNERS)}, got {self.kind!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.parts_in_flight < 1:
            raise ValueError(f"parts in flight must be >= 1, got {self.parts_in_flight}")
        if self.threads_per_worker < 1:
            raise ValueError(f"threads per worker must be >= 1, got {self.threads_per_worker}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"gpus per worker must be >= 0, got {self.gpus_per_worker}")
        if self.gpus_per_worker and (self.kind != "dask" or self.address is not None):
            raise ValueError("--gpus-per-worker needs runner 'dask' with local workers")
        if self.kind == "threads" and self.address is not None:
            raise ValueError("a cluster address needs runner 'dask' or 'ray', not 'threads'")

    @property
    def in_flow_process(self) -> bool:
        """Whether tasks run in the flow's own process (so the flow may start the engine)."""
        return self.kind == "threads"

    def describe(self) -> str:
        """One line for logs."""
        match self.kind:
            case "threads":
                return f"threads ({self.workers})"
            case _ if self.address:
                return f"{self.kind} at {self.address}"
            case "dask":
                gpus = f", {self.gpus_per_worker} GPU(s) each" if self.gpus_per_worker else ""
                return (
                    f"dask LocalCluster ({self.workers} workers × "
                    f"{self.threads_per_worker} threads{gpus})"
                )
            case _:
                return f"{self.kind} local ({self.workers} workers)"


def make_task_runner(spec: RunnerSpec, *, api_url: str | None = None) -> TaskRunner[Any]:
    """A fresh, unstarted task runner for `spec`.

    `api_url` is the Prefect API the local workers report task runs to (the flow's own,
    even an ephemeral one, so workers need not start servers of their own).
    """
    match spec.kind:
        case "threads":
            return ThreadPoolTaskRunner(max_workers=spec.workers)
        case "dask":
            return _dask_runner(spec, api_url)
        case "ray":
            return _ray_runner(spec, api_url)
        case _:
            raise ValueError(f"unknown runner {spec.kind!r}; known: {list(RUNNERS)}")


def _dask_runner(spec: RunnerSpec, api_url: str | None) -> TaskRunner[Any]:
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise ImportError(
            "runner 'dask' needs prefect-dask: `pip install prefect-dask` "
            "(it brings dask.distributed)"
        ) from exc
    if spec.address is not None:
        return DaskTaskRunner(address=spec.address)
    return DaskTaskRunner(
        cluster_class=local_cluster,
        cluster_kwargs={
            "n_workers": spec.workers,
            "threads_per_worker": spec.threads_per_worker,
            "processes": True,
            "dashboard_address": None,
            "env": worker_env(api_url),
        },
    )


def prepare_runner(task_runner: TaskRunner[Any], spec: RunnerSpec | None = None) -> None:
    """Set up a started runner: Dask workers get a plugin that closes their engines, and
    with `gpus_per_worker`, one that gives each its own GPUs."""
    if type(task_runner).__name__ != "DaskTaskRunner":
        return
    from gristmill.flows.dask_plugin import EngineShutdown

    client = task_runner.client  # type: ignore[attr-defined]
    client.register_plugin(EngineShutdown())
    if spec is not None and spec.gpus_per_worker:
        from gristmill.flows.gpus import GpuSlice, gpu_slices, visible_gpus

        slices = gpu_slices(visible_gpus(), spec.workers, spec.gpus_per_worker)
        client.register_plugin(GpuSlice(slices))
        log.info("GPUs per Dask worker: %s", dict(enumerate(slices)))


def local_cluster(**kwargs: Any) -> Any:
    """A Dask LocalCluster whose worker processes may start processes of their own.

    Dask makes workers daemonic by default, and a daemonic process cannot have children;
    vLLM's engine core and gristmill's sandbox are child processes, so they are turned off.
    Dask's own INFO chatter (worker start and stop, dozens of lines) is turned down to
    warnings, in the workers too, and its shuffles' start and end notices to errors;
    Prefect's task-run lines still show.
    """
    import dask
    from distributed import LocalCluster

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}))
    environ["DASK_LOGGING__DISTRIBUTED"] = "warning"
    dask.config.set(
        {"distributed.worker.daemon": False, "distributed.nanny.pre-spawn-environ": environ}
    )
    logging.getLogger("distributed").setLevel(logging.WARNING)
    # the scheduler's shuffle plugin warns at every start and end of a shuffle (global dedup
    # on Dask runs a few); the scheduler lives in this process
    logging.getLogger("distributed.shuffle").setLevel(logging.ERROR)
    return LocalCluster(**kwargs)


def worker_env(api_url: str | None) -> dict[str, str]:
    """Environment for local worker processes: the flow's Prefect API, when known."""
    return {"PREFECT_API_URL": api_url} if api_url else {}


def _ray_runner(spec: RunnerSpec, api_url: str | None) -> TaskRunner[Any]:
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:
        raise ImportError(
            "runner 'ray' needs prefect-ray: `pip install prefect-ray` (it brings ray); "
            "see README 'Schedules and scale-out'"
        ) from exc
    if spec.address is not None:
        runner: TaskRunner[Any] = RayTaskRunner(address=spec.address)
        return runner
    init_kwargs: dict[str, Any] = {"num_cpus": spec.workers}
    if api_url:
        init_kwargs["runtime_env"] = {"env_vars": {"PREFECT_API_URL": api_url}}
    local: TaskRunner[Any] = RayTaskRunner(init_kwargs=init_kwargs)
    return local
