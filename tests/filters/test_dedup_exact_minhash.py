"""Exact and MinHash dedup on real AlpacaFarm rows: planted copies go, nothing else does."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from datasketch import MinHash

from gristmill.filters import dedup
from gristmill.filters.dedup import (
    MINHASH_COLUMNS,
    ExactDedup,
    ExactDedupConfig,
    MinHashDedup,
    MinHashDedupConfig,
    minhash_signatures,
    row_shingles,
)
from gristmill.pipelines.recipe import Recipe, RecipeError
from gristmill.pipelines.stage import ROW_COLUMN, StageContext
from gristmill.records import make_record, records_frame

WORD = re.compile(r"\w+")


def qa(prompt: str, answer: str) -> dict[str, Any]:
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return make_record(msgs, source="planted")


def ctx(tmp_path: Path) -> StageContext:
    return StageContext(stage_name="dedup", stage_index=0, seed=0, run_dir=tmp_path)


def run(
    stage: ExactDedup | MinHashDedup, frame: pl.DataFrame, context: StageContext
) -> pl.DataFrame:
    return stage.select(frame.with_row_index(ROW_COLUMN), context)


def dropped(out: pl.DataFrame) -> list[int]:
    return out.get_column("drop_reason").is_not_null().arg_true().to_list()


def shingle_set(row: dict[str, Any], fields: tuple[str, ...], n: int = 5) -> set[object]:
    """Reference shingles, written independently of the stage: word n-grams per field."""
    out: set[object] = set()
    for i, name in enumerate(fields):
        words = WORD.findall(unicodedata.normalize("NFKC", row[name] or "").lower())
        if words:
            grams = [tuple(words[j : j + n]) for j in range(max(len(words) - n + 1, 1))]
            out |= {(i, g) for g in grams}
    return out


def jaccard(a: set[object], b: set[object]) -> float:
    return len(a & b) / len(a | b)


def swap_word(text: str, index: int, new: str) -> str:
    words = text.split(" ")
    words[index] = new
    return " ".join(words)


@pytest.fixture(scope="module")
def planted(alpaca: pl.DataFrame) -> tuple[pl.DataFrame, dict[int, int]]:
    """The 100 real rows with copies planted after row 49; maps planted row -> original row."""
    real = alpaca.to_dicts()
    r3, r8, r13, r31 = real[3], real[8], real[13], real[31]
    copies = [
        # exact after normalisation: case, whitespace runs, NFKC (no-break space, full width)
        (qa(str(r13["prompt"]).upper(), "  " + str(r13["response"]).replace(" ", "  ")), 13),
        (qa(str(r3["prompt"]).replace(" ", "\u00a0"), str(r3["response"]).upper()), 3),
        # near: one word changed in the answer, two in prompt and answer, a sentence cut
        (qa(str(r8["prompt"]), swap_word(str(r8["response"]), 40, "lovely")), 8),
        (
            qa(
                swap_word(str(r31["prompt"]), 5, "write"),
                swap_word(str(r31["response"]), 100, "economy"),
            ),
            31,
        ),
    ]
    rows = real[:50] + [c[0] for c in copies] + real[50:]
    return records_frame(rows), {50 + k: c[1] for k, c in enumerate(copies)}


def test_exact_dedup_catches_normalised_copies_only(
    planted: tuple[pl.DataFrame, dict[int, int]], tmp_path: Path
) -> None:
    frame, origin = planted
    context = ctx(tmp_path)
    out = run(ExactDedup(), frame, context)
    assert out.height == frame.height
    assert dropped(out) == [50, 51]  # the near copies (52, 53) differ after normalisation
    assert set(out.get_column("drop_reason").drop_nulls()) == {"exact_duplicate"}
    twins = out.get_column("duplicate_of").to_list()
    ids = frame.get_column("id").to_list()
    assert twins[50] == ids[origin[50]] and twins[51] == ids[origin[51]]
    assert twins.count(None) == frame.height - 2
    assert context.extra_stats == {
        "rows": 104,
        "fields": ["prompt", "response"],
        "duplicates": 2,
        "clusters": 2,
        "largest_cluster": 2,
    }
    # without normalisation nothing is equal; on the prompt alone the answer-only edit counts
    plain = ExactDedupConfig(nfkc=False, lowercase=False, collapse_whitespace=False)
    assert dropped(run(ExactDedup(plain), frame, ctx(tmp_path))) == []
    prompts = run(ExactDedup(ExactDedupConfig(fields=("prompt",))), frame, ctx(tmp_path))
    assert dropped(prompts) == [50, 51, 52]


def test_exact_dedup_punctuation_and_null_fields(alpaca: pl.DataFrame, tmp_path: Path) -> None:
    row = alpaca.row(6, named=True)
    prompt = str(row["prompt"])  # "Why can I see the moon during the day?"
    frame = records_frame(
        [
            qa(prompt, "answer"),
            qa(prompt.replace("?", "!"), "answer."),
            make_record([{"role": "user", "content": prompt}], source="planted"),
            make_record([{"role": "user", "content": prompt.upper()}], source="planted"),
        ]
    )
    out = run(ExactDedup(), frame, ctx(tmp_path))
    assert dropped(out) == [3]  # a null response equals only another null
    stripped = run(ExactDedup(ExactDedupConfig(strip_punctuation=True)), frame, ctx(tmp_path))
    assert dropped(stripped) == [1, 3]
    assert stripped.get_column("duplicate_of")[1] == frame.get_column("id")[0]


def test_shingles_match_a_reference_and_signatures_match_datasketch(
    planted: tuple[pl.DataFrame, dict[int, int]],
) -> None:
    frame, _ = planted
    fields = ("prompt", "response")
    shingles = row_shingles(frame, fields, ngram=5, unit="word")
    rows = frame.to_dicts()
    for r, row in enumerate(rows):  # one distinct 32-bit hash per distinct shingle
        mine = np.unique(shingles.hashes[shingles.row == r])
        assert len(mine) == len(shingle_set(row, fields)), r
    signatures, empty = minhash_signatures(shingles, frame.height, num_perm=64, seed=7)
    assert not empty.any()
    for r in (0, 3, 50, 103):
        reference = MinHash(num_perm=64, seed=7, hashfunc=lambda h: h)
        reference.update_batch([int(h) for h in shingles.hashes[shingles.row == r]])
        np.testing.assert_array_equal(signatures[r], reference.hashvalues)
    # a prompt of fewer than 5 words is one shingle; a prompt shingle never equals an
    # answer shingle, even for the same words
    short = records_frame([qa("Name three primes.", "Name three primes.")])
    assert len(np.unique(row_shingles(short, fields, ngram=5, unit="word").hashes)) == 2


def test_signatures_do_not_depend_on_the_shingle_block(
    planted: tuple[pl.DataFrame, dict[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of a few shingles (rows larger than a block, rows without shingles among
    them) give the signatures one block of everything gives."""
    frame, _ = planted
    texts = pl.concat([frame, records_frame([qa("...", "!!!")]), frame.head(3)])
    shingles = row_shingles(texts, ("prompt", "response"), ngram=5, unit="word")
    whole = minhash_signatures(shingles, texts.height + 2, num_perm=32, seed=3)
    monkeypatch.setattr(dedup, "SHINGLE_BLOCK", 7)
    blocked = minhash_signatures(shingles, texts.height + 2, num_perm=32, seed=3)
    np.testing.assert_array_equal(blocked[0], whole[0])
    np.testing.assert_array_equal(blocked[1], whole[1])
    assert whole[1][-6:].tolist() == [True, False, False, False, True, True]


