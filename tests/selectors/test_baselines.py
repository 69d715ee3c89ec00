"""Baseline selectors: seeded uniform `random` and score-ranked `topk`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from gristmill.pipelines.stage import ROW_COLUMN, StageContext
from gristmill.records import make_record, records_frame
from gristmill.selectors.baselines import RandomConfig, RandomSelect, TopKConfig, TopKSelect


def scored(frame: pl.DataFrame) -> pl.DataFrame:
    # a real, tie-free score: the response length in characters
    return frame.with_columns(
        pl.col("response").str.len_chars().cast(pl.Float64).alias("score__length")
    )


def ctx(tmp_path: Path, seed: int = 0) -> StageContext:
    return StageContext(stage_name="sel", stage_index=0, seed=seed, run_dir=tmp_path)


def rows_of(
    stage: RandomSelect | TopKSelect, frame: pl.DataFrame, context: StageContext
) -> list[int]:
    out = stage.select(frame.with_row_index(ROW_COLUMN), context)
    assert set(out.columns) == set(frame.columns) | {ROW_COLUMN}
    return out.get_column(ROW_COLUMN).to_list()


def test_random_budget_order_and_seed(alpaca: pl.DataFrame, tmp_path: Path) -> None:
    frame = scored(alpaca)
    a = rows_of(RandomSelect(RandomConfig(budget=30, seed=1)), frame, ctx(tmp_path))
    b = rows_of(RandomSelect(RandomConfig(budget=30, seed=1)), frame, ctx(tmp_path))
    c = rows_of(RandomSelect(RandomConfig(budget=30, seed=2)), frame, ctx(tmp_path))
    assert len(a) == 30 == len(set(a)) and a == sorted(a)
    assert a == b and a != c
    # without a config seed the run seed decides
    d = rows_of(RandomSelect(RandomConfig(budget=0.3)), frame, ctx(tmp_path, seed=4))
    e = rows_of(RandomSelect(RandomConfig(budget=0.3)), frame, ctx(tmp_path, seed=4))
    f = rows_of(RandomSelect(RandomConfig(budget=0.3)), frame, ctx(tmp_path, seed=5))
    assert d == e != f and len(d) == 30
    assert len(rows_of(RandomSelect(RandomConfig(budget=1000)), frame, ctx(tmp_path))) == 100


def test_random_is_uniform(alpaca: pl.DataFrame, tmp_path: Path) -> None:
    frame = scored(alpaca).head(20)
    counts = np.zeros(20)
    for seed in range(400):
        counts[rows_of(RandomSelect(RandomConfig(budget=5, seed=seed)), frame, ctx(tmp_path))] += 1
    # each row is picked with probability 1/4: 100 expected, sd about 8.7
    assert counts.sum() == 2000
    assert counts.min() > 65 and counts.max() < 135


def test_topk_takes_the_best(alpaca: pl.DataFrame, tmp_path: Path) -> None:
    frame = scored(alpaca)
    lengths = frame.get_column("score__length").to_numpy()
    context = ctx(tmp_path)
    top = rows_of(TopKSelect(TopKConfig(budget=10, score_column="score__length")), frame, context)
    assert top == sorted(np.argsort(-lengths)[:10].tolist())
    assert context.extra_stats["score_cutoff"] == np.sort(lengths)[-10]
    low = rows_of(
        TopKSelect(TopKConfig(budget=0.1, score_column="score__length", largest=False)),
        frame,
        ctx(tmp_path),
    )
    assert low == sorted(np.argsort(lengths)[:10].tolist())


def test_topk_ties_go_to_earlier_rows(tmp_path: Path) -> None:
    recs = [make_record([{"role": "user", "content": f"q{i}"}], source="t") for i in range(6)]
    frame = records_frame(recs).with_columns(pl.Series("score__s", [1.0, 3.0, 2.0, 3.0, 2.0, 2.0]))
    stage = TopKSelect(TopKConfig(budget=3, score_column="score__s"))
    assert rows_of(stage, frame, ctx(tmp_path)) == [1, 2, 3]


def test_topk_errors(alpaca: pl.DataFrame, tmp_path: Path) -> None:
    frame = scored(alpaca)
    with pytest.raises(ValueError, match="score__missing"):
        rows_of(
            TopKSelect(TopKConfig(budget=3, score_column="score__missing")), frame, ctx(tmp_path)
        )
    nan = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 2)
        .then(float("nan"))
        .otherwise(pl.col("score__length"))
        .alias("score__length")
    )
    with pytest.raises(ValueError, match=f"id '{frame.get_column('id')[2]}'"):
        rows_of(TopKSelect(TopKConfig(budget=3, score_column="score__length")), nan, ctx(tmp_path))
    with pytest.raises(ValueError, match="numeric"):
        rows_of(TopKSelect(TopKConfig(budget=3, score_column="source")), frame, ctx(tmp_path))
    with pytest.raises(ValueError, match="budget"):
        RandomConfig(budget=-3)
