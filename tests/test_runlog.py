"""`route_logs` writes the run's log and vLLM's logging config where `RunLayout` says, and
keeps the terminal to gristmill's warnings and anyone's errors (in a subprocess: it rewires
the root logger and the environment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from gristmill.pipelines.layout import RunLayout


def test_logs_go_to_the_layouts_paths(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code = textwrap.dedent(
        f"""
        import logging, os
        from gristmill.runlog import route_logs
        print(route_logs({str(run)!r}))
        print(os.environ["VLLM_LOGGING_CONFIG_PATH"])
        logging.getLogger("gristmill.x").info("an info line")
        logging.getLogger("gristmill.x").warning("a gristmill warning")
        logging.getLogger("other").warning("another library's warning")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_CONFIG_PATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    layout = RunLayout(run)
    assert done.stdout.splitlines() == [str(layout.run_log), str(layout.vllm_logging_config)]
    text = layout.run_log.read_text(encoding="utf-8")
    for line in ("an info line", "a gristmill warning", "another library's warning"):
        assert line in text
    assert "a gristmill warning" in done.stderr
    assert "an info line" not in done.stderr and "another library" not in done.stderr
    config = json.loads(layout.vllm_logging_config.read_text(encoding="utf-8"))
    assert config["handlers"]["file"]["filename"] == str(layout.run_log)
