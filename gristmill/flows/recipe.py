"""The Prefect flow that runs a recipe: a task per map-stage part and per global stage.

Tasks take a `PipelineRef` (the resolved recipe and run folder) and return paths, never
tables; the Parquet checkpoints are the source of truth for resume. Parts run on the task
runner the caller picks (threads, Dask, Ray: see `flows.runners`), and a part that fails
with a transient error is retried with backoff (see `flows.retry`). Runs in Prefect's
ephemeral mode when no server is configured.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run
from tqdm import tqdm

from gristmill.engines.factory import get_engine, is_running
from gristmill.flows.live import engine_tokens, live_counts, live_line
from gristmill.flows.ref import PipelineRef, pipeline_for, planned_stage
from gristmill.flows.retry import RetryPolicy
from gristmill.flows.runners import RunnerSpec, make_task_runner, prepare_runner
from gristmill.pipelines.cluster import DaskCluster, running_on
from gristmill.pipelines.pipeline import Pipeline, PlannedStage, stage_line
from gristmill.pipelines.recipe import Recipe


@task(cache_policy=NO_CACHE)
def split_input(ref: PipelineRef) -> list[str]:
    """Write (or reuse) the input parts."""
    return [str(p) for p in pipeline_for(ref).input_parts()]


@task(cache_policy=NO_CACHE)
def run_map_part(ref: PipelineRef, stage_index: int, part: int, input_path: str) -> str:
    """One part of a map stage; a no-op when its output already exists."""
    planned = planned_stage(ref, stage_index)
    return str(pipeline_for(ref).run_map_part(planned, part, Path(input_path)))


@task(cache_policy=NO_CACHE)
def finish_map_stage(ref: PipelineRef, stage_index: int, seconds: float) -> dict[str, Any]:
    """Write the stage's `_SUCCESS.json` from its part stats."""
    return pipeline_for(ref).finish_map_stage(planned_stage(ref, stage_index), seconds)


@task(cache_policy=NO_CACHE)
def run_global_stage(
    ref: PipelineRef, stage_index: int, dask_address: str | None = None
) -> dict[str, Any]:
    """A whole-dataset stage; with `dask_address`, stages that can spread their work over
    that Dask scheduler (exact and MinHash dedup) do."""
    cluster = DaskCluster(dask_address) if dask_address else None
    with running_on(cluster):
        return pipeline_for(ref).run_global(planned_stage(ref, stage_index))


@task(cache_policy=NO_CACHE)
def write_dataset_task(ref: PipelineRef) -> str:
    """The final dataset folder, card and manifest."""
    return str(pipeline_for(ref).write_dataset())


def run_pipeline(
    ref: PipelineRef,
    runner: RunnerSpec | None = None,
    retry: RetryPolicy | None = None,
) -> str:
    """Drive a pipeline's stages as Prefect tasks (call inside a flow); the dataset folder."""
    runner = runner or RunnerSpec()
    retry = retry or RetryPolicy()
    logger = get_run_logger()
    pipeline = pipeline_for(ref)
    pipeline.check_columns()
    engines = pipeline.engines_to_start()
    if engines:
        where = "the flow's process" if runner.in_flow_process else "each worker process"
        logger.info("engines %s start in %s when their first stage runs", engines, where)
    retrying = retry.task_options()
    split_input.with_options(**retrying)(ref)
    todo = [p for p in pipeline.stages if not pipeline.is_done(p)]
    for planned in pipeline.stages:
        if planned not in todo:
            logger.info(
                "[%02d] %s: finished in an earlier run, skipped", planned.index, planned.name
            )
    if not todo:
        return write_dataset_task(ref)
    runner = _with_parts_in_flight(runner, pipeline)
    logger.info("task runner: %s", runner.describe())
    with make_task_runner(runner, api_url=_api_url()) as task_runner:
        prepare_runner(task_runner, runner)
        for planned in todo:
            _engines_for_stage(ref, task_runner, runner, planned)
            start = time.perf_counter()
            if planned.is_map:
                inputs = pipeline.stage_input_parts(planned)
                futures = [
                    task_runner.submit(
                        run_map_part.with_options(
                            task_run_name=f"{planned.index:02d}-{planned.name}-part-{k:05d}",
                            **retrying,
                        ),
                        {"ref": ref, "stage_index": planned.index, "part": k, "input_path": str(p)},
                    )
                    for k, p in enumerate(inputs)
                ]
                _follow(futures, pipeline, planned, runner)
                failed = [f for f in futures if not f.state.is_completed()]
                if failed:
                    raise RuntimeError(
                        f"stage {planned.name!r}: {len(failed)} of {len(futures)} parts failed; "
                        "finished parts are kept, rerun to redo only the failed ones"
                    ) from _first_exception(failed)
                summary = finish_map_stage(ref, planned.index, time.perf_counter() - start)
            else:
                summary = task_runner.submit(
                    run_global_stage.with_options(
                        task_run_name=f"{planned.index:02d}-{planned.name}", **retrying
                    ),
                    {
                        "ref": ref,
                        "stage_index": planned.index,
                        "dask_address": _dask_address(task_runner),
                    },
                ).result()
            logger.info(stage_line(summary))
        _engines_for_stage(ref, task_runner, runner, None)
    return write_dataset_task(ref)


