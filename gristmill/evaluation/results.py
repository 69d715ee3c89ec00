"""The `evals` table: one row per dataset x seed x metric, kept in `<out>/evals.parquet`.

The catalog (`gristmill query --root`) unions every `evals.parquet` under the runs root into
one `evals` table; the report draws it. Setup columns (base model, eval set, budget,
hyper-parameters) travel with every row, so results that cannot be compared are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from gristmill.evaluation.budget import check_comparable
from gristmill.pipelines.checkpoint import atomic_write_parquet

EVALS_FILE = "evals.parquet"

#: Columns of the `evals` table, with their polars types.
EVALS_SCHEMA: dict[str, pl.DataType] = {
    "dataset": pl.String(),
    "method": pl.String(),
    "budget": pl.String(),
    "budget_tokens": pl.Int64(),
    "budget_steps": pl.Int64(),
    "seed": pl.Int64(),
    "metric": pl.String(),
    "value": pl.Float64(),
    "base_model": pl.String(),
    "eval_set": pl.String(),
    "eval_set_sha256": pl.String(),
    "eval_rows": pl.Int64(),
    "hyperparameters": pl.String(),
    "dataset_path": pl.String(),
    "train_rows": pl.Int64(),
    "train_tokens": pl.Int64(),
    "train_steps": pl.Int64(),
    "held_out_removed": pl.Int64(),
    "final_loss": pl.Float64(),
    "wall_seconds": pl.Float64(),
    "checkpoint": pl.String(),
    "finished_at": pl.Datetime("us"),
}
#: A result is identified by these; a rerun replaces the rows with the same key.
KEY = ("dataset", "seed", "metric")


def evals_frame(rows: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    """Rows as a frame with the table's columns and types."""
    return pl.DataFrame([{c: r.get(c) for c in EVALS_SCHEMA} for r in rows], schema=EVALS_SCHEMA)


def read_evals(folder: str | Path) -> pl.DataFrame:
    """The evals of an evaluation folder (empty with the table's columns when none yet)."""
    path = Path(folder) / EVALS_FILE
    if not path.is_file():
        return evals_frame([])
    return pl.read_parquet(path)


def merge_evals(old: pl.DataFrame, new: pl.DataFrame) -> pl.DataFrame:
    """Old rows not replaced by `new`, then `new`; refused unless all are comparable."""
    kept = old.join(new.select(KEY).unique(), on=list(KEY), how="anti")
    merged = pl.concat([kept, new], how="vertical")
    check_comparable(merged.to_dicts())
    return merged.sort("dataset", "seed", "metric")


def write_evals(folder: str | Path, new: pl.DataFrame) -> Path:
    """Merge `new` into the folder's `evals.parquet` (atomically)."""
    path = Path(folder) / EVALS_FILE
    return atomic_write_parquet(merge_evals(read_evals(folder), new), path)


def summary(evals: pl.DataFrame) -> pl.DataFrame:
    """Mean, standard deviation (over seeds) and seed count per dataset and metric."""
    check_comparable(evals.to_dicts())
    return (
        evals.group_by("dataset", "method", "metric", maintain_order=True)
        .agg(
            pl.col("value").mean().alias("mean"),
            pl.col("value").std().fill_null(0.0).alias("std"),
            pl.col("seed").n_unique().alias("seeds"),
        )
        .sort("metric", "dataset")
    )
