"""`gristmill report DIR`: one self-contained HTML page of plots about a run.

The page names the run, recipe, seed, models and wall time, then shows what the run holds:
the per-stage funnel with drops by reason; example rows each stage kept and dropped (per
reason), with their scores, labels and model; candidates of a few instructions side by side
(`generate`, `grape`, the winner marked); the label mix of labelling stages; a histogram per
`score__*` column, cluster sizes and a 2-D PCA projection of the embeddings, DART difficulty
vs trials and coverage, length distributions, and time and engine throughput per stage.
Plots are matplotlib PNGs inlined as base64 `data:` URIs; every row's text is HTML-escaped;
there is no script and nothing is fetched when the page is viewed. A piece the run does not
have (no embeddings, no scores, no engine) becomes a short note.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from gristmill.catalog import (
    RunFolder,
    StageFolder,
    is_run_folder,
    read_run_folder,
    run_times,
    stage_models,
)
from gristmill.evaluation.results import EVALS_FILE, read_evals, summary
from gristmill.pipelines.checkpoint import atomic_write_text, parquet_rows
from gristmill.records import DROP_REASON, SCORE_PREFIX

REPORT_NAME = "report.html"
#: Most points drawn in the embedding projection (a seeded sample beyond that).
MAX_POINTS = 4000
DPI = 100
#: Column names the DART section reads from rows (first match wins).
BUCKET_COLUMNS = ("difficulty", "level", "bucket")
TRIALS_COLUMNS = ("query_trials", "trials")
CORRECT_COLUMNS = ("query_correct", "correct")
EMBEDDING = "embedding"
CLUSTER = "cluster"
#: Example rows shown per stage: kept rows, and dropped rows per drop reason.
MAX_EXAMPLES = 5
#: Characters of a response (and of a prompt) an example shows before an ellipsis.
RESPONSE_CHARS = 400
PROMPT_CHARS = 600
#: Instructions whose candidates are shown side by side, and candidates per instruction.
MAX_GROUPS = 3
MAX_CANDIDATES = 6
#: Stage keys whose rows are candidates of an instruction (grouped by `parent_id`).
CANDIDATE_STAGES = ("generate", "grape")
GRAPE = "grape"
GRAPE_SCORE = "score__grape"
RANK = "grape_rank"
PROB_SUFFIX = "_prob"
KEPT = "__kept"


@dataclass(frozen=True, kw_only=True)
class Plot:
    """One figure: an id (the HTML element id), a caption and the PNG with its pixel size."""

    id: str
    caption: str
    png: bytes
    width: int
    height: int


@dataclass(frozen=True, kw_only=True)
class Section:
    """A titled part of the report: plots, notes for missing pieces, optional HTML table
    and other HTML (already escaped) after it."""

    id: str
    title: str
    plots: tuple[Plot, ...] = ()
    notes: tuple[str, ...] = ()
    table: str = ""
    html: str = ""


@dataclass(frozen=True, kw_only=True)
class Folder:
    """Rows of one step of the run: the input (index 0) or a stage's kept and dropped parts."""

    index: int
    label: str
    kept: tuple[Path, ...]
    dropped: tuple[Path, ...]

    @cached_property
    def columns(self) -> frozenset[str]:
        """Every column name in the folder's non-empty parts (read from Parquet footers)."""
        parts = _nonempty(self.kept + self.dropped)
        return frozenset(n for p in parts for n in pq.read_schema(p).names)

    def read(self, columns: Sequence[str], *, dropped: bool = True) -> pl.DataFrame:
        """The wanted columns (those present) of kept rows, plus dropped rows if asked."""
        return _read_columns(self.kept + (self.dropped if dropped else ()), columns)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of a run folder (or of an evaluation folder, one holding
    `evals.parquet`) to `out` (default DIR/report.html); returns the path."""
    folder = Path(run_dir)
    if (folder / EVALS_FILE).is_file() and not is_run_folder(folder):
        target = Path(out) if out is not None else folder / REPORT_NAME
        return atomic_write_text(render_eval_report(folder), target)
    run = read_run_folder(run_dir)
    target = Path(out) if out is not None else run.path / REPORT_NAME
    return atomic_write_text(render_report(run), target)


def render_report(run: RunFolder) -> str:
    """The report page of a run as one HTML string."""
    return _page(run, report_sections(run))


def report_sections(run: RunFolder) -> list[Section]:
    """Every section of the report, in page order."""
    folders = run_folders(run)
    final_ids = _final_ids(folders)
    return [
        funnel_section(run),
        examples_section(folders),
        candidates_section(run, folders),
        labels_section(run),
        scores_section(folders, final_ids),
        clusters_section(run, folders, final_ids),
        *difficulty_sections(run, folders),
        lengths_section(folders),
        throughput_section(run),
    ]


def run_folders(run: RunFolder) -> list[Folder]:
    """The input and every stage as Folders, in run order."""
    out = [Folder(index=0, label="input", kept=tuple(run.input_parts()), dropped=())]
    for s in run.stages:
        out.append(
            Folder(
                index=s.index,
                label=f"{s.index:02d} {s.name}",
                kept=tuple(s.parts()),
                dropped=tuple(s.rejected_parts()),
            )
        )
    return out


# ---- sections -------------------------------------------------------------------------------


def funnel_section(run: RunFolder) -> Section:
    """Rows after each step and the drops of each stage, stacked by reason."""
    done = [s for s in run.stages if s.success is not None]
    table = _table(
        ["#", "stage", "rows in", "rows out", "dropped", "seconds"],
        [
            [
                str(s.index),
                s.name,
                str(s.success["rows_in"]),
                str(s.success["rows_out"]),
                ", ".join(f"{k}: {v}" for k, v in sorted(s.success["dropped"].items())) or "-",
                f"{float(s.success['seconds']):.1f}",
            ]
            for s in done
            if s.success is not None
        ],
    )
    if not done:
        return Section(id="funnel", title="Funnel", notes=("No stage has finished yet.",))
    inp = run.input_success() or {}
    labels = ["input"] + [f"{s.index:02d} {s.name}" for s in done]
    rows = [int(inp.get("rows_out", done[0].success["rows_in"]))]  # type: ignore[index]
    rows += [int(s.success["rows_out"]) for s in done if s.success is not None]
    reasons = sorted({r for s in done if s.success for r in s.success["dropped"]})
    fig, (left, right) = _figure(10, 0.9 + 0.42 * len(labels), ncols=2)
    y = np.arange(len(labels))
    left.barh(y, rows, color="#4c72b0")
    left.set_yticks(y, labels)
    left.invert_yaxis()
    left.set_xlabel("rows after the step")
    for yi, n in zip(y, rows, strict=True):
        left.text(n, yi, f" {n}", va="center", fontsize=8)
    left.set_xlim(0, max([*rows, 1]) * 1.18)
    ys = np.arange(len(done))
    base = np.zeros(len(done))
    colours = _colours(len(reasons))
    for reason, colour in zip(reasons, colours, strict=True):
        counts = np.array([s.success["dropped"].get(reason, 0) for s in done if s.success])
        right.barh(ys, counts, left=base, color=colour, label=reason)
        base += counts
    right.set_yticks(ys, labels[1:])
    right.invert_yaxis()
    right.set_xlabel("rows dropped, by reason")
    right.xaxis.get_major_locator().set_params(integer=True)
    if reasons:
        right.legend(fontsize=7, loc="best")
    else:
        right.text(0.5, 0.5, "no stage dropped rows", ha="center", transform=right.transAxes)
    plot = _plot("plot-funnel", fig, "Rows after each step (left) and drops per stage (right).")
    return Section(id="funnel", title="Funnel", plots=(plot,), table=table)


def examples_section(folders: Sequence[Folder]) -> Section:
    """Per stage, the first rows it kept and the first it dropped for each reason."""
    blocks = [b for b in (_stage_examples(f) for f in folders[1:]) if b]
    if not blocks:
        return Section(id="examples", title="Examples", notes=("No stage has written rows yet.",))
    intro = (
        f"<p>Per stage, the first {MAX_EXAMPLES} rows it kept and the first {MAX_EXAMPLES} it "
        f"dropped for each reason, in file order, with their scores, labels and model; "
        f"responses are cut at {RESPONSE_CHARS} characters.</p>"
    )
    return Section(id="examples", title="Examples", html=intro + "\n".join(blocks))


def candidates_section(run: RunFolder, folders: Sequence[Folder]) -> Section:
    """Candidates of a few instructions side by side, for stages that make or pick them."""
    blocks = []
    for stage, folder in zip(run.stages, folders[1:], strict=True):
        kind = _stage_key(stage)
        if kind in CANDIDATE_STAGES and "parent_id" in folder.columns:
            blocks.append(_candidate_block(kind, folder))
    if not blocks:
        note = "No stage made or chose between candidates of an instruction (generate, grape)."
        return Section(id="candidates", title="Candidates", notes=(note,))
    intro = (
        f"<p>Up to {MAX_GROUPS} instructions with several candidates (rows sharing a "
        "<code>parent_id</code>), each shown once with its candidates side by side; for "
        "<code>grape</code> the kept candidate is the winner.</p>"
    )
    return Section(id="candidates", title="Candidates", html=intro + "\n".join(blocks))


def labels_section(run: RunFolder) -> Section:
    """Label counts of each stage whose stats hold a `labels` mix (a judge in label mode)."""
    plots, tables = [], []
    for stage in run.stages:
        success = stage.success or {}
        labels = (success.get("extra") or {}).get("labels")
        if not isinstance(labels, Mapping) or not labels:
            continue
        counts = sorted(((str(k), int(v)) for k, v in labels.items()), key=lambda x: (-x[1], x[0]))
        label = f"{stage.index:02d} {stage.name}"
        column = str((success.get("config") or {}).get("name") or "label")
        total = sum(n for _, n in counts)
        tables.append(
            _table(
                [f"{label}: {column}", "rows", "share"],
                [[k, str(n), f"{100 * n / total:.1f}%" if total else "-"] for k, n in counts],
            )
        )
        fig, (ax,) = _figure(7, max(1.6, 0.8 + 0.3 * len(counts)))
        y = np.arange(len(counts))
        ax.barh(y, [n for _, n in counts], color="#4c72b0")
        ax.set_yticks(y, [k for k, _ in counts])
        ax.invert_yaxis()
        ax.set_xlabel("rows")
        ax.xaxis.get_major_locator().set_params(integer=True)
        for yi, (_, n) in zip(y, counts, strict=True):
            ax.text(n, yi, f" {n}", va="center", fontsize=8)
        ax.set_xlim(0, max([n for _, n in counts] + [1]) * 1.15)
        caption = f"{label}: the label mix of {total} rows (column `{column}`)."
        plots.append(_plot(f"plot-labels-{stage.index:02d}", fig, caption))
    if not plots:
        note = "No stage labelled rows (no `labels` counts in a stage's stats)."
        return Section(id="labels", title="Label mix", notes=(note,))
    return Section(id="labels", title="Label mix", plots=tuple(plots), table="".join(tables))


def scores_section(folders: Sequence[Folder], final_ids: set[str]) -> Section:
    """A histogram per `score__*` column over the rows of the step that added it."""
    plots = []
    seen: set[str] = set()
    for folder in folders:
        cols = folder.columns
        for col in sorted(c for c in cols if c.startswith(SCORE_PREFIX) and c not in seen):
            seen.add(col)
            frame = folder.read(["id", col])
            values = frame[col].cast(pl.Float64).to_numpy()
            ok = np.isfinite(values)
            chosen = (
                frame["id"].is_in(list(final_ids)).to_numpy()
                if "id" in frame.columns
                else np.zeros(frame.height, dtype=bool)
            )
            if not ok.any():
                continue
            fig, (ax,) = _figure(7, 3.2)
            bins = np.histogram_bin_edges(values[ok], bins=30)
            ax.hist(
                [values[ok & chosen], values[ok & ~chosen]],
                bins=bins,
                stacked=True,
                color=["#4c72b0", "#c6c6c6"],
                label=["in the final dataset", "not in the final dataset"],
            )
            ax.set_xlabel(col)
            ax.set_ylabel("rows")
            ax.legend(fontsize=8)
            caption = (
                f"{col}: {int(ok.sum())} rows scored at {folder.label} "
                f"(mean {values[ok].mean():.3g}, median {np.median(values[ok]):.3g})."
            )
            plots.append(_plot(f"plot-score-{_slug(col)}", fig, caption))
    notes = () if plots else ("No `score__*` columns in this run.",)
    return Section(id="scores", title="Scores", plots=tuple(plots), notes=notes)


def clusters_section(run: RunFolder, folders: Sequence[Folder], final_ids: set[str]) -> Section:
    """Cluster sizes (k-means stats or a `cluster` column) and a PCA of the embeddings."""
    plots: list[Plot] = []
    notes: list[str] = []
    sizes = _cluster_sizes(run, folders)
    if sizes is not None:
        stage, total, picked = sizes
        fig, (ax,) = _figure(7, 3.0)
        x = np.arange(len(total))
        ax.bar(x, total, color="#c6c6c6", label="rows in the cluster")
        if picked is not None:
            ax.bar(x, picked, color="#4c72b0", width=0.5, label="rows picked")
        ax.set_xlabel("cluster")
        ax.set_ylabel("rows")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_xticks(x, [str(i) for i in x] if len(x) <= 40 else [""] * len(x))
        ax.legend(fontsize=8)
        caption = f"{len(total)} clusters from {stage}; sizes {min(total)} to {max(total)}."
        plots.append(_plot("plot-clusters", fig, caption))
    else:
        notes.append("No clusters in this run (no k-means stats or `cluster` column).")
    projection = _projection(folders, final_ids)
    if projection is not None:
        plots.append(projection)
    else:
        notes.append("No embeddings to project (no stage output has an `embedding` column).")
    return Section(id="clusters", title="Clusters", plots=tuple(plots), notes=tuple(notes))


def difficulty_sections(run: RunFolder, folders: Sequence[Folder]) -> list[Section]:
    """DART-style difficulty vs trials and coverage, one section per stage that has it."""
    sections = []
    for stage, folder in zip(run.stages, folders[1:], strict=True):
        table = _bucket_table(stage, folder)
        per_query = _query_frame(folder)
        if table is None and per_query is None:
            continue
        sections.append(_difficulty_section(stage, table, per_query))
    return sections


def lengths_section(folders: Sequence[Folder]) -> Section:
    """Prompt and response lengths in words: every row of the first step with responses
    (kept or dropped) against the rows the last step kept."""
    first = next((f for f in folders if _has_values(f, "response")), None)
    last = next((f for f in reversed(folders) if f.kept and "response" in f.columns), None)
    if first is None or last is None:
        return Section(id="lengths", title="Lengths", notes=("No prompt/response columns.",))
    fields = ["prompt", "response"]
    everything = first.read(fields)
    final = last.read(fields, dropped=False)
    fig, axes = _figure(10, 3.0, ncols=2)
    for ax, field in zip(axes, fields, strict=True):
        a = _words(everything, field)
        b = _words(final, field)
        if len(a) == 0:
            ax.text(0.5, 0.5, f"no {field}s", ha="center", transform=ax.transAxes)
            continue
        bins = np.histogram_bin_edges(np.concatenate([a, b]), bins=30)
        ax.hist(a, bins=bins, color="#c6c6c6", label=f"{first.label} (all, {len(a)})")
        ax.hist(b, bins=bins, color="#4c72b0", alpha=0.8, label=f"{last.label} ({len(b)})")
        ax.set_xlabel(f"{field} length (words)")
        ax.set_ylabel("rows")
        ax.legend(fontsize=7)
    caption = (
        f"Word counts of every row {first.label} made (kept or dropped) against the rows "
        f"{last.label} kept."
    )
    return Section(id="lengths", title="Lengths", plots=(_plot("plot-lengths", fig, caption),))


def throughput_section(run: RunFolder) -> Section:
    """Seconds per stage (engine time shaded) and LLM output tokens/s per engine stage."""
    done = [s for s in run.stages if s.success is not None]
    if not done:
        return Section(id="throughput", title="Time and throughput", notes=("No stages.",))
    stats = [(s, s.success.get("engine") or {}) for s in done if s.success is not None]
    engine_stages = [(s, e) for s, e in stats if e.get("calls")]
    table = _table(
        ["stage", "calls", "prompts", "prompt tokens", "output tokens", "engine s", "out tok/s"],
        [
            [
                f"{s.index:02d} {s.name}",
                str(e["calls"]),
                str(e.get("prompts", "")),
                str(e.get("prompt_tokens", "")),
                str(e.get("output_tokens", "")),
                f"{float(e.get('seconds', 0)):.1f}",
                f"{float(e.get('output_tokens_per_s', 0)):.1f}",
            ]
            for s, e in engine_stages
        ],
    )
    plots = []
    labels = [f"{s.index:02d} {s.name}" for s, _ in stats]
    total = np.array([float(s.success["seconds"]) for s, _ in stats if s.success])
    engine_s = np.minimum(total, [float(e.get("seconds", 0.0)) for _, e in stats])
    fig, (ax,) = _figure(7, 0.9 + 0.4 * len(labels))
    y = np.arange(len(labels))
    ax.barh(y, engine_s, color="#dd8452", label="in the LLM engine")
    ax.barh(y, total - engine_s, left=engine_s, color="#4c72b0", label="other")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.legend(fontsize=8)
    plots.append(_plot("plot-stage-time", fig, "Wall time of each stage."))
    notes: tuple[str, ...] = ()
    if engine_stages:
        fig, (ax,) = _figure(7, 0.9 + 0.45 * len(engine_stages))
        y = np.arange(len(engine_stages))
        tps = [float(e.get("output_tokens_per_s", 0.0)) for _, e in engine_stages]
        ax.barh(y, tps, color="#dd8452")
        ax.set_yticks(y, [f"{s.index:02d} {s.name}" for s, _ in engine_stages])
        ax.invert_yaxis()
        ax.set_xlabel("LLM output tokens per second")
        for yi, (v, (_, e)) in zip(y, zip(tps, engine_stages, strict=True), strict=True):
            ax.text(v, yi, f" {v:.0f} ({int(e.get('output_tokens', 0))} tokens)", va="center")
        ax.set_xlim(0, max([*tps, 1.0]) * 1.5)
        caption = "Engine throughput: output tokens over the seconds spent in generate calls."
        plots.append(_plot("plot-throughput", fig, caption))
    else:
        notes = ("No stage called the LLM engine.",)
    return Section(
        id="throughput",
        title="Time and throughput",
        plots=tuple(plots),
        notes=notes,
        table=table if engine_stages else "",
    )


# ---- clusters and projection ----------------------------------------------------------------


def _cluster_sizes(
    run: RunFolder, folders: Sequence[Folder]
) -> tuple[str, list[int], list[int] | None] | None:
    for stage in run.stages:
        extra = (stage.success or {}).get("extra") or {}
        if isinstance(extra.get("cluster_sizes"), list) and extra["cluster_sizes"]:
            picks = extra.get("cluster_picks")
            return (
                f"{stage.index:02d} {stage.name}",
                [int(n) for n in extra["cluster_sizes"]],
                [int(n) for n in picks] if isinstance(picks, list) else None,
            )
    for folder in folders:
        if CLUSTER in folder.columns:
            labels = folder.read([CLUSTER])[CLUSTER].drop_nulls()
            if len(labels):
                counts = labels.value_counts().sort(CLUSTER)
                return folder.label, counts["count"].to_list(), None
    return None


def pca_2d(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows onto their first two principal components (numpy SVD).

    Returns the (n, 2) coordinates and the share of variance each component explains.
    """
    x = np.asarray(vectors, dtype=np.float64)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    var = s**2
    share = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    coords = x @ vt[:2].T
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
        share = np.pad(share, (0, 2 - len(share)))
    return coords, share


