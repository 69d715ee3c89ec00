"""The checkpointed, resumable pipeline: input → stages → dataset.

Layout of a run folder:

    DIR/00_input-<fp>/part-00000.parquet ...        the input, split into parts
    DIR/01_<stage>-<fp>/part-00000.parquet ...      each stage's kept rows, part by part
    DIR/01_<stage>-<fp>/rejected/part-00000.parquet dropped rows with `drop_reason`
    DIR/01_<stage>-<fp>/part-00000.stats.json       per-part stats (map stages)
    DIR/01_<stage>-<fp>/_SUCCESS.json               the stage is complete (fingerprint, stats)
    DIR/dataset/ and DIR/manifest.json              the finished dataset (see output.py)

The fingerprint chains the previous stage's, the stage's name, version and config, and the
models it uses. A rerun skips stages whose `_SUCCESS.json` matches and, inside a map stage,
parts whose file exists: a crash costs at most the parts in flight. The methods below are
the units the Prefect flow runs as tasks; `run()` runs them in order without Prefect.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from gristmill.embed import Embedder, get_embedder
from gristmill.engines.base import Engine, EngineStats, sum_engine_stats
from gristmill.engines.factory import EngineSpec, get_engine
from gristmill.pipelines.checkpoint import (
    REJECTED,
    STATE,
    SUCCESS,
    atomic_write_json,
    atomic_write_parquet,
    clear_dir,
    parquet_rows,
    part_name,
    read_json,
    scan_parts,
)
from gristmill.pipelines.generators import generate_input
from gristmill.pipelines.recipe import InputSpec, Recipe
from gristmill.pipelines.stage import (
    ROW_COLUMN,
    GlobalStage,
    MapStage,
    Stage,
    StageContext,
    fingerprint,
)
from gristmill.records import DROP_REASON, read_records, validate_frame

log = logging.getLogger("gristmill.pipeline")

#: Engine options that change speed or memory, never output: kept out of fingerprints.
ENGINE_PERF_OPTIONS = frozenset(
    {
        "gpu_memory_utilization",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "enable_prefix_caching",
        "max_num_seqs",
        "max_num_batched_tokens",
        "swap_space",
        "use_tqdm",
        "max_concurrency",
        "timeout_s",
        "max_retries",
        "api_key",
    }
)


@dataclass(frozen=True)
class PlannedStage:
    """A stage with its place in the run: index, folder and chained fingerprint."""

    index: int
    stage: Stage
    fingerprint: str
    dir: Path

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def is_map(self) -> bool:
        return isinstance(self.stage, MapStage)


class Pipeline:
    """A recipe bound to a run folder. Build it, then `run()` or drive it from a flow."""

    def __init__(self, recipe: Recipe, run_dir: str | Path, *, show_progress: bool = True):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.show_progress = show_progress
        self._engine_lock = threading.Lock()
        self._input: pl.DataFrame | None = None
        self.input_fingerprint = fingerprint(
            "input",
            _input_identity(recipe.input),
            recipe.seed,
            recipe.part_rows,
        )
        self.input_dir = self.run_dir / f"00_input-{self.input_fingerprint[:10]}"
        self.stages: list[PlannedStage] = []
        prev = self.input_fingerprint
        for i, entry in enumerate(recipe.stages, start=1):
            stage = entry.build()
            models: dict[str, Any] = {}
            if stage.uses_engine:
                if recipe.engine is None:
                    raise ValueError(
                        f"stage {stage.name!r} uses an LLM but the recipe has no `engine:`"
                    )
                models["engine"] = _engine_identity(recipe.engine)
            if stage.uses_embedder:
                models["embedder"] = recipe.embedder
            fp = fingerprint(
                prev, stage.name, stage.version, stage.config_for_fingerprint(), models
            )
            stage_dir = self.run_dir / f"{i:02d}_{stage.name}-{fp[:10]}"
            self.stages.append(PlannedStage(i, stage, fp, stage_dir))
            prev = fp

    # ---- models -------------------------------------------------------------------------
    def engine(self) -> Engine:
        """The recipe's engine, one per process (see engines.factory)."""
        if self.recipe.engine is None:
            raise RuntimeError("the recipe configures no engine")
        return get_engine(self.recipe.engine)

    def embedder(self) -> Embedder:
        """The recipe's embedding model, one per process."""
        return get_embedder(self.recipe.embedder)

    def needs_engine(self) -> bool:
        """Whether any unfinished stage will call the LLM."""
        return any(p.stage.uses_engine and not self.is_done(p) for p in self.stages)

    def context(self, planned: PlannedStage, part: int = 0) -> StageContext:
        """A fresh context for one stage part (map parts get a private state folder)."""
        engine_factory: Callable[[], Engine] | None = (
            self.engine if self.recipe.engine is not None else None
        )
        return StageContext(
            stage_name=planned.name,
            stage_index=planned.index,
            seed=self.recipe.seed,
            run_dir=self.run_dir,
            part_index=part,
            engine_factory=engine_factory,
            embedder_factory=self.embedder,
            engine_lock=self._engine_lock,
            engine_stats=EngineStats(),
            show_progress=self.show_progress,
            state_dir=planned.dir / STATE / f"part-{part:05d}" if planned.is_map else None,
        )

    # ---- input --------------------------------------------------------------------------
    def input_parts(self) -> list[Path]:
        """Split the input into parts of `part_rows` (once; later runs reuse them)."""
        done = self.input_dir / SUCCESS
        if done.exists() and read_json(done).get("fingerprint") == self.input_fingerprint:
            return [self.input_dir / p for p in read_json(done)["parts"]]
        spec = self.recipe.input
        frame = self.read_input()
        where = spec.path if spec.path is not None else f"input rows={spec.rows}"
        clear_dir(self.input_dir)
        names: list[str] = []
        step = self.recipe.part_rows
        for k, start in enumerate(range(0, max(frame.height, 1), step)):
            names.append(part_name(k))
            atomic_write_parquet(frame.slice(start, step), self.input_dir / names[-1])
        atomic_write_json(
            {
                "stage": "input",
                "fingerprint": self.input_fingerprint,
                "source": where,
                "rows_out": frame.height,
                "parts": names,
                "finished_at": _now(),
            },
            done,
        )
        return [self.input_dir / n for n in names]

    def read_input(self) -> pl.DataFrame:
        """The recipe's input as records (or blank seed rows), read and validated once."""
        if self._input is None:
            spec = self.recipe.input
            if spec.generator is not None:
                assert spec.rows is not None
                frame = generate_input(
                    spec.generator, rows=spec.rows, seed=self.recipe.seed, options=spec.options
                )
            elif spec.rows is not None:
                frame = pl.DataFrame({"seed_index": pl.int_range(0, spec.rows, eager=True)})
            else:
                assert spec.path is not None
                frame = read_records(
                    spec.path, format=spec.format, mapping=dict(spec.mapping), source=spec.source
                )
            self._input = frame.head(spec.limit) if spec.limit is not None else frame
        return self._input

    def stage_input_parts(self, planned: PlannedStage) -> list[Path]:
        """Output parts of the stage before `planned` (which must be complete)."""
        if planned.index == 1:
            return self.input_parts()
        prev = self.stages[planned.index - 2]
        success = self.success(prev)
        if success is None:
            raise RuntimeError(
                f"stage {prev.name!r} has not finished; cannot start {planned.name!r}"
            )
        return [prev.dir / p for p in success["parts"]]

    # ---- status -------------------------------------------------------------------------
    def success(self, planned: PlannedStage) -> dict[str, Any] | None:
        """The stage's `_SUCCESS.json` if it exists and matches its fingerprint."""
        path = planned.dir / SUCCESS
        if not path.exists():
            return None
        data = read_json(path)
        if data.get("fingerprint") != planned.fingerprint:
            return None
        return dict(data)

    def is_done(self, planned: PlannedStage) -> bool:
        """Whether the stage has a matching `_SUCCESS.json`."""
        return self.success(planned) is not None

    def check_columns(self) -> None:
        """Check every stage's required columns before any model time is spent."""
        done = self.input_dir / SUCCESS
        if done.exists() and read_json(done).get("fingerprint") == self.input_fingerprint:
            available = set(pl.read_parquet_schema(self.input_dir / part_name(0)))
        else:
            available = set(self.read_input().columns)
        for planned in self.stages:
            planned.stage.check_columns(
                sorted(available), where=f"stage {planned.index} ({planned.name})"
            )
            available |= set(planned.stage.produces())

    # ---- map stages ---------------------------------------------------------------------
    def run_map_part(self, planned: PlannedStage, part: int, input_path: Path) -> Path:
        """Process one input part; skip it when its output already exists (resume)."""
        out = planned.dir / part_name(part)
        if out.exists():
            return out
        assert isinstance(planned.stage, MapStage)
        batch = pl.read_parquet(input_path)
        ctx = self.context(planned, part)
        start = time.perf_counter()
        result = planned.stage.process(batch, ctx) if batch.height else batch
        seconds = time.perf_counter() - start
        kept, rejected = _split_drops(result)
        if kept.height:
            _check_produced(planned, kept)
            if _is_records(kept):
                validate_frame(kept, where=f"{planned.dir.name}/{out.name}")
        if rejected.height:
            atomic_write_parquet(rejected, planned.dir / REJECTED / part_name(part))
        atomic_write_json(
            {
                "rows_in": batch.height,
                "rows_out": kept.height,
                "dropped": _drop_counts(rejected),
                "seconds": round(seconds, 3),
                "engine": ctx.engine_stats.snapshot(),
                "extra": ctx.extra_stats,
            },
            planned.dir / f"part-{part:05d}.stats.json",
        )
        atomic_write_parquet(kept, out)  # last: its presence marks the part done
        if ctx.state_dir is not None and ctx.state_dir.exists():
            shutil.rmtree(ctx.state_dir)
        return out

    def finish_map_stage(self, planned: PlannedStage, seconds: float) -> dict[str, Any]:
        """Aggregate part stats into `_SUCCESS.json` once every part exists."""
        inputs = self.stage_input_parts(planned)
        names = [part_name(k) for k in range(len(inputs))]
        missing = [n for n in names if not (planned.dir / n).exists()]
        if missing:
            raise RuntimeError(f"{planned.dir.name}: parts not finished: {missing[:5]}")
        stats = [read_json(planned.dir / f"part-{k:05d}.stats.json") for k in range(len(inputs))]
        dropped: Counter[str] = Counter()
        for s in stats:
            dropped.update(s["dropped"])
        summary = self._summary(
            planned,
            rows_in=sum(s["rows_in"] for s in stats),
            rows_out=sum(s["rows_out"] for s in stats),
            dropped=dict(dropped),
            parts=names,
            seconds=seconds,
            compute_seconds=sum(s["seconds"] for s in stats),
            engine=sum_engine_stats([s["engine"] for s in stats]),
            extra={
                **_merged_extra(planned, [s["extra"] for s in stats]),
                "parts": [s["extra"] for s in stats if s["extra"]],
            },
        )
        atomic_write_json(summary, planned.dir / SUCCESS)
        return summary

    # ---- global stages ------------------------------------------------------------------
    def run_global(self, planned: PlannedStage) -> dict[str, Any]:
        """Run a whole-dataset stage (always from scratch: it is atomic)."""
        assert isinstance(planned.stage, GlobalStage)
        inputs = self.stage_input_parts(planned)
        clear_dir(planned.dir)
        data = scan_parts(inputs)
        rows_in = sum(parquet_rows(p) for p in inputs)
        ctx = self.context(planned)
        start = time.perf_counter()
        if rows_in:
            indexed = data.with_row_index(ROW_COLUMN)
            chosen = planned.stage.select(indexed, ctx).collect()
            if ROW_COLUMN not in chosen.columns:
                raise RuntimeError(
                    f"stage {planned.name!r} dropped the internal column {ROW_COLUMN!r}"
                )
            kept, specific = _split_drops(chosen)
            decided = pl.concat([kept.select(ROW_COLUMN), specific.select(ROW_COLUMN)])
            unselected = (
                indexed.join(decided.lazy(), on=ROW_COLUMN, how="anti")
                .with_columns(pl.lit("not_selected").alias(DROP_REASON))
                .collect()
            )
            rejected = pl.concat([specific, unselected], how="diagonal_relaxed").sort(ROW_COLUMN)
            kept = kept.sort(ROW_COLUMN).drop(ROW_COLUMN)
            rejected = rejected.drop(ROW_COLUMN)
        else:  # nothing to select from: an empty output that keeps the input's columns
            kept, rejected = data.collect(), pl.DataFrame()
        seconds = time.perf_counter() - start
        if kept.height:
            _check_produced(planned, kept)
            if _is_records(kept):
                validate_frame(kept, where=planned.dir.name)
        names = []
        step = self.recipe.part_rows
        for k, begin in enumerate(range(0, max(kept.height, 1), step)):
            names.append(part_name(k))
            atomic_write_parquet(kept.slice(begin, step), planned.dir / names[-1])
        if rejected.height:
            atomic_write_parquet(rejected, planned.dir / REJECTED / part_name(0))
        summary = self._summary(
            planned,
            rows_in=rows_in,
            rows_out=kept.height,
            dropped=_drop_counts(rejected),
            parts=names,
            seconds=seconds,
            compute_seconds=seconds,
            engine=ctx.engine_stats.snapshot(),
            extra=ctx.extra_stats,
        )
        atomic_write_json(summary, planned.dir / SUCCESS)
        return summary

    def _summary(self, planned: PlannedStage, **stats: Any) -> dict[str, Any]:
        return {
            "stage": planned.name,
            "index": planned.index,
            "version": planned.stage.version,
            "fingerprint": planned.fingerprint,
            "config": planned.stage.config_for_fingerprint(),
            "model": self.recipe.engine.model
            if planned.stage.uses_engine and self.recipe.engine
            else None,
            "embedder": self.recipe.embedder if planned.stage.uses_embedder else None,
            "finished_at": _now(),
            **stats,
        }

    # ---- sequential driver --------------------------------------------------------------
    def run(self, progress: Callable[[str], None] | None = None) -> Path:
        """Run every unfinished stage in order, then write the dataset; returns its folder."""
        from gristmill.pipelines.output import write_dataset

        say = progress or log.info
        self.check_columns()
        self.input_parts()
        for planned in self.stages:
            if self.is_done(planned):
                say(f"[{planned.index:02d}] {planned.name}: done before, skipped")
                continue
            start = time.perf_counter()
            if planned.is_map:
                for k, path in enumerate(self.stage_input_parts(planned)):
                    self.run_map_part(planned, k, path)
                summary = self.finish_map_stage(planned, time.perf_counter() - start)
            else:
                summary = self.run_global(planned)
            say(_stage_line(summary))
        return write_dataset(self)

    def final_parts(self) -> list[Path]:
        """Output parts of the last stage."""
        last = self.stages[-1]
        success = self.success(last)
        if success is None:
            raise RuntimeError(f"the last stage {last.name!r} has not finished")
        return [last.dir / p for p in success["parts"]]


