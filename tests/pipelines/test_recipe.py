"""Recipe loading: validation errors name the key, overrides reach any value."""

from __future__ import annotations

from pathlib import Path

import pytest

from gristmill.engines.factory import EngineSpec
from gristmill.filters.heuristics import HeuristicsConfig
from gristmill.pipelines.recipe import RecipeError, apply_overrides, load_recipe
from gristmill.selectors.kmeans import KMeansConfig
from gristmill.synth.magpie import MagpieConfig

ROOT = Path(__file__).resolve().parents[2]


def test_default_recipe_loads_with_typed_configs() -> None:
    recipe = load_recipe(ROOT / "recipes" / "magpie.yaml")
    assert [s.name for s in recipe.stages] == [
        "magpie",
        "heuristics",
        "embed",
        "semantic_dedup",
        "kmeans",
    ]
    assert isinstance(recipe.stages[0].config, MagpieConfig)
    assert recipe.engine == EngineSpec()  # same spec as the test session's shared engine
    assert recipe.input.rows == 240


def test_overrides_reach_stages_input_engine_and_seed() -> None:
    recipe = load_recipe(
        ROOT / "recipes" / "magpie.yaml",
        [
            "stages.kmeans.budget=7",
            "stages.1.max_repetition=0.2",
            "input.rows=12",
            "seed=5",
            "engine.options.max_model_len=1024",
            "stages.magpie.stop_at_newline=false",
        ],
    )
    kmeans = recipe.stages[4].config
    heur = recipe.stages[1].config
    assert isinstance(kmeans, KMeansConfig) and kmeans.budget == 7
    assert isinstance(heur, HeuristicsConfig) and heur.max_repetition == 0.2
    magpie = recipe.stages[0].config
    assert isinstance(magpie, MagpieConfig) and magpie.stop_at_newline is False
    assert recipe.input.rows == 12 and recipe.seed == 5
    assert recipe.engine is not None and dict(recipe.engine.options) == {"max_model_len": 1024}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.kmeans.budgett=3", r"unknown key\(s\) \['budgett'\]"),
        ("stages.kmeans.budget=lots", r"stages\[4\] \(kmeans\)\.budget: 'lots' does not fit"),
        ("stages.nosuch.x=1", r"stage 'nosuch' matches 0 stages"),
        ("stages.magpie.turns=two", r"\.turns: expected an integer"),
        ("novalue", r"expected KEY=VALUE"),
        ("colour=blue", r"unknown top-level key\(s\) \['colour'\]"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(ROOT / "recipes" / "magpie.yaml", [override])


def test_unknown_stage_and_bad_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("input: {rows: 3}\nstages:\n  - nosuch: {}\n")
    with pytest.raises(RecipeError, match="unknown stage 'nosuch'"):
        load_recipe(bad)
    bad.write_text("input: {rows: 3}\nstages: [magpie\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(bad)
    bad.write_text("input: {rows: 3, path: x.jsonl}\nstages: [magpie]\n")
    with pytest.raises(RecipeError, match="exactly one of `path`"):
        load_recipe(bad)


def test_overrides_do_not_mutate_the_input() -> None:
    raw = {"stages": [{"kmeans": {"budget": 3}}], "input": {"rows": 1}}
    out = apply_overrides(raw, ["stages.kmeans.budget=4"], where="t")
    assert raw["stages"][0]["kmeans"]["budget"] == 3
    assert out["stages"][0]["kmeans"]["budget"] == 4


@pytest.mark.parametrize(
    "path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: Path(p).name
)
def test_every_shipped_recipe_validates_and_its_input_exists(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # recipes name their data relative to the repository root
    recipe = load_recipe(path)
    assert recipe.stages
    if recipe.input.path is not None:
        assert Path(recipe.input.path).exists(), recipe.input.path


def test_a_generator_input_is_built_typed_and_deterministic(tmp_path: Path) -> None:
    from gristmill.pipelines.generators import generate_input

    recipe = load_recipe(ROOT / "recipes" / "dart-arith.yaml", ["input.rows=10"])
    assert recipe.input.generator == "arith" and recipe.input.rows == 10
    a = generate_input("arith", rows=10, seed=0, options=(("levels", [1, 2]),))
    b = generate_input("arith", rows=10, seed=0, options=(("levels", [1, 2]),))
    assert a.equals(b) and set(a["level"]) == {1, 2} and a.height == 10
    with pytest.raises(ValueError, match="unknown option"):
        generate_input("arith", rows=3, seed=0, options=(("level", [1]),))
    with pytest.raises(ValueError, match="unknown input generator"):
        generate_input("nope", rows=3, seed=0)
    with pytest.raises(RecipeError, match="needs `rows`"):
        load_recipe(ROOT / "recipes" / "dart-arith.yaml", ["input.rows=null", "input.path=x.jsonl"])
