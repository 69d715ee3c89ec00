"""Users' own stages, defined in a module outside the package, as first-class stages.

One custom filter and one custom map stage live in a temporary folder put on PYTHONPATH
(as a user's project would be). The same recipe runs from YAML through `gristmill run`,
through `gm.Recipe.from_yaml(...).run(...)`, on a 2-worker Dask cluster, and built in
Python; every run must land the same dataset. A run killed mid-stage resumes without
redoing finished parts. Bad stage references fail with messages that say what to fix.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

import gristmill as gm
from gristmill.flows.ref import PipelineRef
from gristmill.pipelines.config import RecipeError
from gristmill.pipelines.layout import RunLayout
from gristmill.pipelines.pipeline import Pipeline
from gristmill.pipelines.stage import Stage

ROOT = Path(__file__).resolve().parents[2]
ALPACA = ROOT / "tests" / "selectors" / "data" / "alpaca_farm_eval_gpt35_100.jsonl"
MAPPING = {"prompt": "instruction", "input": "input", "response": "output", "model": "generator"}

#: The README's "Write your own stage" filter, verbatim, plus a map stage and a slow one.
USER_MODULE = '''
import time

import polars as pl

import gristmill as gm


class MinWords(gm.Filter):
    """Drops rows whose response has fewer than `min_words` words."""

    min_words: int = 40

    def keep(self, row: dict) -> bool | str:
        return len(row["response"].split()) >= self.min_words or "too_few_words"


class WordCount(gm.Map):
    """Adds `n_words`, the response's word count; optionally slowly (to be killed)."""

    delay_s: float = 0.0
    unhashed = frozenset({"delay_s"})

    def produces(self) -> tuple[str, ...]:
        return ("n_words",)

    def process(self, batch: pl.DataFrame, ctx: gm.StageContext) -> pl.DataFrame:
        time.sleep(self.delay_s)
        return batch.with_columns(
            pl.col("response").str.split(" ").list.len().alias("n_words")
        )


class NotAStage:
    pass
