"""`gristmill report`: a self-contained HTML page whose plots draw in headless Chromium.

A real engine-free run (tests/data/select_alpaca.yaml with two score columns carried in the
input) gets every plot but engine throughput; a DART-shaped run folder (difficulty buckets,
trials, coverage, engine stats) gets the difficulty and throughput plots; a candidates run
(generate with two models, grape winners and `not_best` losers, a label-mode judge) gets the
examples, the candidates side by side and the label mix; an engine test reports a real
Magpie run. Chromium renders each page to a PNG and every plot's region must match the PNG
the page embeds, pixel for pixel; example and candidate cards must be laid out and coloured.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from html import unescape
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from PIL import Image

from gristmill.catalog import read_run_folder
from gristmill.cli import main as cli_main
from gristmill.engines.base import Engine
from gristmill.pipelines.checkpoint import atomic_write_json, atomic_write_parquet
from gristmill.pipelines.layout import SUCCESS
from gristmill.pipelines.pipeline import Pipeline
from gristmill.pipelines.recipe import Recipe
from gristmill.records import DROP_REASON, make_record, records_frame, validate_frame
from gristmill.report import REPORT_NAME, pca_2d, render_report, write_report

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "tests" / "data" / "select_alpaca.yaml"
ALPACA = REPO / "tests" / "selectors" / "data" / "alpaca_farm_eval_gpt35_100.jsonl"
GSM8K = REPO / "tests" / "data" / "gsm8k_train_20.jsonl"
MAGPIE = REPO / "recipes" / "magpie.yaml"
SCORES = ("score__brevity", "score__lexical")


# ---- runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The engine-free recipe on AlpacaFarm rows that carry two scores from the input."""
    tmp = tmp_path_factory.mktemp("scored")
    lines = []
    for line in ALPACA.read_text().splitlines():
        row = json.loads(line)
        words = row["output"].split()
        row["score__brevity"] = 1.0 / (1.0 + len(words) / 50)
        row["score__lexical"] = len({w.lower() for w in words}) / max(1, len(words))
        lines.append(json.dumps(row))
    data = tmp / "alpaca_scored.jsonl"
    data.write_text("\n".join(lines) + "\n")
    recipe = Recipe.from_yaml(
        RECIPE,
        [
            f"input.path={data}",
            "stages.kmeans.weighting=quality",
            "stages.kmeans.score_column=score__brevity",
        ],
    )
    run = tmp / "run"
    Pipeline(recipe, run, show_progress=False).run(lambda _: None)
    return run


#: Per query of the DART-shaped run: (difficulty bucket, trials, correct answers found).
DART_QUERIES = [
    ("fail<0.25", 4, 4),
    ("fail<0.25", 4, 3),
    ("fail<0.5", 6, 4),
    ("fail<0.75", 8, 3),
    ("fail<0.75", 12, 4),
    ("fail<1", 16, 2),
    ("fail=1", 16, 0),
    ("fail=1", 16, 0),
]