def _projection(folders: Sequence[Folder], final_ids: set[str]) -> Plot | None:
    source = next((f for f in folders if EMBEDDING in f.columns), None)
    if source is None:
        return None
    frame = source.read(["id", EMBEDDING], dropped=False).drop_nulls(EMBEDDING)
    if frame.height < 3:
        return None
    if frame.height > MAX_POINTS:
        frame = frame.sample(MAX_POINTS, seed=0)
    vectors = _matrix(frame[EMBEDDING])
    coords, share = pca_2d(vectors)
    ids = frame["id"].to_list() if "id" in frame.columns else [None] * frame.height
    labels = _cluster_labels(folders)
    fig, (ax,) = _figure(7, 5.2)
    if labels:
        cluster = np.array([labels.get(i, -1) if i is not None else -1 for i in ids])
        rest = cluster < 0
        if rest.any():
            ax.scatter(*coords[rest].T, s=10, c="#d0d0d0", label="no cluster (not selected)")
        ks = sorted(set(cluster[~rest].tolist()))
        cmap = _colours(len(ks))
        for k, colour in zip(ks, cmap, strict=True):
            m = cluster == k
            ax.scatter(*coords[m].T, s=16, color=colour, label=f"cluster {k}")
        what = "coloured by cluster"
    else:
        chosen = np.array([i in final_ids for i in ids])
        ax.scatter(*coords[~chosen].T, s=10, c="#d0d0d0", label="not in the final dataset")
        ax.scatter(*coords[chosen].T, s=16, c="#4c72b0", label="in the final dataset")
        what = "final rows in blue"
    ax.set_xlabel(f"PC1 ({share[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({share[1]:.0%} of variance)")
    ax.legend(fontsize=7, ncols=2 if len(set(labels.values())) > 8 else 1)
    caption = f"PCA of {frame.height} `{EMBEDDING}` vectors from {source.label}, {what}."
    return _plot("plot-projection", fig, caption)


