"""`RunLayout` takes a run folder as a str or a Path alike."""

from __future__ import annotations

from pathlib import Path

from gristmill.pipelines.layout import RunLayout


def test_a_str_run_folder_is_a_path() -> None:
    layout = RunLayout("runs/demo")  # type: ignore[arg-type]
    assert layout == RunLayout(Path("runs/demo"))
    assert layout.dataset_data == Path("runs/demo") / "dataset" / "data"
    assert layout.manifest.parent == Path("runs/demo")