def dart_run(folder: Path, *, stats: str) -> Path:
    """A run folder shaped like a finished `dart` stage (no manifest: still unfinished).

    `stats`: "buckets" (stage-level bucket stats), "parts" (per-part stats only) or "none"
    (only the rows' query_trials/query_correct/fail_rate/difficulty columns).
    """
    questions = [json.loads(x) for x in GSM8K.read_text().splitlines()][: len(DART_QUERIES)]
    queries = [
        make_record([{"role": "user", "content": q["question"]}], source="gsm8k", reference=a)
        for q, a in ((q, q["answer"].split("####")[-1].strip()) for q in questions)
    ]
    input_dir = folder / "00_input-0a1b2c3d4e"
    atomic_write_parquet(records_frame(queries), input_dir / "part-00000.parquet")
    atomic_write_json(
        {
            "stage": "input",
            "fingerprint": "0a1b2c3d4e5f6071",
            "source": str(GSM8K),
            "rows_out": len(queries),
            "parts": ["part-00000.parquet"],
            "finished_at": "2026-01-02T03:04:00+00:00",
        },
        input_dir / SUCCESS,
    )
    kept, dropped = [], []
    buckets: dict[str, dict[str, float]] = {}
    for query, (bucket, trials, correct) in zip(queries, DART_QUERIES, strict=True):
        info = {
            "query_trials": trials,
            "query_correct": correct,
            "fail_rate": round(1 - correct / trials, 6),
            "difficulty": bucket,
        }
        b = buckets.setdefault(bucket, {"queries": 0, "trials": 0, "correct": 0, "covered": 0})
        b["queries"] += 1
        b["trials"] += trials
        b["correct"] += correct
        b["covered"] += 1 if correct else 0
        if not correct:
            dropped.append({**query, **info, DROP_REASON: "no_correct_sample"})
        for k in range(correct):
            answer = f"Step {k}: ... The answer is {query['reference']}."
            kept.append(
                make_record(
                    [*query["messages"], {"role": "assistant", "content": answer}],
                    source="dart",
                    reference=query["reference"],
                    parent_id=query["id"],
                    model="smollm2-135m-instruct",
                    **info,
                )
            )
    for b in buckets.values():
        b["coverage"] = round(b["covered"] / b["queries"], 4)
    extra: dict[str, Any] = {}
    if stats == "buckets":
        extra = {"buckets": buckets, "rounds": 3, "calls": 3}
    elif stats == "parts":  # split each bucket's counts over two parts
        halves: list[dict[str, Any]] = [{"buckets": {}}, {"buckets": {}}]
        for name, b in buckets.items():
            first = {k: math.floor(b[k] / 2) for k in ("queries", "trials", "correct", "covered")}
            halves[0]["buckets"][name] = first
            halves[1]["buckets"][name] = {k: b[k] - first[k] for k in first}
        extra = {"parts": halves}
    stage_dir = folder / "01_dart-5f6e7d8c9b"
    kept_frame = records_frame(kept)
    validate_frame(kept_frame, where="dart rows")
    atomic_write_parquet(kept_frame, stage_dir / "part-00000.parquet")
    atomic_write_parquet(pl.DataFrame(dropped), stage_dir / "rejected" / "part-00000.parquet")
    atomic_write_json(
        {
            "stage": "dart",
            "index": 1,
            "version": "1",
            "fingerprint": "5f6e7d8c9b0a1b2c",
            "config": {"strategy": "prop2diff"},
            "model": "smollm2-135m-instruct",
            "embedder": None,
            "finished_at": "2026-01-02T03:06:30+00:00",
            "rows_in": len(queries),
            "rows_out": len(kept),
            "dropped": {"no_correct_sample": len(dropped)},
            "parts": ["part-00000.parquet"],
            "seconds": 150.0,
            "compute_seconds": 150.0,
            "engine": {
                "calls": 3,
                "prompts": sum(t for _, t, _ in DART_QUERIES),
                "prompt_tokens": 6000,
                "output_tokens": 18000,
                "seconds": 120.0,
                "output_tokens_per_s": 150.0,
            },
            "extra": extra,
        },
        stage_dir / SUCCESS,
    )
    return folder


#: The instruction whose text must reach the page escaped, never as markup.
SCRIPT = "<script>alert(1)</script> Write a haiku about rivers."
#: Label the judge gives each grape winner (by instruction); `poor` is dropped.
JUDGE_LABELS = ["poor", "good", "poor", "good", "poor", "poor"]
JUDGE_LABELS += ["good", "poor", "excellent", "poor", "excellent", "poor"]


def _stage_success(
    name: str, index: int, *, rows_in: int, kept: int, dropped: dict[str, int], **more: Any
) -> dict[str, Any]:
    return {
        "stage": name,
        "key": name,
        "index": index,
        "version": "1",
        "fingerprint": f"{index:02d}aa{index:02d}bb{index:02d}cc{index:02d}dd",
        "model": more.pop("model", None),
        "embedder": None,
        "finished_at": f"2026-01-02T03:0{index}:00+00:00",
        "rows_in": rows_in,
        "rows_out": kept,
        "dropped": dropped,
        "parts": ["part-00000.parquet"],
        "seconds": 10.0 * index,
        "compute_seconds": 10.0 * index,
        "engine": {},
        **more,
    }


def _write_stage(
    folder: Path, kept: list[dict[str, Any]], dropped: list[dict[str, Any]], success: dict[str, Any]
) -> None:
    atomic_write_parquet(records_frame(kept), folder / "part-00000.parquet")
    if dropped:
        atomic_write_parquet(records_frame(dropped), folder / "rejected" / "part-00000.parquet")
    atomic_write_json(success, folder / SUCCESS)


