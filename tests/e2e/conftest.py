"""One small DART run on the real engine, shared by the DART flow and trainer tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from dart_small import DART_RECIPE, DART_SMALL

from gristmill.engines.base import Engine
from gristmill.flows.recipe import run_recipe


@pytest.fixture(scope="session")
def dart_run(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small DART run's folder (default output format); tests must not modify it."""
    out = tmp_path_factory.mktemp("dart") / "run"
    run_recipe(DART_RECIPE, out, DART_SMALL, show_progress=False)
    return out
