"""DuckDB views over runs: datasets, stage outputs and rejects, stage stats, lineage.

`gristmill query --run DIR "select source, count(*) from dataset group by 1"` opens an
in-memory DuckDB over one run; `gristmill query "select * from runs"` covers every run
under a root folder (default `./runs`). The Parquet files stay the source of truth.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import duckdb
import pyarrow.parquet as pq

from gristmill.pipelines.checkpoint import parquet_rows, read_json
from gristmill.pipelines.layout import MANIFEST, REJECTED, RunLayout

OutputFormat = Literal["table", "csv", "json"]


def _ident(name: str) -> str:
    """A safe SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _glob(folder: Path) -> str:
    return str(folder / "*.parquet").replace("'", "''")


def stage_view_names(names: Sequence[str]) -> list[str]:
    """View names for stages: the stage name, suffixed `_<n>` when a name repeats."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        base = re.sub(r"\W", "_", name)
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return out


def open_run(run_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with views `dataset`, `input`, one per stage (+ `<stage>_rejected`)
    and the table `stage_stats`."""
    run = Path(run_dir)
    layout = RunLayout(run)
    manifest_path = layout.manifest
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"{run}: no {MANIFEST}; is this a finished gristmill run folder (gristmill run --out)?"
        )
    manifest = read_json(manifest_path)
    con = duckdb.connect(":memory:")
    data = layout.dataset_data
    con.execute(f"create view dataset as select * from read_parquet('{_glob(data)}')")
    input_dir = run / manifest["input"]["dir"]
    con.execute(f"create view input as select * from read_parquet('{_glob(input_dir)}')")
    stages = manifest["stages"]
    rows: list[dict[str, Any]] = []
    for view, stage in zip(stage_view_names([s["stage"] for s in stages]), stages, strict=True):
        folder = run / stage["dir"]
        if any(folder.glob("*.parquet")):
            con.execute(
                f"create view {_ident(view)} as select * from "
                f"read_parquet('{_glob(folder)}', union_by_name=true)"
            )
        if any((folder / REJECTED).glob("*.parquet")):
            con.execute(
                f"create view {_ident(view + '_rejected')} as select * from "
                f"read_parquet('{_glob(folder / REJECTED)}', union_by_name=true)"
            )
        rows.append(_stage_row(read_json(layout.success(folder)), view))
    _create_table(con, "stage_stats", STAGE_STATS_COLUMNS, rows)
    return con


#: Columns of the one-run `stage_stats` table (the cross-run table adds `run` and more).
STAGE_STATS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("index", "integer"),
    ("stage", "varchar"),
    ("view", "varchar"),
    ("fingerprint", "varchar"),
    ("rows_in", "bigint"),
    ("rows_out", "bigint"),
    ("dropped", "bigint"),
    ("drops", "json"),
    ("seconds", "double"),
    ("engine_calls", "bigint"),
    ("output_tokens", "bigint"),
    ("output_tokens_per_s", "double"),
    ("model", "varchar"),
)


def _stage_row(success: Mapping[str, Any], view: str) -> dict[str, Any]:
    """One `stage_stats` row from a stage's `_SUCCESS.json`."""
    engine = success.get("engine") or {}
    return {
        "index": success["index"],
        "stage": success["stage"],
        "view": view,
        "fingerprint": success["fingerprint"],
        "rows_in": success["rows_in"],
        "rows_out": success["rows_out"],
        "dropped": sum(success["dropped"].values()),
        "drops": json.dumps(success["dropped"], sort_keys=True),
        "seconds": success["seconds"],
        "engine_calls": int(engine.get("calls", 0)),
        "output_tokens": int(engine.get("output_tokens", 0)),
        "output_tokens_per_s": float(engine.get("output_tokens_per_s", 0.0)),
        "model": success.get("model"),
    }


def _create_table(
    con: duckdb.DuckDBPyConnection,
    name: str,
    columns: Sequence[tuple[str, str]],
    rows: Sequence[Mapping[str, Any]],
) -> None:
    """Create a table with typed columns and insert `rows` (dicts keyed by column name)."""
    spec = ", ".join(f"{_ident(c)} {t}" for c, t in columns)
    con.execute(f"create table {_ident(name)} ({spec})")
    if rows:
        marks = ", ".join("?" for _ in columns)
        con.executemany(
            f"insert into {_ident(name)} values ({marks})",
            [[r[c] for c, _ in columns] for r in rows],
        )