def candidates_run(folder: Path) -> Path:
    """An unfinished run: `generate` (two models per instruction, two `truncated` drops),
    `grape` (winners kept, losers rejected `not_best`) and a label-mode `judge` (`quality` and
    `quality_prob`, `poor` rows dropped as `quality_poor`, the label mix in its stats)."""
    prompts = [SCRIPT] + [f"Question {i}: name {i} fruits & explain <why>." for i in range(1, 12)]
    queries = [make_record([{"role": "user", "content": p}], source="demo") for p in prompts]
    input_dir = folder / "00_input-0a1b2c3d4e"
    atomic_write_parquet(records_frame(queries), input_dir / "part-00000.parquet")
    atomic_write_json(
        {
            "stage": "input",
            "fingerprint": "0a1b2c3d4e5f6071",
            "source": "demo.jsonl",
            "rows_out": len(queries),
            "parts": ["part-00000.parquet"],
            "finished_at": "2026-01-02T03:00:00+00:00",
        },
        input_dir / SUCCESS,
    )
    candidates, truncated = [], []
    for i, q in enumerate(queries):
        for engine, model in (("a", "model-a"), ("b", "model-b")):
            text = f"Answer {i} from {model}."
            if i == 0 and engine == "a":
                text = "The river runs on and on. " * 30  # 780 characters: cut with an ellipsis
            row = make_record(
                [*q["messages"], {"role": "assistant", "content": text}],
                source="demo",
                parent_id=q["id"],
                model=model,
                engine=engine,
                candidate=0,
            )
            candidates.append(row)
        if i < 2:
            cut = make_record(
                [*q["messages"], {"role": "assistant", "content": f"Answer {i} cut"}],
                source="demo",
                parent_id=q["id"],
                model="model-b",
                engine="b",
                candidate=1,
            )
            truncated.append({**cut, DROP_REASON: "truncated"})
    _write_stage(
        folder / "01_generate-1a2b3c4d5e",
        candidates,
        truncated,
        _stage_success(
            "generate",
            1,
            rows_in=len(queries),
            kept=len(candidates),
            dropped={"truncated": len(truncated)},
            engines={"a": "model-a", "b": "model-b"},
        ),
    )
    winners, losers = [], []
    for i in range(len(queries)):
        a, b = candidates[2 * i], candidates[2 * i + 1]
        scores = (-1.0 - i / 10, -1.25 - i / 10) if i % 3 else (-2.0 - i / 10, -1.5 - i / 10)
        ranked = sorted(zip((a, b), scores, strict=True), key=lambda x: -x[1])
        for rank, (row, score) in enumerate(ranked, 1):
            scored = {**row, "score__grape": score, "grape_tokens": 9, "grape_rank": rank}
            (winners if rank == 1 else losers).append(scored)
    _write_stage(
        folder / "02_grape-2b3c4d5e6f",
        winners,
        [{**row, DROP_REASON: "not_best"} for row in losers],
        _stage_success(
            "grape",
            2,
            rows_in=len(candidates),
            kept=len(winners),
            dropped={"not_best": len(losers)},
            model="model-t",
            extra={"rows": len(candidates), "groups": len(winners), "kept": len(winners)},
        ),
    )
    judged = [
        {**row, "quality": label, "quality_prob": 0.5 + k / 100}
        for k, (row, label) in enumerate(zip(winners, JUDGE_LABELS, strict=True))
    ]
    kept = [r for r in judged if r["quality"] != "poor"]
    poor = [{**r, DROP_REASON: "quality_poor"} for r in judged if r["quality"] == "poor"]
    mix = {label: JUDGE_LABELS.count(label) for label in set(JUDGE_LABELS)}
    _write_stage(
        folder / "03_judge-3c4d5e6f7a",
        kept,
        poor,
        _stage_success(
            "judge",
            3,
            rows_in=len(winners),
            kept=len(kept),
            dropped={"quality_poor": len(poor)},
            model="model-j",
            config={"mode": "label", "name": "quality", "preset": "quality"},
            extra={"rows": len(judged), "labels": mix, "parts": [{"labels": mix}]},
        ),
    )
    return folder


# ---- the page -----------------------------------------------------------------------------


def figures(page: str) -> dict[str, tuple[int, int]]:
    """Plot ids in the page with their width/height attributes."""
    return {
        m.group(1): (int(m.group(2)), int(m.group(3)))
        for m in re.finditer(r'<figure id="([^"]+)"><img [^>]*width="(\d+)" height="(\d+)"', page)
    }


def section(page: str, section_id: str) -> str:
    found = re.search(rf'<section id="{re.escape(section_id)}">(.*?)</section>', page, re.S)
    assert found, f"no section {section_id}"
    return found.group(1)


