"""The checkpointed, resumable pipeline: input → stages → dataset.

Where each file goes is `RunLayout`'s business (see layout.py).

The fingerprint chains the previous stage's, the stage's name, version and config, and the
models it uses. A rerun skips stages whose `_SUCCESS.json` matches and, inside a map stage,
parts whose file exists: a crash costs at most the parts in flight. The methods below are
the units the Prefect flow runs as tasks; `run()` runs them in order without Prefect.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from gristmill.embed import Embedder, get_embedder
from gristmill.engines.base import Engine, EngineStats, sum_engine_stats
from gristmill.engines.factory import EngineSpec, close_engine, get_engine, is_running
from gristmill.frames import cut_into_parts
from gristmill.pipelines.checkpoint import (
    atomic_write_json,
    atomic_write_parquet,
    clear_dir,
    parquet_rows,
    read_json,
    read_parts,
)
from gristmill.pipelines.cluster import current_cluster
from gristmill.pipelines.condensed import condensed_input
from gristmill.pipelines.decision import Decision, apply, decide, projection, split_drops
from gristmill.pipelines.generators import generate_input
from gristmill.pipelines.layout import RunLayout, part_name
from gristmill.pipelines.memory import release_freed_memory
from gristmill.pipelines.output import FinishedRun, write_dataset
from gristmill.pipelines.parts import common_schema, read_part
from gristmill.pipelines.recipe import Input, Recipe
from gristmill.pipelines.stage import (
    ROW_COLUMN,
    Map,
    Select,
    Stage,
    StageContext,
    class_path,
    fingerprint,
)
from gristmill.reader import SchemaDrift, iter_record_batches, read_records
from gristmill.reaper import child_pids
from gristmill.records import DROP_REASON, validate_frame
from gristmill.stages import stage_key

log = logging.getLogger("gristmill.pipeline")

#: Parts of an LLM map stage run at once in continuous mode: one part's requests alone
#: rarely fill the engine's batch (the threads runner takes the same default).
PARTS_IN_FLIGHT = 4

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
    #: The recipe engines the stage calls, by name.
    engines: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def is_map(self) -> bool:
        return isinstance(self.stage, Map)


class Pipeline:
    """A recipe bound to a run folder. Build it, then `run()` or drive it from a flow."""

    def __init__(self, recipe: Recipe, run_dir: str | Path, *, show_progress: bool = True):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.layout = RunLayout(self.run_dir)
        self.show_progress = show_progress
        #: vLLM's in-process engine is not thread-safe: one lock per named engine.
        self._engine_locks = {name: threading.Lock() for name in recipe.engines}
        self._lifecycle = threading.Lock()
        #: Engines this pipeline started in this process (it closes only those).
        self._started: dict[str, tuple[EngineSpec, list[int]]] = {}
        self._generated: pl.DataFrame | None = None
        self.input_fingerprint = fingerprint(
            "input",
            _input_identity(recipe.input),
            recipe.seed,
            recipe.part_rows,
        )
        self.input_dir = self.layout.input_dir(self.input_fingerprint)
        self.stages: list[PlannedStage] = []
        prev = self.input_fingerprint
        for i, stage in enumerate(recipe.stages, start=1):
            names = recipe.stage_engines(stage, where=f"stage {i} ({stage.name})")
            identities = [_engine_identity(recipe.engines[n]) for n in names]
            models: dict[str, Any] = {}
            if len(identities) == 1:
                models["engine"] = identities[0]
            elif identities:
                models["engines"] = identities
            if stage.uses_embedder:
                models["embedder"] = recipe.embedder
            fp = fingerprint(
                prev, stage_key(type(stage)), stage.version, stage.config_for_fingerprint(), models
            )
            folder = self.layout.stage_dir(i, stage.name, fp)
            self.stages.append(PlannedStage(i, stage, fp, folder, names))
            prev = fp

    # ---- models -------------------------------------------------------------------------
    def engine(self, name: str) -> Engine:
        """The named engine, one per process (see engines.factory); the first call starts it
        and logs the start in RUN/logs/engines.jsonl."""
        spec = self.recipe.engines[name]
        with self._lifecycle:
            if not is_running(spec):
                before = child_pids()
                start = time.perf_counter()
                get_engine(spec)
                pids = sorted(child_pids() - before)
                self._started[name] = (spec, pids)
                self._log_engine(
                    "start", name, spec, seconds=round(time.perf_counter() - start, 1), pids=pids
                )
            return get_engine(spec)

    def release_engines(self, keep: Collection[str] = ()) -> list[str]:
        """Close the engines this pipeline started, except those named in `keep` and the
        resident ones; returns the names closed. An engine someone else started (a test's,
        a notebook's) is left alone."""
        keep_specs = {self.recipe.engines[n] for n in keep}
        closed = []
        with self._lifecycle:
            for name, (spec, pids) in list(self._started.items()):
                if spec in keep_specs or spec.resident:
                    continue
                del self._started[name]
                if close_engine(spec):
                    alive = _wait_gone(pids, timeout_s=15)
                    self._log_engine("close", name, spec, pids=pids, left_running=alive)
                    closed.append(name)
        return closed

    def _log_engine(self, event: str, name: str, spec: EngineSpec, **extra: Any) -> None:
        line = {
            "event": event,
            "engine": name,
            "model": spec.model,
            "backend": spec.backend,
            "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "process": os.getpid(),
            **extra,
        }
        log.info("engine %s (%s) %s", name, spec.model, event)
        path = self.layout.engine_log
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:  # one short line: an atomic append
            fh.write(json.dumps(line) + "\n")

    def embedder(self) -> Embedder:
        """The recipe's embedding model, one per process."""
        return get_embedder(self.recipe.embedder)

    def engines_to_keep(self, planned: PlannedStage) -> tuple[str, ...]:
        """The engines to keep loaded while `planned` runs: its own, and, when it calls no
        LLM, those a later unfinished stage needs (no restart around an engine-free stage).
        Every other engine is closed first: one model resident at a time."""
        if planned.engines:
            return planned.engines
        later = [p for p in self.stages[planned.index :] if not self.is_done(p)]
        return tuple(dict.fromkeys(n for p in later for n in p.engines))

    def engines_to_start(self) -> list[str]:
        """The engines some unfinished stage will call (a resumed run starts only these)."""
        todo = [p for p in self.stages if not self.is_done(p)]
        return list(dict.fromkeys(n for p in todo for n in p.engines))

    def context(self, planned: PlannedStage, part: int = 0) -> StageContext:
        """A fresh context for one stage part (map parts get a private state folder)."""
        return StageContext(
            stage_name=planned.name,
            stage_index=planned.index,
            seed=self.recipe.seed,
            run_dir=self.run_dir,
            part_index=part,
            engine_names=planned.engines,
            engine_factory=self.engine,
            embedder_factory=self.embedder,
            engine_locks=self._engine_locks,
            engine_stats=EngineStats(),
            show_progress=self.show_progress,
            state_dir=self.layout.state(planned.dir, part),
            cluster=current_cluster(),
            continuous=not self.recipe.deterministic,
        )

    # ---- input --------------------------------------------------------------------------
    def input_parts(self) -> list[Path]:
        """Split the input into parts of `part_rows`, each written as soon as it is read
        (once; later runs reuse them)."""
        done = self.layout.success(self.input_dir)
        if done.exists() and read_json(done).get("fingerprint") == self.input_fingerprint:
            return [self.input_dir / p for p in read_json(done)["parts"]]
        spec = self.recipe.input
        where = spec.path if spec.path is not None else f"input rows={spec.rows}"
        try:
            names, rows = self._write_input(self._input_batches())
        except SchemaDrift as drift:
            log.warning("%s; reading the input whole, so every part keeps one schema", drift)
            names, rows = self._write_input(_slices(self._whole_input(), self.recipe.part_rows))
        atomic_write_json(
            {
                "stage": "input",
                "fingerprint": self.input_fingerprint,
                "source": where,
                "rows_out": rows,
                "parts": names,
                "finished_at": _now(),
            },
            done,
        )
        return [self.input_dir / n for n in names]

    def _write_input(self, batches: Iterable[pl.DataFrame]) -> tuple[list[str], int]:
        """Write each batch as the next input part; the part names and the row count. A read
        that fails part-way (a bad row further on) leaves no parts behind."""
        clear_dir(self.input_dir)
        names: list[str] = []
        rows = 0
        try:
            for k, batch in enumerate(batches):
                atomic_write_parquet(batch, self.layout.part(self.input_dir, k))
                names.append(part_name(k))
                rows += batch.height
        except Exception:
            clear_dir(self.input_dir)
            raise
        return names, rows

    def _input_batches(self) -> Iterator[pl.DataFrame]:
        """The recipe's input as records (or blank seed rows) in frames of `part_rows`, a
        file read and validated as it goes (stopping at `limit`)."""
        spec = self.recipe.input
        if spec.path is None:
            return _slices(self._generated_input(), self.recipe.part_rows)
        return iter_record_batches(
            spec.path,
            rows=self.recipe.part_rows,
            format=spec.format,
            mapping=dict(spec.mapping),
            source=spec.source,
            limit=spec.limit,
        )

    def _generated_input(self) -> pl.DataFrame:
        """Generator rows or blank seed rows, made once."""
        if self._generated is None:
            spec = self.recipe.input
            assert spec.rows is not None
            if spec.generator is not None:
                frame = generate_input(
                    spec.generator, rows=spec.rows, seed=self.recipe.seed, options=spec.options
                )
            else:
                frame = pl.DataFrame({"seed_index": pl.int_range(0, spec.rows, eager=True)})
            self._generated = frame.head(spec.limit) if spec.limit is not None else frame
        return self._generated

    def _whole_input(self) -> pl.DataFrame:
        """The input file read whole (one schema for every row), cut to `limit`."""
        spec = self.recipe.input
        assert spec.path is not None
        frame = read_records(
            spec.path, format=spec.format, mapping=dict(spec.mapping), source=spec.source
        )
        return frame.head(spec.limit) if spec.limit is not None else frame

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
        path = self.layout.success(planned.dir)
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
        done = self.layout.success(self.input_dir)
        if done.exists() and read_json(done).get("fingerprint") == self.input_fingerprint:
            available = set(pl.read_parquet_schema(self.layout.part(self.input_dir, 0)))
        else:  # the first batch has every part's columns (its block is read and checked)
            available = set(next(self._input_batches()).columns)
        for planned in self.stages:
            planned.stage.check_columns(
                sorted(available), where=f"stage {planned.index} ({planned.name})"
            )
            available |= set(planned.stage.produces())

    # ---- map stages ---------------------------------------------------------------------
    def run_map_part(self, planned: PlannedStage, part: int, input_path: Path) -> Path:
        """Process one input part; skip it when its output already exists (resume)."""
        out = self.layout.part(planned.dir, part)
        if out.exists():
            return out
        assert isinstance(planned.stage, Map)
        batch = pl.read_parquet(input_path)
        ctx = self.context(planned, part)
        start = time.perf_counter()
        result = planned.stage.process(batch, ctx) if batch.height else batch
        seconds = time.perf_counter() - start
        kept, rejected = split_drops(result)
        if kept.height:
            _check_produced(planned, kept)
            if _is_records(kept):
                validate_frame(kept, where=f"{planned.dir.name}/{out.name}")
        if rejected.height:
            atomic_write_parquet(rejected, self.layout.rejected(planned.dir, part))
        atomic_write_json(
            {
                "rows_in": batch.height,
                "rows_out": kept.height,
                "dropped": _drop_counts(rejected),
                "seconds": round(seconds, 3),
                "engine": ctx.engine_stats.snapshot(),
                "extra": ctx.extra_stats,
            },
            self.layout.part_stats(planned.dir, part),
        )
        atomic_write_parquet(kept, out)  # last: its presence marks the part done
        if ctx.state_dir is not None and ctx.state_dir.exists():
            shutil.rmtree(ctx.state_dir)
        return out

    def finish_map_stage(self, planned: PlannedStage, seconds: float) -> dict[str, Any]:
        """Aggregate part stats into `_SUCCESS.json` once every part exists."""
        release_freed_memory()  # what the parts freed (an index built once per process stays)
        inputs = self.stage_input_parts(planned)
        names = [part_name(k) for k in range(len(inputs))]
        missing = [n for k, n in enumerate(names) if not self.layout.part(planned.dir, k).exists()]
        if missing:
            raise RuntimeError(f"{planned.dir.name}: parts not finished: {missing[:5]}")
        stats = [read_json(self.layout.part_stats(planned.dir, k)) for k in range(len(inputs))]
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
            engine=_over_wall(sum_engine_stats([s["engine"] for s in stats]), seconds),
            extra={
                **_merged_extra(planned, [s["extra"] for s in stats]),
                "parts": [s["extra"] for s in stats if s["extra"]],
            },
        )
        atomic_write_json(summary, self.layout.success(planned.dir))
        return summary

    # ---- global stages ------------------------------------------------------------------
    def run_global(self, planned: PlannedStage) -> dict[str, Any]:
        """Run a whole-dataset stage (always from scratch: it is atomic). The stage sees the
        columns it `reads()`; its decision is joined back onto the input part by part."""
        stage = planned.stage
        assert isinstance(stage, Select)
        inputs = self.stage_input_parts(planned)
        clear_dir(planned.dir)
        rows_in = sum(parquet_rows(p) for p in inputs)
        ctx = self.context(planned)
        start = time.perf_counter()
        dropped: Counter[str] = Counter()
        if rows_in:
            schema = common_schema(inputs)
            projected = projection(stage.reads(), schema)
            try:
                data = condensed_input(stage, ctx, inputs, schema, projected)
                condensed = time.perf_counter() - start
                result = stage.select(data, ctx)
            finally:  # scratch files (spilled signatures) last only as long as the stage
                _remove_state(ctx)
            compute = time.perf_counter() - start
            decision = decide(
                result,
                rows=rows_in,
                projected=projected,
                produced=stage.produces(),
                stage=planned.name,
                condensed=[c for c in data.columns if c != ROW_COLUMN and c not in schema],
            )
            del data, result  # only the decision stays while the output is written
            release_freed_memory()  # and the stage's working set goes back to the OS
            kept = self._joined_parts(planned, decision, inputs, schema, dropped)
        else:  # nothing to select from: an empty output that keeps the input's columns
            compute = condensed = 0.0
            kept = iter([read_parts(inputs)])
        names, rows_out = self._write_global_parts(planned, kept)
        summary = self._summary(
            planned,
            rows_in=rows_in,
            rows_out=rows_out,
            dropped=dict(sorted(dropped.items())),
            parts=names,
            seconds=time.perf_counter() - start,
            compute_seconds=compute,
            condense_seconds=round(condensed, 3),
            engine=ctx.engine_stats.snapshot(),
            extra=ctx.extra_stats,
        )
        atomic_write_json(summary, self.layout.success(planned.dir))
        return summary

    def _joined_parts(
        self,
        planned: PlannedStage,
        decision: Decision,
        inputs: Sequence[Path],
        schema: pl.Schema,
        dropped: Counter[str],
    ) -> Iterator[pl.DataFrame]:
        """Each input part's kept rows under `decision`; its rejected rows are written to
        `rejected/` under the part's number and counted in `dropped`."""
        offset = 0
        for k, path in enumerate(inputs):
            part = read_part(path, schema, index=ROW_COLUMN, offset=offset)
            offset += part.height
            kept, rejected = apply(decision, part)
            if rejected.height:
                atomic_write_parquet(rejected, self.layout.rejected(planned.dir, k))
                dropped.update(_drop_counts(rejected))
            yield kept

    def _write_global_parts(
        self, planned: PlannedStage, frames: Iterator[pl.DataFrame]
    ) -> tuple[list[str], int]:
        """Write kept rows as parts of `part_rows` (at least one, maybe empty), each checked
        as a map part is; the part names and the rows written."""
        names: list[str] = []
        rows = 0
        for k, frame in enumerate(cut_into_parts(frames, self.recipe.part_rows)):
            out = self.layout.part(planned.dir, k)
            if frame.height:
                _check_produced(planned, frame)
                if _is_records(frame):
                    validate_frame(frame, where=f"{planned.dir.name}/{out.name}")
            atomic_write_parquet(frame, out)
            names.append(out.name)
            rows += frame.height
        return names, rows

    def _summary(self, planned: PlannedStage, **stats: Any) -> dict[str, Any]:
        return {
            "stage": planned.name,
            "key": stage_key(type(planned.stage)),
            "class": class_path(type(planned.stage)),
            "index": planned.index,
            "version": planned.stage.version,
            "fingerprint": planned.fingerprint,
            "config": planned.stage.config_for_fingerprint(),
            "model": ", ".join(self.recipe.engines[n].model for n in planned.engines) or None,
            "engines": {n: self.recipe.engines[n].model for n in planned.engines},
            "embedder": self.recipe.embedder if planned.stage.uses_embedder else None,
            "finished_at": _now(),
            **stats,
        }

    # ---- sequential driver --------------------------------------------------------------
    def run(self, progress: Callable[[str], None] | None = None) -> Path:
        """Run every unfinished stage in order, then write the dataset; returns its folder."""
        say = progress or log.info
        self.check_columns()
        self.input_parts()
        for planned in self.stages:
            if self.is_done(planned):
                say(f"[{planned.index:02d}] {planned.name}: done before, skipped")
                continue
            self.release_engines(keep=self.engines_to_keep(planned))
            start = time.perf_counter()
            if planned.is_map:
                self._run_map_parts(planned)
                summary = self.finish_map_stage(planned, time.perf_counter() - start)
            else:
                summary = self.run_global(planned)
            say(_stage_line(summary))
        self.release_engines()
        return self.write_dataset()

    def _run_map_parts(self, planned: PlannedStage) -> None:
        """Every part of a map stage; an LLM stage's parts run `PARTS_IN_FLIGHT` at a time
        (unless deterministic), so their requests share the engine's batch."""
        parts = list(enumerate(self.stage_input_parts(planned)))
        width = 1 if self.recipe.deterministic or not planned.engines else PARTS_IN_FLIGHT
        if width == 1 or len(parts) == 1:
            for k, path in parts:
                self.run_map_part(planned, k, path)
            return
        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="gm-part") as pool:
            futures = [pool.submit(self.run_map_part, planned, k, path) for k, path in parts]
            for future in futures:
                future.result()

    def write_dataset(self) -> Path:
        """Write the dataset folder, its card and the manifest; returns the dataset folder."""
        return write_dataset(self.finished_run())

    def finished_run(self) -> FinishedRun:
        """The summaries the outputs are made from (every stage must have finished)."""
        stages = []
        for planned in self.stages:
            success = self.success(planned)
            if success is None:
                raise RuntimeError(f"stage {planned.index} ({planned.name}) has not finished")
            stages.append({**success, "dir": planned.dir.name})
        return FinishedRun(
            recipe=self.recipe,
            layout=self.layout,
            input_dir=self.input_dir,
            input_summary=read_json(self.layout.success(self.input_dir)),
            stages=stages,
            final_parts=self.final_parts(),
        )

    def final_parts(self) -> list[Path]:
        """Output parts of the last stage."""
        last = self.stages[-1]
        success = self.success(last)
        if success is None:
            raise RuntimeError(f"the last stage {last.name!r} has not finished")
        return [last.dir / p for p in success["parts"]]


