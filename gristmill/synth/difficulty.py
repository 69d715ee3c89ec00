"""Per-query fail rates from an earlier run's sampling counters (DART's `difficulty_from`).

DART-Math's Prop2Diff reads each query's pass rate from its whole synthesis pool, not from a
small probe whose fail rate moves in steps of 1/m. A finished `dart` or `rejection` stage
writes every query's counters on its rows (`query_trials`, `query_raw_correct`: all samples
and all correct ones, duplicates included), kept rows under their query's `parent_id` and
queries that ended with nothing to emit in `rejected/` under their own `id`. This module
finds those rows from a path (a run folder, one stage folder, or a dataset), reads the
counters back, and checks every query has them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from gristmill.pipelines.checkpoint import read_json
from gristmill.pipelines.layout import STAGE_DIR, SUCCESS, RunLayout

#: The counter columns a sampling stage writes on each of its rows.
TRIALS = "query_trials"
RAW_CORRECT = "query_raw_correct"
COUNTER_COLUMNS = (TRIALS, RAW_CORRECT)
#: Stages whose rows carry the counters (rejection sampling and DART).
SAMPLER_STAGES = ("dart", "rejection")
#: How many missing query ids an error lists.
SHOWN_IDS = 5


@dataclass(frozen=True, kw_only=True)
class QueryCounts:
    """One query's samples in the earlier run: all of them, and the correct ones."""

    trials: int
    raw_correct: int

    @property
    def failures(self) -> int:
        """Samples that were not correct (wrong, unanswered or truncated)."""
        return self.trials - self.raw_correct


@dataclass(frozen=True, kw_only=True)
class EarlierCounters:
    """The counters read from `difficulty_from`, per query id, and where they came from."""

    counts: Mapping[str, QueryCounts]
    #: For the stage stats: the path given, the files read, the source stage and fingerprint.
    provenance: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class _Files:
    """Parquet files to read, each with the column naming its query."""

    by_key: tuple[tuple[Path, str], ...]
    stage_dir: Path | None = None
    fingerprint: str | None = None


def read_counters(path: str | Path) -> EarlierCounters:
    """Every query's counters from a run folder, a stage folder or a dataset (folder or file)."""
    given = Path(path)
    if not given.exists():
        raise FileNotFoundError(f"difficulty_from {str(path)!r}: no such file or folder")
    files = _locate(given)
    counts: dict[str, QueryCounts] = {}
    for file, key in files.by_key:
        for qid, trials, raw in _rows(file, key):
            seen = counts.get(qid)
            mine = QueryCounts(trials=trials, raw_correct=raw)
            if seen is not None and seen != mine:
                raise ValueError(
                    f"difficulty_from {str(path)!r}: query {qid} has two sets of counters "
                    f"({seen.trials} trials / {seen.raw_correct} correct and {trials} / {raw}, "
                    f"the second in {file}); point it at one run's stage"
                )
            counts[qid] = mine
    if not counts:
        raise ValueError(
            f"difficulty_from {str(path)!r}: no row with sampling counters "
            f"({', '.join(COUNTER_COLUMNS)}) in {[str(f) for f, _ in files.by_key]}"
        )
    return EarlierCounters(
        counts=counts,
        provenance={
            "source": "earlier_run",
            "difficulty_from": str(path),
            "stage_dir": str(files.stage_dir) if files.stage_dir else None,
            "fingerprint": files.fingerprint
            or f"sha256:{files_digest([f for f, _ in files.by_key])}",
            "files": [str(f) for f, _ in files.by_key],
            "queries": len(counts),
        },
    )


def counts_for(ids: Sequence[str], earlier: EarlierCounters) -> dict[str, QueryCounts]:
    """The counters of these query ids; an error names the ones the earlier run lacks."""
    missing = [qid for qid in ids if qid not in earlier.counts]
    if missing:
        shown = ", ".join(missing[:SHOWN_IDS]) + (" ..." if len(missing) > SHOWN_IDS else "")
        raise ValueError(
            f"difficulty_from {earlier.provenance['difficulty_from']!r}: no sampling counters "
            f"({', '.join(COUNTER_COLUMNS)}) for {len(missing)} of {len(ids)} queries: {shown}. "
            "Run the earlier stage on the same queries (a dataset holds only queries with a "
            "kept row; a run's stage folder also has the unsolved ones in rejected/)"
        )
    return {qid: earlier.counts[qid] for qid in ids}


