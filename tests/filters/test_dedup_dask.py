"""Exact and MinHash dedup on a 2-worker Dask LocalCluster keep the rows the local path keeps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from planted import planted_rows

from gristmill.filters import dedup_dask
from gristmill.filters.dedup import ExactDedup, ExactDedupConfig, MinHashDedup, MinHashDedupConfig
from gristmill.pipelines.cluster import DaskCluster
from gristmill.pipelines.stage import ROW_COLUMN, Select, StageContext
from gristmill.records import make_record, records_frame

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[DaskCluster]:
    """Two worker processes, one thread each, no dashboard: what the Dask runner starts."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as local:
        yield DaskCluster(local.scheduler_address)


@pytest.fixture(scope="module")
def rows(committed_slices: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Planted near and exact copies, copies changed only in case and spacing, null answers."""
    frame = planted_rows(committed_slices, 3000, seed=11)
    variants = [
        make_record(
            [{"role": "user", "content": str(r["prompt"]).upper()}]
            + ([{"role": "assistant", "content": "  " + str(r["response"])}] if k % 3 else []),
            source="variant",
        )
        for k, r in enumerate(frame.head(400).to_dicts())
    ]
    mixed = pl.concat([frame, records_frame(variants)], how="diagonal_relaxed")
    return mixed.sample(fraction=1.0, shuffle=True, seed=5)


def _select(
    stage: Select, frame: pl.DataFrame, cluster: DaskCluster | None, tmp: Path
) -> pl.DataFrame:
    ctx = StageContext(stage_name=stage.name, stage_index=0, seed=0, run_dir=tmp, cluster=cluster)
    out = stage.select(frame.with_row_index(ROW_COLUMN), ctx)
    assert (ctx.extra_stats.get("dask_scheduler") is not None) == (cluster is not None)
    return out


def _same(local: pl.DataFrame, spread: pl.DataFrame) -> int:
    kept = local.filter(pl.col("drop_reason").is_null()).get_column("id").to_list()
    assert spread.filter(pl.col("drop_reason").is_null()).get_column("id").to_list() == kept
    assert spread.equals(local), "same rows, same duplicate_of, same Jaccard"
    return local.height - len(kept)


@pytest.mark.parametrize(
    "cfg",
    [
        ExactDedupConfig(),
        ExactDedupConfig(fields=("prompt",)),
        ExactDedupConfig(nfkc=False, lowercase=False),
    ],
    ids=["default", "prompt", "plain"],
)
def test_exact_dedup_on_dask_matches_local(
    rows: pl.DataFrame,
    cluster: DaskCluster,
    cfg: ExactDedupConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dedup_dask, "PARTITION_ROWS", 700)  # several partitions to shuffle
    stage = ExactDedup(cfg)
    dropped = _same(_select(stage, rows, None, tmp_path), _select(stage, rows, cluster, tmp_path))
    assert dropped > 100


@pytest.mark.parametrize(
    "cfg",
    [
        MinHashDedupConfig(batch_size=700),
        MinHashDedupConfig(batch_size=900, threshold=0.6, num_perm=64),
        MinHashDedupConfig(batch_size=1000, fields=("response",), unit="char", threshold=0.9),
    ],
    ids=["default", "loose", "char"],
)
def test_minhash_dedup_on_dask_matches_local(
    rows: pl.DataFrame, cluster: DaskCluster, cfg: MinHashDedupConfig, tmp_path: Path
) -> None:
    stage = MinHashDedup(cfg)
    dropped = _same(_select(stage, rows, None, tmp_path), _select(stage, rows, cluster, tmp_path))
    assert dropped > 300


def test_large_buckets_on_dask_match_local(
    rows: pl.DataFrame, cluster: DaskCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gristmill.filters import lsh

    monkeypatch.setattr(lsh, "PAIR_LIMIT", 2)  # most buckets are walked, not paired
    stage = MinHashDedup(MinHashDedupConfig(batch_size=700))
    dropped = _same(_select(stage, rows, None, tmp_path), _select(stage, rows, cluster, tmp_path))
    assert dropped > 300


def test_committed_slices_on_dask_match_local(
    committed_slices: dict[str, pl.DataFrame], cluster: DaskCluster, tmp_path: Path
) -> None:
    both = pl.concat(list(committed_slices.values()), how="vertical_relaxed")
    for stage in (ExactDedup(), MinHashDedup(MinHashDedupConfig(batch_size=128))):
        _same(_select(stage, both, None, tmp_path), _select(stage, both, cluster, tmp_path))


def test_the_texts_are_spread_over_partitions(rows: pl.DataFrame, cluster: DaskCluster) -> None:
    with cluster.client() as client:
        data = dedup_dask.scatter_texts(client, rows.select("prompt"), 700)
        assert data.npartitions == 5 and data.known_divisions
        assert data.compute().index.tolist() == list(range(rows.height))