def test_report_is_self_contained_and_names_the_run(scored_run: Path) -> None:
    path = write_report(scored_run)
    assert path == scored_run / REPORT_NAME
    page = path.read_text()
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert not re.search(r"url\(|@import", page, re.I)
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    manifest = json.loads((scored_run / "manifest.json").read_text())
    facts = dict(re.findall(r"<tr><td>([^<]+)</td><td>([^<]*)</td></tr>", page))
    assert facts["recipe"].startswith("select-alpaca (")
    assert facts["seed"] == str(manifest["seed"]) == "0"
    assert facts["status"] == "finished" and facts["engine"] == "none"
    assert facts["models used"] == "all-minilm-l6-v2" == facts["embedder"]
    assert facts["dataset rows"] == str(manifest["dataset"]["rows"]) == "40"
    assert re.fullmatch(r"\d+ s \(input split .+ UTC to last stage .+ UTC\)", facts["wall time"])
    assert facts["input"].endswith("(100 rows)")


def test_report_has_every_plot_the_run_supports(scored_run: Path) -> None:
    page = render_report(read_run_folder(scored_run))
    plots = figures(page)
    assert set(plots) == {
        "plot-funnel",
        "plot-score-score-brevity",
        "plot-score-score-lexical",
        "plot-clusters",
        "plot-projection",
        "plot-lengths",
        "plot-stage-time",
    }
    assert all(w >= 600 and h >= 120 for w, h in plots.values())
    assert "No stage called the LLM engine." in section(page, "throughput")
    stages = json.loads((scored_run / "manifest.json").read_text())["stages"]
    funnel = section(page, "funnel")
    for s in stages:
        row = f"<td>{s['stage']}</td><td>{s['rows_in']}</td><td>{s['rows_out']}</td>"
        assert row in funnel
    kmeans = stages[-1]["extra"]
    clusters = section(page, "clusters")
    assert f"{kmeans['k']} clusters from 04 kmeans" in clusters
    assert "PCA of 93 `embedding` vectors from 02 embed, coloured by cluster" in clusters
    assert "score__brevity: 100 rows scored at input" in section(page, "scores")


def test_report_of_a_run_without_embeddings_scores_or_engine(tmp_path: Path) -> None:
    recipe = Recipe.from_yaml(RECIPE, [f"input.path={ALPACA}", "input.limit=30"])
    recipe = dataclasses.replace(recipe, stages=recipe.stages[:1])  # heuristics only
    Pipeline(recipe, tmp_path / "run", show_progress=False).run(lambda _: None)
    page = write_report(tmp_path / "run").read_text()
    assert set(figures(page)) == {"plot-funnel", "plot-lengths", "plot-stage-time"}
    assert "No `score__*` columns in this run." in page
    assert "No embeddings to project" in page and "No clusters in this run" in page
    assert "No stage made or chose between candidates" in section(page, "candidates")
    assert "No stage labelled rows" in section(page, "labels")
    blocks = stage_blocks(section(page, "examples"))
    assert list(blocks) == ["01 heuristics"] and "<h3>kept: " in blocks["01 heuristics"]


def test_difficulty_section_from_bucket_stats(tmp_path: Path) -> None:
    run = dart_run(tmp_path / "dart", stats="buckets")
    page = write_report(run).read_text()
    assert set(figures(page)) == {
        "plot-funnel",
        "plot-dart-01",
        "plot-lengths",
        "plot-stage-time",
        "plot-throughput",
    }
    assert "<td>status</td><td>unfinished</td>" in page
    assert "<td>seed</td><td>unknown (unfinished run: no manifest.json yet)</td>" in page
    table = unescape(section(page, "difficulty-dart-1"))
    rows = re.findall(
        r"<tr><td>(fail.*?)</td><td>(\d+)</td><td>(\d+)</td><td>(\d+)</td>"
        r"<td>([\d.]+)%</td></tr>",
        table,
    )
    expected = {}
    for bucket, trials, correct in DART_QUERIES:
        q, t, c, cov = expected.get(bucket, (0, 0, 0, 0))
        expected[bucket] = (q + 1, t + trials, c + correct, cov + (1 if correct else 0))
    assert {r[0]: (int(r[1]), int(r[2]), int(r[3]), float(r[4])) for r in rows} == {
        b: (q, t, c, round(100 * cov / q, 1)) for b, (q, t, c, cov) in expected.items()
    }
    throughput = section(page, "throughput")
    assert "<td>01 dart</td><td>3</td><td>82</td><td>6000</td><td>18000</td>" in throughput