'''


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder outside the package holding `my_stages.py`, importable for this module."""
    folder = tmp_path_factory.mktemp("user_project")
    (folder / "my_stages.py").write_text(textwrap.dedent(USER_MODULE))
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("my_stages", None)


def recipe_mapping(**wordcount: object) -> dict[str, object]:
    """60 AlpacaFarm answers in 4 parts → MinWords → WordCount → heuristics → random 12."""
    return {
        "name": "user-stages",
        "seed": 3,
        "part_rows": 15,
        "input": {"path": str(ALPACA), "mapping": MAPPING, "limit": 60},
        "stages": [
            {"my_stages:MinWords": {"min_words": 30}},
            {"my_stages:WordCount": dict(wordcount)},
            {"heuristics": {"max_response_words": 400}},
            {"random": {"budget": 12}},
        ],
    }


def write_recipe(path: Path, **wordcount: object) -> Path:
    path.write_text(yaml.safe_dump(recipe_mapping(**wordcount), sort_keys=False))
    return path


def cli_env(user_dir: Path, tmp: Path) -> dict[str, str]:
    """The user's folder on PYTHONPATH (inherited by local Dask workers), own Prefect home."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(user_dir), os.environ.get("PYTHONPATH", "")]),
        "PREFECT_HOME": str(tmp / "prefect"),
        "PYTHONUNBUFFERED": "1",
    }


def gristmill_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gristmill.cli", *args]


def run_cli(user_dir: Path, tmp: Path, *args: str) -> None:
    done = subprocess.run(
        gristmill_cmd(*args, "--no-progress"),
        env=cli_env(user_dir, tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def dataset(run: Path) -> pl.DataFrame:
    return pl.read_parquet(RunLayout(run).dataset_data / "*.parquet")


@pytest.mark.slow
def test_custom_stages_run_the_same_on_cli_python_and_dask(user_dir: Path, tmp_path: Path) -> None:
    recipe_path = write_recipe(tmp_path / "recipe.yaml")

    run_cli(user_dir, tmp_path, "run", str(recipe_path), "--out", str(tmp_path / "cli"))
    from_yaml = gm.Recipe.from_yaml(recipe_path)
    from_yaml.run(tmp_path / "python", show_progress=False)
    run_cli(
        user_dir,
        tmp_path,
        "run",
        str(recipe_path),
        "--out",
        str(tmp_path / "dask"),
        "--runner",
        "dask",
        "--workers",
        "2",
    )

    cli = dataset(tmp_path / "cli")
    assert 0 < cli.height <= 12 and "n_words" in cli.columns
    assert cli["n_words"].min() >= 30  # MinWords ran before WordCount counted
    assert dataset(tmp_path / "python").equals(cli)
    assert dataset(tmp_path / "dask").equals(cli)

    # the custom stages are recorded by class path and version, with their whole config
    manifest = json.loads(RunLayout(tmp_path / "cli").manifest.read_text())
    first = manifest["stages"][0]
    assert (first["key"], first["class"], first["version"]) == (
        "my_stages:MinWords",
        "my_stages:MinWords",
        "1",
    )
    assert manifest["recipe"]["resolved"]["stages"][1] == {"my_stages:WordCount": {"delay_s": 0.0}}
    assert first["dropped"] == {"too_few_words": 60 - first["rows_out"]}

    # built in Python: the same recipe object, the same dataset, and its YAML via the CLI
    MinWords = sys.modules["my_stages"].MinWords
    WordCount = sys.modules["my_stages"].WordCount
    built = gm.Recipe(
        name="user-stages",
        seed=3,
        part_rows=15,
        input=gm.Input(path=str(ALPACA), mapping=MAPPING, limit=60),
        stages=[
            MinWords(min_words=30),
            WordCount(),
            gm.stages.Heuristics(max_response_words=400),
            gm.stages.RandomSelect(budget=12),
        ],
    )
    assert built == from_yaml
    built.run(tmp_path / "built", show_progress=False)
    assert dataset(tmp_path / "built").equals(cli)
    (tmp_path / "built.yaml").write_text(built.to_yaml())
    run_cli(user_dir, tmp_path, "run", str(tmp_path / "built.yaml"), "--out", str(tmp_path / "b2"))
    assert dataset(tmp_path / "b2").equals(cli)


@pytest.mark.slow
def test_custom_stage_killed_mid_run_resumes_without_redoing_parts(
    user_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    slow = write_recipe(tmp_path / "slow.yaml", delay_s=4.0)
    stage_dir = Pipeline(gm.Recipe.from_yaml(slow), out).stages[1].dir  # word_count's folder
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        gristmill_cmd("run", str(slow), "--out", str(out), "--no-progress"),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=cli_env(user_dir, tmp_path),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if RunLayout.part(stage_dir, 1).exists():
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [p.name for p in out.glob("02_word_count-*")] == [stage_dir.name]
    done = {p.name: p.stat().st_mtime_ns for p in RunLayout.written_parts(stage_dir)}
    assert 2 <= len(done) < 4, f"the kill must land mid-stage: {sorted(done)}"
    assert not RunLayout.success(stage_dir).exists()

    # delay_s is unhashed: the fast rerun has the same fingerprints, so it resumes
    fast = gm.Recipe.from_yaml(write_recipe(tmp_path / "fast.yaml"))
    fast.run(out, show_progress=False)
    for name, mtime in done.items():
        assert (stage_dir / name).stat().st_mtime_ns == mtime, f"{name} was recomputed"
    assert len(RunLayout.written_parts(stage_dir)) == 4
    fast.run(tmp_path / "clean", show_progress=False)
    assert dataset(out).equals(dataset(tmp_path / "clean"))


def test_filter_attributes_keyword_config_and_repr(user_dir: Path) -> None:
    import my_stages

    stage = my_stages.MinWords(min_words=5)
    assert stage.min_words == 5 and stage.config.min_words == 5
    assert stage.name == "min_words" and stage.kind == "filter" and stage.version == "1"
    assert repr(stage) == "MinWords(min_words=5)"
    assert my_stages.MinWords() == my_stages.MinWords(min_words=40) != stage
    frame = pl.DataFrame({"id": ["a", "b"], "response": ["one two three four five", "one"]})
    out = stage.process(frame, None)  # type: ignore[arg-type]
    assert out["drop_reason"].to_list() == [None, "too_few_words"]


def test_bad_stage_references_say_what_to_fix(user_dir: Path) -> None:
    def load(stage: object) -> None:
        gm.Recipe.from_dict({"input": {"rows": 3}, "stages": [stage]}, where="r.yaml")

    with pytest.raises(
        RecipeError,
        match=r"r.yaml: stages\[0\]: cannot import module "
        r"'no_such_mod' for stage 'no_such_mod:X'.*PYTHONPATH \(sys.path: \[",
    ):
        load("no_such_mod:X")
    with pytest.raises(RecipeError, match="module 'my_stages' has no attribute 'Nope'"):
        load("my_stages:Nope")
    with pytest.raises(
        RecipeError,
        match=re.escape(
            "'my_stages:NotAStage' is not a gristmill stage: "
            "subclass gm.Filter, gm.Map or gm.Select"
        ),
    ):
        load("my_stages:NotAStage")
    with pytest.raises(
        RecipeError,
        match=r"unknown key\(s\) \['min_word'\]; valid keys: "
        "min_words",
    ):
        load({"my_stages:MinWords": {"min_word": 3}})
    with pytest.raises(RecipeError, match=r"min_words: expected an integer, got 'many'"):
        load({"my_stages:MinWords": {"min_words": "many"}})
    with pytest.raises(
        RecipeError, match="unknown stage 'heuristic'; built-in stages: generate, magpie"
    ):
        load("heuristic")
    import my_stages

    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['min_word'\]"):
        my_stages.MinWords(min_word=3)


def test_keep_must_return_a_verdict(user_dir: Path) -> None:
    class Broken(gm.Filter):
        def keep(self, row: dict) -> bool | str:
            return None  # type: ignore[return-value]

    frame = pl.DataFrame({"id": ["x1"], "response": ["hi"]})
    with pytest.raises(
        TypeError,
        match=r"keep\(\) must return True, False or a drop reason.*"
        r"returned None for id 'x1'",
    ):
        Broken().process(frame, None)  # type: ignore[arg-type]


def readme_filter() -> str:
    """The complete filter of the README's "Write your own stage" section."""
    section = (ROOT / "README.md").read_text().split("### Write your own stage", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_filter_is_the_one_these_tests_run() -> None:
    code = readme_filter()
    assert code.startswith("# my_stages.py\n")
    assert code.removeprefix("# my_stages.py\n") in textwrap.dedent(USER_MODULE)
    assert len(code.removeprefix("# my_stages.py\n").splitlines()) == 10


def small_recipe(*stages: Stage) -> gm.Recipe:
    """30 AlpacaFarm answers in 2 parts through `stages`, built in Python (no file)."""
    return gm.Recipe(
        name="py-built",
        part_rows=15,
        input=gm.Input(path=str(ALPACA), mapping=MAPPING, limit=30),
        stages=stages,
    )


def test_python_recipe_manifest_card_and_worker_payload_come_from_the_typed_recipe(
    user_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import my_stages

    monkeypatch.setattr(my_stages.MinWords, "citation", "Doe (2024), Counting words")
    recipe = small_recipe(
        my_stages.MinWords(min_words=30),
        gm.stages.MinHashDedup(),
        gm.stages.RandomSelect(budget=5),
    )
    data = recipe.to_dict()
    assert data["stages"][0] == {"my_stages:MinWords": {"min_words": 30}}
    assert gm.Recipe(**data) == recipe and gm.Recipe.from_dict(data).to_dict() == data

    # what a Dask or Ray worker receives: JSON of to_dict(), picklable, the same recipe
    ref = pickle.loads(pickle.dumps(PipelineRef.of(recipe, tmp_path / "run")))
    assert json.loads(ref.recipe_json) == data and ref.recipe() == recipe

    layout = RunLayout(tmp_path / "run")
    Pipeline(recipe, layout.root, show_progress=False).run()
    manifest = json.loads(layout.manifest.read_text())
    assert manifest["recipe"] == {"name": "py-built", "path": None, "resolved": data}
    card = (layout.dataset_dir / "README.md").read_text()
    methods = card.split("## Methods\n\n", 1)[1].split("\n\n", 1)[0]
    assert methods.splitlines() == [
        "- **min_words**: Doe (2024), Counting words",
        f"- **minhash_dedup**: {gm.stages.MinHashDedup.citation}",
    ]
    assert f"## Recipe\n\n```yaml\n{recipe.to_yaml()}```" in card


def test_class_path_and_version_enter_the_fingerprint_and_the_manifest(
    user_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import my_stages

    (user_dir / "other_stages.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(user_dir))
    import other_stages

    def run(stage: Stage, name: str) -> tuple[str, dict[str, object]]:
        pipe = Pipeline(small_recipe(stage), tmp_path / name, show_progress=False)
        pipe.run()
        (summary,) = json.loads(pipe.layout.manifest.read_text())["stages"]
        assert summary["fingerprint"] == pipe.stages[0].fingerprint
        return pipe.stages[0].fingerprint, summary

    base, summary = run(my_stages.MinWords(min_words=30), "base")
    assert (summary["key"], summary["class"], summary["version"]) == (
        "my_stages:MinWords",
        "my_stages:MinWords",
        "1",
    )
    moved, summary = run(other_stages.MinWords(min_words=30), "moved")
    assert moved != base and summary["class"] == "other_stages:MinWords"
    monkeypatch.setattr(my_stages.MinWords, "version", "2")
    bumped, summary = run(my_stages.MinWords(min_words=30), "bumped")
    assert bumped not in (base, moved) and summary["version"] == "2"
    sys.modules.pop("other_stages", None)