# ---- finding the rows -----------------------------------------------------------------------


def _locate(path: Path) -> _Files:
    """The Parquet files holding counters under `path`, and the query-id column of each."""
    if path.is_file():
        return _Files(by_key=((path, "parent_id"),))
    if RunLayout(path).is_run():
        return _stage_files(_sampler_stage(path))
    if STAGE_DIR.match(path.name):
        return _stage_files(path)
    found = sorted(path.rglob("*.parquet"))
    if not found:
        raise ValueError(
            f"difficulty_from {str(path)!r}: neither a run folder, a stage folder nor a "
            "dataset (no Parquet files under it)"
        )
    return _Files(by_key=tuple((f, "parent_id") for f in found))


def _sampler_stage(run: Path) -> Path:
    """The one `dart` or `rejection` stage folder of a run (its manifest's, else the newest)."""
    layout = RunLayout(run)
    if layout.manifest.is_file():
        stages = [
            (s["stage"], run / s["dir"]) for s in read_json(layout.manifest).get("stages", [])
        ]
    else:
        newest = sorted(layout.newest_stage_dirs().items())
        stages = [(name, folder) for index, (name, folder) in newest if index > 0]
    samplers = [folder for name, folder in stages if name in SAMPLER_STAGES]
    if not samplers:
        names = [name for name, _ in stages]
        raise ValueError(
            f"difficulty_from {str(run)!r}: the run has no {' or '.join(SAMPLER_STAGES)} stage "
            f"(its stages: {names}); its rows carry no sampling counters"
        )
    if len(samplers) > 1:
        raise ValueError(
            f"difficulty_from {str(run)!r}: the run has {len(samplers)} sampling stages "
            f"({[f.name for f in samplers]}); name one folder, e.g. {str(samplers[0])!r}"
        )
    return samplers[0]


def _stage_files(folder: Path) -> _Files:
    """A finished stage's kept parts (by `parent_id`) and rejected parts (by `id`)."""
    marker = folder / SUCCESS
    if not marker.is_file():
        raise ValueError(
            f"difficulty_from: stage folder {str(folder)!r} has not finished (no {SUCCESS}); "
            "its counters may be incomplete"
        )
    success = read_json(marker)
    kept = [folder / name for name in success.get("parts", [])]
    rejected = RunLayout.rejected_parts(folder)
    return _Files(
        by_key=(*((p, "parent_id") for p in kept), *((p, "id") for p in rejected)),
        stage_dir=folder,
        fingerprint=success.get("fingerprint"),
    )


def _rows(file: Path, key: str) -> list[tuple[str, int, int]]:
    """(query id, trials, raw correct) of each row of `file` that carries counters."""
    schema = pl.read_parquet_schema(file)
    missing = [c for c in (key, *COUNTER_COLUMNS) if c not in schema]
    if missing:
        hint = (
            f"; {RAW_CORRECT!r} is written by dart/rejection since stage version 2: rerun the "
            "earlier stage"
            if missing == [RAW_CORRECT]
            else ""
        )
        raise ValueError(f"difficulty_from: {file} has no column(s) {missing}{hint}")
    frame = pl.read_parquet(file, columns=[key, *COUNTER_COLUMNS]).filter(
        pl.col(TRIALS).is_not_null() & pl.col(key).is_not_null()
    )
    out = []
    for qid, trials, raw in frame.iter_rows():
        if raw is None or not 0 <= raw <= trials or trials < 1:
            raise ValueError(
                f"difficulty_from: {file}: query {qid} has {trials} trials and {raw} correct "
                "samples; counters must have 1 <= trials and 0 <= correct <= trials"
            )
        out.append((str(qid), int(trials), int(raw)))
    return out


def files_digest(paths: Sequence[Path]) -> str:
    """A short content hash of files: the identity of a dataset, which has no fingerprint."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]
