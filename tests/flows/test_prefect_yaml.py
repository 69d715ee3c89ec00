"""prefect.yaml: every deployment points at a real flow, a real recipe and a valid schedule."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import Flow

from gristmill.flows.schedule import ScheduleSpec
from gristmill.pipelines.recipe import Recipe

ROOT = Path(__file__).resolve().parents[2]
CONFIG = yaml.safe_load((ROOT / "prefect.yaml").read_text())
DEPLOYMENTS: list[dict[str, Any]] = CONFIG["deployments"]
RECIPES = ("magpie", "dart-arith", "start-math", "select-sft")


def test_every_ready_made_recipe_has_a_deployment() -> None:
    assert [d["name"] for d in DEPLOYMENTS] == list(RECIPES)
    assert CONFIG["build"] is None and CONFIG["push"] is None
    assert "pull" not in CONFIG, "prefect deploy records the working directory itself"


@pytest.mark.parametrize("spec", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_deployment_is_runnable(spec: dict[str, Any]) -> None:
    path, _, attr = spec["entrypoint"].partition(":")
    assert (ROOT / path).is_file()
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, attr)
    assert isinstance(flow, Flow) and flow.name == "gristmill-recipe"

    params = spec["parameters"]
    signature = inspect.signature(flow.fn)
    assert set(params) <= set(signature.parameters), "only parameters the flow takes"
    signature.bind(**params)  # and every required one
    flow.validate_parameters(params)

    recipe = ROOT / params["recipe_path"]
    assert recipe.is_file(), f"{spec['name']}: recipe {params['recipe_path']} is missing"
    assert recipe.stem == spec["name"], "deployment named after its recipe, as in `serve`"
    Recipe.from_yaml(recipe, params.get("overrides") or [])

    (schedule,) = spec["schedules"]
    assert schedule["active"] is True
    ScheduleSpec(cron=schedule.get("cron"), interval=schedule.get("interval"), timezone="UTC")
    assert spec["work_pool"]["name"] == "gristmill-process"