def _with_parts_in_flight(runner: RunnerSpec, pipeline: Pipeline) -> RunnerSpec:
    """The threads runner widened to `parts_in_flight` threads when a map stage calls an
    LLM in continuous mode: one part's requests alone do not fill the engine's batch."""
    llm_maps = any(p.is_map and p.engines for p in pipeline.stages if not pipeline.is_done(p))
    if runner.kind != "threads" or pipeline.recipe.deterministic or not llm_maps:
        return runner
    return dataclasses.replace(runner, workers=max(runner.workers, runner.parts_in_flight))


def _engines_for_stage(
    ref: PipelineRef, task_runner: Any, runner: RunnerSpec, planned: PlannedStage | None
) -> None:
    """Before a stage (None: after the last): close the engines it does not keep (one model
    resident at a time, unless `resident`) wherever they run; in the flow's process, start
    its own."""
    pipeline = pipeline_for(ref)
    keep = pipeline.engines_to_keep(planned) if planned is not None else ()
    if runner.in_flow_process:
        pipeline.release_engines(keep=keep)
        for name in planned.engines if planned is not None else ():
            pipeline.engine(name)  # started in the flow's thread, before any task uses it
    elif type(task_runner).__name__ == "DaskTaskRunner":
        task_runner.client.run(release_worker_engines, ref, keep)


def _dask_address(task_runner: Any) -> str | None:
    """The scheduler address of a started Dask task runner; None for other runners."""
    if type(task_runner).__name__ != "DaskTaskRunner":
        return None
    return str(task_runner.client.scheduler.address)


def release_worker_engines(ref: PipelineRef, keep: tuple[str, ...]) -> list[str]:
    """On a Dask worker: close the run's engines that the next stage does not use."""
    return pipeline_for(ref).release_engines(keep=keep)


def _follow(
    futures: list[PrefectFuture[Any]], pipeline: Pipeline, planned: PlannedStage, runner: RunnerSpec
) -> None:
    """Wait for a map stage's parts, with a bar of parts and the stage's live line."""
    desc = f"[{planned.index:02d}] {planned.name}"
    bar = tqdm(total=len(futures), desc=desc, unit="part", disable=not pipeline.show_progress)
    engines = [
        get_engine(pipeline.recipe.engines[n])
        for n in planned.engines
        if runner.in_flow_process and is_running(pipeline.recipe.engines[n])
    ]
    inputs = pipeline.stage_input_parts(planned)
    started, tokens = time.perf_counter(), engine_tokens(engines)
    pending = list(futures)
    while pending:
        _done, pending_set = wait(pending, timeout=1.0)
        pending = list(pending_set)
        if not bar.disable:
            if not engines and runner.in_flow_process:  # the first part starts the engine
                engines = [
                    get_engine(pipeline.recipe.engines[n])
                    for n in planned.engines
                    if is_running(pipeline.recipe.engines[n])
                ]
                tokens = engine_tokens(engines)
            counts = live_counts(pipeline.layout, planned.dir, inputs, engines, started, tokens)
            bar.n = len(futures) - len(pending)
            bar.set_postfix_str(live_line(counts))
    bar.n = len(futures)
    bar.refresh()
    bar.close()
    wait(futures)  # each future's final state, for the caller's check


def _first_exception(futures: list[PrefectFuture[Any]]) -> BaseException | None:
    for f in futures:
        try:
            f.result()
        except BaseException as exc:
            return exc
    return None


