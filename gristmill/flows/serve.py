"""`gristmill serve`: serve recipes as Prefect deployments, each on its schedule.

One deployment per recipe file, named after the file (`recipes/magpie.yaml` → `magpie`), of
the `gristmill-recipe` flow. `prefect.serve` registers them with the Prefect server (set
`PREFECT_API_URL`), polls for scheduled or manually triggered runs and runs each in a
subprocess. A run with no `out_dir` gets a fresh folder OUT_ROOT/<recipe>/<time>-<run id>,
so scheduled runs never resume into each other; pass `out_dir` to resume a failed one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gristmill.flows.retry import RetryPolicy
from gristmill.flows.runners import RunnerSpec
from gristmill.flows.schedule import ScheduleSpec, pick_schedule
from gristmill.pipelines.recipe import Recipe

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

FLOW_NAME = "gristmill-recipe"


@dataclass(frozen=True, kw_only=True)
class ServePlan:
    """One recipe to serve: its deployment name, schedule and flow parameters."""

    name: str
    recipe_path: Path
    schedule: ScheduleSpec | None
    parameters: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def describe(self) -> str:
        """One line for the console."""
        when = self.schedule.describe() if self.schedule else "on demand only"
        return f"{FLOW_NAME}/{self.name}: {self.recipe_path} — {when}"


def deployment_name(recipe_path: str | Path) -> str:
    """A recipe file's deployment name: its file name without `.yaml`."""
    return Path(recipe_path).stem


def plan_recipe(
    recipe_path: str | Path,
    *,
    out_root: str | Path = "runs",
    overrides: Sequence[str] = (),
    runner: RunnerSpec | None = None,
    retry: RetryPolicy | None = None,
    cron: str | None = None,
    interval: float | None = None,
    timezone: str | None = None,
) -> ServePlan:
    """Check a recipe (it must load with `overrides`) and plan its deployment."""
    path = Path(recipe_path).resolve()
    recipe = Recipe.from_yaml(path, overrides)
    runner = runner or RunnerSpec()
    retry = retry or RetryPolicy()
    return ServePlan(
        name=deployment_name(path),
        recipe_path=path,
        schedule=pick_schedule(path, cron=cron, interval=interval, timezone=timezone),
        parameters={
            "recipe_path": str(path),
            "out_root": str(Path(out_root).resolve()),
            "overrides": list(overrides),
            "show_progress": False,
            "runner": runner.kind,
            "workers": runner.workers,
            "threads_per_worker": runner.threads_per_worker,
            "address": runner.address,
            "retries": retry.retries,
            "retry_delay_s": retry.delay_s,
        },
        description=f"recipe {recipe.name} ({path.name})",
    )


def to_deployment(plan: ServePlan) -> RunnerDeployment:
    """The Prefect deployment of `recipe_flow` for a plan (module entrypoint, so the
    runner's subprocesses import the installed package)."""
    from prefect.deployments.runner import EntrypointType, RunnerDeployment

    from gristmill.flows.recipe import recipe_flow

    deployment = recipe_flow.to_deployment(
        name=plan.name,
        schedules=[plan.schedule.to_prefect()] if plan.schedule else None,
        parameters=plan.parameters,
        description=plan.description,
        tags=["gristmill"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    if not isinstance(deployment, RunnerDeployment):  # only inside a running event loop
        raise RuntimeError("to_deployment: call from synchronous code, not an event loop")
    return deployment


def serve_plans(plans: Sequence[ServePlan], *, limit: int | None = None) -> None:
    """Register the deployments and run their flow runs until interrupted."""
    from prefect import serve
    from prefect.settings import get_current_settings

    if not plans:
        raise ValueError("serve: give at least one recipe")
    names = [p.name for p in plans]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"serve: two recipes map to the same deployment name(s) {dupes}")
    if not get_current_settings().api.url:
        raise RuntimeError(
            "serve needs a Prefect server, whose scheduler creates the runs: start one with "
            "`prefect server start` and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)"
        )
    serve(*(to_deployment(p) for p in plans), limit=limit)
