"""The band-key join gives the drops, twins and Jaccard estimates of datasketch's index.

The reference below is the greedy pass `minhash_dedup` ran before the join (gristmill at
ee563ee): rows are queried against a datasketch `MinHashLSH` in order and only kept rows
are inserted. It is computed here, in the test, on the same signatures.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pytest
from datasketch import LeanMinHash, MinHashLSH
from planted import planted_rows, qa

from gristmill.filters.dedup import MinHashDedup, MinHashDedupConfig
from gristmill.filters.lsh import (
    CheckedPairs,
    band_keys,
    banding,
    greedy_twins,
    lsh_duplicates,
    representatives,
)
from gristmill.pipelines.stage import ROW_COLUMN, StageContext
from gristmill.records import records_frame


def reference_greedy(
    signatures: np.ndarray, empty: np.ndarray, *, threshold: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(duplicate_of, jaccard) from datasketch's MinHashLSH, queried and filled in row order."""
    n, num_perm = signatures.shape
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    need = threshold * num_perm - 1e-9
    duplicate_of = np.full(n, -1, dtype=np.int64)
    jaccard = np.full(n, np.nan)
    for row in range(n):
        if empty[row]:
            continue
        sketch = LeanMinHash(seed=seed, hashvalues=signatures[row], scheme="affine32")
        found = sorted(lsh.query(sketch))
        equal = [int(np.count_nonzero(signatures[c] == signatures[row])) for c in found]
        passing = [(c, e) for c, e in zip(found, equal, strict=True) if e >= need]
        if passing:
            duplicate_of[row], jaccard[row] = passing[0][0], passing[0][1] / num_perm
        else:
            lsh.insert(row, sketch)
    return duplicate_of, jaccard


def _run(stage: MinHashDedup, frame: pl.DataFrame, tmp_path: Any) -> pl.DataFrame:
    ctx = StageContext(stage_name="minhash_dedup", stage_index=0, seed=0, run_dir=tmp_path)
    return stage.select(frame.with_row_index(ROW_COLUMN), ctx)


def _assert_same_as_reference(frame: pl.DataFrame, cfg: MinHashDedupConfig, tmp_path: Any) -> int:
    stage = MinHashDedup(cfg)
    out = _run(stage, frame, tmp_path)
    signatures, empty = stage.signatures(frame)
    twins, jaccard = reference_greedy(signatures, empty, threshold=cfg.threshold, seed=cfg.seed)
    ids = frame.get_column("id")
    want_twins = [ids[int(t)] if t >= 0 else None for t in twins]
    assert out.get_column("duplicate_of").to_list() == want_twins
    want_reason = ["near_duplicate" if t >= 0 else None for t in twins]
    assert out.get_column("drop_reason").to_list() == want_reason
    got_jaccard = out.get_column("duplicate_jaccard").fill_null(np.nan).to_numpy()
    np.testing.assert_array_equal(got_jaccard, jaccard)
    return int((twins >= 0).sum())


@pytest.mark.parametrize(
    "cfg",
    [
        MinHashDedupConfig(),
        MinHashDedupConfig(threshold=0.5, num_perm=64),
        MinHashDedupConfig(fields=("response",), unit="char", ngram=5, threshold=0.7),
    ],
    ids=["default", "loose", "char"],
)
def test_committed_slices_give_the_reference_result(
    committed_slices: dict[str, pl.DataFrame], cfg: MinHashDedupConfig, tmp_path: Any
) -> None:
    for frame in committed_slices.values():
        _assert_same_as_reference(frame, cfg, tmp_path)
    # all slices together, with planted copies of their own rows
    both = pl.concat(list(committed_slices.values()), how="vertical_relaxed")
    assert _assert_same_as_reference(planted_rows(committed_slices, 1500, 1), cfg, tmp_path)
    _assert_same_as_reference(both, cfg, tmp_path)