@pytest.mark.parametrize("stats", ["parts", "none"])
def test_difficulty_table_is_the_same_from_part_stats_or_rows(tmp_path: Path, stats: str) -> None:
    reference = section(
        write_report(dart_run(tmp_path / "a", stats="buckets")).read_text(), "difficulty-dart-1"
    )
    other = section(
        write_report(dart_run(tmp_path / "b", stats=stats)).read_text(), "difficulty-dart-1"
    )
    table = re.compile(r"<table>.*</table>", re.S)
    assert table.search(other).group(0) == table.search(reference).group(0)  # type: ignore[union-attr]
    assert "fail rate against its trials" in other, "rows give the per-query scatter"


def stage_blocks(part: str) -> dict[str, str]:
    """A section's `<details>` blocks by stage label (e.g. "03 judge")."""
    found = re.findall(r"<details[^>]*><summary><b>([^<]+)</b>(.*?)</details>", part, re.S)
    return {label: body for label, body in found}


def example_lists(block: str) -> dict[str, list[str]]:
    """A stage's example cards under each heading ("kept", "dropped, quality_poor")."""
    out = {}
    for heading, cards in re.findall(r"<h3>([^:<]+):[^<]*</h3>(.*?)(?=<h3>|$)", block, re.S):
        out[heading] = re.findall(r'<div class="ex[^"]*">.*?</p></div>', cards, re.S)
    return out


def test_examples_show_kept_and_dropped_rows_per_reason(tmp_path: Path) -> None:
    page = write_report(candidates_run(tmp_path / "run")).read_text()
    assert "<script" not in page.lower() and "alert(1)</" not in page
    examples = section(page, "examples")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; Write a haiku" in examples
    blocks = stage_blocks(examples)
    assert list(blocks) == ["01 generate", "02 grape", "03 judge"]
    assert blocks["03 judge"].startswith(": 5 kept, 7 dropped (quality_poor: 7)</summary>")
    assert "<h3>dropped, quality_poor: 7 rows, the first 5 shown</h3>" in blocks["03 judge"]
    assert "<h3>kept: 24 rows, the first 5 shown</h3>" in blocks["01 generate"]
    shown = {label: {h: len(c) for h, c in example_lists(b).items()} for label, b in blocks.items()}
    assert shown == {
        "01 generate": {"kept": 5, "dropped, truncated": 2},
        "02 grape": {"kept": 5, "dropped, not_best": 5},
        "03 judge": {"kept": 5, "dropped, quality_poor": 5},
    }
    judge = example_lists(blocks["03 judge"])
    kept_labels = [re.search(r"quality: (\w+) \((0\.\d{3})\)", c) for c in judge["kept"]]
    assert [m.group(1) for m in kept_labels if m] == ["good"] * 3 + ["excellent"] * 2
    poor = judge["dropped, quality_poor"]
    assert all('<span class="reason">quality_poor</span>' in c for c in poor)
    assert "score__grape: -1.500" in poor[0] and "quality: poor (0.500)" in poor[0]
    assert "model: model-b" in poor[0] and "&lt;script&gt;" in poor[0]  # the first winner
    first = example_lists(blocks["01 generate"])["kept"][0]
    response = unescape(re.search(r"<b>response</b> (.*?)</p>", first, re.S).group(1))  # type: ignore[union-attr]
    assert response.endswith("The river…") and len(response) <= 401
    assert "model: model-a" in first and "score__" not in first  # generate adds no scores


def test_candidates_side_by_side_mark_the_grape_winner(tmp_path: Path) -> None:
    page = write_report(candidates_run(tmp_path / "run")).read_text()
    blocks = stage_blocks(section(page, "candidates"))
    assert list(blocks) == ["01 generate", "02 grape"]
    for block in blocks.values():
        assert ": 12 instructions with several candidates, the first 3 shown" in block
    groups = {
        label: re.findall(
            r'<div class="group"><p class="text"><b>instruction</b> (.*?)</p>(.*?)</div></div>'
            r'(?=<div class="group">|$)',
            block,
            re.S,
        )
        for label, block in blocks.items()
    }
    assert all(len(g) == 3 for g in groups.values())
    assert (
        groups["02 grape"][0][0]
        == "&lt;script&gt;alert(1)&lt;/script&gt; Write a haiku about rivers."
    )
    cards = [
        re.findall(r'<div class="(cand(?: win| drop)?)">(.*?)</p></div>', g)
        for _, g in groups["02 grape"]
    ]
    assert [[cls for cls, _ in c] for c in cards] == [["cand win", "cand drop"]] * 3
    winner, loser = cards[0]
    assert '<span class="win">winner</span>' in winner[1]
    assert "model: model-b" in winner[1] and "score__grape: -1.500, rank 1" in winner[1]
    assert "not_best" in loser[1] and "score__grape: -2.000, rank 2" in loser[1]
    assert "model: model-a" in cards[1][0][1]  # instruction 1: model-a scores higher
    generate = [
        re.findall(r'<div class="(cand(?: win| drop)?)">', g) for _, g in groups["01 generate"]
    ]
    assert generate == [["cand", "cand", "cand drop"], ["cand", "cand", "cand drop"], ["cand"] * 2]
    first = groups["01 generate"][0][1]
    assert "engine a, #0" in first and "engine b, #1" in first and "truncated" in first
    assert "winner" not in blocks["01 generate"]


