"""`gm.evaluate` on real components: TRL fine-tunes the bundled SmolLM2 for a few steps on two
tiny AlpacaFarm datasets (one in `messages`, one in prompt/completion format), two seeds, at
one token budget; the held-out NLL lands in the `evals` table, which DuckDB reads through the
catalog; held-out rows (by id and by prompt) never reach the trainer; a result under another
budget is refused; the report's chart draws in headless Chromium. An engine test measures
greedy accuracy on GSM8K with the project's vLLM engine and math verifier.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import test_report
from test_report import chromium_layout, drawn_problems, figures

import gristmill as gm
from gristmill.catalog import query_runs
from gristmill.cli import main as cli_main
from gristmill.evaluation.budget import Budget, check_comparable
from gristmill.evaluation.data import exclude_held_out, load_eval_set, load_training_data
from gristmill.evaluation.results import read_evals
from gristmill.evaluation.run import plan_runs
from gristmill.evaluation.train import TRAINING_ROWS, TrainConfig, encode_rows
from gristmill.pipelines.pipeline import Pipeline
from gristmill.records import TrainerFormat, make_record, records_frame, write_format
from gristmill.report import write_report
from gristmill.verify.math import verify_math

#: The report tests' fixture: Debian's chromium, installed when missing and possible.
chromium = test_report.chromium
TESTS = Path(__file__).resolve().parents[1]
ALPACA = TESTS / "selectors" / "data" / "alpaca_farm_eval_gpt35_100.jsonl"
GSM8K = TESTS / "data" / "gsm8k_train_20.jsonl"
EVAL_MAP = {"prompt": "instruction", "input": "input", "response": "output"}
BUDGET = Budget(tokens=120)
CONFIG = TrainConfig(batch_size=2, max_length=256)
SEEDS = (0, 1)
#: Eval rows planted in `alpha` as they are (same id), and one with its prompt, another answer.
PLANTED_BY_ID = 4


def write_dataset(frame: pl.DataFrame, folder: Path, fmt: TrainerFormat) -> Path:
    """A dataset folder as a run writes one: data/train-00000-of-00001.parquet."""
    write_format(frame, folder / "data" / "train-00000-of-00001.parquet", fmt)
    return folder


@pytest.fixture(scope="module")
def setup(alpaca: pl.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The eval set (rows 80-87), `alpha` (rows 0-29 + planted eval rows) and `beta` (30-69)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    lines = ALPACA.read_text().splitlines()
    eval_path = tmp / "eval.jsonl"
    eval_path.write_text("\n".join(lines[80:88]) + "\n")
    planted = alpaca[80 : 80 + PLANTED_BY_ID]
    user = alpaca["messages"][85].to_list()[0]
    answer = {"role": "assistant", "content": "A different answer to a held-out prompt."}
    extra = records_frame([make_record([user, answer], source="x")])
    alpha = pl.concat([alpaca[:30], planted, extra.select(alpaca.columns)], how="vertical")
    return {
        "eval": eval_path,
        "alpha": write_dataset(alpha, tmp / "alpha", "messages"),
        "beta": write_dataset(alpaca[30:70], tmp / "beta", "prompt_completion"),
        "root": tmp / "runs",
    }


@pytest.fixture(scope="module")
def evaluated(setup: dict[str, Any]) -> tuple[Path, list[str]]:
    lines: list[str] = []
    out = setup["root"] / "alpaca-eval"
    gm.evaluate(
        [setup["alpha"], setup["beta"]],
        eval_set=setup["eval"],
        eval_mapping=EVAL_MAP,
        budget=BUDGET,
        seeds=SEEDS,
        config=CONFIG,
        out=out,
        progress=lines.append,
    )
    return out, lines


def test_evals_table_has_one_row_per_dataset_seed_and_metric(
    evaluated: tuple[Path, list[str]], setup: dict[str, Any]
) -> None:
    out, lines = evaluated
    columns, rows = query_runs(
        setup["root"],
        "select dataset, seed, metric, count(*), min(value), min(train_tokens), "
        "max(train_tokens), min(train_steps), max(hyperparameters), min(evaluation) "
        "from evals group by all order by all",
    )
    assert [r[:4] for r in rows] == [(d, s, "nll", 1) for d in ("alpha", "beta") for s in SEEDS], (
        columns
    )
    for _, _, _, _, nll, low, high, steps, hyper, where in rows:
        assert math.isfinite(nll) and 0 < nll < 10
        assert low == high == BUDGET.tokens  # every run trained on exactly the budget
        assert 1 <= steps <= 3
        assert json.loads(hyper) == CONFIG.to_dict()
        assert where == "alpaca-eval"
    # the manifests of what the trainer got agree, and seeds draw different rows
    drawn = {}
    for d in ("alpha", "beta"):
        for s in SEEDS:
            got = [json.loads(x) for x in (out / d / f"seed-{s}" / TRAINING_ROWS).open()]
            assert sum(r["loss_tokens"] for r in got) == BUDGET.tokens
            # the prompt (system and user turns) carries no loss: every row has more tokens
            assert all(0 < r["loss_tokens"] < r["tokens"] - 20 for r in got)
            drawn[d, s] = [r["id"] for r in got]
            assert (out / d / f"seed-{s}" / "checkpoint" / "config.json").is_file()
    assert drawn["alpha", 0] != drawn["alpha", 1]
    # progress: one line per training run, then its steps and losses
    assert sum(line.startswith("[") for line in lines) == 4
    assert lines[0].startswith("[1/4] alpha seed 0: ") and "120 loss tokens" in lines[0]
    assert any(line.strip().startswith("step 1/") and " loss " in line for line in lines)


def test_held_out_rows_never_reach_training(
    evaluated: tuple[Path, list[str]], setup: dict[str, Any]
) -> None:
    out, _ = evaluated
    evals = load_eval_set(setup["eval"], mapping=EVAL_MAP)
    eval_ids = set(evals.rows["id"].to_list())
    eval_prompts = set(evals.rows["prompt_text"].to_list())
    alpha = load_training_data(setup["alpha"])
    planted = alpha.rows.filter(
        pl.col("id").is_in(list(eval_ids)) | pl.col("prompt_text").is_in(list(eval_prompts))
    )
    assert planted.height == PLANTED_BY_ID + 1  # the dataset really holds held-out rows
    for d in ("alpha", "beta"):
        prompts = dict(
            zip(*load_training_data(setup[d]).rows.select("id", "prompt_text"), strict=True)
        )
        for s in SEEDS:
            got = [json.loads(x)["id"] for x in (out / d / f"seed-{s}" / TRAINING_ROWS).open()]
            assert got and not set(got) & eval_ids
            assert not {prompts[i] for i in got} & eval_prompts
    removed = pl.read_ndjson(out / "alpha" / "held_out_removed.jsonl")
    assert sorted(removed["why"].to_list()) == ["id"] * PLANTED_BY_ID + ["prompt"]
    table = read_evals(out)
    assert set(zip(table["dataset"], table["held_out_removed"], strict=True)) == {
        ("alpha", PLANTED_BY_ID + 1),
        ("beta", 0),
    }


def test_a_budget_of_every_row_draws_every_row_but_the_held_out(
    bundled_model_path: Path, setup: dict[str, Any]
) -> None:
    from transformers import AutoTokenizer

    evals = load_eval_set(setup["eval"], mapping=EVAL_MAP)
    alpha = load_training_data(setup["alpha"])
    kept, removed = exclude_held_out(alpha, evals)
    enc = encode_rows(AutoTokenizer.from_pretrained(bundled_model_path), kept.rows, 256)
    everything = Budget(tokens=sum(enc.loss_tokens))
    (plan,) = plan_runs([kept], {kept.name: enc}, everything, [3], CONFIG)
    drawn = [e["id"] for e in plan.examples]
    assert sorted(drawn) == sorted(kept.rows["id"].to_list())
    assert not set(drawn) & set(removed["id"].to_list())
    assert alpha.rows.height == kept.rows.height + PLANTED_BY_ID + 1


def test_unequal_budgets_and_short_datasets_are_refused(
    evaluated: tuple[Path, list[str]], setup: dict[str, Any], tmp_path: Path
) -> None:
    out, _ = evaluated
    before = (out / "evals.parquet").read_bytes()
    with pytest.raises(ValueError, match="different budget") as info:
        gm.evaluate(
            [setup["beta"]],
            eval_set=setup["eval"],
            eval_mapping=EVAL_MAP,
            budget=Budget(tokens=400),
            config=CONFIG,
            out=out,
        )
    message = str(info.value)
    assert "alpha, beta: budget 120 tokens" in message and "beta: budget 400 tokens" in message
    assert (out / "evals.parquet").read_bytes() == before
    # results read together are checked too, whoever wrote them
    rows = read_evals(out).to_dicts()
    rows[0] = {**rows[0], "dataset": "gamma", "budget": "2 steps"}
    with pytest.raises(ValueError, match=r"gamma: budget 2 steps"):
        check_comparable(rows)
    with pytest.raises(ValueError, match=r"dataset 'alpha' has \d+ loss tokens, fewer than"):
        gm.evaluate(
            [setup["alpha"], setup["beta"]],
            eval_set=setup["eval"],
            eval_mapping=EVAL_MAP,
            budget=Budget(tokens=10**6),
            config=CONFIG,
            out=tmp_path / "short",
        )
    with pytest.raises(ValueError, match="exactly one"):
        Budget(tokens=10, steps=2)


def test_report_draws_the_evaluation_chart(
    evaluated: tuple[Path, list[str]],
    chromium: str,
    tmp_path: Path,
) -> None:
    out, _ = evaluated
    html = write_report(out).read_text()
    assert list(figures(html)) == ["plot-evals"]
    layout, shot = chromium_layout(html, chromium, tmp_path)
    assert drawn_problems(html, layout, shot) == {}
    assert "alpha" in html and "beta" in html and "120 tokens" in html
    assert html.count("<tr><td>") >= 2 + 5  # a summary row per dataset, after the facts


def test_cli_evaluate_prints_progress(
    setup: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    args = ["evaluate", str(setup["beta"]), "--eval-set", str(setup["eval"])]
    args += [f"--eval-map={k}={v}" for k, v in EVAL_MAP.items()]
    args += ["--budget-steps", "2", "--batch-size", "2", "--max-length", "128", "--out", str(out)]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "[1/1] beta seed 0: 4 rows" in printed
    assert "step 2/2 loss" in printed and "nll" in printed
    (row,) = read_evals(out).to_dicts()
    assert (row["budget"], row["train_steps"], row["train_rows"]) == ("2 steps", 2, 4)
    # a rerun with another seed (or after a crash) trains only what the folder lacks
    assert cli_main([*args, "--seeds", "0,1"]) == 0
    printed = capsys.readouterr().out
    assert f"[1/2] beta seed 0: already in {out}, skipped" in printed
    assert "[2/2] beta seed 1: 4 rows" in printed and printed.count("step 2/2 loss") == 1
    again = read_evals(out).sort("seed").to_dicts()
    assert [r["seed"] for r in again] == [0, 1]
    assert again[0]["finished_at"] == row["finished_at"]  # seed 0's result was kept as it was


@pytest.mark.engine
def test_greedy_accuracy_with_the_engine_and_the_math_verifier(tmp_path: Path) -> None:
    problems = [json.loads(x) for x in GSM8K.read_text().splitlines()]
    train = [
        make_record(
            [
                {"role": "user", "content": p["question"]},
                {"role": "assistant", "content": p["answer"]},
            ],
            source="gsm8k",
        )
        for p in problems[:14]
    ]
    dataset = write_dataset(records_frame(train), tmp_path / "gsm", "messages")
    eval_path = tmp_path / "gsm_eval.jsonl"
    eval_path.write_text("\n".join(json.dumps(p) for p in problems[14:]) + "\n")
    out = tmp_path / "eval"
    gm.evaluate(
        [dataset],
        eval_set=eval_path,
        eval_mapping={"prompt": "question", "response": "answer"},
        verifier="math",
        accuracy=True,
        budget=Budget(steps=1),
        config=TrainConfig(batch_size=2, max_length=384),
        max_new_tokens=160,
        out=out,
    )
    table = read_evals(out)
    assert sorted(table["metric"].to_list()) == ["accuracy", "nll"]
    answers = [json.loads(x) for x in (out / "gsm" / "seed-0" / "answers.jsonl").open()]
    assert len(answers) == 6 and all(a["answer"].strip() for a in answers)
    # the recorded accuracy is the verifier's verdict on the recorded answers
    refs = {p["question"]: p["answer"] for p in problems[14:]}
    evals = load_eval_set(eval_path, mapping={"prompt": "question", "response": "answer"})
    by_id = dict(zip(evals.rows["id"], evals.rows["prompt_text"], strict=True))
    again = [verify_math(a["answer"], refs[by_id[a["id"]]]).correct for a in answers]
    assert again == [a["correct"] for a in answers]
    accuracy = table.filter(pl.col("metric") == "accuracy")["value"][0]
    assert accuracy == pytest.approx(sum(again) / 6)


def test_the_catalog_has_an_empty_evals_table_before_any_evaluation(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    columns, rows = query_runs(tmp_path / "runs", "select * from evals")
    assert rows == []
    assert columns[:1] == ["evaluation"] and {"dataset", "seed", "metric", "value"} <= set(columns)


def test_a_run_folder_is_read_as_its_dataset_with_its_selection_method(
    tmp_path: Path, setup: dict[str, Any]
) -> None:
    recipe = gm.Recipe(
        name="random-30",
        input=gm.Input(path=str(ALPACA), mapping=EVAL_MAP),
        stages=[gm.stages.Heuristics(max_response_words=200), gm.stages.RandomSelect(budget=30)],
    )
    run = tmp_path / "random-30"
    Pipeline(recipe, run, show_progress=False).run(lambda _: None)
    data = load_training_data(run)
    assert (data.name, data.method, data.rows.height) == ("random-30", "random", 30)
    assert data.rows.columns == ["id", "prompt", "completion", "prompt_text"]
    dataset = pl.read_parquet(run / "dataset" / "data")
    assert sorted(data.rows["id"].to_list()) == sorted(dataset["id"].to_list())
    # the run's rows held out by the eval set (rows 80-87 of the same file) are found
    kept, removed = exclude_held_out(data, load_eval_set(setup["eval"], mapping=EVAL_MAP))
    eval_ids = set(load_eval_set(setup["eval"], mapping=EVAL_MAP).rows["id"].to_list())
    assert set(removed["id"].to_list()) == set(dataset["id"].to_list()) & eval_ids
    assert kept.rows.height + removed.height == 30
