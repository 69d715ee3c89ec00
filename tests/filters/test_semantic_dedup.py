"""Semantic dedup: planted duplicates go, the earliest copy stays, FAISS agrees with numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from gristmill.embed import get_embedder
from gristmill.filters.dedup import SemanticDedup, SemanticDedupConfig, near_duplicates
from gristmill.pipelines.stage import ROW_COLUMN, StageContext
from gristmill.records import make_record, records_frame


def qa(prompt: str, answer: str = "An answer.") -> dict[str, object]:
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return make_record(msgs, source="planted")


def ctx(tmp_path: Path) -> StageContext:
    return StageContext(
        stage_name="semantic_dedup",
        stage_index=0,
        seed=0,
        run_dir=tmp_path,
        embedder_factory=get_embedder,
    )


def indexed(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` as the pipeline hands it to `select`: in input order, with the row column."""
    return frame.with_row_index(ROW_COLUMN)


def brute_force(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference: all pairwise distances in float64, greedy keep in input order."""
    x64 = x.astype(np.float64)
    dist = 2.0 - 2.0 * (x64 @ x64.T)
    np.fill_diagonal(dist, np.inf)
    near = dist < threshold
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        keep[i] = not (near[i, :i] & keep[:i]).any()
    return dist.min(axis=1), near.sum(axis=1), keep


def test_planted_duplicates_drop_the_later_copy(alpaca: pl.DataFrame, tmp_path: Path) -> None:
    real = alpaca.head(40).to_dicts()
    actors = str(real[0]["prompt"])
    moon = str(real[6]["prompt"])
    assert actors.startswith("What are the names of some famous actors")
    assert moon == "Why can I see the moon during the day?"
    planted = [
        qa(actors, "A different answer, same question."),  # exact duplicate prompt
        qa("What are the names of some famous actors who started their career on Broadway?"),
        qa("why can i see the moon during the day"),  # light rewording
    ]
    frame = records_frame(real[:20] + planted + real[20:])
    context = ctx(tmp_path)
    out = SemanticDedup().select(indexed(frame), context)
    assert out.height == frame.height  # every row comes back, drops carry a reason
    reasons = out.get_column("drop_reason").to_list()
    dropped = [i for i, r in enumerate(reasons) if r is not None]
    assert dropped == [20, 21, 22]
    assert set(reasons[i] for i in dropped) == {"near_duplicate"}
    twins = out.get_column("duplicate_of").to_list()
    assert twins[20] == twins[21] == real[0]["id"]
    assert twins[22] == real[6]["id"]
    assert twins.count(None) == frame.height - 3
    counts = out.get_column("repeat_count").to_list()
    assert counts[0] == 2 and counts[6] == 1 and counts[20] == 2 and counts[22] == 1
    assert sum(counts) == 8  # nothing else in the real data is within 0.05
    dist = out.get_column("min_neighbor_distance")
    assert dist[20] == pytest.approx(0.0, abs=1e-5)
    assert 0 < dist[22] < 0.05
    assert dist.filter(pl.Series(counts) == 0).min() > 0.05  # type: ignore[operator]
    assert context.extra_stats["near_duplicates"] == 3
    assert context.extra_stats["rows_with_neighbors"] == 5


def test_stats_and_the_row_column_passes_through(tmp_path: Path) -> None:
    recs = [
        qa("How do I bake sourdough bread at home?"),
        qa("How do I bake sourdough bread at home?"),
    ]
    recs += [qa("What is the capital of Australia?")]
    context = ctx(tmp_path)
    out = SemanticDedup().select(indexed(records_frame(recs)), context)
    by_row = dict(zip(out.get_column(ROW_COLUMN), out.get_column("drop_reason"), strict=True))
    assert by_row == {0: None, 1: "near_duplicate", 2: None}
    assert context.extra_stats["near_duplicates"] == 1
    assert context.extra_stats["threshold"] == 0.05


def test_greedy_against_kept_rows_not_chains(tmp_path: Path) -> None:
    # A, B, C on a circle: A~B and B~C are near, A and C are not. B goes, C stays.
    angles = np.radians([0.0, 10.0, 20.0])  # 2-2cos(10deg) = 0.030, 2-2cos(20deg) = 0.121
    vecs = np.stack([np.cos(angles), np.sin(angles), np.zeros(3)], axis=1)
    frame = records_frame([qa("A"), qa("B"), qa("C")]).with_columns(
        pl.Series("embedding", vecs.tolist())
    )
    bare = StageContext(stage_name="semantic_dedup", stage_index=0, seed=0, run_dir=tmp_path)
    out = SemanticDedup().select(indexed(frame), bare)  # no embedder needed
    assert out.get_column("drop_reason").to_list() == [None, "near_duplicate", None]
    assert out.get_column("repeat_count").to_list() == [1, 2, 1]


def test_exact_against_brute_force(alpaca: pl.DataFrame) -> None:
    recs = alpaca.to_dicts()
    texts = [str(r["prompt"]) for r in recs] + [str(r["response"])[:80] for r in recs[:20]]
    x = get_embedder().embed(texts)
    x64 = x.astype(np.float64)
    pair = np.sort((2.0 - 2.0 * (x64 @ x64.T))[np.triu_indices(len(x), 1)])
    # thresholds in wide gaps between pair distances, so float32 rounding cannot flip a pair
    for quantile in (0.001, 0.02, 0.2):
        i = int(quantile * len(pair))
        gap = int(np.argmax(np.diff(pair[i : i + 200]))) + i
        threshold = float((pair[gap] + pair[gap + 1]) / 2)
        assert pair[gap + 1] - pair[gap] > 1e-5
        got = near_duplicates(x, threshold, batch_size=64)
        min_dist, counts, keep = brute_force(x, threshold)
        assert counts.sum() > 0
        np.testing.assert_array_equal(got.repeat_count, counts)
        np.testing.assert_array_equal(got.keep, keep)
        np.testing.assert_allclose(got.min_distance, min_dist, atol=1e-5)
    assert not keep.all() and keep.sum() > 1


def test_single_row_and_config_errors(tmp_path: Path) -> None:
    frame = records_frame([qa("Only one row here.")])
    out = SemanticDedup().select(indexed(frame), ctx(tmp_path))
    assert out.get_column("min_neighbor_distance").to_list() == [None]
    assert out.get_column("drop_reason").to_list() == [None]
    with pytest.raises(ValueError, match="threshold"):
        SemanticDedupConfig(threshold=-0.1)
    with pytest.raises(ValueError, match="field"):
        SemanticDedupConfig(field="id")  # type: ignore[arg-type]
