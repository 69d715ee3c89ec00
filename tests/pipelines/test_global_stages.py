"""Global stages read only their columns and are joined back part by part: same outputs as
running `select` on the whole input with every column (no LLM; GRAPE on a scripted engine).

The oracle is the stage's own `select` over the whole input, every column, assembled into kept
and rejected rows as the pipeline did before it read columns selectively (`whole_input_run`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from gristmill.engines.base import Messages
from gristmill.engines.factory import EngineSpec
from gristmill.filters.embed import embedding_series
from gristmill.pipelines.checkpoint import read_json, read_parts
from gristmill.pipelines.layout import RunLayout
from gristmill.pipelines.pipeline import Pipeline, PlannedStage
from gristmill.pipelines.recipe import Input, Output, Recipe
from gristmill.pipelines.stage import ROW_COLUMN, Map, Select, StageContext
from gristmill.records import DROP_REASON, trainer_frame
from gristmill.stages import (
    ExactDedup,
    GrapeSelect,
    KMeansSelect,
    MinHashDedup,
    RandomSelect,
    SemanticDedup,
    TopKSelect,
)

TESTS = Path(__file__).resolve().parents[1]
GSM8K = TESTS / "filters" / "data" / "gsm8k_train_20_119.jsonl"
SELF_INSTRUCT = TESTS / "selectors" / "data" / "self_instruct_user_oriented_20x8.jsonl"
#: Stats that time the work: they differ between any two runs.
TIMINGS = frozenset({"minhash_seconds", "lsh_seconds"})


def whole_input_run(
    stage: Select, inputs: Sequence[Path], ctx: StageContext
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Kept and rejected rows as the pipeline made them before selective reads: `select` on
    every column of the whole input, the rest not selected, both sorted by input position."""
    indexed = read_parts(inputs).with_row_index(ROW_COLUMN)
    chosen = stage.select(indexed, ctx)
    if DROP_REASON in chosen.columns:
        specific = chosen.filter(pl.col(DROP_REASON).is_not_null())
        kept = chosen.filter(pl.col(DROP_REASON).is_null()).drop(DROP_REASON)
    else:
        kept, specific = chosen, chosen.head(0)
    decided = pl.concat([kept.select(ROW_COLUMN), specific.select(ROW_COLUMN)])
    unselected = indexed.join(decided, on=ROW_COLUMN, how="anti").with_columns(
        pl.lit("not_selected").alias(DROP_REASON)
    )
    rejected = pl.concat([specific, unselected], how="diagonal_relaxed").sort(ROW_COLUMN)
    return kept.sort(ROW_COLUMN).drop(ROW_COLUMN), rejected.drop(ROW_COLUMN)


def input_parts(pipe: Pipeline, planned: PlannedStage) -> list[Path]:
    return pipe.stage_input_parts(planned)


def check_against_whole_input(pipe: Pipeline) -> list[str]:
    """Every global stage's parts, rejected rows and stats equal the whole-input oracle's;
    the names of the stages checked."""
    checked = []
    for planned in pipe.stages:
        stage = planned.stage
        if not isinstance(stage, Select):
            continue
        ctx = pipe.context(planned)
        kept, rejected = whole_input_run(stage, input_parts(pipe, planned), ctx)
        success = read_json(RunLayout.success(planned.dir))
        parts = [planned.dir / p for p in success["parts"]]
        sizes = [pl.read_parquet(p).height for p in parts]
        step = pipe.recipe.part_rows
        assert sizes == [min(step, kept.height - i) for i in range(0, max(kept.height, 1), step)]
        assert_frame_equal(read_parts(parts), kept)
        written = RunLayout.rejected_parts(planned.dir)
        if rejected.height:
            assert_frame_equal(read_parts(written), rejected)
        else:
            assert written == []
        assert success["rows_out"] == kept.height
        counts = rejected.group_by(DROP_REASON).len() if rejected.height else None
        assert success["dropped"] == ({} if counts is None else dict(counts.iter_rows()))
        ours = {k: v for k, v in success["extra"].items() if k not in TIMINGS}
        assert ours == json.loads(
            json.dumps({k: v for k, v in ctx.extra_stats.items() if k not in TIMINGS})
        )
        checked.append(planned.name)
    return checked


def vector(key: str, dim: int = 16) -> np.ndarray:
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).normal(size=dim)