def _cluster_labels(folders: Sequence[Folder]) -> dict[str, int]:
    for folder in folders:
        cols = folder.columns
        if CLUSTER in cols and "id" in cols:
            frame = folder.read(["id", CLUSTER]).drop_nulls()
            return {str(i): int(c) for i, c in frame.iter_rows()}
    return {}


def _matrix(column: pl.Series) -> np.ndarray:
    if isinstance(column.dtype, pl.Array):
        return np.asarray(column.to_numpy(), dtype=np.float64)
    return np.vstack([np.asarray(v, dtype=np.float64) for v in column.to_list()])


# ---- difficulty (DART) ----------------------------------------------------------------------


def _bucket_table(stage: StageFolder, folder: Folder) -> pl.DataFrame | None:
    """Per-bucket queries, trials, correct and coverage from the stage's `buckets` stats."""
    extra = (stage.success or {}).get("extra") or {}
    buckets = extra.get("buckets")
    if not isinstance(buckets, Mapping) or not buckets:
        merged: dict[str, dict[str, float]] = {}
        for part in extra.get("parts") or []:
            for name, b in (part.get("buckets") or {}).items():
                t = merged.setdefault(name, {"queries": 0, "trials": 0, "correct": 0, "covered": 0})
                for key in t:
                    t[key] += float(b.get(key, 0))
        buckets = merged
    if not buckets:
        return None
    rows = []
    for name, b in buckets.items():
        queries = float(b.get("queries", 0))
        covered = b.get("covered")
        coverage = (
            float(b["coverage"])
            if "coverage" in b
            else (float(covered) / queries if covered is not None and queries else None)
        )
        rows.append(
            {
                "bucket": str(name),
                "queries": queries if queries else None,
                "trials": float(b.get("trials", 0)),
                "correct": float(b.get("correct", 0)),
                "coverage": coverage,
            }
        )
    return pl.DataFrame(rows)