def test_label_mix_counts(tmp_path: Path) -> None:
    page = write_report(candidates_run(tmp_path / "run")).read_text()
    labels = section(page, "labels")
    assert "plot-labels-03" in figures(page)
    assert "<th>03 judge: quality</th><th>rows</th><th>share</th>" in labels
    rows = re.findall(r"<tr><td>(\w+)</td><td>(\d+)</td><td>([\d.]+)%</td></tr>", labels)
    assert rows == [("poor", "7", "58.3"), ("good", "3", "25.0"), ("excellent", "2", "16.7")]


def test_pca_2d_finds_the_main_directions() -> None:
    rng = np.random.default_rng(0)
    t = rng.normal(size=200)
    direction = rng.normal(size=16)
    direction /= np.linalg.norm(direction)
    points = np.outer(t, direction) * 10 + rng.normal(scale=0.01, size=(200, 16))
    coords, share = pca_2d(points)
    assert coords.shape == (200, 2)
    assert share[0] > 0.99 and share[1] < 0.01
    assert abs(np.corrcoef(coords[:, 0], t)[0, 1]) > 0.999
    coords, share = pca_2d(np.eye(1)[[0, 0, 0]])  # one dimension, no variance: still 2 columns
    assert coords.shape == (3, 2) and share.tolist() == [0.0, 0.0]


