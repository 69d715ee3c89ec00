"""exact_dedup's keys skip NFKC on ASCII texts and still equal the plain normalisation."""

from __future__ import annotations

import random

import polars as pl
import pytest

from gristmill.filters.dedup import ExactDedupConfig, exact_keys, field_texts, normalize_expr

ODD = [
    "Ｆｕｌｌ ｗｉｄｔｈ",
    "ﬁne\u00a0print",
    "Straße",
    None,
    "",
    "plain ascii  text\n",
    "①②",
    # whitespace: lone spaces and newlines take the literal path, the rest the regex
    "one line\nand the next\n",
    " leading and trailing ",
    "\n",
    "a\n\nb",
    "a \nb",
    "tab\there",
    "cr\r\nlf",
    "nbsp\u00a0and\u2003em",
    "\u3000ideographic\u3000",
    "\x1cfile separator",
    "line\u2028separator",
]


@pytest.mark.parametrize(
    "cfg",
    [ExactDedupConfig(), ExactDedupConfig(strip_punctuation=True), ExactDedupConfig(nfkc=False)],
    ids=["default", "punctuation", "no-nfkc"],
)
def test_keys_equal_the_plain_normalisation(
    committed_slices: dict[str, pl.DataFrame], cfg: ExactDedupConfig
) -> None:
    frames = [field_texts(f, cfg.fields) for f in committed_slices.values()]
    odd = pl.DataFrame(
        {"t0": ODD, "t1": list(reversed(ODD))}, schema={"t0": pl.String, "t1": pl.String}
    )
    texts = pl.concat([*frames, odd])
    plain = texts.select(
        normalize_expr(
            pl.col(c),
            nfkc=cfg.nfkc,
            lowercase=cfg.lowercase,
            strip_punctuation=cfg.strip_punctuation,
            collapse_whitespace=cfg.collapse_whitespace,
        ).alias(f"key{i}")
        for i, c in enumerate(texts.columns)
    )
    assert exact_keys(texts, cfg).equals(plain)


def test_keys_equal_the_plain_normalisation_on_random_whitespace() -> None:
    """Short random texts over letters and every kind of white character, in runs or alone."""
    rng = random.Random(7)
    alphabet = ["a", "B", ".", "é", "ﬁ", " ", " ", "\n", "\n", "\t", "\r", "\u00a0", "\u2028"]
    texts = ["".join(rng.choices(alphabet, k=rng.randint(0, 12))) for _ in range(3000)]
    frame = pl.DataFrame({"t0": texts, "t1": texts[::-1]})
    cfg = ExactDedupConfig()
    plain = frame.select(
        normalize_expr(pl.col(c)).alias(f"key{i}") for i, c in enumerate(frame.columns)
    )
    assert exact_keys(frame, cfg).equals(plain)
