"""exact_dedup's keys skip NFKC on ASCII texts and still equal the plain normalisation."""

from __future__ import annotations

import polars as pl
import pytest

from gristmill.filters.dedup import ExactDedupConfig, exact_keys, field_texts, normalize_expr

ODD = ["Ｆｕｌｌ ｗｉｄｔｈ", "ﬁne\u00a0print", "Straße", None, "", "plain ascii  text\n", "①②"]


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
