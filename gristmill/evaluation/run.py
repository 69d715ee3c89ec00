"""`gm.evaluate`: train the base model on each dataset at one budget, per seed, and measure it
on the held-out set; results go to `<out>/evals.parquet` (the catalog's `evals` table).

Everything that makes the comparison unfair is refused before any training: a dataset with
less than the budget, token budgets that give steps more than 10x apart, and an `out`
folder holding results of another budget, base model, eval set or hyper-parameters.

Results are merged into `evals.parquet` after each training run, so a rerun into the same
folder (after a crash, or with more seeds) skips every run whose metrics are already there
for the same dataset and drawn rows; `redo=True` trains them again.

    out/evaluation.json                 the setup: base model, eval set, budget, hyper-parameters
    out/evals.parquet                   one row per dataset x seed x metric
    out/<dataset>/held_out_removed.jsonl  training rows removed because the eval set has them
    out/<dataset>/seed-<k>/training_rows.jsonl  what the trainer received, in order
    out/<dataset>/seed-<k>/checkpoint/  the fine-tuned model and tokenizer
    out/<dataset>/seed-<k>/answers.jsonl  greedy answers and verdicts (with accuracy)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from gristmill.evaluation.budget import (
    Budget,
    check_comparable,
    check_steps,
    draw_rows,
    steps_for,
)
from gristmill.evaluation.data import (
    EvalSet,
    TrainingData,
    exclude_held_out,
    load_eval_set,
    load_training_data,
)
from gristmill.evaluation.metrics import answer_nll, greedy_accuracy
from gristmill.evaluation.results import evals_frame, read_evals, write_evals
from gristmill.evaluation.train import (
    Encoded,
    Progress,
    TrainConfig,
    TrainResult,
    drawn_examples,
    encode_rows,
    train_model,
)
from gristmill.pipelines.checkpoint import atomic_write_json

SETUP_FILE = "evaluation.json"
HELD_OUT_FILE = "held_out_removed.jsonl"
ANSWERS_FILE = "answers.jsonl"


@dataclass(frozen=True, kw_only=True)
class Planned:
    """One training run to do: a dataset, a seed and its drawn examples."""

    data: TrainingData
    seed: int
    examples: tuple[dict[str, Any], ...]
    tokens: int
    steps: int


def _folder_name(name: str, used: set[str]) -> str:
    base = re.sub(r"[^\w.-]", "_", name) or "dataset"
    folder, n = base, 1
    while folder in used:
        n += 1
        folder = f"{base}_{n}"
    used.add(folder)
    return folder


def load_datasets(
    paths: Sequence[str | Path], names: Sequence[str] | None = None
) -> list[TrainingData]:
    """Every dataset, named by `names` or by its folder; two with one name are refused."""
    labels: list[str | None] = list(names) if names is not None else [None] * len(paths)
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} names for {len(paths)} datasets")
    loaded = [load_training_data(p, name=n) for p, n in zip(paths, labels, strict=True)]
    if len({d.name for d in loaded}) != len(loaded):
        raise ValueError(f"two datasets share a name: {[d.name for d in loaded]}; pass names=")
    return loaded


def held_out_removed(
    loaded: Sequence[TrainingData], evals: EvalSet
) -> tuple[list[TrainingData], dict[str, pl.DataFrame]]:
    """Each dataset without the eval set's rows, and the rows removed from each, by name."""
    kept, removed = [], {}
    for data in loaded:
        clean, gone = exclude_held_out(data, evals)
        kept.append(clean)
        removed[data.name] = gone
    return kept, removed


def plan_runs(
    datasets: Sequence[TrainingData],
    encoded: Mapping[str, Encoded],
    budget: Budget,
    seeds: Sequence[int],
    config: TrainConfig,
) -> list[Planned]:
    """Every (dataset, seed) run with its rows; refuses, naming every dataset short of the
    budget, or step counts too far apart, before any training."""
    plans, short = [], []
    for data in datasets:
        enc = encoded[data.name]
        for seed in seeds:
            try:
                draw = draw_rows(
                    enc.loss_tokens,
                    budget,
                    seed=seed,
                    rows_per_step=config.rows_per_step,
                    name=data.name,
                )
            except ValueError as exc:
                short.append(str(exc))
                break
            steps = budget.steps or steps_for(len(draw.rows), config.rows_per_step)
            plans.append(
                Planned(
                    data=data,
                    seed=seed,
                    examples=tuple(drawn_examples(enc, draw)),
                    tokens=draw.total_tokens,
                    steps=steps,
                )
            )
    if short:
        raise ValueError("; ".join(short))
    check_steps({p.data.name: p.steps for p in plans})
    return plans


def finished_runs(
    existing: pl.DataFrame, plans: Sequence[Planned], metrics: Sequence[str]
) -> set[tuple[str, int]]:
    """The (dataset, seed) runs of `plans` whose `metrics` are all in `existing`, recorded for
    the same dataset path and the same number of drawn loss tokens: a rerun skips them."""
    if not existing.height:
        return set()
    done = set()
    for plan in plans:
        rows = existing.filter(
            (pl.col("dataset") == plan.data.name)
            & (pl.col("seed") == plan.seed)
            & (pl.col("dataset_path") == plan.data.path)
            & (pl.col("train_tokens") == plan.tokens)
        )
        if set(metrics) <= set(rows["metric"].to_list()):
            done.add((plan.data.name, plan.seed))
    return done