def test_cli_report(scored_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.html"
    assert cli_main(["report", str(scored_run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert "plot-funnel" in out.read_text()
    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    assert "not a gristmill run folder" in capsys.readouterr().err


# ---- headless Chromium --------------------------------------------------------------------

PROBE = """<script>
window.addEventListener("load", () => {
  const root = document.documentElement;
  const out = {page: [root.scrollWidth, root.scrollHeight], figures: {}};
  for (const fig of document.querySelectorAll("figure")) {
    const img = fig.querySelector("img");
    const r = img.getBoundingClientRect();
    out.figures[fig.id] = {x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height,
                           natural: [img.naturalWidth, img.naturalHeight]};
  }
  const box = (el) => {
    const r = el.getBoundingClientRect();
    return {x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height};
  };
  out.sections = {};
  for (const s of document.querySelectorAll("section[id]")) out.sections[s.id] = box(s);
  out.boxes = {};
  for (const sel of ["details.stage", ".ex", ".ex.drop", ".cand", ".cand.win"]) {
    out.boxes[sel] = Array.from(document.querySelectorAll(sel), box);
  }
  const pre = document.createElement("pre");
  pre.id = "gm-probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="session")
def chromium() -> Iterator[str]:
    """Debian's `chromium` (make install puts it there; as root we install it here)."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=900
        )
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed and cannot be installed here (needs root + apt)")
    yield found


def _chromium(binary: str, page: Path, profile: Path, *args: str) -> str:
    result = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={profile}",
            *args,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    return result.stdout


def plot_problems(page: Path, binary: str, work: Path) -> dict[str, str]:
    """Render `page` in Chromium; for each plot that did not draw, say why."""
    html = page.read_text()
    return drawn_problems(html, *chromium_layout(html, binary, work))


def chromium_layout(html: str, binary: str, work: Path) -> tuple[dict[str, Any], np.ndarray]:
    """Render `html` in Chromium: the probe's layout (figures, sections, example and
    candidate boxes, in page pixels) and a screenshot of the whole page."""
    work.mkdir(parents=True, exist_ok=True)
    probe = work / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = _chromium(binary, probe, work / "profile", "--window-size=1280,1000", "--dump-dom")
    found = re.search(r'<pre id="gm-probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe script did not run"
    layout = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    width, height = layout["page"]
    shot_path = work / "page.png"
    _chromium(
        binary,
        probe,
        work / "profile",
        f"--window-size={width},{height}",
        f"--screenshot={shot_path}",
    )
    shot = np.asarray(Image.open(shot_path).convert("RGB"), dtype=np.int16)
    assert shot.shape[:2] == (height, width)
    return layout, shot


def _best_crop(
    shot: np.ndarray, box: dict[str, float], src: np.ndarray
) -> tuple[float, np.ndarray]:
    """The screenshot's crop at `box` that best matches `src`, and its mean pixel diff.

    A box at a fractional position (y = 3462.5) is snapped to a whole pixel by Chromium,
    up or down, so the crop is tried at the floor and ceiling of each coordinate.
    """
    w, h = round(box["w"]), round(box["h"])
    best: tuple[float, np.ndarray] | None = None
    for x in {math.floor(box["x"]), math.ceil(box["x"])}:
        for y in {math.floor(box["y"]), math.ceil(box["y"])}:
            crop = shot[y : y + h, x : x + w]
            diff = float(np.abs(crop - src).mean()) if crop.shape == src.shape else math.inf
            if best is None or diff < best[0]:
                best = (diff, crop)
    assert best is not None
    return best


def drawn_problems(html: str, layout: dict[str, Any], shot: np.ndarray) -> dict[str, str]:
    """For each plot of `html` that did not draw in the rendered page, say why.

    A plot drew when its image decoded at the size the page gives it, and the screenshot's
    pixels in its box equal the embedded PNG's (and some of them are coloured).
    """
    problems = {}
    for plot_id, (w_attr, h_attr) in figures(html).items():
        box = layout["figures"].get(plot_id)
        if box is None:
            problems[plot_id] = "not laid out"
            continue
        if tuple(box["natural"]) != (w_attr, h_attr):
            problems[plot_id] = f"image did not decode (natural size {box['natural']})"
            continue
        try:
            src = _embedded_png(html, plot_id)
        except OSError as exc:
            problems[plot_id] = f"the embedded PNG does not decode: {exc}"
            continue
        diff, crop = _best_crop(shot, box, src)
        coloured = int(((crop.max(axis=2) - crop.min(axis=2)) > 48).sum())
        if diff > 2.0:
            problems[plot_id] = f"screenshot differs from the embedded image (mean diff {diff:.1f})"
        elif coloured < 30:  # every plot has coloured bars or markers; axes are grey
            problems[plot_id] = f"nothing coloured drawn ({coloured} pixels)"
    return problems


def _embedded_png(html: str, plot_id: str) -> np.ndarray:
    m = re.search(rf'<figure id="{plot_id}"><img [^>]*src="data:image/png;base64,([^"]+)"', html)
    assert m
    return np.asarray(
        Image.open(io.BytesIO(base64.b64decode(m.group(1)))).convert("RGB"), dtype=np.int16
    )


def test_every_plot_draws_in_chromium(scored_run: Path, chromium: str, tmp_path: Path) -> None:
    html = write_report(scored_run).read_text()
    assert len(figures(html)) == 7
    layout, shot = chromium_layout(html, chromium, tmp_path)
    assert drawn_problems(html, layout, shot) == {}
    stages = json.loads((scored_run / "manifest.json").read_text())["stages"]
    blocks = layout["boxes"]["details.stage"]  # one closed block of examples per stage
    assert len(blocks) == len(stages) and all(b["w"] > 600 and b["h"] > 10 for b in blocks)
    assert dark_pixels(shot, layout["sections"]["examples"]) > 500
    assert layout["sections"]["examples"]["h"] < 120 + 50 * len(stages)  # folded away


def dark_pixels(shot: np.ndarray, box: dict[str, float]) -> int:
    """Pixels of text (near black) in the screenshot inside `box`."""
    x, y, w, h = (round(box[k]) for k in ("x", "y", "w", "h"))
    return int((shot[y : y + h, x : x + w].max(axis=2) < 100).sum())


def left_edge(shot: np.ndarray, box: dict[str, float]) -> tuple[int, ...]:
    """The colour at the left border of `box`, half-way down."""
    return tuple(int(v) for v in shot[round(box["y"] + box["h"] / 2), round(box["x"]) + 1])


def near(colour: tuple[int, ...], hex_colour: str) -> bool:
    want = [int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]
    return all(abs(a - b) <= 12 for a, b in zip(colour, want, strict=True))


def test_examples_and_candidates_render_in_chromium(tmp_path: Path, chromium: str) -> None:
    html = write_report(candidates_run(tmp_path / "run")).read_text()
    closed, _ = chromium_layout(html, chromium, tmp_path / "closed")
    opened = html.replace('<details class="stage">', '<details class="stage" open>')
    layout, shot = chromium_layout(opened, chromium, tmp_path / "open")
    assert drawn_problems(opened, layout, shot) == {}  # the label-mix plot among them
    assert "plot-labels-03" in layout["figures"]
    # examples fold away per stage; candidates are open
    assert closed["sections"]["examples"]["h"] < layout["sections"]["examples"]["h"] / 5
    assert all(b["h"] > 20 for b in closed["boxes"][".cand"])
    cards, drops = layout["boxes"][".ex"], layout["boxes"][".ex.drop"]
    assert len(cards) == 27 and len(drops) == 12 and all(b["w"] > 600 for b in cards)
    assert all(near(left_edge(shot, b), "#c44e52") for b in drops)  # red edge: dropped
    kept = [b for b in cards if b not in drops]
    assert all(near(left_edge(shot, b), "#4c72b0") for b in kept)  # blue edge: kept
    assert dark_pixels(shot, layout["sections"]["examples"]) > 5000
    winners, candidates = layout["boxes"][".cand.win"], layout["boxes"][".cand"]
    assert len(winners) == 3 and len(candidates) == 3 + 3 + 2 + 6
    assert all(near(left_edge(shot, b), "#55a868") for b in winners)  # green: the winner
    rows = {round(b["y"]) for b in winners}
    side_by_side = [b for b in candidates if round(b["y"]) in rows and b not in winners]
    assert len(side_by_side) == 3 and all(b["x"] > 300 for b in side_by_side)


def test_dart_plots_draw_in_chromium(tmp_path: Path, chromium: str) -> None:
    page = write_report(dart_run(tmp_path / "dart", stats="none"))
    assert {"plot-dart-01", "plot-throughput"} <= set(figures(page.read_text()))
    assert plot_problems(page, chromium, tmp_path / "work") == {}


def test_a_broken_or_blank_plot_is_caught(scored_run: Path, chromium: str, tmp_path: Path) -> None:
    html = write_report(scored_run, tmp_path / "ok.html").read_text()
    # corrupt the clusters image's data; replace the lengths image by a white PNG of its size
    m = re.search(
        r'(<figure id="plot-clusters"><img [^>]*src="data:image/png;base64,)([^"]+)', html
    )
    assert m
    data = m.group(2)
    broken = html.replace(data, data[:24] + "A" * 64 + data[88:])  # inside the PNG header
    w, h = figures(html)["plot-lengths"]
    white = io.BytesIO()
    Image.new("RGB", (w, h), "white").save(white, format="PNG")
    lengths = _embedded_b64(html, "plot-lengths")
    broken = broken.replace(lengths, base64.b64encode(white.getvalue()).decode())
    page = tmp_path / "broken.html"
    page.write_text(broken)
    problems = plot_problems(page, chromium, tmp_path / "work")
    assert set(problems) == {"plot-clusters", "plot-lengths"}
    assert "did not decode" in problems["plot-clusters"]
    assert "nothing coloured" in problems["plot-lengths"]


def _embedded_b64(html: str, plot_id: str) -> str:
    m = re.search(rf'<figure id="{plot_id}"><img [^>]*src="data:image/png;base64,([^"]+)"', html)
    assert m
    return m.group(1)


# ---- a real LLM run -----------------------------------------------------------------------


@pytest.mark.engine
@pytest.mark.slow
def test_report_of_a_magpie_run_shows_engine_throughput(
    engine: Engine, tmp_path: Path, chromium: str
) -> None:
    recipe = Recipe.from_yaml(
        MAGPIE,
        [
            "input.rows=6",
            "part_rows=3",
            "stages.magpie.instruction_max_tokens=32",
            "stages.magpie.response_max_tokens=48",
            "stages.heuristics.min_prompt_words=2",
            "stages.heuristics.drop_truncated=false",
            "stages.kmeans.budget=3",
            "stages.kmeans.k=2",
        ],
    )
    run = tmp_path / "run"
    Pipeline(recipe, run, show_progress=False).run(lambda _: None)
    page = write_report(run)
    html = page.read_text()
    magpie = json.loads(next(run.glob("01_magpie-*/_SUCCESS.json")).read_text())["engine"]
    assert magpie["calls"] >= 4 and magpie["output_tokens"] > 0
    row = (
        f"<td>01 magpie</td><td>{magpie['calls']}</td><td>{magpie['prompts']}</td>"
        f"<td>{magpie['prompt_tokens']}</td><td>{magpie['output_tokens']}</td>"
    )
    assert row in section(html, "throughput")
    assert "plot-throughput" in figures(html)
    assert "<td>engine</td><td>vllm: smollm2-135m-instruct</td>" in html
    assert plot_problems(page, chromium, tmp_path / "work") == {}
