"""The catalog across runs: `gristmill query "SQL"` over every run under a root folder.

Real runs of the engine-free recipe tests/data/select_alpaca.yaml (AlpacaFarm answers →
heuristics → embed → semantic dedup → k-means) with two seeds and budgets, an unfinished
run, and two small runs of a test stage that derives rows from rows (parent_id lineage).
The README's "Querying runs" queries are run here and must print what the README shows.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from gristmill.catalog import find_runs, query, query_runs, run_view_names
from gristmill.cli import main as cli_main
from gristmill.pipelines.pipeline import Pipeline
from gristmill.pipelines.recipe import Input, Output, Recipe
from gristmill.pipelines.stage import Map, StageConfig, StageContext
from gristmill.records import make_record, records_frame

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "tests" / "data" / "select_alpaca.yaml"
ALPACA = REPO / "tests" / "selectors" / "data" / "alpaca_farm_eval_gpt35_100.jsonl"
README = REPO / "README.md"
#: The second run of the README: another seed, a smaller budget, a stricter length bound.
S1 = ["seed=1", "stages.kmeans.budget=20", "stages.heuristics.max_response_words=80"]


def make_run(out: Path, overrides: list[str] | None = None) -> Path:
    """Run the engine-free recipe into `out` (what `gristmill run` does, minus Prefect)."""
    recipe = Recipe.from_yaml(RECIPE, [f"input.path={ALPACA}", *(overrides or [])])
    return Pipeline(recipe, out, show_progress=False).run(lambda _: None)


@dataclass(frozen=True, kw_only=True)
class VariantsConfig(StageConfig):
    copies: int = 2
    as_text: bool = False


class Variants(Map):
    """Test stage: derives `copies` records from every row, each with parent_id = the row."""

    name = "variants"
    Config = VariantsConfig

    def process(self, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        cfg = self.config
        assert isinstance(cfg, VariantsConfig)
        rows = [
            make_record(
                [
                    {"role": "user", "content": f"{row['prompt']} (variant {k})"},
                    {"role": "assistant", "content": str(row["response"])},
                ],
                source="variants",
                parent_id=row["id"],
                variant=str(k) if cfg.as_text else k,
            )
            for row in batch.iter_rows(named=True)
            for k in range(cfg.copies)
        ]
        variant_type = pl.String() if cfg.as_text else pl.Int64()
        return records_frame(rows, {"variant": variant_type})


def variants_run(out: Path, *, as_text: bool) -> Path:
    """Input (4 AlpacaFarm rows) → 2 variants each → 1 variant of each variant."""
    recipe = Recipe(
        name="variants",
        seed=0,
        part_rows=4,
        input=Input(
            path=str(ALPACA),
            mapping={"prompt": "instruction", "response": "output", "input": "input"},
            limit=4,
        ),
        embedder="all-minilm-l6-v2",
        stages=(
            Variants(VariantsConfig(copies=2, as_text=as_text)),
            Variants(VariantsConfig(copies=1, as_text=as_text)),
        ),
        output=Output(),
    )
    return Pipeline(recipe, out, show_progress=False).run(lambda _: None)


@pytest.fixture(scope="module")
def readme_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exactly the two runs the README's queries were made on."""
    root = tmp_path_factory.mktemp("readme") / "runs"
    make_run(root / "alpaca-s0")
    make_run(root / "alpaca-s1", S1)
    return root


@pytest.fixture(scope="module")
def root(readme_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's runs (linked), an unfinished run in a subfolder, two lineage runs."""
    root = tmp_path_factory.mktemp("many") / "runs"
    root.mkdir()
    for name in ("alpaca-s0", "alpaca-s1"):
        (root / name).symlink_to(readme_root / name, target_is_directory=True)
    partial = Pipeline(
        Recipe.from_yaml(RECIPE, [f"input.path={ALPACA}", "seed=2"]),
        root / "exp" / "partial",
        show_progress=False,
    )
    first = partial.stages[0]
    for k, path in enumerate(partial.stage_input_parts(first)):
        partial.run_map_part(first, k, path)
    partial.finish_map_stage(first, 0.5)
    variants_run(root / "variants-int", as_text=False)
    variants_run(root / "variants-text", as_text=True)
    (root / "notes").mkdir()  # a folder that is no run is ignored
    return root


def _manifest(run: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run / "manifest.json").read_text())
    return data