def bucket_order(name: str) -> tuple[int, float, str]:
    """Sort key of difficulty buckets: numeric names by value first, then the rest by name."""
    try:
        return (0, float(name), "")
    except ValueError:
        return (1, 0.0, name)


def _query_frame(folder: Folder) -> pl.DataFrame | None:
    """One row per query (by prompt) with bucket, fail rate, trials and correct, from rows."""
    cols = folder.columns
    trials = next((c for c in TRIALS_COLUMNS if c in cols), None)
    correct = next((c for c in CORRECT_COLUMNS if c in cols), None)
    bucket = next((c for c in BUCKET_COLUMNS if c in cols), None)
    if trials is None or correct is None or "prompt" not in cols:
        return None
    wanted = ["prompt", trials, correct, *([bucket] if bucket else []), "fail_rate"]
    frame = folder.read(wanted).unique("prompt", keep="first", maintain_order=True)
    frame = frame.rename({trials: "trials", correct: "correct"})
    if bucket is not None and bucket != "bucket":
        frame = frame.rename({bucket: "bucket"})
    if "fail_rate" not in frame.columns:
        t = pl.col("trials").cast(pl.Float64)
        frame = frame.with_columns(
            fail_rate=pl.when(t > 0).then(1 - pl.col("correct") / t).otherwise(None)
        )
    if "bucket" not in frame.columns:
        frame = frame.with_columns(bucket=pl.lit("all"))
    return frame.with_columns(pl.col("bucket").cast(pl.String)).filter(
        pl.col("trials").is_not_null()
    )


