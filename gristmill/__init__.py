"""gristmill: synthesize, score and select LLM training data into Parquet datasets.

    import gristmill as gm

    recipe = gm.Recipe(
        name="alpaca-min",
        input=gm.Input(path="data.jsonl", mapping={"prompt": "instruction", "response": "output"}),
        stages=[gm.stages.Heuristics(max_response_words=80), gm.stages.RandomSelect(budget=50)],
    )
    dataset = recipe.run("runs/alpaca-min")

The names below are loaded on first use, so `import gristmill` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "Recipe": "gristmill.pipelines.recipe",
    "Input": "gristmill.pipelines.recipe",
    "Output": "gristmill.pipelines.recipe",
    "RecipeError": "gristmill.pipelines.config",
    "Filter": "gristmill.pipelines.stage",
    "Map": "gristmill.pipelines.stage",
    "Select": "gristmill.pipelines.stage",
    "StageContext": "gristmill.pipelines.stage",
    "ExtraStats": "gristmill.pipelines.stats",
    "TransientError": "gristmill.engines.base",
    "evaluate": "gristmill.evaluation.run",
    "Budget": "gristmill.evaluation.budget",
    "TrainConfig": "gristmill.evaluation.train",
}
#: `gm.Engine` is the engine spec (which backend and model), not a running engine.
_ALIASES = {"Engine": ("gristmill.engines.factory", "EngineSpec")}

if TYPE_CHECKING:
    from gristmill import stages
    from gristmill.engines.base import TransientError
    from gristmill.engines.factory import EngineSpec as Engine
    from gristmill.evaluation.budget import Budget
    from gristmill.evaluation.run import evaluate
    from gristmill.evaluation.train import TrainConfig
    from gristmill.pipelines.config import RecipeError
    from gristmill.pipelines.recipe import Input, Output, Recipe
    from gristmill.pipelines.stage import Filter, Map, Select, StageContext
    from gristmill.pipelines.stats import ExtraStats

__all__ = [
    "Budget",
    "Engine",
    "ExtraStats",
    "Filter",
    "Input",
    "Map",
    "Output",
    "Recipe",
    "RecipeError",
    "Select",
    "StageContext",
    "TrainConfig",
    "TransientError",
    "__version__",
    "evaluate",
    "stages",
]


def __getattr__(name: str) -> Any:
    if name == "stages":
        return importlib.import_module("gristmill.stages")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _ALIASES:
        module, attr = _ALIASES[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'gristmill' has no attribute {name!r}")
