"""Multi-round loops with and without round barriers, on the same problems and seeds.

Runs `hint_infer` (recipes/start-math.yaml) and `dart` Uniform (recipes/dart-arith.yaml)
on the same arithmetic problems twice each, in one process on one engine: once in
deterministic mode (one `generate` call per round, cells run between rounds) and once
continuous (each trajectory or query submits its next request as soon as its own result is
back, cells run while others generate). Prints, per loop and mode: wall seconds, requests,
output tokens, tokens/s, the engine busy fraction (time with at least one request in flight
over wall time) and `barrier/continuous wall: X`. Timings are printed, never asserted.

`clear` has one generating step (its samples) and then scoring rounds that are prefills
only (prompt log-probs), so what costs it is the parts waiting on each other: it runs as a
whole pipeline (`Pipeline.run`) over `--clear-rows` AlpacaFarm rows in parts of
`--clear-part-rows`, deterministic (parts one after another, one batch per call) against
continuous (`parts_in_flight` parts at once, samples and scoring prefills in the running
batch).

    .venv/bin/python bench/loops.py [--rows 12] [--samples 4] [--max-tokens 256]
    .venv/bin/python bench/loops.py --only clear [--clear-rows 32] [--clear-part-rows 8]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from gristmill.engines.factory import shutdown_engines
from gristmill.pipelines.pipeline import Pipeline
from gristmill.pipelines.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Measure:
    """One loop run in one mode."""

    loop: str
    mode: str
    seconds: float
    requests: int
    output_tokens: int
    busy_seconds: float
    kept: int

    @property
    def busy(self) -> float:
        return self.busy_seconds / self.seconds if self.seconds else 0.0


def run_once(recipe: Recipe, loop: str, *, continuous: bool, tmp: Path) -> Measure:
    """The recipe's first stage over its input, in one mode, timed."""
    mode = "continuous" if continuous else "barrier"
    pipeline = Pipeline(recipe, tmp / f"{loop}-{mode}", show_progress=False)
    (part,) = pipeline.input_parts()
    planned = pipeline.stages[0]
    ctx = pipeline.context(planned, 0)
    ctx.continuous = continuous
    ctx.show_progress = False
    frame = pl.read_parquet(part)
    pipeline.engine(planned.engines[0])  # started before the clock
    start = time.perf_counter()
    out = planned.stage.process(frame, ctx)
    seconds = time.perf_counter() - start
    stats = ctx.engine_stats
    kept = out.height if "drop_reason" not in out.columns else out["drop_reason"].null_count()
    return Measure(
        loop=loop,
        mode=mode,
        seconds=seconds,
        requests=stats.prompts,
        output_tokens=stats.output_tokens,
        busy_seconds=stats.seconds,
        kept=kept,
    )


def run_clear(rows: int, part_rows: int, *, continuous: bool, tmp: Path) -> Measure:
    """CLEAR over `rows` AlpacaFarm rows as a whole pipeline run, in one mode, timed."""
    mode = "continuous" if continuous else "barrier"
    recipe = Recipe.from_dict(
        {
            "name": "clear-parts",
            "seed": 0,
            "part_rows": part_rows,
            "deterministic": not continuous,
            "input": {
                "path": str(ROOT / "recipes" / "data" / "alpaca_farm_eval_gpt35_160.jsonl"),
                "mapping": {"prompt": "instruction", "input": "input", "response": "output"},
                "limit": rows,
            },
            "engine": {"backend": "vllm", "model": "smollm2-135m-instruct"},
            "stages": [{"clear": {"samples": 3, "max_tokens": 96}}],
        }
    )
    pipeline = Pipeline(recipe, tmp / f"clear-{mode}", show_progress=False)
    pipeline.engine(pipeline.stages[0].engines[0])  # started before the clock
    start = time.perf_counter()
    dataset = pipeline.run(lambda _: None)
    seconds = time.perf_counter() - start
    success = next((tmp / f"clear-{mode}").glob("01_clear-*/_SUCCESS.json"))
    engine = json.loads(success.read_text())["engine"]
    return Measure(
        loop="clear",
        mode=mode,
        seconds=seconds,
        requests=int(engine["prompts"]),
        output_tokens=int(engine["output_tokens"]),
        busy_seconds=float(engine["seconds"]),
        kept=pl.read_parquet(dataset / "data" / "*.parquet").height,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12, help="arithmetic problems per loop")
    parser.add_argument("--samples", type=int, default=4, help="hint_infer trajectories each")
    parser.add_argument("--max-tokens", type=int, default=256, help="hint_infer token budget")
    parser.add_argument("--only", choices=("hint_infer", "dart", "clear"), help="one loop only")
    parser.add_argument("--clear-rows", type=int, default=32, help="rows CLEAR scores")
    parser.add_argument("--clear-part-rows", type=int, default=8, help="CLEAR's part_rows")
    args = parser.parse_args()
    common = [f"input.rows={args.rows}", "part_rows=100000"]
    recipes = {
        "hint_infer": Recipe.from_yaml(
            ROOT / "recipes" / "start-math.yaml",
            overrides=[
                *common,
                f"stages.hint_infer.samples={args.samples}",
                f"stages.hint_infer.max_tokens={args.max_tokens}",
            ],
        ),
        "dart": Recipe.from_yaml(
            ROOT / "recipes" / "dart-arith.yaml",
            overrides=[*common, "stages.dart.strategy=uniform", "stages.dart.k_u=2"],
        ),
    }
    load_before = os.getloadavg()
    results: list[Measure] = []
    try:
        with tempfile.TemporaryDirectory(prefix="gm-loops-") as tmp:
            for loop, recipe in recipes.items():
                if args.only and loop != args.only:
                    continue
                for continuous in (False, True):
                    results.append(run_once(recipe, loop, continuous=continuous, tmp=Path(tmp)))
            if args.only in (None, "clear"):
                for continuous in (False, True):
                    results.append(
                        run_clear(
                            args.clear_rows,
                            args.clear_part_rows,
                            continuous=continuous,
                            tmp=Path(tmp),
                        )
                    )
    finally:
        shutdown_engines()
    load = os.getloadavg()
    print(
        f"loops bench: rows={args.rows} samples={args.samples} max_tokens={args.max_tokens} "
        f"load {load_before[0]:.2f} -> {load[0]:.2f}"
    )
    print(
        f"{'loop':<11} {'mode':<11} {'seconds':>8} {'requests':>8} {'out_tok':>8} "
        f"{'tok/s':>7} {'busy':>5} {'kept':>5}"
    )
    for m in results:
        print(
            f"{m.loop:<11} {m.mode:<11} {m.seconds:>8.1f} {m.requests:>8} {m.output_tokens:>8} "
            f"{m.output_tokens / m.seconds:>7.1f} {m.busy:>5.2f} {m.kept:>5}"
        )
    by = {(m.loop, m.mode): m for m in results}
    for loop in [*recipes, "clear"]:
        if (loop, "barrier") in by and (loop, "continuous") in by:
            x = by[(loop, "barrier")].seconds / by[(loop, "continuous")].seconds
            print(f"{loop}: barrier/continuous wall: {x:.2f}")


if __name__ == "__main__":
    main()