def _difficulty_section(
    stage: StageFolder, table: pl.DataFrame | None, per_query: pl.DataFrame | None
) -> Section:
    label = f"{stage.index:02d} {stage.name}"
    if table is None:
        assert per_query is not None
        table = per_query.group_by("bucket").agg(
            queries=pl.len().cast(pl.Float64),
            trials=pl.col("trials").sum().cast(pl.Float64),
            correct=pl.col("correct").sum().cast(pl.Float64),
            coverage=(pl.col("correct") > 0).mean(),
        )
    names = table["bucket"].to_list()
    table = table[sorted(range(len(names)), key=lambda i: bucket_order(names[i]))]
    has_scatter = per_query is not None and per_query.height > 0
    fig, axes = _figure(10 if has_scatter else 8, 3.4, ncols=3 if has_scatter else 2)
    names = table["bucket"].to_list()
    x = np.arange(len(names))
    per_query_trials = [
        t / q if q else t
        for t, q in zip(table["trials"].to_list(), table["queries"].to_list(), strict=True)
    ]
    axes[0].bar(x, per_query_trials, color="#dd8452")
    axes[0].set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    axes[0].set_ylabel("trials per query" if table["queries"].is_not_null().all() else "trials")
    axes[0].set_xlabel("difficulty")
    coverage = [c if c is not None else 0.0 for c in table["coverage"].to_list()]
    axes[1].bar(x, [100 * c for c in coverage], color="#55a868")
    axes[1].set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    axes[1].set_ylabel("coverage (% of queries solved)")
    axes[1].set_ylim(0, 105)
    axes[1].set_xlabel("difficulty")
    if has_scatter:
        assert per_query is not None
        solved = (per_query["correct"] > 0).to_numpy()
        fr = per_query["fail_rate"].cast(pl.Float64).to_numpy()
        tr = per_query["trials"].cast(pl.Float64).to_numpy()
        axes[2].scatter(fr[solved], tr[solved], s=14, c="#55a868", label="solved")
        axes[2].scatter(fr[~solved], tr[~solved], s=14, c="#c44e52", label="never solved")
        axes[2].set_xlabel("fail rate")
        axes[2].set_ylabel("trials")
        axes[2].legend(fontsize=7)
    caption = f"{label}: trials spent and coverage per difficulty bucket" + (
        ", and each query's fail rate against its trials." if has_scatter else "."
    )
    html_table = _table(
        ["bucket", "queries", "trials", "correct", "coverage"],
        [
            [
                str(r["bucket"]),
                _num(r["queries"]),
                _num(r["trials"]),
                _num(r["correct"]),
                "" if r["coverage"] is None else f"{100 * r['coverage']:.1f}%",
            ]
            for r in table.iter_rows(named=True)
        ],
    )
    return Section(
        id=f"difficulty-{_slug(stage.name)}-{stage.index}",
        title=f"Difficulty, trials and coverage ({label})",
        plots=(_plot(f"plot-dart-{stage.index:02d}", fig, caption),),
        table=html_table,
    )


# ---- examples and candidates ----------------------------------------------------------------


def _stage_key(stage: StageFolder) -> str:
    """The stage's recipe key (`generate`, `grape`, ...) once finished, else its name."""
    return str((stage.success or {}).get("key") or stage.name)


def _stage_examples(folder: Folder) -> str:
    """A stage's collapsible block of kept and dropped examples ('' when it has no rows)."""
    n_kept = sum(parquet_rows(p) for p in _nonempty(folder.kept))
    reasons = _reason_counts(_read_columns(folder.dropped, [DROP_REASON]))
    if not n_kept and not reasons:
        return ""
    columns = _example_columns(folder.columns)
    kept = _first_rows(folder.kept, columns, MAX_EXAMPLES)
    parts = [f"<h3>kept: {_shown(kept.height, n_kept)}</h3>", _examples(kept, columns)]
    dropped = _first_rows(folder.dropped, columns, MAX_EXAMPLES, per=DROP_REASON)
    for reason, n in reasons:
        rows = dropped.filter(pl.col(DROP_REASON) == reason)
        parts.append(f"<h3>dropped, {html.escape(reason)}: {_shown(rows.height, n)}</h3>")
        parts.append(_examples(rows, columns, dropped=True))
    why = ", ".join(f"{r}: {n}" for r, n in reasons)
    summary = (
        f"<b>{html.escape(folder.label)}</b>: {n_kept} kept, "
        f"{sum(n for _, n in reasons)} dropped" + (f" ({html.escape(why)})" if why else "")
    )
    return f'<details class="stage"><summary>{summary}</summary>{"".join(parts)}</details>'


def _reason_counts(frame: pl.DataFrame) -> list[tuple[str, int]]:
    """(drop reason, rows) pairs, most rows first."""
    if DROP_REASON not in frame.columns:
        return []
    counts = frame[DROP_REASON].drop_nulls().cast(pl.String).value_counts()
    pairs = [(str(r), int(n)) for r, n in counts.iter_rows()]
    return sorted(pairs, key=lambda x: (-x[1], x[0]))


def _shown(shown: int, total: int) -> str:
    if total == 0:
        return "none"
    return f"{total} rows" + (f", the first {shown} shown" if shown < total else "")


def _example_columns(columns: frozenset[str]) -> list[str]:
    """What an example reads: text, model, drop reason, then its score and label columns."""
    return ["prompt", "response", "model", DROP_REASON, *_value_columns(columns)]


def _value_columns(columns: frozenset[str]) -> list[str]:
    """`score__*` columns, then each `<x>_prob` after its label column `<x>` (when present)."""
    out = sorted(c for c in columns if c.startswith(SCORE_PREFIX))
    for col in sorted(c for c in columns if c.endswith(PROB_SUFFIX) and c != PROB_SUFFIX):
        base = col.removesuffix(PROB_SUFFIX)
        out += [base, col] if base in columns else [col]
    return out


