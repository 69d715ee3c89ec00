"""Pipeline runner: checkpoints, resume, fingerprints, drops, column checks (no LLM)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import polars as pl
import pytest
import yaml

from gristmill.catalog import query
from gristmill.pipelines.layout import SUCCESS
from gristmill.pipelines.pipeline import Pipeline
from gristmill.pipelines.recipe import Input, Output, Recipe
from gristmill.pipelines.stage import Map, Select, StageConfig, StageContext

CALLS: list[tuple[str, int]] = []


@dataclass(frozen=True, kw_only=True)
class ShoutConfig(StageConfig):
    suffix: str = "!"
    fail_on_part: int = -1
    batch_size: int = 8


class Shout(Map):
    """Appends a suffix to responses; drops rows whose prompt mentions 'drop'."""

    name = "shout"
    Config = ShoutConfig
    unhashed: ClassVar[frozenset[str]] = frozenset({"batch_size", "fail_on_part"})

    def requires(self) -> tuple[str, ...]:
        return ("prompt", "response")

    def produces(self) -> tuple[str, ...]:
        return ("shouted",)

    def process(self, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        assert isinstance(self.config, ShoutConfig)
        CALLS.append((self.name, ctx.part_index))
        if ctx.part_index == self.config.fail_on_part:
            raise RuntimeError("simulated crash")
        return batch.with_columns(
            shouted=pl.col("response") + self.config.suffix,
            drop_reason=pl.when(pl.col("prompt").str.contains("drop"))
            .then(pl.lit("asked_to_drop"))
            .otherwise(pl.lit(None, dtype=pl.String)),
        )


@dataclass(frozen=True, kw_only=True)
class EveryOtherConfig(StageConfig):
    pass


class EveryOther(Select):
    """Keeps even input positions; marks multiples of 3 (odd ones) with a specific reason."""

    name = "every_other"
    Config = EveryOtherConfig

    def select(self, data: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        row = pl.col("_gm_row")
        return data.filter((row % 2 == 0) | (row % 3 == 0)).with_columns(
            drop_reason=pl.when(row % 2 == 1).then(pl.lit("odd_third")).otherwise(None)
        )


def _input(tmp_path: Path, n: int = 20) -> Path:
    path = tmp_path / "in.jsonl"
    rows = [
        {"instruction": f"question {i}" + (" drop" if i % 5 == 0 else ""), "output": f"a{i}"}
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _recipe(path: Path, **shout: object) -> Recipe:
    return Recipe(
        name="t",
        seed=1,
        part_rows=6,
        input=Input(path=str(path), mapping={"prompt": "instruction", "response": "output"}),
        embedder="all-minilm-l6-v2",
        stages=(
            Shout(ShoutConfig(**shout)),  # type: ignore[arg-type]
            EveryOther(EveryOtherConfig()),
        ),
        output=Output(),
    )


def test_run_writes_parts_rejects_stats_and_dataset(tmp_path: Path) -> None:
    pipe = Pipeline(_recipe(_input(tmp_path)), tmp_path / "run", show_progress=False)
    dataset = pipe.run()
    shout, every = pipe.stages
    s1 = json.loads((shout.dir / SUCCESS).read_text())
    assert s1["rows_in"] == 20 and s1["rows_out"] == 16
    assert s1["dropped"] == {"asked_to_drop": 4}
    assert len(s1["parts"]) == 4  # 20 rows in parts of 6
    rejected = pl.read_parquet(shout.dir / "rejected" / "*.parquet")
    assert sorted(rejected["prompt"].to_list()) == sorted(
        f"question {i} drop" for i in (0, 5, 10, 15)
    )
    s2 = json.loads((every.dir / SUCCESS).read_text())
    assert s2["rows_in"] == 16 and s2["rows_out"] == 8
    assert s2["dropped"] == {"not_selected": 5, "odd_third": 3}
    data = pl.read_parquet(dataset / "data" / "*.parquet")
    assert data.height == 8
    assert "_gm_row" not in data.columns and "drop_reason" not in data.columns
    assert data["shouted"].str.ends_with("!").all()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [s["stage"] for s in manifest["stages"]] == ["shout", "every_other"]
    assert manifest["dataset"]["rows"] == 8
    card = (dataset / "README.md").read_text()
    assert card.startswith("---\n") and "num_examples: 8" in card
    front = yaml.safe_load(card.split("---\n")[1])
    features = {f["name"]: f for f in front["dataset_info"]["features"]}
    assert features["messages"]["list"] == [
        {"name": "role", "dtype": "string"},
        {"name": "content", "dtype": "string"},
    ]
    assert features["shouted"]["dtype"] == "string"


def test_resume_skips_finished_parts_and_stages(tmp_path: Path) -> None:
    src = _input(tmp_path)
    run = tmp_path / "run"
    CALLS.clear()
    with pytest.raises(RuntimeError, match="simulated crash"):
        Pipeline(_recipe(src, fail_on_part=2), run, show_progress=False).run()
    assert CALLS == [("shout", 0), ("shout", 1), ("shout", 2)]
    first = Pipeline(_recipe(src), run, show_progress=False)
    assert [p.fingerprint for p in first.stages] == [
        p.fingerprint for p in Pipeline(_recipe(src, fail_on_part=2), run).stages
    ], "unhashed knobs must not change the fingerprint"
    done_before = sorted(p.name for p in first.stages[0].dir.glob("part-*.parquet"))
    assert done_before == ["part-00000.parquet", "part-00001.parquet"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.stages[0].dir.glob("part-*.parquet")}
    CALLS.clear()
    dataset = first.run()
    assert CALLS == [("shout", 2), ("shout", 3)], "finished parts must not be redone"
    for name, mtime in mtimes.items():
        assert (first.stages[0].dir / name).stat().st_mtime_ns == mtime
    clean = Pipeline(_recipe(src), tmp_path / "clean", show_progress=False).run()
    assert pl.read_parquet(dataset / "data" / "*.parquet").equals(
        pl.read_parquet(clean / "data" / "*.parquet")
    )
    CALLS.clear()
    Pipeline(_recipe(src), run, show_progress=False).run()
    assert CALLS == [], "a finished run is not recomputed"


def test_fingerprint_chains_config_changes(tmp_path: Path) -> None:
    src = _input(tmp_path)
    a = Pipeline(_recipe(src), tmp_path / "r")
    b = Pipeline(_recipe(src, suffix="?"), tmp_path / "r")
    assert a.stages[0].fingerprint != b.stages[0].fingerprint
    assert a.stages[1].fingerprint != b.stages[1].fingerprint, "downstream must change too"
    c = Pipeline(_recipe(src, batch_size=99), tmp_path / "r")
    assert [p.fingerprint for p in a.stages] == [p.fingerprint for p in c.stages]


def test_changed_input_file_changes_fingerprint(tmp_path: Path) -> None:
    src = _input(tmp_path)
    before = Pipeline(_recipe(src), tmp_path / "r").input_fingerprint
    src.write_text(src.read_text() + json.dumps({"instruction": "new", "output": "x"}) + "\n")
    assert Pipeline(_recipe(src), tmp_path / "r").input_fingerprint != before


class NeedsScore(Map):
    name = "needs_score"
    Config = EveryOtherConfig

    def requires(self) -> tuple[str, ...]:
        return ("score__quality",)


def test_missing_column_fails_before_any_work(tmp_path: Path) -> None:
    base = _recipe(_input(tmp_path))
    stages = (base.stages[0], NeedsScore(EveryOtherConfig()))
    recipe = dataclasses.replace(base, stages=stages)
    CALLS.clear()
    with pytest.raises(ValueError, match=r"requires column\(s\) \['score__quality'\]"):
        Pipeline(recipe, tmp_path / "run").run()
    assert CALLS == [], "no stage may run before the column check passes"


def test_unhashable_config_is_an_error() -> None:
    @dataclass(frozen=True, kw_only=True)
    class BadConfig(StageConfig):
        thing: object = object()

    class Bad(Map):
        name = "bad"
        Config = BadConfig

    with pytest.raises(TypeError, match="not fingerprintable"):
        Bad().config_for_fingerprint()


def test_bad_input_fails_clearly_and_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"instruction": "q1", "output": "a1"}\n{"instruction": "q2", "output": \n')
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"in\.jsonl.*line 2"):
        Pipeline(_recipe(src), run, show_progress=False).run()
    assert not run.exists() or not any(run.rglob("*.parquet")), "nothing may be half-written"
    src.write_text('{"instruction": 5, "output": "a1"}\n')
    with pytest.raises(ValueError, match=r"line 1.*'prompt'.*instruction"):
        Pipeline(_recipe(src), run, show_progress=False).run()


@pytest.mark.parametrize("fmt", ["records", "messages", "chat_preference"])
def test_a_run_that_keeps_nothing_still_writes_a_loadable_dataset(tmp_path: Path, fmt: str) -> None:
    """Every row dropped: the map stage's parts, the global stage and the dataset keep their
    columns, so the DuckDB catalog reads the empty result like any other."""
    path = tmp_path / "in.jsonl"
    path.write_text(
        "".join(json.dumps({"instruction": f"q{i} drop", "output": "a"}) + "\n" for i in range(8))
    )
    recipe = dataclasses.replace(_recipe(path), output=Output(format=fmt))  # type: ignore[arg-type]
    dataset = Pipeline(recipe, tmp_path / "run", show_progress=False).run()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [s["rows_out"] for s in manifest["stages"]] == [0, 0]
    data = pl.read_parquet(dataset / "data" / "*.parquet")
    assert data.height == 0
    expected = {
        "records": {"id", "messages", "prompt", "response", "shouted"},
        "messages": {"id", "messages"},
        "chat_preference": {"id", "messages", "chosen", "rejected"},
    }[fmt]
    assert expected <= set(data.columns)
    # the card's features are the format's (`datasets` itself refuses to load a split with
    # no rows, so the schema is what a user gets to see)
    front = yaml.safe_load((dataset / "README.md").read_text().split("---\n")[1])
    assert expected <= {f["name"] for f in front["dataset_info"]["features"]}
    _, rows = query(tmp_path / "run", "select count(*), count(id) from dataset")
    assert rows == [(0, 0)]
