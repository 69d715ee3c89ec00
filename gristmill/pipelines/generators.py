"""Built-in input generators a recipe can name instead of a dataset file (`input.generator`).

Explicit dispatch: each generator is imported lazily and called with the row count, the
recipe's seed and its options, and returns a records frame.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl

GENERATORS = ("arith",)


def generate_input(
    name: str, *, rows: int, seed: int, options: Mapping[str, Any] | None = None
) -> pl.DataFrame:
    """Records from the built-in generator `name` (deterministic for a seed)."""
    opts = dict(options or {})
    match name:
        case "arith":
            from gristmill.synth.arith import generate_problems, problems_frame

            levels = opts.pop("levels", (1, 2, 3, 4, 5))
            if opts:
                raise ValueError(
                    f"input.options: unknown option(s) {sorted(opts)} for generator 'arith'; "
                    "known: ['levels']"
                )
            return problems_frame(generate_problems(rows, seed=seed, levels=tuple(levels)))
        case _:
            raise ValueError(f"unknown input generator {name!r}; known: {list(GENERATORS)}")
