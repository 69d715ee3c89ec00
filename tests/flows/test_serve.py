"""`gristmill serve` planning: deployment names, parameters, schedules, refusals."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from gristmill.cli import main as cli_main
from gristmill.flows.retry import RetryPolicy
from gristmill.flows.runners import RunnerSpec
from gristmill.flows.schedule import ScheduleSpec
from gristmill.flows.serve import plan_recipe, serve_plans, to_deployment
from gristmill.pipelines.recipe import RecipeError

RecipeFactory = Callable[..., Path]


def test_plan_carries_the_run_settings_as_flow_parameters(
    tiny_recipe: RecipeFactory, tmp_path: Path
) -> None:
    path = tiny_recipe("nightly", schedule={"cron": "0 3 * * *"})
    plan = plan_recipe(
        path,
        out_root=tmp_path / "runs",
        overrides=["stages.random.budget=3"],
        runner=RunnerSpec(kind="dask", workers=2),
        retry=RetryPolicy(retries=4, delay_s=1.5),
    )
    assert plan.name == "nightly" and plan.schedule == ScheduleSpec(cron="0 3 * * *")
    assert plan.parameters == {
        "recipe_path": str(path.resolve()),
        "out_root": str((tmp_path / "runs").resolve()),
        "overrides": ["stages.random.budget=3"],
        "show_progress": False,
        "runner": "dask",
        "workers": 2,
        "threads_per_worker": 1,
        "address": None,
        "retries": 4,
        "retry_delay_s": 1.5,
    }
    deployment = to_deployment(plan_recipe(path, interval=600))
    assert deployment.name == "nightly"
    assert deployment.entrypoint == "gristmill.flows.recipe.recipe_flow"
    (schedule,) = deployment.schedules or []
    assert schedule.schedule.interval == datetime.timedelta(seconds=600)  # type: ignore[union-attr]


def test_a_bad_recipe_fails_before_anything_is_served(
    tiny_recipe: RecipeFactory, tmp_path: Path
) -> None:
    with pytest.raises(RecipeError, match="unknown key"):
        plan_recipe(tiny_recipe(), overrides=["stages.random.nope=1"])
    with pytest.raises(RecipeError, match="recipe not found"):
        plan_recipe(tmp_path / "missing.yaml")


def test_serve_refuses_duplicate_names_and_a_missing_server(
    tiny_recipe: RecipeFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tiny_recipe("same")
    second = tmp_path / "other" / "same.yaml"
    second.parent.mkdir()
    second.write_text(first.read_text())
    one, two = plan_recipe(first), plan_recipe(second)
    with pytest.raises(ValueError, match=r"same deployment name\(s\) \['same'\]"):
        serve_plans([one, two])
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert cli_main(["serve", str(tiny_recipe("alone"))]) == 2
    assert "set PREFECT_API_URL" in capsys.readouterr().err
