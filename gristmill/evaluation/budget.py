"""The training budget, and the rules that make a comparison of datasets fair by construction.

A budget is counted in *loss tokens*: tokens of assistant answers, the only tokens that carry
loss (prompt tokens are masked out), after truncation to the training `max_length`. Every
dataset gets exactly the same number: rows are drawn in a seeded order and the last row's
answer is cut where the budget ends. A step budget trains every dataset for the same number
of optimizer steps on the same number of rows instead (their token counts are recorded).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: A tokens budget may give datasets different numbers of steps (short answers: more rows);
#: past this ratio between the most and fewest steps the comparison is refused.
MAX_STEP_RATIO = 10.0


@dataclass(frozen=True, kw_only=True)
class Budget:
    """How much training each dataset gets: `tokens` (loss tokens) or `steps`, exactly one."""

    tokens: int | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.steps is None):
            raise ValueError(
                f"a budget is tokens or steps, exactly one of them; got tokens={self.tokens}, "
                f"steps={self.steps}"
            )
        for name, value in (("tokens", self.tokens), ("steps", self.steps)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"budget {name} must be a positive integer, got {value!r}")

    def describe(self) -> str:
        """`"4000 tokens"` or `"20 steps"`: how results name their budget."""
        return f"{self.tokens} tokens" if self.tokens is not None else f"{self.steps} steps"


@dataclass(frozen=True, kw_only=True)
class Draw:
    """The rows one training run gets: indices in training order, and the loss tokens kept of
    each (the last one may be cut short by a tokens budget)."""

    rows: tuple[int, ...]
    tokens: tuple[int, ...]

    @property
    def total_tokens(self) -> int:
        """Loss tokens the run trains on."""
        return sum(self.tokens)


def seeded_order(n: int, seed: int) -> list[int]:
    """A permutation of range(n) that depends only on `n` and `seed`."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def draw_rows(
    loss_tokens: Sequence[int], budget: Budget, *, seed: int, rows_per_step: int, name: str
) -> Draw:
    """Rows for one run: a seeded order of the rows with loss tokens, taken until the budget.

    Raises ValueError naming `name` when the dataset holds less than the budget.
    """
    order = [i for i in seeded_order(len(loss_tokens), seed) if loss_tokens[i] > 0]
    if budget.tokens is not None:
        available = sum(loss_tokens[i] for i in order)
        if available < budget.tokens:
            raise ValueError(
                f"dataset {name!r} has {available} loss tokens, fewer than the budget of "
                f"{budget.tokens} tokens"
            )
        rows: list[int] = []
        kept: list[int] = []
        left = budget.tokens
        for i in order:
            take = min(loss_tokens[i], left)
            rows.append(i)
            kept.append(take)
            left -= take
            if left == 0:
                break
        return Draw(rows=tuple(rows), tokens=tuple(kept))
    assert budget.steps is not None
    need = budget.steps * rows_per_step
    if len(order) < need:
        raise ValueError(
            f"dataset {name!r} has {len(order)} trainable rows, fewer than the budget of "
            f"{budget.steps} steps x {rows_per_step} rows"
        )
    chosen = order[:need]
    return Draw(rows=tuple(chosen), tokens=tuple(loss_tokens[i] for i in chosen))


def steps_for(rows: int, rows_per_step: int) -> int:
    """Optimizer steps of one pass over `rows` rows."""
    return -(-rows // rows_per_step)


def check_steps(steps: Mapping[str, int]) -> None:
    """Refuse a plan whose datasets' step counts differ by more than MAX_STEP_RATIO."""
    if not steps:
        return
    most, fewest = max(steps.values()), min(steps.values())
    if most > MAX_STEP_RATIO * fewest:
        listed = ", ".join(f"{name}: {n} steps" for name, n in steps.items())
        raise ValueError(
            f"the same token budget gives steps more than {MAX_STEP_RATIO:g}x apart ({listed}); "
            "the runs would not be comparable: use a step budget or closer datasets"
        )


#: The fields of a result that must be equal for two results to be compared.
SETUP_FIELDS = ("base_model", "eval_set_sha256", "budget", "hyperparameters")


def check_comparable(results: Sequence[Mapping[str, object]]) -> None:
    """Refuse results recorded under different budgets, base models, eval sets or
    hyper-parameters; the error names each dataset with its setup."""
    setups: dict[tuple[object, ...], list[str]] = {}
    for row in results:
        key = tuple(row[f] for f in SETUP_FIELDS)
        names = setups.setdefault(key, [])
        if row["dataset"] not in names:
            names.append(str(row["dataset"]))
    if len(setups) <= 1:
        return
    differ = [f for i, f in enumerate(SETUP_FIELDS) if len({k[i] for k in setups}) > 1]
    lines = []
    for key, names in setups.items():
        setup = ", ".join(
            f"{f}={key[i]}" for i, f in enumerate(SETUP_FIELDS) if f in differ and f != "budget"
        )
        budget = key[SETUP_FIELDS.index("budget")]
        lines.append(f"{', '.join(names)}: budget {budget}" + (f" ({setup})" if setup else ""))
    raise ValueError(
        f"refusing to compare results trained under different {' and '.join(differ)}: "
        + "; ".join(lines)
    )