def query(run_dir: str | Path, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run SQL over a run's views; returns column names and rows."""
    return _run_sql(open_run(run_dir), sql)


def _run_sql(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    try:
        rel = con.execute(sql)
        columns = [d[0] for d in rel.description or []]
        return columns, rel.fetchall()
    finally:
        con.close()


# ---- run folders ------------------------------------------------------------------------

#: Where `gristmill query` looks for runs when no `--run`/`--root` is given.
DEFAULT_ROOT = "runs"
#: Environment variable that overrides DEFAULT_ROOT.
ROOT_ENV = "GRISTMILL_RUNS"


@dataclass(frozen=True, kw_only=True)
class StageFolder:
    """One stage's folder in a run, with its `_SUCCESS.json` once the stage finished."""

    index: int
    name: str
    dir: Path
    success: Mapping[str, Any] | None

    def parts(self) -> list[Path]:
        """Kept-row parts: those `_SUCCESS.json` lists, or (unfinished) those written so far."""
        if self.success is not None and "parts" in self.success:
            return [self.dir / p for p in self.success["parts"]]
        return RunLayout.written_parts(self.dir)

    def rejected_parts(self) -> list[Path]:
        """Parts of dropped rows (with `drop_reason`)."""
        return RunLayout.rejected_parts(self.dir)


@dataclass(frozen=True, kw_only=True)
class RunFolder:
    """A run folder read from disk: its manifest (None until finished), input and stages."""

    path: Path
    manifest: Mapping[str, Any] | None
    input_dir: Path | None
    stages: tuple[StageFolder, ...]

    @property
    def finished(self) -> bool:
        """Whether the run wrote its dataset and manifest."""
        return self.manifest is not None

    def input_success(self) -> Mapping[str, Any] | None:
        """The input folder's `_SUCCESS.json` (source, rows, when it was split)."""
        if self.input_dir is None or not RunLayout.success(self.input_dir).exists():
            return None
        data: Mapping[str, Any] = read_json(RunLayout.success(self.input_dir))
        return data

    def input_parts(self) -> list[Path]:
        """The input's parts (those its `_SUCCESS.json` lists, else those on disk)."""
        if self.input_dir is None:
            return []
        listed = (self.input_success() or {}).get("parts")
        if listed is not None:
            return [self.input_dir / p for p in listed]
        return RunLayout.written_parts(self.input_dir)

    def dataset_files(self) -> list[Path]:
        """The finished dataset's Parquet files (none while the run is unfinished)."""
        if self.manifest is None:
            return []
        return [RunLayout(self.path).dataset_dir / f for f in self.manifest["dataset"]["files"]]


def is_run_folder(path: Path) -> bool:
    """A folder holding a manifest or an input split (`00_input-*`) is a run."""
    return RunLayout(path).is_run()


def read_run_folder(path: str | Path) -> RunFolder:
    """Read a run folder: the manifest's stages when finished, else the newest stage folders."""
    run = Path(path)
    if not run.is_dir() or not is_run_folder(run):
        raise FileNotFoundError(
            f"{run}: not a gristmill run folder (no {MANIFEST} and no 00_input-* folder)"
        )
    layout = RunLayout(run)
    if layout.manifest.is_file():
        manifest = read_json(layout.manifest)
        stages = tuple(
            StageFolder(index=s["index"], name=s["stage"], dir=run / s["dir"], success=s)
            for s in manifest["stages"]
        )
        return RunFolder(
            path=run, manifest=manifest, input_dir=run / manifest["input"]["dir"], stages=stages
        )
    newest = layout.newest_stage_dirs()
    input_dir = newest.pop(0)[1] if 0 in newest else None
    found = []
    for index, (name, folder) in sorted(newest.items()):
        marker = layout.success(folder)
        success = read_json(marker) if marker.exists() else None
        found.append(StageFolder(index=index, name=name, dir=folder, success=success))
    return RunFolder(path=run, manifest=None, input_dir=input_dir, stages=tuple(found))


def default_root() -> Path:
    """The runs root: $GRISTMILL_RUNS, else ./runs."""
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def find_runs(root: str | Path) -> dict[str, RunFolder]:
    """Every run folder under `root` (or `root` itself), keyed by its path relative to root."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: runs root not found; pass --root DIR or set ${ROOT_ENV}")
    if is_run_folder(base):
        return {base.resolve().name: read_run_folder(base)}
    runs: dict[str, RunFolder] = {}
    for folder, subdirs, _ in os.walk(base):  # symlinked run folders count, are not walked
        here = Path(folder)
        walk_on = []
        for name in sorted(d for d in subdirs if not d.startswith(".")):
            if is_run_folder(here / name):
                runs[(here / name).relative_to(base).as_posix()] = read_run_folder(here / name)
            else:
                walk_on.append(name)
        subdirs[:] = walk_on
    return dict(sorted(runs.items()))


#: Names the cross-run catalog defines itself; a run with such a name gets a `run_` prefix.
CATALOG_NAMES = frozenset(
    {"runs", "stage_stats", "datasets", "records", "origins", "lineage", "evals"}
)


def run_view_names(names: Sequence[str]) -> list[str]:
    """SQL-friendly view names for runs: `\\W` → `_`, `run_` before a digit or a catalog
    name, `_<n>` when two runs collide (DuckDB names are case-insensitive)."""
    used: set[str] = set()
    out = []
    for name in names:
        base = re.sub(r"\W", "_", name)
        if not base or base[0].isdigit() or base.lower() in CATALOG_NAMES:
            base = f"run_{base}"
        view, n = base, 1
        while view.lower() in used:
            n += 1
            view = f"{base}_{n}"
        used.add(view.lower())
        out.append(view)
    return out


# ---- the cross-run catalog ----------------------------------------------------------------

RUNS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run", "varchar"),
    ("path", "varchar"),
    ("status", "varchar"),
    ("recipe", "varchar"),
    ("recipe_path", "varchar"),
    ("seed", "bigint"),
    ("engine_model", "varchar"),
    ("embedder", "varchar"),
    ("models", "varchar[]"),
    ("input_rows", "bigint"),
    ("rows", "bigint"),
    ("stages", "integer"),
    ("started_at", "timestamp"),
    ("finished_at", "timestamp"),
    ("wall_seconds", "double"),
    ("stage_seconds", "double"),
    ("output_tokens", "bigint"),
    ("fingerprint", "varchar"),
    ("gristmill_version", "varchar"),
)

RUN_STAGE_STATS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run", "varchar"),
    *STAGE_STATS_COLUMNS,
    ("prompts", "bigint"),
    ("prompt_tokens", "bigint"),
    ("engine_seconds", "double"),
    ("finished_at", "timestamp"),
    ("dir", "varchar"),
)

#: The narrow record columns the `records` view keeps from every stage folder.
RECORD_COLUMNS = ("drop_reason", "id", "parent_id", "source", "model", "prompt", "response")


def open_runs(root: str | Path | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB over every run under `root` (default: default_root()).

    Views: one per run's dataset (named by run_view_names), `<run>__<stage>` and
    `<run>__<stage>_rejected` per stage output, `datasets` (all datasets by column name,
    with a `run` column), `records` (every row version of every stage, narrow columns),
    `origins` (where each id first appeared) and `lineage` (each id's chain of parents).
    Tables: `runs`, `stage_stats` and `evals` (every `evals.parquet` of `gristmill evaluate`
    under `root`, with an `evaluation` column naming its folder).
    """
    base = default_root() if root is None else root
    runs = find_runs(base)
    con = duckdb.connect(":memory:")
    names = run_view_names(list(runs))
    run_rows: list[dict[str, Any]] = []
    stat_rows: list[dict[str, Any]] = []
    record_selects: list[str] = []
    for view, run in zip(names, runs.values(), strict=True):
        files = run.dataset_files()
        if files:
            con.execute(f"create view {_ident(view)} as select * from {_read(files)}")
        stage_views = stage_view_names([s.name for s in run.stages])
        for sv, stage in zip(stage_views, run.stages, strict=True):
            for suffix, parts in (("", stage.parts()), ("_rejected", stage.rejected_parts())):
                nonempty = _nonempty(parts)
                if nonempty:
                    con.execute(
                        f"create view {_ident(f'{view}__{sv}{suffix}')} as "
                        f"select * from {_read(nonempty)}"
                    )
            if stage.success is not None:
                stat_rows.append(_run_stage_row(view, stage, sv))
        run_rows.append(_run_row(view, run))
        record_selects.extend(_record_selects(view, run))
    _create_table(con, "runs", RUNS_COLUMNS, run_rows)
    _create_table(con, "stage_stats", RUN_STAGE_STATS_COLUMNS, stat_rows)
    con.execute(f"create view datasets as {_datasets_sql(names, list(runs.values()))}")
    con.execute(f"create view records as {_records_sql(record_selects)}")
    con.execute(ORIGINS_SQL)
    con.execute(LINEAGE_SQL)
    _create_evals(con, Path(base))
    return con


def _create_evals(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    """The `evals` table: every evaluation's results under `root`, in one table."""
    from gristmill.evaluation.results import EVALS_FILE, evals_frame

    files = sorted(p for p in root.rglob(EVALS_FILE) if not p.name.startswith("."))
    selects = [
        f"select {_quote(f.parent.relative_to(root).as_posix() or '.')} as evaluation, * "
        f"from read_parquet({_quote(str(f))})"
        for f in files
    ]
    if selects:
        con.execute(f"create table evals as {' union all by name '.join(selects)}")
        return
    con.register("_gm_no_evals", evals_frame([]).to_arrow())
    con.execute("create table evals as select null::varchar as evaluation, * from _gm_no_evals")
    con.unregister("_gm_no_evals")


def query_runs(root: str | Path | None, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run SQL over every run under `root`; returns column names and rows."""
    return _run_sql(open_runs(root), sql)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _read(files: Sequence[Path]) -> str:
    listed = ", ".join(_quote(str(f)) for f in files)
    return f"read_parquet([{listed}], union_by_name=true)"


def _nonempty(parts: Sequence[Path]) -> list[Path]:
    return [p for p in parts if p.exists() and parquet_rows(p) > 0]


def _utc(stamp: str | None) -> datetime | None:
    """An ISO timestamp as naive UTC (what the `timestamp` columns hold)."""
    if not stamp:
        return None
    parsed = datetime.fromisoformat(stamp)
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def run_times(run: RunFolder) -> tuple[datetime | None, datetime | None]:
    """(started, finished) in UTC: when the input was split and when the last stage finished."""
    start = run.input_success()
    done = [_utc(s.success.get("finished_at")) for s in run.stages if s.success is not None]
    finished = max((d for d in done if d is not None), default=None)
    return _utc(start.get("finished_at")) if start else None, finished


def stage_models(success: Mapping[str, Any]) -> list[str]:
    """The models a finished stage used: each of its engines' and its embedder."""
    engines = success.get("engines") or {}
    llms = list(engines.values()) if engines else [success.get("model")]
    return [str(m) for m in [*llms, success.get("embedder")] if m]


def _run_row(view: str, run: RunFolder) -> dict[str, Any]:
    m = run.manifest or {}
    started, finished = run_times(run)
    done = [s.success for s in run.stages if s.success is not None]
    engines = m.get("engines") or ({"default": m["engine"]} if m.get("engine") else {})
    models = sorted({m for s in done for m in stage_models(s)})
    input_success = run.input_success() or {}
    recipe = m.get("recipe") or {}
    return {
        "run": view,
        "path": str(run.path),
        "status": "finished" if run.finished else "unfinished",
        "recipe": recipe.get("name"),
        "recipe_path": recipe.get("path"),
        "seed": m.get("seed"),
        "engine_model": ", ".join(dict.fromkeys(e["model"] for e in engines.values())) or None,
        "embedder": m.get("embedder"),
        "models": models,
        "input_rows": input_success.get("rows_out"),
        "rows": (m.get("dataset") or {}).get("rows"),
        "stages": len(run.stages),
        "started_at": started,
        "finished_at": finished,
        "wall_seconds": (finished - started).total_seconds() if started and finished else None,
        "stage_seconds": round(sum(float(s["seconds"]) for s in done), 3),
        "output_tokens": sum(int((s.get("engine") or {}).get("output_tokens", 0)) for s in done),
        "fingerprint": (m.get("dataset") or {}).get("fingerprint")
        or (done[-1]["fingerprint"] if done else None),
        "gristmill_version": m.get("gristmill_version"),
    }


def _run_stage_row(view: str, stage: StageFolder, stage_view: str) -> dict[str, Any]:
    assert stage.success is not None
    engine = stage.success.get("engine") or {}
    return {
        "run": view,
        **_stage_row(stage.success, f"{view}__{stage_view}"),
        "prompts": int(engine.get("prompts", 0)),
        "prompt_tokens": int(engine.get("prompt_tokens", 0)),
        "engine_seconds": float(engine.get("seconds", 0.0)),
        "finished_at": _utc(stage.success.get("finished_at")),
        "dir": stage.dir.name,
    }


def _datasets_sql(names: Sequence[str], runs: Sequence[RunFolder]) -> str:
    """All datasets unioned by column name; a column whose type differs between runs is
    cast to varchar so one odd run cannot break the view."""
    schemas = {
        name: pq.read_schema(run.dataset_files()[0])
        for name, run in zip(names, runs, strict=True)
        if run.dataset_files()
    }
    types: dict[str, set[str]] = {}
    for schema in schemas.values():
        for field in schema:
            types.setdefault(field.name, set()).add(str(field.type))
    mixed = {c for c, t in types.items() if len(t) > 1}
    selects = []
    for name, schema in schemas.items():
        run = runs[list(names).index(name)]
        casts = [f"cast({_ident(c)} as varchar) as {_ident(c)}" for c in schema.names if c in mixed]
        star = f"* replace ({', '.join(casts)})" if casts else "*"
        selects.append(f"select {_quote(name)} as run, {star} from {_read(run.dataset_files())}")
    if not selects:
        return "select null::varchar as run where false"
    return " union all by name ".join(selects)


def _record_selects(view: str, run: RunFolder) -> list[str]:
    """One select per folder of the run (input, each stage's kept and rejected rows)."""
    folders: list[tuple[int, str, bool, list[Path]]] = [(0, "input", True, run.input_parts())]
    for stage in run.stages:
        folders.append((stage.index, stage.name, True, stage.parts()))
        folders.append((stage.index, stage.name, False, stage.rejected_parts()))
    selects = []
    for index, stage_name, kept, parts in folders:
        files = _nonempty(parts)
        if not files:
            continue
        present = {n for f in files for n in pq.read_schema(f).names}
        cols = ", ".join(
            f"cast({_ident(c)} as varchar) as {c}" if c in present else f"null::varchar as {c}"
            for c in RECORD_COLUMNS
        )
        selects.append(
            f"select {_quote(view)} as run, {index} as stage_index, {_quote(stage_name)} as "
            f"stage, {'true' if kept else 'false'} as kept, {cols} from {_read(files)}"
        )
    return selects


def _records_sql(selects: Sequence[str]) -> str:
    if selects:
        return " union all ".join(selects)
    empty = ", ".join(f"null::varchar as {c}" for c in RECORD_COLUMNS)
    return (
        "select null::varchar as run, null::integer as stage_index, null::varchar as stage, "
        f"null::boolean as kept, {empty} where false"
    )


#: Where each id first appeared in its run: the stage that created it, and its parent.
ORIGINS_SQL = """
create view origins as
select run, id, parent_id, stage_index, stage, source, model, prompt, response
from records
where id is not null
qualify row_number() over (partition by run, id order by stage_index, kept desc) = 1
"""

#: Each id's chain of ancestors through parent_id (depth 0 is the row itself); an ancestor
#: the run never produced (an id from the input file's own parent_id) has null stage.
LINEAGE_SQL = """
create view lineage as
with recursive chain(run, id, depth, ancestor_id) as (
    select run, id, 0, id from origins
    union all
    select c.run, c.id, c.depth + 1, o.parent_id
    from chain c join origins o on o.run = c.run and o.id = c.ancestor_id
    where o.parent_id is not null and c.depth < 64
)
select c.run, c.id, c.depth, c.ancestor_id,
       o.stage_index as ancestor_stage_index, o.stage as ancestor_stage,
       o.source as ancestor_source, o.prompt as ancestor_prompt,
       o.response as ancestor_response
from chain c left join origins o on o.run = c.run and o.id = c.ancestor_id
"""


def render(columns: list[str], rows: list[tuple[Any, ...]], fmt: OutputFormat) -> str:
    """Format query results as an aligned table, CSV or JSON lines."""
    match fmt:
        case "json":
            return "\n".join(
                json.dumps(dict(zip(columns, r, strict=True)), default=str, ensure_ascii=False)
                for r in rows
            )
        case "csv":
            import csv
            import io

            buf = io.StringIO()
            writer = csv.writer(buf)
            writer.writerow(columns)
            writer.writerows(rows)
            return buf.getvalue().rstrip("\n")
        case "table":
            cells = [[_cell(v) for v in r] for r in rows]
            widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
            line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()
            sep = "  ".join("-" * w for w in widths)
            body = [
                "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                for r in cells
            ]
            return "\n".join([line, sep, *body, f"({len(rows)} rows)"])
        case _:
            raise ValueError(f"unknown format {fmt!r}; use table, csv or json")


def _cell(value: Any, limit: int = 60) -> str:
    text = "NULL" if value is None else str(value)
    text = text.replace("\n", "⏎")
    return text if len(text) <= limit else text[: limit - 1] + "…"
