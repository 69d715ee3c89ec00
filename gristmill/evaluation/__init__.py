"""Does the data help? Fine-tune a base model on each dataset at one budget and measure it.

`evaluate(datasets, eval_set=..., budget=Budget(tokens=N), seeds=[0, 1, 2], out=DIR)`:
modules `budget` (the budget and the fairness rules), `data` (datasets, eval set, held-out
exclusion), `train` (TRL SFT on the answers only), `metrics` (NLL, greedy accuracy),
`results` (the `evals` table) and `run` (the loop). Heavy libraries load when called.
"""

from __future__ import annotations

from gristmill.evaluation.budget import Budget, check_comparable
from gristmill.evaluation.data import EvalSet, load_eval_set, load_training_data
from gristmill.evaluation.results import EVALS_FILE, read_evals, summary
from gristmill.evaluation.run import evaluate
from gristmill.evaluation.train import TrainConfig

__all__ = [
    "EVALS_FILE",
    "Budget",
    "EvalSet",
    "TrainConfig",
    "check_comparable",
    "evaluate",
    "load_eval_set",
    "load_training_data",
    "read_evals",
    "summary",
]
