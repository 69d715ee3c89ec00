"""The README's "same recipe in Python" example runs as written (a broken example is a bug)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_python_recipe_example_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### The same recipe in Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README lost its Python recipe example"
    (tmp_path / "example.py").write_text(match.group(1), encoding="utf-8")
    rows = (ROOT / "recipes" / "data" / "alpaca_farm_eval_gpt35_160.jsonl").read_text().splitlines()
    (tmp_path / "data.jsonl").write_text("\n".join(rows[:60]) + "\n", encoding="utf-8")
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    done = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "runs" / "alpaca-short" / "dataset" / "data").glob("*.parquet"))
    assert "stages:" in done.stdout  # the printed YAML of the magpie recipe
