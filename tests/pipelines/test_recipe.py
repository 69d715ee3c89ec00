"""Recipe loading: validation errors name the key, overrides reach any value."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from gristmill.engines.factory import EngineSpec
from gristmill.filters.heuristics import HeuristicsConfig
from gristmill.pipelines.recipe import Recipe, RecipeError, apply_overrides
from gristmill.selectors.kmeans import KMeansConfig
from gristmill.synth.magpie import MagpieConfig

ROOT = Path(__file__).resolve().parents[2]


def test_default_recipe_loads_with_typed_configs() -> None:
    recipe = Recipe.from_yaml(ROOT / "recipes" / "magpie.yaml")
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
    recipe = Recipe.from_yaml(
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
        Recipe.from_yaml(ROOT / "recipes" / "magpie.yaml", [override])


def test_unknown_stage_and_bad_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("input: {rows: 3}\nstages:\n  - nosuch: {}\n")
    with pytest.raises(RecipeError, match="unknown stage 'nosuch'"):
        Recipe.from_yaml(bad)
    bad.write_text("input: {rows: 3}\nstages: [magpie\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        Recipe.from_yaml(bad)
    bad.write_text("input: {rows: 3, path: x.jsonl}\nstages: [magpie]\n")
    with pytest.raises(RecipeError, match="exactly one of `path`"):
        Recipe.from_yaml(bad)


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
    recipe = Recipe.from_yaml(path)
    assert recipe.stages
    if recipe.input.path is not None:
        assert Path(recipe.input.path).exists(), recipe.input.path


def test_a_generator_input_is_built_typed_and_deterministic(tmp_path: Path) -> None:
    from gristmill.pipelines.generators import generate_input

    recipe = Recipe.from_yaml(ROOT / "recipes" / "dart-arith.yaml", ["input.rows=10"])
    assert recipe.input.generator == "arith" and recipe.input.rows == 10
    a = generate_input("arith", rows=10, seed=0, options={"levels": [1, 2]})
    b = generate_input("arith", rows=10, seed=0, options={"levels": [1, 2]})
    assert a.equals(b) and set(a["level"]) == {1, 2} and a.height == 10
    with pytest.raises(ValueError, match="unknown option"):
        generate_input("arith", rows=3, seed=0, options={"level": [1]})
    with pytest.raises(ValueError, match="unknown input generator"):
        generate_input("nope", rows=3, seed=0)
    with pytest.raises(RecipeError, match="needs `rows`"):
        Recipe.from_yaml(
            ROOT / "recipes" / "dart-arith.yaml", ["input.rows=null", "input.path=x.jsonl"]
        )


SHIPPED = sorted((ROOT / "recipes").glob("*.yaml")) + sorted(
    (ROOT / "tests" / "data").glob("*.yaml")
)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: Path(p).name)
def test_yaml_to_dict_and_back_round_trips_exactly(path: Path) -> None:
    recipe = Recipe.from_yaml(path)
    data = recipe.to_dict()
    assert list(data) == [
        "name",
        "seed",
        "part_rows",
        "deterministic",
        "input",
        "engines",
        "embedder",
        "stages",
        "output",
    ]
    again = Recipe(**data)
    assert again == recipe and again.to_dict() == data
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    for entry, stage in zip(data["stages"], recipe.stages, strict=True):
        ((key, config),) = entry.items()
        assert key == stage.name  # built-ins by name
        assert set(config) == {f.name for f in dataclasses.fields(stage.config)}, (
            "to_dict writes every config field, defaults included"
        )


def test_python_recipe_has_defaults_and_records_its_config() -> None:
    import gristmill as gm

    recipe = gm.Recipe(stages=[gm.stages.Heuristics(max_response_words=80)])
    assert (recipe.name, recipe.seed, recipe.part_rows, recipe.engine) == ("recipe", 0, 64, None)
    assert recipe.input == gm.Input(rows=100) and recipe.output == gm.Output()
    stage_cfg = recipe.to_dict()["stages"][0]["heuristics"]
    assert stage_cfg["max_response_words"] == 80 and stage_cfg["drop_echo"] is True
    engine = gm.Engine(model="m", options={"max_model_len": 512})
    assert engine == EngineSpec(model="m", options=(("max_model_len", 512),))
    with pytest.raises(RecipeError, match="stages"):
        gm.Recipe(stages=[])
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['max_words'\]; valid keys:"):
        gm.stages.Heuristics(max_words=3)


def test_checking_recipes_loads_no_model_library() -> None:
    """Loading, planning and column-checking every shipped recipe imports no torch, faiss,
    sentence-transformers, transformers or vLLM: those load when a stage runs."""
    code = textwrap.dedent(
        f"""
        import os, sys, tempfile
        os.chdir({str(ROOT)!r})
        import gristmill as gm
        from gristmill.pipelines.pipeline import Pipeline
        for path in {[str(p) for p in SHIPPED]!r}:
            recipe = gm.Recipe.from_yaml(path)
            Pipeline(recipe, tempfile.mkdtemp()).check_columns()
        heavy = ("torch", "faiss", "sentence_transformers", "transformers", "vllm")
        print(sorted(m for m in heavy if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_readme_stage_table_is_the_generated_one() -> None:
    from gristmill.stages import stage_table

    readme = (ROOT / "README.md").read_text()
    assert stage_table() in readme, "regenerate it: gristmill stages --markdown"


def test_citations_come_from_the_stage_classes() -> None:
    from gristmill.stages import BUILTIN

    cited = {cls.name for cls in BUILTIN if cls.citation}
    assert {"magpie", "dart", "clear", "grape", "s2l", "kmeans", "hint_infer"} <= cited