def test_condensed_parts_decide_as_the_whole_input_does(
    planted: tuple[pl.DataFrame, dict[int, int]], tmp_path: Path
) -> None:
    """Both stages condensed part by part (MinHash with its signatures spilled to files)
    give the whole input's drops, twins and Jaccard estimates."""
    frame, _ = planted
    data = frame.with_row_index(ROW_COLUMN)
    decided = [ROW_COLUMN, "duplicate_of", "drop_reason"]
    spilling = StageContext(
        stage_name="dedup", stage_index=0, seed=0, run_dir=tmp_path, state_dir=tmp_path / "s"
    )
    for stage, columns in (
        (ExactDedup(), decided),
        (MinHashDedup(threshold=0.7), [*decided, "duplicate_jaccard"]),
    ):
        whole = stage.select(data, ctx(tmp_path))
        parts = [stage.condense(data.slice(lo, 9), spilling) for lo in range(0, data.height, 9)]
        assert "prompt" not in parts[0].columns
        got = stage.select(pl.concat(parts), spilling)
        assert set(got.columns) == {ROW_COLUMN, "id", *columns[1:]}  # no condensed column
        assert got.select(columns).equals(whole.select(columns)), stage.name
        assert whole.get_column("drop_reason").is_not_null().any()
    assert MINHASH_COLUMNS[0] not in parts[0].columns  # the signatures went to files
    assert len(list((tmp_path / "s").glob("minhash-*.npy"))) == len(parts)


