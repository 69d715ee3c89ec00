"""Small engine-free recipes for flow tests: a slice of AlpacaFarm → heuristics → selector."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

# A busy 2-core box can take longer than Prefect's default 20 s to start a temporary server.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

ROOT = Path(__file__).resolve().parents[2]
ALPACA = ROOT / "tests" / "selectors" / "data" / "alpaca_farm_eval_gpt35_100.jsonl"

RecipeFactory = Callable[..., Path]


def tiny_recipe_mapping(
    *, rows: int = 24, part_rows: int = 8, selector: str = "random", **top: Any
) -> dict[str, Any]:
    """24 AlpacaFarm rows in 3 parts, heuristics, then a `random` or `kmeans` selection."""
    stages: list[Any] = [{"heuristics": {"min_prompt_words": 3}}]
    match selector:
        case "random":
            stages.append({"random": {"budget": 6}})
        case "kmeans":
            stages += [{"embed": {"field": "prompt"}}, {"kmeans": {"budget": 6, "k": 3}}]
        case _:
            raise ValueError(selector)
    return {
        "name": "tiny-alpaca",
        "seed": 7,
        "part_rows": part_rows,
        "input": {
            "path": str(ALPACA),
            "mapping": {
                "prompt": "instruction",
                "input": "input",
                "response": "output",
                "model": "generator",
            },
            "limit": rows,
        },
        "stages": stages,
        **top,
    }


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> RecipeFactory:
    """Write a tiny recipe YAML under tmp_path and return its path."""

    def make(name: str = "tiny", **kwargs: Any) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_recipe_mapping(**kwargs), sort_keys=False))
        return path

    return make