def _api_url() -> str | None:
    url = get_client(sync_client=True).api_url
    return str(url) if url else None


def scheduled_run_dir(out_root: str | Path, recipe_name: str) -> Path:
    """A fresh folder for a run with no `out_dir`: OUT_ROOT/<recipe>/<scheduled time>-<run id>.

    Scheduled runs each get their own folder; a Prefect retry of the same flow run keeps its
    id and scheduled time, so it lands in the same folder and resumes there.
    """
    when = flow_run.scheduled_start_time or datetime.datetime.now(datetime.UTC)
    stamp = when.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_id = str(flow_run.id or "local")[:8]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", recipe_name).strip("-.") or "recipe"
    return Path(out_root) / safe / f"{stamp}-{run_id}"


@flow(name="gristmill-recipe", log_prints=True)
def recipe_flow(
    recipe_path: str | None = None,
    out_dir: str | None = None,
    overrides: list[str] | None = None,
    show_progress: bool = True,
    out_root: str = "runs",
    runner: str = "threads",
    workers: int = 1,
    threads_per_worker: int = 1,
    address: str | None = None,
    retries: int = 2,
    retry_delay_s: float = 2.0,
    recipe: dict[str, Any] | None = None,
) -> str:
    """Run a recipe into `out_dir` (or a fresh folder under `out_root`); the dataset folder.

    The recipe is the file `recipe_path` with `overrides` (deployments: read when the run
    starts), or `recipe`, a resolved `Recipe.to_dict()` (Python and the CLI; `recipe_path`
    is then provenance only). `runner`/`workers`/`threads_per_worker`/`address` pick the
    task runner; `retries` and `retry_delay_s` set the backoff for parts that fail with a
    transient error.
    """
    if recipe is not None:
        where = recipe_path or "recipe"
        typed = Recipe.from_dict(recipe, where=where, path=recipe_path)
    elif recipe_path is not None:
        typed = Recipe.from_yaml(recipe_path, overrides or [])
    else:
        raise ValueError("recipe_flow needs `recipe_path` or `recipe`")
    run_dir = Path(out_dir) if out_dir else scheduled_run_dir(out_root, typed.name)
    get_run_logger().info("run folder: %s", run_dir)
    watch_prefect_server()
    return run_pipeline(
        PipelineRef.of(typed, run_dir, show_progress=show_progress),
        RunnerSpec(
            kind=runner, workers=workers, threads_per_worker=threads_per_worker, address=address
        ),
        RetryPolicy(retries=retries, delay_s=retry_delay_s),
    )


#: Command line of Prefect's temporary API server, a child of the process that runs a flow
#: when no PREFECT_API_URL names a server.
PREFECT_SERVER_APP = "prefect.server.api.server:create_app"


def watch_prefect_server() -> None:
    """Have Prefect's temporary server killed when this process dies, even by `kill -9`.

    `gristmill run` already watches its whole process tree; a flow run from Python (a
    notebook, `recipe.run`) is in the caller's process, whose other children are the
    caller's, so only the server Prefect started for it is watched. The engines' helpers
    have watchers of their own.
    """
    from gristmill import reaper

    if not reaper.watching_tree():
        reaper.watch_children_matching(PREFECT_SERVER_APP)


def run_recipe(
    recipe: Recipe | str | Path,
    out_dir: str | Path,
    overrides: list[str] | None = None,
    *,
    runner: RunnerSpec | None = None,
    retry: RetryPolicy | None = None,
    workers: int | None = None,
    show_progress: bool = True,
) -> Path:
    """Run a recipe (typed, or a file with `overrides`) through the flow into `out_dir`;
    `workers` alone means that many threads."""
    if runner is not None and workers is not None:
        raise ValueError("give `workers` inside the RunnerSpec, not both")
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_yaml(recipe, overrides or [])
    elif overrides:
        raise ValueError("overrides apply to a recipe file; change a typed recipe directly")
    spec = runner or RunnerSpec(workers=workers or 1)
    policy = retry or RetryPolicy()
    result = recipe_flow(
        recipe.path,
        str(out_dir),
        None,
        show_progress,
        runner=spec.kind,
        workers=spec.workers,
        threads_per_worker=spec.threads_per_worker,
        address=spec.address,
        retries=policy.retries,
        retry_delay_s=policy.delay_s,
        recipe=recipe.to_dict(),
    )
    return Path(result)
