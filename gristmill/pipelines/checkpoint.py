"""Atomic Parquet/JSON writes and reading of stage part folders.

Every file is written to a temporary name in its final folder and renamed into place, so a
crash leaves either the old state or the new one, never half a file. A part's kept-rows
file is written last: its presence is what marks the part done.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import polars as pl
import pyarrow.parquet as pq

from gristmill.atomic import atomic_path

#: Compression of the run's working files (stage parts, rejected rows), not of the dataset
#: (`records.write_table`). Parts are written once and read once or twice, so speed wins:
#: on a 20,000-row part of GSM8K records uncompressed writes in 0.05 s and reads in 0.05 s,
#: zstd takes 0.27 s and 0.11 s (lz4 0.15 s and 0.05 s), for 3.5 times the disk (43 MB
#: against 12 MB; a million such rows take about 2 GB per stage).
PART_COMPRESSION: Literal["uncompressed"] = "uncompressed"


def atomic_write_parquet(frame: pl.DataFrame, path: Path) -> Path:
    """Write `frame` to `path` through a temp file and rename."""
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, compression=PART_COMPRESSION, statistics=True)
    return path


def atomic_write_text(text: str, path: Path) -> Path:
    """Write text to `path` through a temp file and rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def atomic_write_json(data: Any, path: Path) -> Path:
    """Write JSON (pretty, sorted keys) atomically."""
    return atomic_write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", path)


def read_json(path: Path) -> Any:
    """Parse a JSON file."""
    return json.loads(path.read_text(encoding="utf-8"))


def parquet_rows(path: Path) -> int:
    """Row count from a Parquet footer, without reading data."""
    return int(pq.ParquetFile(path).metadata.num_rows)


def write_loop_state(path: Path, ids: Sequence[str], **state: Any) -> None:
    """Save a stage's resumable loop state (JSON, atomic) for the part's query ids."""
    atomic_write_json({"query_ids": list(ids), **state}, path)


def read_loop_state(path: Path | None, ids: Sequence[str], what: str) -> dict[str, Any] | None:
    """The loop state saved at `path` for these same query ids, or None when there is none.

    State saved for other queries (the part's input changed) is an error, not silently used.
    """
    if path is None or not path.exists():
        return None
    data: dict[str, Any] = read_json(path)
    if data.get("query_ids") != list(ids):
        raise RuntimeError(
            f"{path.parent}: saved {what} state is for other queries; remove the folder to "
            "start this part again"
        )
    return data


def read_parts(paths: Iterable[Path]) -> pl.DataFrame:
    """Concatenate parts in order, schemas relaxed to a common one; empty parts are skipped,
    unless every part is empty: then the result is empty but keeps their columns."""
    paths = list(paths)
    frames = [pl.read_parquet(p) for p in paths if parquet_rows(p) > 0]
    if not frames:
        frames = [pl.read_parquet(p) for p in paths]
    if not frames:
        return pl.DataFrame()
    if len(frames) == 1:
        return frames[0]
    return pl.concat(frames, how="diagonal_relaxed")


def scan_parts(paths: Sequence[Path]) -> pl.LazyFrame:
    """Lazy view of the non-empty parts (one scan when schemas agree); all parts empty gives
    an empty frame with their columns."""
    nonempty = [p for p in paths if parquet_rows(p) > 0]
    if not nonempty:
        return read_parts(paths).lazy()
    schemas = {tuple(pl.read_parquet_schema(p).items()) for p in nonempty}
    if len(schemas) == 1:
        return pl.scan_parquet(nonempty)
    return read_parts(nonempty).lazy()


def clear_dir(path: Path) -> None:
    """Remove a folder's contents (used before recomputing a whole-dataset stage)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