def measure(
    checkpoint: Path,
    evals: EvalSet,
    work: Path,
    *,
    max_length: int,
    accuracy: bool,
    max_new_tokens: int,
    max_model_len: int,
) -> dict[str, float]:
    """The metrics of one checkpoint: `nll`, and `accuracy` when asked (its answers and
    verdicts go to `work/answers.jsonl`)."""
    metrics = {"nll": answer_nll(checkpoint, evals, max_length=max_length).value}
    if accuracy:
        acc = greedy_accuracy(
            checkpoint, evals, max_new_tokens=max_new_tokens, max_model_len=max_model_len
        )
        metrics["accuracy"] = acc.value
        with (work / ANSWERS_FILE).open("w") as f:
            f.writelines(json.dumps(a) + "\n" for a in acc.answers)
    return metrics


def _run_columns(
    plan: Planned, trained: TrainResult, budget: Budget, evals: EvalSet
) -> dict[str, Any]:
    """The `evals` columns one training run shares across its metrics."""
    return {
        "dataset": plan.data.name,
        "method": plan.data.method,
        "budget_tokens": budget.tokens,
        "budget_steps": budget.steps,
        "seed": plan.seed,
        "eval_set": evals.path,
        "eval_rows": evals.rows.height,
        "dataset_path": plan.data.path,
        "train_rows": trained.rows,
        "train_tokens": trained.tokens,
        "train_steps": trained.steps,
        "final_loss": trained.losses[-1] if trained.losses else None,
        "checkpoint": str(trained.checkpoint),
        "finished_at": datetime.now(UTC).replace(tzinfo=None),
    }


def evaluate(
    datasets: Sequence[str | Path],
    *,
    eval_set: str | Path | EvalSet,
    budget: Budget,
    out: str | Path,
    base_model: str = "smollm2-135m-instruct",
    seeds: Sequence[int] = (0,),
    config: TrainConfig | None = None,
    eval_mapping: Mapping[str, str] | None = None,
    verifier: str | None = None,
    accuracy: bool = False,
    max_new_tokens: int = 256,
    max_model_len: int = 1024,
    names: Sequence[str] | None = None,
    progress: Progress | None = None,
    redo: bool = False,
) -> Path:
    """Fine-tune `base_model` on each dataset once per seed at `budget`, measure held-out
    NLL (and greedy accuracy with `accuracy=True` where the eval set has a verifier), and
    merge the results into `out/evals.parquet`; returns that path. Runs already recorded
    there are skipped unless `redo`."""
    from gristmill.engines.models import resolve_model

    say = progress or (lambda _line: None)
    cfg = config or TrainConfig()
    evals = (
        eval_set
        if isinstance(eval_set, EvalSet)
        else load_eval_set(eval_set, mapping=eval_mapping, verifier=verifier)
    )
    if accuracy and evals.verifier is None:
        raise ValueError(f"accuracy needs a verifier: {evals.path} was given none")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    loaded = load_datasets(datasets, names)
    model_path = resolve_model(base_model)
    hyper = json.dumps(cfg.to_dict(), sort_keys=True)
    setup = {
        "base_model": base_model,
        "eval_set_sha256": evals.sha256,
        "budget": budget.describe(),
        "hyperparameters": hyper,
    }
    root = Path(out)
    existing = read_evals(root)  # refused before training: results here must share the setup
    if existing.height:
        check_comparable([*existing.to_dicts(), *({"dataset": d.name, **setup} for d in loaded)])

    from transformers import AutoTokenizer

    kept, removed = held_out_removed(loaded, evals)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoded = {d.name: encode_rows(tokenizer, d.rows, cfg.max_length) for d in kept}
    plans = plan_runs(kept, encoded, budget, seeds, cfg)
    wanted = ["nll", "accuracy"] if accuracy else ["nll"]
    skip = set() if redo else finished_runs(existing, plans, wanted)

    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        {
            **setup,
            "hyperparameters": cfg.to_dict(),
            "eval_set": evals.describe(),
            "model_path": model_path,
            "seeds": list(seeds),
            "datasets": [{"name": d.name, "path": d.path, "method": d.method} for d in kept],
        },
        root / SETUP_FILE,
    )
    used: set[str] = set()
    folders = {d.name: root / _folder_name(d.name, used) for d in kept}
    for name, gone in removed.items():
        folders[name].mkdir(parents=True, exist_ok=True)
        gone.write_ndjson(folders[name] / HELD_OUT_FILE)
    for n, plan in enumerate(plans, start=1):
        name = plan.data.name
        if (name, plan.seed) in skip:
            say(f"[{n}/{len(plans)}] {name} seed {plan.seed}: already in {root}, skipped")
            continue
        say(
            f"[{n}/{len(plans)}] {name} seed {plan.seed}: {len(plan.examples)} rows, "
            f"{plan.tokens} loss tokens, {plan.steps} steps"
        )
        start = time.perf_counter()
        work = folders[name] / f"seed-{plan.seed}"
        trained = train_model(
            model_path,
            plan.examples,
            cfg,
            seed=plan.seed,
            out=work,
            max_steps=budget.steps,
            progress=say,
        )
        metrics = measure(
            trained.checkpoint,
            evals,
            work,
            max_length=cfg.max_length,
            accuracy=accuracy,
            max_new_tokens=max_new_tokens,
            max_model_len=max_model_len,
        )
        wall = time.perf_counter() - start
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        say(f"    done in {wall:.1f}s (training {trained.seconds:.1f}s): {shown}")
        common = {
            **setup,
            **_run_columns(plan, trained, budget, evals),
            "held_out_removed": removed[name].height,
            "wall_seconds": round(wall, 3),
        }
        rows = [{**common, "metric": m, "value": v} for m, v in metrics.items()]
        write_evals(root, evals_frame(rows))
    return root / "evals.parquet"