@pytest.mark.parametrize(("rows", "threshold"), [(20_000, 0.8), (5_000, 0.6)])
def test_planted_rows_give_the_reference_result(
    committed_slices: dict[str, pl.DataFrame], rows: int, threshold: float, tmp_path: Any
) -> None:
    frame = planted_rows(committed_slices, rows, seed=7)
    dropped = _assert_same_as_reference(frame, MinHashDedupConfig(threshold=threshold), tmp_path)
    assert 0.1 * rows < dropped < 0.4 * rows  # the planted copies, not the fresh rows


def test_copies_of_a_dropped_row_follow_its_twin() -> None:
    # row 2 is near row 0, row 1 is far; rows 3 and 4 copy row 2 exactly
    sig = np.array(
        [[1, 1, 1, 1], [9, 9, 9, 9], [1, 1, 1, 7], [1, 1, 1, 7], [1, 1, 1, 7]], dtype=np.uint32
    )
    empty = np.zeros(5, dtype=bool)
    got = lsh_duplicates(sig, empty, threshold=0.5)
    want, _ = reference_greedy(sig, empty, threshold=0.5, seed=1)
    assert got.duplicate_of.tolist() == want.tolist() == [-1, -1, 0, 0, 0]
    assert got.equal.tolist() == [0, 0, 3, 3, 3]
    assert representatives(sig, np.arange(5)).tolist() == [0, 1, 2, 2, 2]


def test_a_band_key_collision_is_not_a_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    from gristmill.filters import lsh

    sig = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.uint32)
    collide = lambda values, salt=0: np.zeros(len(values), dtype=np.uint64)  # noqa: E731
    monkeypatch.setattr(lsh, "fold_columns", collide)
    got = lsh_duplicates(sig, np.zeros(2, dtype=bool), threshold=0.01)
    assert got.duplicate_of.tolist() == [-1, -1] and got.candidates == 0


def test_greedy_twins_skips_dropped_partners() -> None:
    # 0~1, 1~2, 0~2 below the bar: 1 goes (twin 0), 2 stays (its only partner 1 went)
    pairs = CheckedPairs(np.array([0, 1, 0]), np.array([1, 2, 2]), np.array([4, 4, 1]))
    walk = greedy_twins(3, pairs, need=3)
    assert walk.duplicate_of.tolist() == [-1, 0, -1] and walk.equal.tolist() == [0, 4, 0]
    assert band_keys(np.zeros((2, 4), np.uint32), banding(0.5, 4)).shape[0] == 2


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_large_buckets_walked_row_by_row_give_the_reference_result(
    committed_slices: dict[str, pl.DataFrame],
    limit: int,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gristmill.filters import lsh

    monkeypatch.setattr(lsh, "PAIR_LIMIT", limit)  # most buckets count as large
    frame = planted_rows(committed_slices, 3000, seed=3)
    for cfg in (MinHashDedupConfig(), MinHashDedupConfig(threshold=0.5, num_perm=64)):
        assert _assert_same_as_reference(frame, cfg, tmp_path) > 300


def test_one_big_near_copy_cluster(tmp_path: Any) -> None:
    """2,000 near copies of one answer: one large bucket per band, no pair explosion."""
    words = [f"{w}{i}" for i, w in enumerate(("story " * 100).split())]  # 100 distinct words
    rows = []
    for k in range(2000):
        answer = list(words)
        answer[k % len(answer)] = f"word{k}"
        rows.append(qa("Tell me a story.", " ".join(answer)))
    frame = records_frame(rows)
    cfg = MinHashDedupConfig()
    assert _assert_same_as_reference(frame, cfg, tmp_path) > 1000
    stage = MinHashDedup(cfg)
    sig, empty = stage.signatures(frame)
    got = lsh_duplicates(sig, empty, threshold=cfg.threshold)
    assert got.candidates < 200_000  # pairing every bucket would check ~2M pairs