def stage_line(summary: dict[str, Any]) -> str:
    """One human line: rows in → out, drops by reason, time, engine throughput."""
    return _stage_line(summary)


def _stage_line(s: dict[str, Any]) -> str:
    drops = ", ".join(f"{k}={v}" for k, v in sorted(s["dropped"].items())) or "none"
    line = (
        f"[{s['index']:02d}] {s['stage']:<16} {s['rows_in']:>6} → {s['rows_out']:>6} rows"
        f"  dropped: {drops}  ({s['seconds']:.1f}s)"
    )
    eng = s.get("engine") or {}
    if eng.get("calls"):
        line += (
            f"  engine: {eng['calls']} calls, {eng['output_tokens']} out tokens,"
            f" {eng['output_tokens_per_s']} tok/s"
        )
    return line


def _merged_extra(planned: PlannedStage, extras: list[dict[str, Any]]) -> dict[str, Any]:
    assert isinstance(planned.stage, MapStage)
    merged = planned.stage.merge_extra(extras)
    if "parts" in merged:
        raise RuntimeError(f"stage {planned.name!r}: merge_extra may not set 'parts'")
    return merged


def _split_drops(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    if DROP_REASON not in frame.columns:
        return frame, frame.head(0)
    dropped = frame.filter(pl.col(DROP_REASON).is_not_null())
    kept = frame.filter(pl.col(DROP_REASON).is_null()).drop(DROP_REASON)
    return kept, dropped


def _drop_counts(rejected: pl.DataFrame) -> dict[str, int]:
    if rejected.height == 0 or DROP_REASON not in rejected.columns:
        return {}
    counts = rejected.group_by(DROP_REASON).len().sort(DROP_REASON)
    return {str(r): int(n) for r, n in counts.iter_rows()}


def _is_records(frame: pl.DataFrame) -> bool:
    return "messages" in frame.columns


def _check_produced(planned: PlannedStage, frame: pl.DataFrame) -> None:
    missing = [c for c in planned.stage.produces() if c not in frame.columns]
    if missing:
        raise RuntimeError(f"stage {planned.name!r} did not produce declared column(s) {missing}")


def _input_identity(spec: InputSpec) -> dict[str, Any]:
    ident: dict[str, Any] = {
        "rows": spec.rows,
        "format": spec.format,
        "mapping": spec.mapping,
        "source": spec.source,
        "limit": spec.limit,
    }
    if spec.generator is not None:
        ident["generator"] = spec.generator
        ident["options"] = spec.options
    if spec.path is not None:
        ident["path_sha256"] = _file_sha256(Path(spec.path))
    return ident


def _file_sha256(path: Path) -> str:
    import hashlib

    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode())
            h.update(_file_sha256(f).encode())
        return h.hexdigest()
    if not path.exists():
        raise FileNotFoundError(f"input file not found: {path}")
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _engine_identity(spec: EngineSpec) -> dict[str, Any]:
    return {
        "backend": spec.backend,
        "model": spec.model,
        "options": {k: v for k, v in spec.options if k not in ENGINE_PERF_OPTIONS},
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