def _remove_state(ctx: StageContext) -> None:
    """Remove a global stage's state folder, if it made one (and `state/` if left empty)."""
    if ctx.state_dir is not None and ctx.state_dir.exists():
        shutil.rmtree(ctx.state_dir)
        with contextlib.suppress(OSError):
            ctx.state_dir.parent.rmdir()


def _over_wall(engine: dict[str, float], wall: float) -> dict[str, float]:
    """Parts that ran at once shared the engine: their summed busy seconds exceed the stage's
    wall time, so throughput is over the wall time then (this run's parts only)."""
    if 0 < wall < engine["seconds"]:
        engine = {**engine, "output_tokens_per_s": round(engine["output_tokens"] / wall, 1)}
    return engine


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
    """The stage's typed stats merged from its parts' (none when it declares no `Stats`)."""
    assert isinstance(planned.stage, Map)
    stats = planned.stage.Stats
    if stats is None:
        return {}
    parts = [stats.from_dict(e) for e in extras if e]
    if not parts:
        return {}
    merged = stats.merge(parts).to_dict()
    if "parts" in merged:
        raise RuntimeError(f"stage {planned.name!r}: its Stats may not have a field 'parts'")
    return merged


def _slices(frame: pl.DataFrame, rows: int) -> Iterator[pl.DataFrame]:
    """`frame` in slices of `rows` rows; an empty frame is one empty slice (one part)."""
    for start in range(0, max(frame.height, 1), rows):
        yield frame.slice(start, rows)


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


def _input_identity(spec: Input) -> dict[str, Any]:
    ident: dict[str, Any] = {
        "rows": spec.rows,
        "format": spec.format,
        "mapping": sorted(spec.mapping.items()),
        "source": spec.source,
        "limit": spec.limit,
    }
    if spec.generator is not None:
        ident["generator"] = spec.generator
        ident["options"] = sorted(spec.options.items())
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
        "options": {k: v for k, v in spec.option_pairs() if k not in ENGINE_PERF_OPTIONS},
    }


def _wait_gone(pids: Sequence[int], *, timeout_s: float) -> list[int]:
    """Wait until these processes exit (an engine's helpers after it closed); those still
    running after `timeout_s`."""
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    running = []
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.status() != psutil.STATUS_ZOMBIE:
                running.append(p.pid)
    return sorted(running)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
