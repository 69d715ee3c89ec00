"""The pipeline's input split: parts written as the input is read, the same parts as the whole
input cut into `part_rows` slices (what the pipeline wrote before it streamed), no LLM."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from gristmill.pipelines import pipeline as pipeline_module
from gristmill.pipelines.pipeline import Pipeline
from gristmill.pipelines.recipe import Input, Recipe
from gristmill.pipelines.stage import Map, StageContext
from gristmill.reader import BlockSize, read_records, stream
from gristmill.records import RecordError

ROOT = Path(__file__).resolve().parents[2]
ALPACA100 = ROOT / "tests" / "selectors" / "data" / "alpaca_farm_eval_gpt35_100.jsonl"
SELECT_MAP = {
    "prompt": "instruction",
    "input": "input",
    "response": "output",
    "model": "generator",
    "source": "dataset",
}
INPUTS = [
    (ALPACA100, SELECT_MAP, None),
    (ROOT / "recipes" / "data" / "gsm8k_train_200.jsonl", {"prompt": "question"}, "gsm8k"),
    (ROOT / "tests" / "data" / "alpaca_farm_eval_20.json", {"prompt": "instruction"}, None),
    (ROOT / "recipes" / "data" / "humaneval_easy_20.jsonl", {"reference": "test"}, "humaneval"),
]


class Keep(Map):
    """Passes rows through (a recipe needs a stage)."""

    name = "keep"

    def process(self, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        return batch


def _pipeline(tmp_path: Path, spec: Input, part_rows: int) -> Pipeline:
    recipe = Recipe(name="t", part_rows=part_rows, input=spec, stages=(Keep(),))
    return Pipeline(recipe, tmp_path / f"run-{part_rows}", show_progress=False)


def _parts(paths: list[Path]) -> list[pl.DataFrame]:
    return [pl.read_parquet(p) for p in paths]


def _slices(frame: pl.DataFrame, rows: int) -> list[pl.DataFrame]:
    return [frame.slice(s, rows) for s in range(0, max(frame.height, 1), rows)]


@pytest.mark.parametrize(("path", "mapping", "source"), INPUTS, ids=lambda v: str(v)[-24:])
@pytest.mark.parametrize("part_rows", [1, 7, 64])
def test_parts_are_the_input_cut_into_slices(
    tmp_path: Path, path: Path, mapping: dict[str, str], source: str | None, part_rows: int
) -> None:
    spec = Input(path=str(path), mapping=mapping, source=source)
    pipe = _pipeline(tmp_path, spec, part_rows)
    parts = _parts(pipe.input_parts())
    whole = read_records(path, mapping=mapping, source=source)  # pinned in tests/test_reader.py
    expected = _slices(whole, part_rows)
    assert len(parts) == len(expected)
    for k, (part, want) in enumerate(zip(parts, expected, strict=True)):
        assert part.equals(want), k
    success = json.loads((pipe.input_dir / "_SUCCESS.json").read_text())
    assert success["rows_out"] == whole.height
    assert pipe.input_parts() == [pipe.input_dir / n for n in success["parts"]]  # reused


def test_limit_stops_reading(tmp_path: Path) -> None:
    spec = Input(path=str(ALPACA100), mapping=SELECT_MAP, limit=30)
    parts = _parts(_pipeline(tmp_path, spec, 7).input_parts())
    whole = read_records(ALPACA100, mapping=SELECT_MAP).head(30)
    assert [p.height for p in parts] == [7, 7, 7, 7, 2]
    assert pl.concat(parts).equals(whole)


def test_seed_rows_and_generators_still_split(tmp_path: Path) -> None:
    seeds = _parts(_pipeline(tmp_path, Input(rows=10), 4).input_parts())
    assert [p["seed_index"].to_list() for p in seeds] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    spec = Input(rows=12, generator="arith", limit=9)
    arith = _parts(_pipeline(tmp_path / "g", spec, 4).input_parts())
    assert [p.height for p in arith] == [4, 4, 1]


def _lines(n: int, bad: dict[int, str] | None = None) -> str:
    bad = bad or {}
    return "".join(
        bad.get(i, json.dumps({"question": f"q{i}", "answer": f"a{i}"})) + "\n"
        for i in range(1, n + 1)
    )


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Blocks of 4 KiB (a few dozen short lines), and the size of each block read."""
    monkeypatch.setattr(stream, "DEFAULT_BLOCK", BlockSize(bytes=4096, rows=50))
    read: list[int] = []
    real = stream.iter_blocks

    def counting(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for block in real(*args, **kwargs):
            read.append(block.length)
            yield block

    monkeypatch.setattr(stream, "iter_blocks", counting)
    return read


def test_parts_are_written_while_the_input_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_blocks: list[int]
) -> None:
    path = tmp_path / "many.jsonl"
    path.write_text(_lines(3000))
    writes: list[tuple[int, int]] = []  # (rows in the part, blocks read so far)
    real_write = pipeline_module.atomic_write_parquet

    def recording(frame: pl.DataFrame, where: Path) -> Path:
        writes.append((frame.height, len(small_blocks)))
        return real_write(frame, where)

    monkeypatch.setattr(pipeline_module, "atomic_write_parquet", recording)
    spec = Input(path=str(path), mapping={"prompt": "question", "reference": "answer"})
    parts = _pipeline(tmp_path, spec, 10).input_parts()
    assert len(parts) == 300 and len(small_blocks) >= 20
    assert all(rows <= 10 for rows, _ in writes)
    assert writes[0][1] == 1, "the first part is written once the first block is read"
    assert max(small_blocks) < 150, "no block holds more than about a hundred lines"
    whole = read_records(path, mapping={"prompt": "question", "reference": "answer"})
    assert pl.concat(_parts(parts)).equals(whole)


def test_a_bad_row_in_a_later_part_names_its_line_and_leaves_no_parts(
    tmp_path: Path, small_blocks: list[int]
) -> None:
    path = tmp_path / "late.jsonl"
    path.write_text(_lines(3000, {2501: '{"question": 7, "answer": "a"}'}))
    pipe = _pipeline(tmp_path, Input(path=str(path), mapping={"prompt": "question"}), 10)
    with pytest.raises(
        RecordError,
        match=r"late\.jsonl: line 2501: field 'prompt' \(column 'question'\): expected a string",
    ):
        pipe.input_parts()
    assert len(small_blocks) > 20, "the error was met while streaming"
    assert not list(pipe.input_dir.glob("*.parquet"))


def test_a_column_that_appears_late_reads_the_input_whole(
    tmp_path: Path, small_blocks: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    rows = [{"question": f"q{i}"} for i in range(600)]
    rows[500]["lang"] = "en"
    path = tmp_path / "late.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pipe = _pipeline(tmp_path, Input(path=str(path), mapping={"prompt": "question"}), 64)
    with caplog.at_level(logging.WARNING, logger="gristmill.pipeline"):
        parts = _parts(pipe.input_parts())
    assert "line 501: field 'lang': this column first appears here" in caplog.text
    whole = pl.concat(parts)
    assert whole.columns[-1] == "lang" and whole["lang"].null_count() == 599
    assert all(p.schema == parts[0].schema for p in parts)
    assert whole.equals(read_records(path, mapping={"prompt": "question"}))
