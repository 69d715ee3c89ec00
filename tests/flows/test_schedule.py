"""Recipe and command-line schedules, and recipes carrying a `schedule:` key."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

import pytest

from gristmill.flows.ref import PipelineRef, pipeline_for
from gristmill.flows.schedule import ScheduleSpec, pick_schedule, recipe_schedule
from gristmill.pipelines.recipe import Recipe, RecipeError

RecipeFactory = Callable[..., Path]


def test_cron_and_interval_become_prefect_schedules() -> None:
    cron = ScheduleSpec(cron="0 3 * * *", timezone="Europe/Berlin").to_prefect()
    assert cron.cron == "0 3 * * *" and cron.timezone == "Europe/Berlin"
    every = ScheduleSpec(interval=90).to_prefect()
    assert every.interval == datetime.timedelta(seconds=90) and every.timezone == "UTC"
    assert ScheduleSpec(interval=90).describe() == "every 90s (UTC)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"cron": "0 3 * * *", "interval": 60}, "exactly one"),
        ({"interval": 0}, "> 0"),
        ({"cron": "61 3 * * *"}, "cron"),
        ({"interval": 60, "timezone": "Mars/Olympus"}, "IANA"),
    ],
)
def test_bad_schedules_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScheduleSpec(**kwargs)  # type: ignore[arg-type]


def test_recipe_schedule_and_command_line_precedence(tiny_recipe: RecipeFactory) -> None:
    own = tiny_recipe(schedule={"cron": "30 2 * * *", "timezone": "Asia/Tokyo"})
    assert recipe_schedule(own) == ScheduleSpec(cron="30 2 * * *", timezone="Asia/Tokyo")
    assert pick_schedule(own, interval=600) == ScheduleSpec(interval=600)
    assert pick_schedule(own, timezone="UTC") == ScheduleSpec(cron="30 2 * * *")
    plain = tiny_recipe("plain")
    assert recipe_schedule(plain) is None and pick_schedule(plain) is None
    assert pick_schedule(plain, cron="*/5 * * * *") == ScheduleSpec(cron="*/5 * * * *")


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("daily", "must be a mapping"),
        ({"every": 5}, r"unknown key\(s\) \['every'\]"),
        ({"interval": "1h"}, "interval must be seconds"),
        ({"cron": 5}, "cron must be a string"),
    ],
)
def test_bad_recipe_schedule_names_the_file(
    tiny_recipe: RecipeFactory, schedule: object, message: str
) -> None:
    path = tiny_recipe(schedule=schedule)
    with pytest.raises(RecipeError, match=message) as info:
        recipe_schedule(path)
    assert str(path) in str(info.value)


def test_recipe_with_schedule_loads_and_rebuilds_from_its_ref(
    tiny_recipe: RecipeFactory, tmp_path: Path
) -> None:
    path = tiny_recipe(schedule={"interval": 3600})
    recipe = Recipe.from_yaml(path, ["stages.random.budget=4"])
    assert recipe.name == "tiny-alpaca" and "schedule" not in recipe.to_dict()
    ref = PipelineRef.of(recipe, tmp_path / "run")
    pipeline = pipeline_for(ref)
    assert pipeline is pipeline_for(PipelineRef.of(recipe, tmp_path / "run")), "one per process"
    assert pipeline.stages[-1].stage.config.budget == 4  # type: ignore[attr-defined]
    plain = pipeline_for(PipelineRef.of(Recipe.from_yaml(path), tmp_path / "run"))
    assert plain is not pipeline
    assert plain.stages[0].fingerprint == pipeline.stages[0].fingerprint
    assert plain.stages[1].fingerprint != pipeline.stages[1].fingerprint, "override applied"
