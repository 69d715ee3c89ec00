"""The small DART run the e2e tests share (see conftest.py's `dart_run`)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DART_RECIPE = ROOT / "recipes" / "dart-arith.yaml"

# Ten problems at levels 1 and 3, few samples: small enough for CI, and the tiny model both
# solves and fails some. The engine spec stays the recipe's, so it reuses the session engine.
DART_SMALL = [
    "input.rows=10",
    "input.options={levels: [1, 3]}",
    "stages.dart.max_tokens=160",
    "stages.dart.probe_samples=2",
    "stages.dart.samples_per_round=2",
    "stages.dart.k_p=2",
    "stages.dart.max_trials=6",
]