def _examples(frame: pl.DataFrame, columns: Sequence[str], *, dropped: bool = False) -> str:
    """Example cards for the rows of `frame`."""
    values = [c for c in _value_columns(frozenset(frame.columns)) if c in columns]
    cards = []
    for row in frame.iter_rows(named=True):
        tags = _tags(row, values, reason=dropped)
        cards.append(
            f'<div class="ex{" drop" if dropped else ""}">{tags}'
            f'<p class="text"><b>prompt</b> {_excerpt(row.get("prompt"), PROMPT_CHARS)}</p>'
            f'<p class="text"><b>response</b> {_excerpt(row.get("response"), RESPONSE_CHARS)}'
            "</p></div>"
        )
    return "".join(cards)


def _tags(row: Mapping[str, Any], values: Sequence[str], *, reason: bool) -> str:
    """A row's model, scores, labels (with their probability) and drop reason, as chips."""
    chips = []
    if reason and row.get(DROP_REASON) is not None:
        chips.append(f'<span class="reason">{html.escape(str(row[DROP_REASON]))}</span>')
    if row.get("model") is not None:
        chips.append(f"<span>model: {html.escape(str(row['model']))}</span>")
    for col in values:
        value = row.get(col)
        prob = row.get(col + PROB_SUFFIX)
        if value is None or (col.endswith(PROB_SUFFIX) and col.removesuffix(PROB_SUFFIX) in row):
            continue
        text = f"{col}: {_value(value)}" + (f" ({_value(prob)})" if prob is not None else "")
        chips.append(f"<span>{html.escape(text)}</span>")
    return f'<div class="tags">{"".join(chips)}</div>' if chips else ""


