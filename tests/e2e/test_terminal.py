"""A real `gristmill run` keeps the terminal for progress and results; the logs go to a file.

The default recipe, shrunk, in its own process (its own engine, Prefect server and home),
its output captured (not a terminal: no progress bars). Before `gristmill.runlog` the same
run printed ~140 lines of vLLM, httpx and faiss chatter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "magpie.yaml"
TINY = [
    "input.rows=4",
    "part_rows=4",
    "stages.magpie.instruction_max_tokens=32",
    "stages.magpie.response_max_tokens=32",
    "stages.heuristics.min_prompt_words=1",
    "stages.heuristics.drop_truncated=false",
    "stages.kmeans.budget=2",
    "stages.kmeans.k=2",
]

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_a_short_run_prints_at_most_30_lines_and_logs_vllm_to_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    # as a user's shell has them: unset (the suite's conftest quiets Prefect's loggers)
    for key in ("VLLM_LOGGING_CONFIG_PATH", "PYTHONWARNINGS", "PREFECT_LOGGING_LEVEL"):
        env.pop(key, None)
    args = [sys.executable, "-m", "gristmill.cli", "run", str(RECIPE), "--out", str(out)]
    proc = subprocess.run(
        [*args, *[a for s in TINY for a in ("--set", s)]],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    # lines as a terminal shows them: a progress bar redraws its line with "\r"
    terminal = (proc.stdout + proc.stderr).rstrip("\n").split("\n")
    shown = "\n".join(terminal)
    assert proc.returncode == 0, shown
    log = out / "logs" / "run.log"
    assert terminal[0] == f"run folder: {out}", shown
    assert terminal[1].startswith(f"log: {log} "), shown
    assert len(terminal) <= 30, f"{len(terminal)} lines:\n{shown}"
    assert not [line for line in terminal if " INFO " in line], shown
    assert "dataset: " in shown and "wall time: " in shown
    text = log.read_text(encoding="utf-8")
    # start-up lines of vLLM's engine process, and the flow's own records
    assert "Initializing a V1 LLM engine" in text
    assert "vLLM engine for smollm2-135m-instruct started" in text
    assert "[01] magpie" in text
    assert "Finished in state Completed()" in text  # a line per finished part
