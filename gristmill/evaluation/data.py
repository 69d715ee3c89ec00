"""What an evaluation reads: training datasets (run folders, dataset folders, files) and the
held-out eval set, both as prompt/completion conversations; held-out rows leave training.

A training row is `id`, `prompt` (the turns before the answer), `completion` (the one
assistant answer) and `prompt_text` (the last user turn). An eval row adds `answer` (the
reference answer whose NLL is measured) and `reference` (what a verifier checks against).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from gristmill.catalog import is_run_folder, read_run_folder
from gristmill.pipelines.checkpoint import read_json
from gristmill.pipelines.layout import DATASET_DATA, MANIFEST
from gristmill.records import POLARS_CORE, read_records, record_ids

MESSAGES = POLARS_CORE["messages"]
#: Columns of a training frame, in order.
TRAIN_COLUMNS = ("id", "prompt", "completion", "prompt_text")


@dataclass(frozen=True, kw_only=True)
class TrainingData:
    """One dataset to train on: its name, the selection method that made it, its rows."""

    name: str
    path: str
    method: str
    rows: pl.DataFrame = field(repr=False)


@dataclass(frozen=True, kw_only=True)
class EvalSet:
    """The held-out set: prompts with reference answers, and the verifier (if any) that
    checks generated answers against `reference`."""

    path: str
    sha256: str
    verifier: str | None
    rows: pl.DataFrame = field(repr=False)

    def describe(self) -> dict[str, Any]:
        """What a result records of the eval set."""
        return {
            "path": self.path,
            "sha256": self.sha256,
            "verifier": self.verifier,
            "rows": self.rows.height,
        }


def _last_user(prompt: pl.Expr) -> pl.Expr:
    users = prompt.list.eval(
        pl.when(pl.element().struct.field("role") == "user")
        .then(pl.element().struct.field("content"))
        .otherwise(None)
    ).list.drop_nulls()
    return users.list.last().fill_null("").str.strip_chars()


def conversations(frame: pl.DataFrame, where: str) -> pl.DataFrame:
    """`id`, `prompt`, `completion`, `prompt_text` from a `messages` dataset (ending in an
    assistant turn) or a prompt/completion one."""
    if "prompt" in frame.columns and frame.schema["prompt"] == MESSAGES:
        if "completion" not in frame.columns:
            raise ValueError(f"{where}: a `prompt` of messages needs a `completion` column")
        prompt, completion = pl.col("prompt"), pl.col("completion")
        source = "prompt/completion"
    elif "messages" in frame.columns:
        messages = pl.col("messages")
        prompt = messages.list.slice(0, messages.list.len() - 1)
        completion = messages.list.slice(-1, 1)
        source = "messages"
        roles = frame.select(messages.list.last().struct.field("role").alias("r"))["r"]
        bad = (roles != "assistant").fill_null(True)
        if bad.any():
            row = int(bad.arg_max() or 0)
            raise ValueError(f"{where}: row {row}'s conversation does not end with an answer")
    else:
        raise ValueError(
            f"{where}: no conversation; expected a `messages` column or `prompt`/`completion` "
            f"messages, found columns {frame.columns}"
        )
    if "id" not in frame.columns:
        if source != "messages":
            raise ValueError(f"{where}: no `id` column")
        frame = frame.with_columns(
            record_ids(frame["messages"], pl.Series([None] * frame.height, dtype=pl.String))
        )
    out = frame.select(
        pl.col("id").cast(pl.String), prompt.alias("prompt"), completion.alias("completion")
    )
    return out.with_columns(_last_user(pl.col("prompt")).alias("prompt_text"))


def _parquet_files(path: Path) -> list[Path]:
    for folder in (path / DATASET_DATA, path):
        files = sorted(folder.glob("*.parquet"))
        if files:
            return files
    return []


def _method(manifest: Mapping[str, Any] | None) -> str:
    """The last stage of the recipe that made the dataset (the selection method), or "-"."""
    stages = (manifest or {}).get("stages") or []
    return str(stages[-1]["stage"]) if stages else "-"


def load_training_data(path: str | Path, *, name: str | None = None) -> TrainingData:
    """A run folder (its dataset), a dataset folder (`data/*.parquet`), a folder of Parquet
    files, or one Parquet/JSON-lines file of records."""
    p = Path(path)
    manifest: Mapping[str, Any] | None = None
    if p.is_dir() and is_run_folder(p):
        run = read_run_folder(p)
        if not run.finished:
            raise ValueError(f"{p}: the run is unfinished (no {MANIFEST}); it has no dataset yet")
        files, manifest = run.dataset_files(), run.manifest
    elif p.is_dir():
        files = _parquet_files(p)
        if not files:
            raise ValueError(f"{p}: no Parquet files (looked in {p / DATASET_DATA} and {p})")
        for candidate in (p / MANIFEST, p.parent / MANIFEST):
            if candidate.is_file():
                manifest = read_json(candidate)
                break
    elif p.is_file():
        frame = read_records(p)
        return TrainingData(
            name=name or p.stem, path=str(p), method="-", rows=conversations(frame, str(p))
        )
    else:
        raise FileNotFoundError(f"{p}: no such run folder, dataset folder or file")
    frame = pl.read_parquet(files)
    label = name or (p.name if p.name != "dataset" else p.parent.name)
    return TrainingData(
        name=label, path=str(p), method=_method(manifest), rows=conversations(frame, str(p))
    )


def _sha256(path: Path, extra: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(path.read_bytes())
    digest.update(json.dumps(extra, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def load_eval_set(
    path: str | Path, *, mapping: Mapping[str, str] | None = None, verifier: str | None = None
) -> EvalSet:
    """Read the eval set with gristmill's reader (`mapping` as for a recipe's input, e.g.
    `{"prompt": "question", "response": "answer"}`): each row needs an answer (a final
    assistant turn, or a `reference`)."""
    p = Path(path)
    if verifier is not None:
        from gristmill.verify import VERIFIERS

        if verifier not in VERIFIERS:
            raise ValueError(f"unknown verifier {verifier!r}; known: {list(VERIFIERS)}")
    frame = read_records(p, mapping=mapping)
    messages = pl.col("messages")
    ends_answer = messages.list.last().struct.field("role") == "assistant"
    rows = frame.select(
        "id",
        pl.when(ends_answer)
        .then(messages.list.slice(0, messages.list.len() - 1))
        .otherwise(messages)
        .alias("prompt"),
        pl.when(ends_answer)
        .then(messages.list.last().struct.field("content"))
        .otherwise(pl.col("reference"))
        .alias("answer"),
        "reference",
    )
    rows = rows.with_columns(
        pl.col("reference").fill_null(pl.col("answer")),
        _last_user(pl.col("prompt")).alias("prompt_text"),
    )
    missing = rows["answer"].is_null()
    if missing.any():
        raise ValueError(
            f"{p}: eval row {int(missing.arg_max() or 0)} has no reference answer (no final "
            "assistant turn and no reference)"
        )
    if rows.height == 0:
        raise ValueError(f"{p}: the eval set is empty")
    sha = _sha256(p, {"mapping": dict(mapping or {}), "verifier": verifier})
    return EvalSet(path=str(p), sha256=sha, verifier=verifier, rows=rows)


def exclude_held_out(data: TrainingData, evals: EvalSet) -> tuple[TrainingData, pl.DataFrame]:
    """Remove training rows whose id or prompt text is in the eval set; returns the kept data
    and the removed rows (`id`, `prompt_text`, `why`)."""
    ids = set(evals.rows["id"].to_list())
    prompts = {t for t in evals.rows["prompt_text"].to_list() if t}
    rows = data.rows.with_columns(
        pl.when(pl.col("id").is_in(list(ids)))
        .then(pl.lit("id"))
        .when(pl.col("prompt_text").is_in(list(prompts)))
        .then(pl.lit("prompt"))
        .otherwise(None)
        .alias("why")
    )
    removed = rows.filter(pl.col("why").is_not_null()).select("id", "prompt_text", "why")
    kept = rows.filter(pl.col("why").is_null()).drop("why")
    return TrainingData(name=data.name, path=data.path, method=data.method, rows=kept), removed
