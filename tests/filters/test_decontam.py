"""Decontamination on real data: planted GSM8K items are caught and named, clean rows pass;
plus a recipe run of exact_dedup -> minhash_dedup -> decontam through the pipeline."""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from gristmill.filters.decontam import Decontam, DecontamConfig, EvalSet, eval_index
from gristmill.pipelines.layout import SUCCESS
from gristmill.pipelines.pipeline import Pipeline
from gristmill.pipelines.recipe import Recipe, RecipeError
from gristmill.pipelines.stage import StageContext
from gristmill.records import RecordError, make_record, records_frame

TESTS = Path(__file__).resolve().parents[1]
GSM8K_EVAL = TESTS / "data" / "gsm8k_train_20.jsonl"  # stands in for a test split
GSM8K_CLEAN = TESTS / "filters" / "data" / "gsm8k_train_20_119.jsonl"  # other problems
ALPACA_RAW = TESTS / "selectors" / "data" / "alpaca_farm_eval_gpt35_100.jsonl"
WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Reference tokens, written independently of the stage."""
    return WORD.findall(unicodedata.normalize("NFKC", text).lower())


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def qa(prompt: str, answer: str) -> dict[str, Any]:
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return make_record(msgs, source="planted")


def ctx(tmp_path: Path) -> StageContext:
    return StageContext(stage_name="decontam", stage_index=0, seed=0, run_dir=tmp_path)


def gsm8k_config(**kw: Any) -> DecontamConfig:
    sets = ({"path": str(GSM8K_EVAL), "fields": ["question"], "name": "gsm8k"},)
    return DecontamConfig(eval_sets=sets, **kw)  # type: ignore[arg-type]


EVAL_QUESTIONS = [str(r["question"]) for r in jsonl(GSM8K_EVAL)]
CLEAN = [qa(r["question"], r["answer"]) for r in jsonl(GSM8K_CLEAN)]


def planted_rows() -> tuple[list[dict[str, Any]], dict[int, tuple[str, str, str | None]]]:
    """Planted rows and what each should report: (item, field, n-gram or None: unchecked)."""
    q = EVAL_QUESTIONS
    inner2 = " ".join(q[2].split()[2:-2])  # first and last two words rephrased away
    t9 = words(q[9])
    t5 = words(q[5])
    rows = [
        (
            qa(f"Here is a word problem for you: {inner2} Please solve it step by step.", "42"),
            ("2", "prompt", None),
        ),
        (
            qa("Can you help with homework?", f"Sure! It reads: “{q[11]}” Let us start."),
            ("11", "response", None),
        ),
        (qa(re.sub(r"\s+", "   ", q[15].upper()), "The answer is 5."), ("15", "prompt", None)),
        # exactly 13 shared words: caught, and the report names those words
        (
            qa("Consider: " + " ".join(t9[10:23]) + ". Okay?", "Fine."),
            ("9", "prompt", " ".join(t9[10:23])),
        ),
        # exactly 12 shared words: clean
        (qa("Consider: " + " ".join(t5[5:17]) + ". Okay?", "Fine."), None),
    ]
    return [r for r, _ in rows], {k: e for k, (_, e) in enumerate(rows) if e is not None}


def test_planted_gsm8k_items_are_caught_and_named(alpaca: pl.DataFrame, tmp_path: Path) -> None:
    plants, expected = planted_rows()
    real = alpaca.to_dicts() + CLEAN
    frame = records_frame(real[:120] + plants + real[120:])
    context = ctx(tmp_path)
    out = Decontam(gsm8k_config()).process(frame, context)
    assert out.height == frame.height
    hit_rows = out.get_column("drop_reason").is_not_null().arg_true().to_list()
    assert hit_rows == [120 + k for k in expected]
    assert set(out.get_column("drop_reason").drop_nulls()) == {"contaminated"}
    for k, (item, field, ngram) in expected.items():
        row = out.row(120 + k, named=True)
        assert (row["contam_eval"], row["contam_item"], row["contam_field"]) == (
            "gsm8k",
            item,
            field,
        )
        shared = str(row["contam_ngram"])
        assert len(shared.split()) == 13 and shared in " ".join(words(EVAL_QUESTIONS[int(item)]))
        if ngram is not None:
            assert shared == ngram
    assert out.filter(pl.col("drop_reason").is_null()).get_column("contam_eval").null_count() == (
        frame.height - len(expected)
    )
    assert context.extra_stats["contaminated"] == 4
    assert context.extra_stats["by_eval_set"] == {"gsm8k": 4}
    ngrams = sum(len(words(q)) - 12 for q in EVAL_QUESTIONS)
    index_stats = {"items": 20, "texts": 20, "texts_too_short": 0, "ngrams": ngrams}
    assert context.extra_stats["index"] == {"gsm8k": index_stats}
    # only the fields asked for are checked
    prompts_only = Decontam(gsm8k_config(fields=("prompt",))).process(frame, ctx(tmp_path))
    assert prompts_only.get_column("drop_reason").drop_nulls().len() == 3


def test_short_eval_items_must_appear_whole(tmp_path: Path) -> None:
    # AlpacaFarm instructions as the eval set: many have fewer than 13 words
    instructions = [str(r["instruction"]) for r in jsonl(ALPACA_RAW)]
    assert instructions[1] == "What are different drawers I should have for clothes?"
    assert instructions[3] == "What breed dog is smallest?"
    sets = ({"path": str(ALPACA_RAW), "fields": ["instruction"], "name": "alpaca_eval"},)
    cfg = DecontamConfig(eval_sets=sets)  # type: ignore[arg-type]
    plants = [
        qa(f"My friend asked me: {instructions[1].lower()} What do you think?", "Socks."),
        qa("Why can I see the moon during the", "day, you mean?"),  # 8 of 9 words
        qa(f"Quick one. {instructions[3]} Thanks a lot.", "A chihuahua."),  # 5 words: unchecked
    ]
    frame = records_frame([*CLEAN[:50], *plants])
    context = ctx(tmp_path)
    out = Decontam(cfg).process(frame, context)
    assert out.get_column("drop_reason").is_not_null().arg_true().to_list() == [50]
    hit = out.row(50, named=True)
    assert hit["contam_item"] == "1"
    assert hit["contam_ngram"] == "what are different drawers i should have for clothes"
    lengths = [len(words(t)) for t in instructions]
    stats = context.extra_stats["index"]["alpaca_eval"]
    assert stats["texts_too_short"] == sum(n < 8 for n in lengths) > 0
    assert stats["ngrams"] == sum(n - 12 if n >= 13 else 1 for n in lengths if n >= 8)


def test_parquet_eval_set_with_ids_and_list_fields(tmp_path: Path) -> None:
    rows = jsonl(GSM8K_EVAL)
    table = pl.DataFrame(
        {
            "uid": [f"gsm8k-test-{i:04d}" for i in range(len(rows))],
            "question": [r["question"] for r in rows],
            "steps": [str(r["answer"]).split("\n") for r in rows],
        }
    )
    path = tmp_path / "gsm8k_test.parquet"
    table.write_parquet(path)
    sets = ({"path": str(path), "fields": ["question", "steps"], "id_field": "uid"},)
    cfg = DecontamConfig(eval_sets=sets, fields=("response",))  # type: ignore[arg-type]
    long_step = str(rows[7]["answer"]).split("\n")[0]  # 29 words of item 7's solution
    short_step = str(rows[4]["answer"]).split("\n")[1]  # 12 words: must appear whole
    assert len(words(short_step)) == 12
    frame = records_frame(
        [
            qa("How heavy is the box?", f"Let me think. {long_step}"),
            qa("How many pages a week?", f"{short_step}, right?"),
            qa("And a year?", short_step.rsplit(" ", 1)[0]),  # last word cut: clean
            *CLEAN[:5],
        ]
    )
    context = ctx(tmp_path)
    out = Decontam(cfg).process(frame, context)
    assert (
        out.get_column("contam_item").to_list()
        == [
            "gsm8k-test-0007",
            "gsm8k-test-0004",
        ]
        + [None] * 6
    )
    assert out.get_column("contam_ngram")[1] == " ".join(words(short_step))
    # the "#### <answer>" lines are shorter than min_words: not indexed
    assert context.extra_stats["index"]["gsm8k_test"]["texts_too_short"] == 20
    assert out.get_column("contam_eval")[0] == "gsm8k_test"  # the file name by default


def test_hf_dataset_from_the_local_cache_and_a_clear_error_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    folder = tmp_path / "gsm8k_hf" / "data"
    folder.mkdir(parents=True)
    pl.read_ndjson(GSM8K_EVAL).write_parquet(folder / "test-00000-of-00001.parquet")
    local = EvalSet(hf=str(folder.parent), split="test", fields=("question",), name="gsm8k")
    frame = records_frame([qa(EVAL_QUESTIONS[7], "ok"), *CLEAN[:3]])
    out = Decontam(DecontamConfig(eval_sets=(local,))).process(frame, ctx(tmp_path))
    assert out.get_column("contam_item").to_list() == ["7", None, None, None]
    missing = EvalSet(hf="no-such-org/no-such-eval", subset="main", fields=("question",))
    with pytest.raises(RuntimeError, match=r"'no-such-org/no-such-eval'.*cannot load it"):
        Decontam(DecontamConfig(eval_sets=(missing,))).process(frame, ctx(tmp_path))


def test_bad_eval_files_and_configs_give_clear_errors(tmp_path: Path) -> None:
    frame = records_frame(CLEAN[:2])
    typo = DecontamConfig(eval_sets=({"path": str(GSM8K_EVAL), "fields": ["questoin"]},))  # type: ignore[arg-type]
    with pytest.raises(RecordError, match=r"gsm8k_train_20\.jsonl.*'questoin'.*\['question'"):
        Decontam(typo).process(frame, ctx(tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "fine text here"}\n{"q": 7}\n')
    wrong = DecontamConfig(eval_sets=({"path": str(bad), "fields": ["q"]},))  # type: ignore[arg-type]
    with pytest.raises(RecordError, match=r"bad\.jsonl: line 2: field 'q': expected a string"):
        Decontam(wrong).process(frame, ctx(tmp_path))
    pinned = EvalSet(path=str(GSM8K_EVAL), fields=("question",), sha256="0" * 64)
    with pytest.raises(ValueError, match="has sha256"):
        Decontam(DecontamConfig(eval_sets=(pinned,))).process(frame, ctx(tmp_path))
    digest = hashlib.sha256(GSM8K_EVAL.read_bytes()).hexdigest()
    ok = EvalSet(path=str(GSM8K_EVAL), fields=("question",), sha256=digest)
    assert Decontam(DecontamConfig(eval_sets=(ok,))).process(frame, ctx(tmp_path)).height == 2
    with pytest.raises(ValueError, match="eval_sets is empty"):
        DecontamConfig()
    with pytest.raises(ValueError, match="exactly one of"):
        EvalSet(path="a.jsonl", hf="openai/gsm8k", fields=("question",))
    with pytest.raises(ValueError, match="names repeat"):
        DecontamConfig(eval_sets=(ok, ok))
    with pytest.raises(ValueError, match="min_words"):
        gsm8k_config(min_words=14)
    raw = {
        "input": {"path": "in.jsonl"},
        "stages": [{"decontam": {"eval_sets": [{"path": "e.jsonl", "feilds": ["q"]}]}}],
    }
    with pytest.raises(RecipeError, match=r"eval_sets\[0\]: unknown key\(s\) \['feilds'\]"):
        Recipe.from_dict(raw, where="r.yaml")


def test_index_is_built_once_per_config_and_again_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text(GSM8K_EVAL.read_text())
    cfg = DecontamConfig(eval_sets=({"path": str(path), "fields": ["question"]},))  # type: ignore[arg-type]
    first = eval_index(cfg)
    assert eval_index(DecontamConfig(eval_sets=cfg.eval_sets)) is first
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:5]) + "\n")
    os.utime(path, ns=(1, 1))  # a different stamp even on coarse-clock file systems
    second = eval_index(cfg)
    assert second is not first and second.stats["eval"]["items"] == 5


def test_recipe_runs_dedup_and_decontam_through_the_pipeline(tmp_path: Path) -> None:
    raw = jsonl(ALPACA_RAW)
    clean = [
        {"instruction": r["question"], "input": "", "output": r["answer"]}
        for r in jsonl(GSM8K_CLEAN)
    ]
    r10, r20 = raw[10], raw[20]
    plants = [
        {**r10, "instruction": str(r10["instruction"]).upper()},  # exact after normalisation
        {**r20, "output": str(r20["output"]).replace("popular", "famous", 1)},  # near
        {"instruction": f"Solve: {EVAL_QUESTIONS[3]}", "input": "", "output": "24 pages."},
        {"instruction": "Explain.", "input": "", "output": f"As asked: {EVAL_QUESTIONS[18]}"},
    ]
    rows = raw[:60] + plants + raw[60:] + clean
    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe_path = tmp_path / "recipe.yaml"
    recipe = {
        "name": "dedup-decontam",
        "seed": 0,
        "part_rows": 50,
        "input": {
            "path": str(source),
            "mapping": {"prompt": "instruction", "input": "input", "response": "output"},
        },
        "stages": [
            {"exact_dedup": {"fields": ["prompt", "response"]}},
            {"minhash_dedup": {"ngram": 5, "threshold": 0.8}},
            {
                "decontam": {
                    "eval_sets": [
                        {"path": str(GSM8K_EVAL), "fields": ["question"], "name": "gsm8k"}
                    ],
                    "ngram": 13,
                }
            },
        ],
    }
    recipe_path.write_text(yaml.safe_dump(recipe))
    pipe = Pipeline(Recipe.from_yaml(recipe_path), tmp_path / "run", show_progress=False)
    dataset = pipe.run()
    exact, near, decontam = pipe.stages
    rejected = {
        p.name: pl.read_parquet(p.dir / "rejected" / "*.parquet") for p in (exact, near, decontam)
    }
    assert rejected["exact_dedup"].select("prompt", "drop_reason", "duplicate_of").rows() == [
        (str(r10["instruction"]).upper(), "exact_duplicate", records_id(r10))
    ]
    near_rows = rejected["minhash_dedup"]
    assert near_rows.get_column("drop_reason").to_list() == ["near_duplicate"]
    assert near_rows.get_column("duplicate_of").to_list() == [records_id(r20)]
    assert near_rows.get_column("duplicate_jaccard")[0] > 0.8
    contam = rejected["decontam"].sort("contam_item")
    assert contam.select("drop_reason", "contam_eval", "contam_item", "contam_field").rows() == [
        ("contaminated", "gsm8k", "18", "response"),
        ("contaminated", "gsm8k", "3", "prompt"),
    ]
    summaries = {p.name: json.loads((p.dir / SUCCESS).read_text()) for p in pipe.stages}
    assert summaries["exact_dedup"]["dropped"] == {"exact_duplicate": 1}
    assert summaries["minhash_dedup"]["dropped"] == {"near_duplicate": 1}
    assert summaries["decontam"]["dropped"] == {"contaminated": 2}
    assert summaries["decontam"]["extra"]["contaminated"] == 2
    assert summaries["decontam"]["extra"]["rows"] == len(rows) - 2
    out = pl.read_parquet(dataset / "data" / "*.parquet")
    assert out.height == len(rows) - 4


def records_id(row: dict[str, Any]) -> str:
    """The record id the reader gives an AlpacaFarm row (prompt, input, output)."""
    user = (
        f"{row['instruction']}\n\n{row['input']}"
        if str(row["input"]).strip()
        else row["instruction"]
    )
    return str(qa(str(user), str(row["output"]))["id"])
