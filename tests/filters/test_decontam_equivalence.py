"""The batched n-gram lookup reports the first hit a plain dictionary of n-grams reports.

The reference below restates decontam's matching rule with Python tuples: every eval text
contributes its `ngram`-word windows (or, at min_words..ngram-1 words, itself), the first
text and offset of each window win, and a row's first hit is found by field, then word
position, then window size. Tokens come from the stage's own tokenizer (tested elsewhere),
so only the matching is compared.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from gristmill.filters import decontam
from gristmill.filters.decontam import CONTAM_COLUMNS, Decontam, DecontamConfig
from gristmill.filters.dedup import field_expr, text_tokens
from gristmill.pipelines.stage import StageContext
from gristmill.records import make_record, records_frame

Hit = tuple[str, str, str, str]  # eval set, item, field, shared words


def _tokens(texts: list[str | None]) -> list[list[str]]:
    return [list(t) for t in text_tokens(pl.Series(texts, dtype=pl.String)).to_list()]


def reference_hits(
    frame: pl.DataFrame, evals: dict[str, list[str]], cfg: DecontamConfig
) -> list[Hit | None]:
    """Each row's first hit by the rule in the module docstring, or None."""
    index: dict[tuple[str, ...], tuple[str, str]] = {}
    for label, texts in evals.items():
        for item, words in enumerate(_tokens(list(texts))):
            if len(words) >= cfg.ngram:
                grams = [tuple(words[s : s + cfg.ngram]) for s in range(len(words) - cfg.ngram + 1)]
            elif len(words) >= cfg.min_words:
                grams = [tuple(words)]
            else:
                grams = []
            for gram in grams:
                index.setdefault(gram, (label, str(item)))
    sizes = sorted({len(g) for g in index})
    fields = {f: _tokens(frame.select(field_expr(f)).to_series().to_list()) for f in cfg.fields}
    hits: list[Hit | None] = []
    for row in range(frame.height):
        hit = None
        for f in cfg.fields:
            words = fields[f][row]
            for start in range(len(words)):
                for size in sizes:
                    gram = tuple(words[start : start + size])
                    if len(gram) == size and gram in index:
                        hit = (*index[gram], f, " ".join(gram))
                        break
                if hit:
                    break
            if hit:
                break
        hits.append(hit)
    return hits


def _qa(prompt: str, answer: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return make_record(messages, source="planted")


def planted(slices: dict[str, pl.DataFrame], evals: dict[str, list[str]]) -> pl.DataFrame:
    """The committed rows plus rows quoting eval texts whole, in part, cased and spaced."""
    rng = random.Random(3)
    rows = [r for name, f in slices.items() for r in f.to_dicts() if name != "gsm8k_train_20"]
    texts = [t for ts in evals.values() for t in ts]
    for _ in range(300):
        words = rng.choice(texts).split()
        lo = rng.randrange(len(words))
        cut = " ".join(words[lo : lo + rng.randint(3, 20)])
        quote = cut.upper() if rng.random() < 0.3 else cut.replace(" ", "  ")
        host = rng.choice(rows)
        if rng.random() < 0.5:
            rows.append(_qa(f"{host['prompt']} {quote}", str(host["response"])))
        else:
            rows.append(_qa(str(host["prompt"]), f"{quote} {host['response']}"))
    rng.shuffle(rows)
    return records_frame(rows)


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two eval sets: GSM8K questions and answers, AlpacaFarm instructions (as jsonl)."""
    data = Path(__file__).resolve().parents[1] / "data"
    gsm8k = [json.loads(x) for x in (data / "gsm8k_train_20.jsonl").read_text().splitlines()]
    alpaca = json.loads((data / "alpaca_farm_eval_20.json").read_text())
    folder = tmp_path_factory.mktemp("evals")
    out = {"gsm8k": folder / "gsm8k.jsonl", "alpaca": folder / "alpaca.jsonl"}
    out["gsm8k"].write_text("".join(json.dumps(r) + "\n" for r in gsm8k))
    out["alpaca"].write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    return out


@pytest.mark.parametrize(
    ("ngram", "min_words", "fields"),
    [(13, 8, ("prompt", "response")), (8, 3, ("response", "prompt")), (5, 5, ("conversation",))],
)
def test_same_first_hits_as_a_dictionary_of_ngrams(
    committed_slices: dict[str, pl.DataFrame],
    eval_files: dict[str, Path],
    tmp_path: Path,
    ngram: int,
    min_words: int,
    fields: tuple[str, ...],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sets = (
        {"path": str(eval_files["gsm8k"]), "fields": ["question", "answer"], "name": "gsm8k"},
        {"path": str(eval_files["alpaca"]), "fields": ["instruction"], "name": "alpaca"},
    )
    cfg = DecontamConfig(eval_sets=sets, ngram=ngram, min_words=min_words, fields=fields)  # type: ignore[arg-type]
    gsm8k = [json.loads(x) for x in eval_files["gsm8k"].read_text().splitlines()]
    alpaca = [json.loads(x) for x in eval_files["alpaca"].read_text().splitlines()]
    evals = {
        "gsm8k": [t for r in gsm8k for t in (r["question"], r["answer"])],
        "alpaca": [r["instruction"] for r in alpaca],
    }
    frame = planted(committed_slices, evals)
    ctx = StageContext(stage_name="decontam", stage_index=0, seed=0, run_dir=tmp_path)
    out = Decontam(cfg).process(frame, ctx)
    want = reference_hits(frame, evals, cfg)
    got = [
        None if r["contam_eval"] is None else tuple(r[c] for c in CONTAM_COLUMNS)
        for r in out.select(CONTAM_COLUMNS).iter_rows(named=True)
    ]
    # the reference numbers items across an eval set's texts; map the stage's item labels
    positions = {
        "gsm8k": {str(i): str(i // 2) for i in range(len(evals["gsm8k"]))},
        "alpaca": {str(i): str(i) for i in range(len(evals["alpaca"]))},
    }
    want = [None if h is None else (h[0], positions[h[0]][h[1]], h[2], h[3]) for h in want]
    assert got == want
    assert 100 < sum(h is not None for h in got) < frame.height
    reasons = out.get_column("drop_reason").to_list()
    assert reasons == ["contaminated" if h else None for h in want]
    monkeypatch.setattr(decontam, "CHUNK_ROWS", 7)  # rows matched in pieces: the same hits
    assert Decontam(cfg).process(frame, ctx).equals(out)