def _value(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _excerpt(text: Any, limit: int) -> str:
    """`text` cut to `limit` characters with an ellipsis, HTML-escaped ('(none)' if null)."""
    if text is None:
        return '<span class="note">(none)</span>'
    t = str(text).strip()
    return html.escape(t if len(t) <= limit else t[:limit].rstrip() + "…")


def _candidate_block(kind: str, folder: Folder) -> str:
    """The first instructions of a stage with several candidates, each with them in a grid."""
    ids = folder.read(["parent_id"])  # kept rows first, so groups come in the kept order
    groups = (
        ids.drop_nulls().group_by("parent_id", maintain_order=True).len().filter(pl.col("len") > 1)
        if "parent_id" in ids.columns
        else pl.DataFrame({"parent_id": [], "len": []})
    )
    head = f'<details class="stage" open><summary><b>{html.escape(folder.label)}</b>: '
    if groups.height == 0:
        return head + "no instruction has more than one candidate</summary></details>"
    chosen = groups["parent_id"].head(MAX_GROUPS).to_list()
    columns = [*_example_columns(folder.columns), "parent_id", "engine", "candidate", RANK]
    where = pl.col("parent_id").is_in(chosen)
    frames = [
        f.with_columns(pl.lit(kept).alias(KEPT))
        for f, kept in (
            (_read_columns(folder.kept, columns, where), True),
            (_read_columns(folder.dropped, columns, where), False),
        )
        if f.height
    ]
    rows = pl.concat(frames, how="diagonal_relaxed")
    if RANK in rows.columns:
        rows = rows.sort(RANK, nulls_last=True, maintain_order=True)
    shown = f"the first {len(chosen)} shown" if len(chosen) < groups.height else "all shown"
    parts = [f"{head}{groups.height} instructions with several candidates, {shown}</summary>"]
    for parent in chosen:
        group = rows.filter(pl.col("parent_id") == parent)
        parts.append(_candidate_group(kind, group))
    return "".join(parts) + "</details>"


def _candidate_group(kind: str, group: pl.DataFrame) -> str:
    """One instruction, shown once, and its candidates side by side."""
    cards = []
    for row in group.head(MAX_CANDIDATES).iter_rows(named=True):
        win = kind == GRAPE and row[KEPT]
        chips = ['<span class="win">winner</span>'] if win else []
        if not row[KEPT] and row.get(DROP_REASON) is not None:
            chips.append(f'<span class="reason">{html.escape(str(row[DROP_REASON]))}</span>')
        facts = [
            _facts(row, ("model", "model: {}")),
            _facts(row, ("engine", "engine {}"), ("candidate", "#{}")),
            _facts(row, (GRAPE_SCORE, GRAPE_SCORE + ": {}"), (RANK, "rank {}")),
        ]
        chips += [f"<span>{html.escape(f)}</span>" for f in facts if f]
        cls = "cand win" if win else ("cand drop" if not row[KEPT] else "cand")
        cards.append(
            f'<div class="{cls}"><div class="tags">{"".join(chips)}</div>'
            f'<p class="text">{_excerpt(row.get("response"), RESPONSE_CHARS)}</p></div>'
        )
    more = group.height - MAX_CANDIDATES
    extra = f'<p class="note">and {more} more candidates</p>' if more > 0 else ""
    prompt = _excerpt(group["prompt"][0] if "prompt" in group.columns else None, PROMPT_CHARS)
    return (
        f'<div class="group"><p class="text"><b>instruction</b> {prompt}</p>'
        f'<div class="cands">{"".join(cards)}</div>{extra}</div>'
    )


def _facts(row: Mapping[str, Any], *fields: tuple[str, str]) -> str:
    """The row's non-null `fields`, each put into its format, joined by commas."""
    return ", ".join(f.format(_value(row[c])) for c, f in fields if row.get(c) is not None)


def _first_rows(
    paths: Sequence[Path], columns: Sequence[str], n: int, *, per: str | None = None
) -> pl.DataFrame:
    """The first `n` rows of the parts in file order (or the first `n` per value of `per`)."""
    frames: list[pl.DataFrame] = []
    for path in _nonempty(paths):
        present = [c for c in columns if c in pq.read_schema(path).names]
        if not present or (per is not None and per not in present):
            continue
        lazy = pl.scan_parquet(path).select(present)
        frames.append((lazy.head(n) if per is None else lazy.filter(_first_n(per, n))).collect())
        if per is None and sum(f.height for f in frames) >= n:
            break
    if not frames:
        return pl.DataFrame()
    frame = pl.concat(frames, how="diagonal_relaxed")
    return frame.head(n) if per is None else frame.filter(_first_n(per, n))


def _first_n(column: str, n: int) -> pl.Expr:
    """True on the first `n` rows of each value of `column`."""
    return pl.int_range(pl.len()).over(column) < n


# ---- data helpers ---------------------------------------------------------------------------


def _nonempty(paths: Sequence[Path]) -> list[Path]:
    return [p for p in paths if p.exists() and parquet_rows(p) > 0]


def _read_columns(
    paths: Sequence[Path], columns: Sequence[str], where: pl.Expr | None = None
) -> pl.DataFrame:
    """The wanted columns (those present) of every part, filtered by `where` if given (a
    part without the columns `where` reads is left out)."""
    frames = []
    needs = set(where.meta.root_names()) if where is not None else set()
    for path in _nonempty(paths):
        names = pq.read_schema(path).names
        present = [c for c in columns if c in names]
        if present and needs <= set(present):
            lazy = pl.scan_parquet(path).select(present)
            frames.append((lazy if where is None else lazy.filter(where)).collect())
    if not frames:
        return pl.DataFrame()
    return pl.concat(frames, how="diagonal_relaxed")


def _final_ids(folders: Sequence[Folder]) -> set[str]:
    """Ids kept by the last step that has written rows (the dataset's rows)."""
    for folder in reversed(folders):
        if folder.kept:
            frame = folder.read(["id"], dropped=False)
            return set(frame["id"].to_list()) if "id" in frame.columns else set()
    return set()


def _has_values(folder: Folder, column: str) -> bool:
    if column not in folder.columns:
        return False
    frame = folder.read([column])
    return frame.height > 0 and frame[column].null_count() < frame.height


def _words(frame: pl.DataFrame, field: str) -> np.ndarray:
    if field not in frame.columns or frame.height == 0:
        return np.zeros(0)
    counts = frame[field].drop_nulls().str.count_matches(r"\S+")
    return np.asarray(counts.to_numpy(), dtype=np.float64)


# ---- figures --------------------------------------------------------------------------------


def _figure(width: float, height: float, *, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(axis="both", alpha=0.25)
        ax.set_axisbelow(True)
    return fig, list(axes)


def _plot(plot_id: str, fig: Any, caption: str) -> Plot:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    png = buf.getvalue()
    width, height = struct.unpack(">II", png[16:24])  # the PNG's IHDR chunk
    return Plot(id=plot_id, caption=caption, png=png, width=width, height=height)


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _num(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


# ---- page -----------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1040px;
       color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } figure { margin: 12px 0; } figcaption { color: #555;
     font-size: 13px; } .note { color: #777; font-style: italic; } code { font-size: 12px; }
img { display: block; max-width: 100%; height: auto; }
h3 { font-size: 14px; margin: 14px 0 6px; color: #444; }
details.stage { border: 1px solid #ddd; border-radius: 4px; margin: 8px 0; padding: 4px 12px; }
details.stage > summary { cursor: pointer; padding: 4px 0; }
.ex { border-left: 3px solid #4c72b0; background: #f8f9fb; margin: 6px 0; padding: 4px 10px; }
.ex.drop { border-left-color: #c44e52; background: #fcf7f7; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; margin: 3px 0; font-size: 13px; }
.text b { color: #666; font-size: 11px; text-transform: uppercase; margin-right: 4px; }
.tags span { display: inline-block; background: #e8edf5; border-radius: 3px; padding: 0 6px;
             margin: 2px 4px 2px 0; font-size: 12px; }
.tags span.reason { background: #f3d6d6; } .tags span.win { background: #55a868; color: #fff;
             font-weight: 600; }
.group { margin: 10px 0 14px; } .cands { display: grid; gap: 8px; align-items: start;
         grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); }
.cand { border: 1px solid #ddd; border-radius: 4px; padding: 4px 8px; }
.cand.win { border: 2px solid #55a868; background: #f3faf4; } .cand.drop { background: #fafafa; }
"""


def _page(run: RunFolder, sections: Sequence[Section]) -> str:
    facts = run_facts(run)
    title = f"gristmill report: {facts['run']}"
    body = [f"<h1>{html.escape(title)}</h1>", _table(["", ""], list(facts.items()), head=False)]
    body.append(_toc(sections))
    for section in sections:
        body.append(f'<section id="{section.id}"><h2>{html.escape(section.title)}</h2>')
        body.extend(f'<p class="note">{html.escape(n)}</p>' for n in section.notes)
        body.extend(_figure_html(plot) for plot in section.plots)
        body.append(section.table)
        body.append(section.html)
        body.append("</section>")
    body.append(_provenance(run))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _figure_html(plot: Plot) -> str:
    """A plot as a <figure> with its PNG inlined."""
    data = base64.b64encode(plot.png).decode("ascii")
    return (
        f'<figure id="{plot.id}"><img alt="{html.escape(plot.caption)}" '
        f'width="{plot.width}" height="{plot.height}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(plot.caption)}</figcaption></figure>"
    )


def _engines_fact(engines: Mapping[str, Any]) -> str:
    """`vllm: model` for one engine; `name: vllm model; ...` for several."""
    if len(engines) == 1:
        (e,) = engines.values()
        return f"{e.get('backend')}: {e.get('model')}"
    return "; ".join(f"{n}: {e.get('backend')} {e.get('model')}" for n, e in engines.items())


def run_facts(run: RunFolder) -> dict[str, str]:
    """The header facts: run, recipe, seed, models, input, dataset rows, wall time."""
    m = run.manifest or {}
    recipe = m.get("recipe") or {}
    started, finished = run_times(run)
    done = [s.success for s in run.stages if s.success is not None]
    engines = m.get("engines") or ({"default": m["engine"]} if m.get("engine") else {})
    models = sorted({x for s in done for x in stage_models(s)})
    inp = run.input_success() or {}
    unknown = "unknown (unfinished run: no manifest.json yet)"
    wall = (finished - started).total_seconds() if started and finished else None
    stage_seconds = sum(float(s["seconds"]) for s in done)
    return {
        "run": run.path.name,
        "folder": str(run.path.resolve()),
        "status": "finished" if run.finished else "unfinished",
        "recipe": f"{recipe['name']} ({recipe.get('path') or 'no file'})" if recipe else unknown,
        "seed": str(m["seed"]) if "seed" in m else unknown,
        "engine": _engines_fact(engines) if engines else ("none" if run.finished else unknown),
        "embedder": str(m.get("embedder") or unknown),
        "models used": ", ".join(models) or "none",
        "input": f"{inp.get('source', '?')} ({inp.get('rows_out', '?')} rows)",
        "dataset rows": str((m.get("dataset") or {}).get("rows", "-")),
        "wall time": (
            f"{wall:.0f} s (input split {started:%Y-%m-%d %H:%M:%S} UTC to last stage "
            f"{finished:%H:%M:%S} UTC)"
            if wall is not None and started and finished
            else "-"
        ),
        "stage time": f"{stage_seconds:.1f} s over {len(done)} finished stage(s)",
        "gristmill": str(m.get("gristmill_version", "-")),
        "report written": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def _toc(sections: Sequence[Section]) -> str:
    links = " · ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    return f"<p>{links}</p>"


def _provenance(run: RunFolder) -> str:
    m = run.manifest or {}
    versions = m.get("versions") or {}
    parts = ['<section id="provenance"><h2>Provenance</h2>']
    if versions:
        parts.append(_table(["package", "version"], sorted(versions.items())))
    if m.get("recipe"):
        resolved = json.dumps(m["recipe"].get("resolved"), indent=2, ensure_ascii=False)
        parts.append(
            f"<details><summary>resolved recipe</summary><pre>"
            f"{html.escape(resolved)}</pre></details>"
        )
    fps = [
        (f"{s.index:02d} {s.name}", str((s.success or {}).get("fingerprint", "-")))
        for s in run.stages
    ]
    parts.append(_table(["stage", "fingerprint"], fps))
    parts.append("</section>")
    return "\n".join(parts)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, head: bool = True) -> str:
    if not rows:
        return ""
    top = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if head else ""
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table>{top}{body}</table>"


# ---- evaluations ----------------------------------------------------------------------------


def evals_section(evals: pl.DataFrame) -> Section:
    """Each metric per dataset: every seed's value as a dot, the mean with a ±1 std bar."""
    if evals.height == 0:
        return Section(id="evals", title="Evaluation", notes=("No results yet.",))
    table = summary(evals)  # refuses results that cannot be compared
    metrics = list(dict.fromkeys(evals["metric"].to_list()))
    names = list(dict.fromkeys(evals.sort("dataset")["dataset"].to_list()))
    colours = _colours(len(names))
    fig, axes = _figure(max(4.0, 1.2 + 1.1 * len(names)) * len(metrics), 3.6, ncols=len(metrics))
    for ax, metric in zip(axes, metrics, strict=True):
        for x, (name, colour) in enumerate(zip(names, colours, strict=True)):
            values = evals.filter((pl.col("metric") == metric) & (pl.col("dataset") == name))
            ys = values["value"].to_numpy()
            if ys.size == 0:
                continue
            jitter = np.linspace(-0.12, 0.12, ys.size) if ys.size > 1 else np.zeros(1)
            ax.scatter(x + jitter, ys, color=colour, s=22, alpha=0.7, zorder=3)
            std = float(ys.std(ddof=1)) if ys.size > 1 else 0.0
            ax.errorbar(
                [x + 0.3],
                [float(ys.mean())],
                yerr=[std],
                fmt="D",
                color=colour,
                capsize=4,
                markersize=6,
                zorder=4,
            )
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_xlim(-0.6, len(names) - 0.2)
        lower = "lower is better" if metric == "nll" else "higher is better"
        ax.set_title(f"{metric} ({lower})")
    first = evals.row(0, named=True)
    seeds = evals["seed"].n_unique()
    caption = (
        f"Held-out metrics per dataset: dots are the {seeds} seed(s), the diamond the mean and "
        f"its bar ±1 std over seeds. Base model {first['base_model']}, budget "
        f"{first['budget']}, eval set {first['eval_set']} ({first['eval_rows']} rows)."
    )
    rows = []
    for r in table.iter_rows(named=True):
        runs = evals.filter((pl.col("dataset") == r["dataset"]) & (pl.col("metric") == r["metric"]))
        rows.append(
            [
                r["dataset"],
                r["method"],
                r["metric"],
                f"{r['mean']:.4f} ± {r['std']:.4f}",
                str(r["seeds"]),
                f"{_avg(runs['train_tokens']):.0f}",
                f"{_avg(runs['train_steps']):.0f}",
                f"{_avg(runs['held_out_removed']):.0f}",
                f"{_avg(runs['wall_seconds']):.1f}",
            ]
        )
    header = [
        "dataset",
        "method",
        "metric",
        "mean ± std",
        "seeds",
        "train tokens",
        "steps",
        "held-out rows removed",
        "s per run",
    ]
    return Section(
        id="evals",
        title="Evaluation",
        plots=(_plot("plot-evals", fig, caption),),
        table=_table(header, rows),
    )


def _avg(values: pl.Series) -> float:
    """The mean of a numeric column's non-null values (0 when none)."""
    numbers = [float(v) for v in values.drop_nulls().to_list()]
    return sum(numbers) / len(numbers) if numbers else 0.0


def render_eval_report(folder: Path) -> str:
    """The report page of an evaluation folder: its setup, the chart and the table."""
    evals = read_evals(folder)
    section = evals_section(evals)
    facts = {"evaluation": folder.name, "folder": str(folder.resolve())}
    if evals.height:
        first = evals.row(0, named=True)
        facts |= {
            "base model": str(first["base_model"]),
            "eval set": f"{first['eval_set']} ({first['eval_rows']} rows)",
            "budget": str(first["budget"]),
            "seeds": ", ".join(str(s) for s in sorted(evals["seed"].unique().to_list())),
            "hyper-parameters": str(first["hyperparameters"]),
        }
    facts["report written"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    title = f"gristmill evaluation: {folder.name}"
    body = [f"<h1>{html.escape(title)}</h1>", _table(["", ""], list(facts.items()), head=False)]
    body.append(f'<section id="{section.id}"><h2>{html.escape(section.title)}</h2>')
    body.extend(f'<p class="note">{html.escape(n)}</p>' for n in section.notes)
    body.extend(_figure_html(plot) for plot in section.plots)
    body.append(section.table)
    body.append("</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
