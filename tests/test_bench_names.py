"""Bench scripts run with bench/ first on sys.path, so none may take a standard-library name
(a `bench/select.py` once shadowed `select`, which subprocess, asyncio and vLLM import)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_no_bench_script_shadows_the_standard_library() -> None:
    scripts = sorted(p.stem for p in BENCH.glob("*.py"))
    assert scripts, "no bench scripts found"
    assert [s for s in scripts if s in sys.stdlib_module_names] == []