class Decorate(Map):
    """An embedding (a vector per question opening, so copies land next to each other), a
    quality score, and a `note` column that is all null, of type Null, in part 0 only: the
    parts then have different schemas."""

    name = "decorate"

    def produces(self) -> tuple[str, ...]:
        return ("embedding", "score__quality", "note")

    def process(self, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        prompts = batch.get_column("prompt").to_list()
        vectors = np.stack([vector(p[:40].lower()) + 0.01 * vector(p) for p in prompts]).astype(
            np.float32
        )
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        scores = [int(hashlib.sha256(p.encode()).hexdigest()[:6], 16) / 2**24 for p in prompts]
        note = pl.lit(None) if ctx.part_index == 0 else pl.lit("noted")
        return batch.with_columns(
            embedding_series("embedding", vectors),
            pl.Series("score__quality", scores, dtype=pl.Float64),
            note.alias("note"),
        )


def gsm8k_with_copies(tmp_path: Path) -> Path:
    """The 100 committed GSM8K problems with exact copies (upper case, extra spaces) and near
    copies (one word changed) planted among them."""
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    out = list(rows)
    for k in range(0, 60, 6):
        src = rows[k]
        words = src["question"].split(" ")
        words[len(words) // 2] = "exactly"
        out.insert(len(out) // 2 + k, {**src, "question": src["question"].upper()})
        out.append({**src, "question": " ".join(words)})
        out.append({**src, "question": "  " + src["question"].replace(" ", "  ")})
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def test_builtin_global_stages_match_the_whole_input_oracle(tmp_path: Path) -> None:
    recipe = Recipe(
        name="global",
        seed=3,
        part_rows=16,
        input=Input(
            path=gsm8k_with_copies(tmp_path), mapping={"prompt": "question", "response": "answer"}
        ),
        stages=(
            Decorate(),
            ExactDedup(),
            MinHashDedup(threshold=0.7),
            SemanticDedup(threshold=0.05),
            KMeansSelect(budget=70, weighting="quality", score_column="score__quality", seed=1),
            TopKSelect(budget=50, score_column="score__quality"),
            RandomSelect(budget=0.8),
        ),
    )
    pipe = Pipeline(recipe, tmp_path / "run", show_progress=False)
    pipe.run()
    assert all(p.stage.reads() is not None for p in pipe.stages if isinstance(p.stage, Select))
    assert check_against_whole_input(pipe) == [
        "exact_dedup",
        "minhash_dedup",
        "semantic_dedup",
        "kmeans",
        "topk",
        "random",
    ]
    assert not any((p.dir / "state").exists() for p in pipe.stages)  # scratch files removed
    first = {p.name: read_json(RunLayout.success(p.dir)) for p in pipe.stages}
    # every kind of drop happened, on input whose parts have different schemas
    assert first["exact_dedup"]["dropped"] == {"exact_duplicate": 20}
    assert first["minhash_dedup"]["dropped"] == {"near_duplicate": 10}
    assert first["kmeans"]["dropped"] == {"not_selected": first["kmeans"]["rows_in"] - 70}
    schemas = {
        str(pl.read_parquet_schema(p)["note"]) for p in pipe.stages[0].dir.glob("part-*.parquet")
    }
    assert schemas == {"Null", "String"}
    final = pl.read_parquet(RunLayout(pipe.run_dir).dataset_data / "*.parquet")
    assert final.columns[-6:] == [
        "note",
        "duplicate_of",
        "duplicate_jaccard",
        "min_neighbor_distance",
        "repeat_count",
        "cluster",
    ]


@dataclass
class CharEngine:
    """Scripted GRAPE target: a token is a character, its log-prob looked up by letter."""

    model_id: str = "chars"
    calls: list[int] = field(default_factory=list)

    @property
    def chat_template(self) -> str | None:
        return "[chars]"

    def count_tokens(self, text: str) -> int:
        return len(text)

    def chat_prompt(self, messages: Messages, *, add_generation_prompt: bool = True) -> str:
        text = "".join(f"[{m['role']}]{m['content']}" for m in messages)
        return text + ("[assistant]\n" if add_generation_prompt else "")

    def prompt_logprobs(self, texts: Sequence[str]) -> list[list[float | None]]:
        self.calls.append(len(texts))
        scale = {c: -0.1 * (1 + i % 7) for i, c in enumerate("etaoinshrdlucmfwyp")}
        return [[None] + [scale.get(c, -1.0) for c in t[1:]] for t in texts]


def test_grape_matches_the_oracle_on_self_instruct_candidates(tmp_path: Path) -> None:
    mapping = {
        "prompt": "instruction",
        "input": "input",
        "response": "response",
        "model": "generator",
        "parent_id": "task_id",
    }
    recipe = Recipe(
        name="grape",
        part_rows=24,
        input=Input(path=SELF_INSTRUCT, mapping=mapping),
        engines={"default": EngineSpec(model="scripted-chars")},
        stages=(GrapeSelect(keep=2),),
    )
    pipe = Pipeline(recipe, tmp_path / "run", show_progress=False)
    engine = CharEngine()
    pipe.engine = lambda name: engine  # type: ignore[assignment,method-assign,return-value]
    pipe.run()
    assert engine.calls  # scored through the scripted engine
    assert check_against_whole_input(pipe) == ["grape"]
    success = read_json(RunLayout.success(pipe.stages[0].dir))
    assert success["dropped"] == {"no_response": 3, "not_best": 117}


class Reorder(Select):
    """A user stage that declares no reads: keeps every third row, reversed column order,
    one column dropped and one rewritten. Its result is written as it is."""

    name = "reorder"

    def select(self, data: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        kept = data.filter(pl.col(ROW_COLUMN) % 3 == 0).drop("prompt_chars")
        return kept.select(reversed(kept.columns)).with_columns(
            pl.col("response").str.to_uppercase()
        )


class PromptLength(Select):
    """A stage that reads only `prompt`: keeps short prompts, adds their length, and gives
    long ones a reason of its own."""

    name = "prompt_length"
    seen: ClassVar[list[list[str]]] = []

    def reads(self) -> tuple[str, ...]:
        return ("prompt",)

    def produces(self) -> tuple[str, ...]:
        return ("prompt_chars",)

    def select(self, data: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        self.seen.append(data.columns)
        chars = pl.col("prompt").str.len_chars()
        return data.filter(pl.col(ROW_COLUMN) % 4 != 1).with_columns(
            chars.alias("prompt_chars"),
            pl.when(chars > 200).then(pl.lit("long")).otherwise(None).alias(DROP_REASON),
        )


def test_user_stages_with_and_without_reads(tmp_path: Path) -> None:
    recipe = Recipe(
        name="user",
        part_rows=7,
        input=Input(path=GSM8K, mapping={"prompt": "question", "response": "answer"}),
        stages=(PromptLength(), Reorder()),
        output=Output(shard_rows=5),
    )
    PromptLength.seen.clear()
    pipe = Pipeline(recipe, tmp_path / "run", show_progress=False)
    pipe.run()
    assert PromptLength.seen == [[ROW_COLUMN, "prompt"]]
    assert check_against_whole_input(pipe) == ["prompt_length", "reorder"]
    length, reorder = (read_json(RunLayout.success(p.dir)) for p in pipe.stages)
    assert set(length["dropped"]) == {"long", "not_selected"}
    kept = read_parts(pipe.final_parts())
    assert kept.columns[:2] == ["model", "parent_id"] and "prompt_chars" not in kept.columns
    assert kept.get_column("response").str.to_uppercase().equals(kept.get_column("response"))
    assert reorder["rows_out"] == kept.height


def test_dataset_shards_stream_the_final_parts(tmp_path: Path) -> None:
    recipe = Recipe(
        name="shards",
        part_rows=7,
        input=Input(path=GSM8K, mapping={"prompt": "question", "response": "answer"}),
        stages=(Decorate(), RandomSelect(budget=0.5)),
        output=Output(shard_rows=9, format="records", drop_columns=("embedding", "note")),
    )
    pipe = Pipeline(recipe, tmp_path / "run", show_progress=False)
    dataset = pipe.run()
    whole = read_parts(pipe.final_parts()).drop("embedding", "note")
    files = sorted((dataset / "data").glob("*.parquet"))
    assert [f.name for f in files] == [f"train-{k:05d}-of-00006.parquet" for k in range(6)]
    assert [pl.read_parquet(f).height for f in files] == [9] * 5 + [5]
    assert_frame_equal(pl.concat([pl.read_parquet(f) for f in files]), whole)
    manifest = read_json(pipe.layout.manifest)
    assert manifest["dataset"]["rows"] == 50 and manifest["dataset"]["columns"] == whole.columns

    sft = dataclasses.replace(recipe, output=Output(shard_rows=20, format="messages"))
    pipe = Pipeline(sft, tmp_path / "run", show_progress=False)
    dataset = pipe.run()
    files = sorted((dataset / "data").glob("*.parquet"))
    assert [pl.read_parquet(f).height for f in files] == [20, 20, 10]
    expected = trainer_frame(read_parts(pipe.final_parts()), "messages")
    assert_frame_equal(pl.concat([pl.read_parquet(f) for f in files]), expected)


class Invent(Select):
    """A broken stage: it renumbers the rows."""

    name = "invent"

    def reads(self) -> tuple[str, ...]:
        return ()

    def select(self, data: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        return data.with_columns(pl.col(ROW_COLUMN) + 1000)


def test_a_stage_that_renumbers_rows_is_an_error(tmp_path: Path) -> None:
    recipe = Recipe(
        name="bad",
        input=Input(path=GSM8K, mapping={"prompt": "question", "response": "answer"}),
        stages=(Invent(),),
    )
    with pytest.raises(RuntimeError, match="not positions of its 100 input rows"):
        Pipeline(recipe, tmp_path / "run", show_progress=False).run()


class DropThirds(Map):
    """Drops every third row of each part, so the parts a global stage reads differ in size."""

    name = "drop_thirds"

    def process(self, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        third = pl.int_range(pl.len()) % 3 == 2
        return batch.with_columns(
            pl.when(third).then(pl.lit("third")).otherwise(None).cast(pl.String).alias(DROP_REASON)
        )


class Witness(Select):
    """Records what `select` is handed (its type, row positions and prompts); keeps all."""

    name = "witness"
    seen: ClassVar[list[pl.DataFrame]] = []

    def select(self, data: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        self.seen.append(data)
        return data


def test_select_gets_the_whole_input_collected_and_in_input_order(tmp_path: Path) -> None:
    recipe = Recipe(
        name="order",
        part_rows=7,
        input=Input(path=GSM8K, mapping={"prompt": "question", "response": "answer"}),
        stages=(DropThirds(), Witness()),
    )
    Witness.seen.clear()
    Pipeline(recipe, tmp_path / "run", show_progress=False).run()
    (data,) = Witness.seen
    questions = [json.loads(line)["question"] for line in GSM8K.read_text().splitlines()]
    kept = [q for i, q in enumerate(questions) if i % 7 % 3 != 2]
    assert isinstance(data, pl.DataFrame)  # collected, not a LazyFrame
    assert data.columns[0] == ROW_COLUMN
    assert data.get_column(ROW_COLUMN).to_list() == list(range(len(kept)))
    assert data.get_column("prompt").to_list() == kept


class ShortestOfOpening(Select):
    """Condenses each part to (row, id, opening word, prompt length) and keeps the shortest
    prompt of each opening word: `select` never sees a prompt text in the pipeline."""

    name = "shortest_of_opening"
    seen: ClassVar[list[list[str]]] = []

    def reads(self) -> tuple[str, ...]:
        return ("id", "prompt")

    def produces(self) -> tuple[str, ...]:
        return ("opening",)

    def condense(self, part: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        return part.select(
            ROW_COLUMN,
            "id",
            pl.col("prompt").str.split(" ").list.first().alias("opening"),
            pl.col("prompt").str.len_chars().alias("_chars"),
        )

    def select(self, data: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        if "_chars" not in data.columns:  # the whole input: add what condense would
            data = data.with_columns(self.condense(data, ctx).drop(ROW_COLUMN, "id"))
        self.seen.append(data.columns)
        best = pl.col("_chars") == pl.col("_chars").min().over("opening")
        first = pl.int_range(pl.len()).over("opening", best) == 0
        return data.filter(best & first).drop("_chars")


class Shrink(Select):
    """A broken condense: it drops rows."""

    name = "shrink"

    def reads(self) -> tuple[str, ...]:
        return ("prompt",)

    def condense(self, part: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        return part.head(1)

    def select(self, data: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        return data


def test_a_condensing_stage_sees_only_its_condensed_parts(tmp_path: Path) -> None:
    recipe = Recipe(
        name="condense",
        part_rows=7,
        input=Input(path=GSM8K, mapping={"prompt": "question", "response": "answer"}),
        stages=(DropThirds(), ShortestOfOpening()),
    )
    ShortestOfOpening.seen.clear()
    pipe = Pipeline(recipe, tmp_path / "run", show_progress=False)
    pipe.run()
    assert ShortestOfOpening.seen == [[ROW_COLUMN, "id", "opening", "_chars"]]
    assert check_against_whole_input(pipe) == ["shortest_of_opening"]
    kept = read_parts(pipe.final_parts())
    assert "_chars" not in kept.columns and kept.columns[-1] == "opening"
    assert "prompt" in kept.columns and kept.get_column("opening").is_unique().all()
    success = read_json(RunLayout.success(pipe.stages[1].dir))
    assert success["condense_seconds"] >= 0


def test_a_condense_that_drops_rows_is_an_error(tmp_path: Path) -> None:
    recipe = Recipe(
        name="shrink",
        part_rows=30,
        input=Input(path=GSM8K, mapping={"prompt": "question", "response": "answer"}),
        stages=(Shrink(),),
    )
    with pytest.raises(RuntimeError, match="condense must keep every row of a part"):
        Pipeline(recipe, tmp_path / "run", show_progress=False).run()
