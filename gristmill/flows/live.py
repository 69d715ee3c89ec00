"""The live line of a running map stage: rows done of total, requests in flight, output
tokens/s, drops so far and an ETA, refreshed while its parts run.

Rows and drops come from the parts' stats files as parts finish; requests in flight and
tokens from the in-process engines' feeders (threads runner: the flow's own process holds
the engine; on Dask the engines live in the workers, so those two stay blank).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gristmill.pipelines.checkpoint import parquet_rows, read_json
from gristmill.pipelines.layout import RunLayout


@dataclass(frozen=True)
class LiveCounts:
    """What one refresh knows about a stage."""

    rows_done: int
    rows_total: int
    dropped: int
    in_flight: int | None
    tokens: int | None
    seconds: float


def live_counts(
    layout: RunLayout,
    stage_dir: Path,
    inputs: Sequence[Path],
    engines: Sequence[Any],
    started: float,
    tokens_at_start: int,
) -> LiveCounts:
    """Counts for the stage in `stage_dir` whose parts read `inputs`."""
    done = dropped = 0
    for k in range(len(inputs)):
        stats_file = layout.part_stats(stage_dir, k)
        if layout.part(stage_dir, k).exists() and stats_file.exists():
            stats = read_json(stats_file)
            done += int(stats.get("rows_in", 0))
            dropped += sum(int(v) for v in stats.get("dropped", {}).values())
    feeders = [f for f in (_feeder(e) for e in engines) if f is not None]
    return LiveCounts(
        rows_done=done,
        rows_total=sum(parquet_rows(p) for p in inputs),
        dropped=dropped,
        in_flight=sum(f.in_flight for f in feeders) if feeders else None,
        tokens=sum(f.output_tokens for f in feeders) - tokens_at_start if feeders else None,
        seconds=time.perf_counter() - started,
    )


def engine_tokens(engines: Sequence[Any]) -> int:
    """Tokens the engines' feeders have generated so far (0 without feeders)."""
    return sum(f.output_tokens for f in (_feeder(e) for e in engines) if f is not None)


def live_line(c: LiveCounts) -> str:
    """`rows 120/480 · in flight 37 · 212 tok/s · dropped 5 · ETA 3m10s`."""
    parts = [f"rows {c.rows_done}/{c.rows_total}"]
    if c.in_flight is not None:
        parts.append(f"in flight {c.in_flight}")
    if c.tokens is not None and c.seconds > 0:
        parts.append(f"{c.tokens / c.seconds:.0f} tok/s")
    parts.append(f"dropped {c.dropped}")
    if 0 < c.rows_done < c.rows_total:
        left = c.seconds * (c.rows_total - c.rows_done) / c.rows_done
        parts.append(f"ETA {_duration(left)}")
    return " · ".join(parts)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _feeder(engine: Any) -> Any:
    stats = getattr(engine, "feeder_stats", None)
    return stats() if callable(stats) else None