def readme_queries() -> list[tuple[str, str]]:
    """(command, printed output) pairs of the README's "Querying runs" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Querying runs", 1)[1].split("\n## ", 1)[0]
    pairs = re.findall(r"```shell\n(gristmill query .+?)\n```\n+```text\n(.*?)```", section, re.S)
    return [(cmd, out) for cmd, out in pairs]


def test_readme_queries_print_what_the_readme_shows(
    readme_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = readme_queries()
    assert len(pairs) == 3, "the README shows three queries with their output"
    monkeypatch.chdir(readme_root.parent)  # the README runs them from the folder holding runs/
    monkeypatch.delenv("GRISTMILL_RUNS", raising=False)
    for command, expected in pairs:
        argv = shlex.split(command)
        assert argv[0] == "gristmill"
        assert cli_main(argv[1:]) == 0, command
        assert capsys.readouterr().out == expected, f"README output of: {command}"


def test_runs_table_has_one_row_per_run(root: Path) -> None:
    cols, rows = query_runs(
        root,
        "select run, status, recipe, seed, input_rows, rows, stages, models, started_at, "
        "finished_at, wall_seconds, stage_seconds, fingerprint from runs order by run",
    )
    got = {r[0]: dict(zip(cols, r, strict=True)) for r in rows}
    assert list(got) == ["alpaca_s0", "alpaca_s1", "exp_partial", "variants_int", "variants_text"]
    for name, seed in (("alpaca_s0", 0), ("alpaca_s1", 1)):
        m = _manifest(root / name.replace("_", "-"))
        row = got[name]
        assert row["status"] == "finished" and row["recipe"] == "select-alpaca"
        assert row["seed"] == seed == m["seed"]
        assert row["input_rows"] == m["input"]["rows"] == 100
        assert row["rows"] == m["dataset"]["rows"] and row["stages"] == 4
        assert row["fingerprint"] == m["dataset"]["fingerprint"]
        assert row["models"] == ["all-minilm-l6-v2"]
        assert row["started_at"] <= row["finished_at"]
        assert row["wall_seconds"] == (row["finished_at"] - row["started_at"]).total_seconds()
        assert row["stage_seconds"] == pytest.approx(
            sum(s["seconds"] for s in m["stages"]), abs=1e-3
        )
    assert (got["alpaca_s0"]["rows"], got["alpaca_s1"]["rows"]) == (40, 20)
    partial = got["exp_partial"]
    assert partial["status"] == "unfinished" and partial["rows"] is None
    assert partial["recipe"] is None and partial["stages"] == 1
    assert partial["input_rows"] == 100 and partial["stage_seconds"] == 0.5


def test_stage_stats_and_stage_views_per_run(root: Path) -> None:
    _, rows = query_runs(
        root, "select run, index, stage, view, rows_out, drops from stage_stats order by 1, 2"
    )
    assert [(r[0], r[2]) for r in rows if r[0].startswith("alpaca_s1")] == [
        ("alpaca_s1", "heuristics"),
        ("alpaca_s1", "embed"),
        ("alpaca_s1", "semantic_dedup"),
        ("alpaca_s1", "kmeans"),
    ]
    assert [r[2] for r in rows if r[0] == "exp_partial"] == ["heuristics"]
    for run, index, _, view, rows_out, drops in rows:
        if not run.startswith("alpaca"):
            continue
        stage = _manifest(root / run.replace("_", "-"))["stages"][index - 1]
        assert rows_out == stage["rows_out"] and json.loads(drops) == stage["dropped"]
        assert query_runs(root, f"select count(*) from {view}")[1][0][0] == rows_out
        if stage["dropped"]:
            _, by_reason = query_runs(
                root, f"select drop_reason, count(*) from {view}_rejected group by 1"
            )
            assert dict(by_reason) == stage["dropped"]


def test_dataset_views_and_their_union(root: Path) -> None:
    for name in ("alpaca_s0", "alpaca_s1"):
        folder = root / name.replace("_", "-")
        direct = pl.read_parquet(folder / "dataset" / "data" / "*.parquet")
        _, rows = query_runs(root, f"select id from {name} order by id")
        assert [r[0] for r in rows] == sorted(direct["id"].to_list())
    _, rows = query_runs(root, "select run, count(*) from datasets group by 1 order by 1")
    assert rows == [
        ("alpaca_s0", 40),
        ("alpaca_s1", 20),
        ("variants_int", 8),
        ("variants_text", 8),
    ]
    # `variant` is an integer in one run and text in the other: the union casts it to text
    _, rows = query_runs(
        root,
        "select run, typeof(variant), count(distinct variant) from datasets "
        "where variant is not null group by all order by 1",
    )
    assert rows == [("variants_int", "VARCHAR", 1), ("variants_text", "VARCHAR", 1)]
    _, rows = query_runs(
        root, "select count(*) from datasets where run like 'alpaca%' and variant is not null"
    )
    assert rows == [(0,)]
    assert query_runs(
        root, "select count(*) from information_schema.tables where table_name = 'exp_partial'"
    )[1] == [(0,)], "no dataset yet"


def test_records_cover_every_step_of_every_run(root: Path) -> None:
    _, rows = query_runs(
        root,
        "select stage_index, stage, kept, count(*) from records where run = 'alpaca_s1' "
        "group by all order by 1, 3",
    )
    stages = _manifest(root / "alpaca-s1")["stages"]
    expected = [(0, "input", True, 100)]
    for s in stages:
        if s["dropped"]:
            expected.append((s["index"], s["stage"], False, sum(s["dropped"].values())))
        expected.append((s["index"], s["stage"], True, s["rows_out"]))
    assert rows == expected
    _, rows = query_runs(
        root, "select stage, kept, count(*) from records where run = 'exp_partial' group by all"
    )
    assert sum(n for _, _, n in rows) == 100 + 100, "input rows plus heuristics kept + dropped"


def test_lineage_follows_parent_ids_back_to_the_input(root: Path) -> None:
    run = root / "variants-int"
    data = pl.read_parquet(run / "dataset" / "data" / "*.parquet")
    inputs = pl.read_parquet(next(run.glob("00_input-*")) / "*.parquet")
    first = pl.read_parquet(next(run.glob("01_variants-*")) / "*.parquet")
    _, rows = query_runs(
        root,
        "select id, depth, ancestor_id, ancestor_stage_index, ancestor_stage, ancestor_prompt "
        "from lineage where run = 'variants_int' and id in (select id from variants_int) "
        "order by id, depth",
    )
    assert len(rows) == 3 * data.height, "each dataset row: itself, its parent, the input row"
    parent_of = dict(zip(first["id"], first["parent_id"], strict=True))
    input_prompt = dict(zip(inputs["id"], inputs["prompt"], strict=True))
    for row in data.iter_rows(named=True):
        chain = [r for r in rows if r[0] == row["id"]]
        assert [(r[1], r[3], r[4]) for r in chain] == [
            (0, 2, "variants"),
            (1, 1, "variants"),
            (2, 0, "input"),
        ]
        assert chain[1][2] == row["parent_id"]
        assert chain[2][2] == parent_of[row["parent_id"]]
        assert chain[2][5] == input_prompt[chain[2][2]]
        assert row["prompt"] in {f"{chain[2][5]} (variant {k}) (variant 0)" for k in (0, 1)}
    # the alpaca rows keep their input id through every stage: created by the input
    _, rows = query_runs(
        root,
        "select o.stage, count(*) from alpaca_s0 d join origins o on o.run = 'alpaca_s0' "
        "and o.id = d.id group by 1",
    )
    assert rows == [("input", 40)]


def test_run_view_names() -> None:
    names = ["runs", "1st", "a-b", "A_b", "a_b_2", "x/y", "lineage"]
    assert run_view_names(names) == [
        "run_runs",
        "run_1st",
        "a_b",
        "A_b_2",
        "a_b_2_2",
        "x_y",
        "run_lineage",
    ]


def test_find_runs_skips_non_runs_and_reads_a_run_given_as_root(root: Path) -> None:
    found = find_runs(root)
    assert sorted(found) == [
        "alpaca-s0",
        "alpaca-s1",
        "exp/partial",
        "variants-int",
        "variants-text",
    ]
    assert found["exp/partial"].manifest is None
    assert [s.name for s in found["exp/partial"].stages] == ["heuristics"]
    assert list(find_runs(root / "alpaca-s0")) == ["alpaca-s0"]


def test_cli_root_env_run_and_errors(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GRISTMILL_RUNS", str(root))
    assert cli_main(["query", "--format", "csv", "select count(*) as n from runs"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "5"]
    # --run keeps its one-run views
    assert (
        cli_main(["query", "--run", str(root / "alpaca-s0"), "select count(*) from dataset"]) == 0
    )
    assert "40" in capsys.readouterr().out
    assert cli_main(["query", "--run", "x", "--root", "y", "select 1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli_main(["query", "--root", str(root / "nope"), "select 1"]) == 2
    assert "runs root not found" in capsys.readouterr().err
    assert cli_main(["query", "select nope from runs"]) == 2
    assert "query failed" in capsys.readouterr().err


def test_one_run_catalog_is_unchanged(root: Path) -> None:
    cols, rows = query(root / "alpaca-s0", "select * from stage_stats order by index")
    assert cols == [
        "index",
        "stage",
        "view",
        "fingerprint",
        "rows_in",
        "rows_out",
        "dropped",
        "drops",
        "seconds",
        "engine_calls",
        "output_tokens",
        "output_tokens_per_s",
        "model",
    ]
    assert [r[2] for r in rows] == ["heuristics", "embed", "semantic_dedup", "kmeans"]