def test_minhash_catches_planted_near_duplicates_and_nothing_else(
    planted: tuple[pl.DataFrame, dict[int, int]], tmp_path: Path
) -> None:
    frame, origin = planted
    context = ctx(tmp_path)
    out = run(MinHashDedup(), frame, context)
    assert dropped(out) == [50, 51, 52, 53]
    assert set(out.get_column("drop_reason").drop_nulls()) == {"near_duplicate"}
    ids = frame.get_column("id").to_list()
    twins = out.get_column("duplicate_of").to_list()
    assert all(twins[r] == ids[o] for r, o in origin.items())
    # the estimates agree with the true Jaccard of the reference shingle sets
    rows = frame.to_dicts()
    sets = [shingle_set(r, ("prompt", "response")) for r in rows]
    estimates = out.get_column("duplicate_jaccard").to_list()
    for r, o in origin.items():
        truth = jaccard(sets[r], sets[o])
        assert truth >= 0.85 and abs(estimates[r] - truth) < 0.1, (r, truth, estimates[r])
    assert estimates.count(None) == frame.height - 4
    # the real rows are far apart: nothing in them is near the threshold
    real = [s for k, s in enumerate(sets) if k not in origin]
    worst = max(jaccard(a, b) for i, a in enumerate(real) for b in real[i + 1 :])
    assert worst < 0.3
    stats = context.extra_stats
    assert stats["duplicates"] == 4 and stats["clusters"] == 4
    assert stats["lsh_bands"] * stats["lsh_rows_per_band"] <= 128
    assert stats["candidate_pairs"] >= 4 and stats["rows_without_tokens"] == 0


def test_minhash_chain_keeps_the_row_far_from_every_survivor(
    alpaca: pl.DataFrame, tmp_path: Path
) -> None:
    # A, B, C are 80-word windows of one real answer, each 5 words after the last:
    # J(A,B) = J(B,C) = 0.87 but J(A,C) = 0.76. B joins A; C, far from A, stays.
    words = str(alpaca.row(31, named=True)["response"]).split()
    texts = [" ".join(words[s : s + 80]) for s in (0, 5, 10)]
    rows = [qa("Summarise the impact of AI on the economy.", t) for t in texts]
    frame = records_frame(rows)
    sets = [shingle_set(r, ("response",)) for r in frame.to_dicts()]
    assert min(jaccard(sets[0], sets[1]), jaccard(sets[1], sets[2])) > 0.85
    assert jaccard(sets[0], sets[2]) < 0.77
    cfg = MinHashDedupConfig(fields=("response",), num_perm=512)
    out = run(MinHashDedup(cfg), frame, ctx(tmp_path))
    assert out.get_column("drop_reason").to_list() == [None, "near_duplicate", None]
    assert out.get_column("duplicate_jaccard")[1] == pytest.approx(
        jaccard(sets[0], sets[1]), abs=0.05
    )


def test_char_shingles_catch_a_typo_and_the_row_column_passes_through(
    alpaca: pl.DataFrame, tmp_path: Path
) -> None:
    real = alpaca.row(4, named=True)  # "What kind of foods do they eat in Thailand"
    prompt, answer = str(real["prompt"]), str(real["response"])
    typo = answer.replace("Thai", "Tai", 1)
    frame = records_frame([qa(prompt, answer), qa(prompt, typo), qa("Another question?", "No.")])
    cfg = MinHashDedupConfig(unit="char", ngram=5, threshold=0.9)
    out = MinHashDedup(cfg).select(frame.with_row_index(ROW_COLUMN), ctx(tmp_path))
    by_row = dict(zip(out.get_column(ROW_COLUMN), out.get_column("drop_reason"), strict=True))
    assert by_row == {0: None, 1: "near_duplicate", 2: None}


def test_configs_from_recipe_yaml_and_their_errors(tmp_path: Path) -> None:
    raw = {
        "input": {"path": str(tmp_path / "in.jsonl")},
        "stages": [
            {"exact_dedup": {"fields": ["prompt"], "strip_punctuation": True}},
            {"minhash_dedup": {"fields": ["conversation"], "unit": "char", "ngram": 7}},
        ],
    }
    recipe = Recipe.from_dict(raw, where="t.yaml")
    exact, near = (s.config for s in recipe.stages)
    assert exact == ExactDedupConfig(fields=("prompt",), strip_punctuation=True)
    assert near == MinHashDedupConfig(fields=("conversation",), unit="char", ngram=7)
    assert recipe.stages[1].requires() == ("id", "messages")
    bad = {**raw, "stages": [{"minhash_dedup": {"unit": "byte"}}]}
    with pytest.raises(RecipeError, match=r"unit: 'byte' is not one of"):
        Recipe.from_dict(bad, where="t.yaml")
    with pytest.raises(ValueError, match="threshold must be in"):
        MinHashDedupConfig(threshold=1.5)
    with pytest.raises(ValueError, match="at least one"):
        ExactDedupConfig(fields=())
    with pytest.raises(ValueError, match="field must be one of"):
        ExactDedupConfig(fields=("instruction",))  # type: ignore[arg-type]
    # batch size is not fingerprinted: it does not change the output
    assert "batch_size" not in MinHashDedup(MinHashDedupConfig()).config_for_fingerprint()
