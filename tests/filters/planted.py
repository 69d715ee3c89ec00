"""Planted near-duplicate rows built from the committed slices (shared by dedup tests)."""

from __future__ import annotations

import random
from typing import Any

import polars as pl

from gristmill.records import make_record, records_frame


def qa(prompt: str, answer: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return make_record(messages, source="planted")


def planted_rows(slices: dict[str, pl.DataFrame], n: int, seed: int) -> pl.DataFrame:
    """n rows built from the committed slices' words: fresh texts, exact copies, near copies
    (1-3 words changed), copies of near copies, 5-word shifts, and rows without words."""
    rng = random.Random(seed)
    words = [
        w for frame in slices.values() for t in frame.get_column("response") for w in t.split()
    ]
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        roll = rng.random()
        if rows and roll < 0.08:
            rows.append(dict(rng.choice(rows)))  # an exact copy (same id)
        elif rows and roll < 0.25:
            base = rng.choice(rows)
            answer = str(base["response"]).split(" ")
            for _ in range(rng.randint(1, 3)):
                answer[rng.randrange(len(answer))] = rng.choice(words)
            rows.append(qa(str(base["prompt"]), " ".join(answer)))
        elif rows and roll < 0.30:
            base = rng.choice(rows)
            answer = str(base["response"]).split(" ")
            rows.append(qa(str(base["prompt"]), " ".join(answer[5:] + rng.sample(words, 5))))
        elif roll < 0.301:
            rows.append(qa("???", "..."))  # no \w tokens at all
        else:
            prompt = " ".join(rng.sample(words, rng.randint(3, 12)))
            rows.append(qa(prompt, " ".join(rng.sample(words, rng.randint(20, 90)))))
    return records_frame(rows)
