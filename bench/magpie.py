"""Benchmark: gristmill's Magpie stage against the raw engine doing the same work.

One process, one engine (`get_engine(EngineSpec())`). An untimed warm-up runs the stage
once through a recording engine, capturing the exact prompts and Samplings Magpie builds;
then each round times three paths on the same N seed rows:

  raw       `VLLMEngine.generate` replaying the recorded calls (instructions, then responses)
  stage     `Magpie.process` on the N rows through a StageContext
  pipeline  `Pipeline(...).run()` on a magpie-only recipe with part_rows=N/4 (parts on disk,
            stats, `_SUCCESS.json`, the dataset folder)

It prints output tokens, seconds and tokens/s per path and the tok/s ratios to raw. Timings
are printed, never asserted. Run: `.venv/bin/python bench/magpie.py --help`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import argparse
import dataclasses
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from gristmill.engines.base import Completion, Engine, Messages, Sampling, per_prompt
from gristmill.engines.factory import EngineSpec, get_engine, shutdown_engines
from gristmill.pipelines.pipeline import Pipeline
from gristmill.pipelines.recipe import Recipe
from gristmill.pipelines.stage import StageContext
from gristmill.synth.magpie import Magpie, MagpieConfig


@dataclass(frozen=True)
class Call:
    """One recorded `generate` call: its prompts and one Sampling per prompt."""

    prompts: tuple[str, ...]
    samplings: tuple[Sampling, ...]


class RecordingEngine:
    """Forwards to an engine and records every `generate` call, so raw can replay them."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.calls: list[Call] = []

    def generate(
        self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling]
    ) -> list[list[Completion]]:
        """Record the call, then run it on the wrapped engine."""
        params = per_prompt(sampling, len(prompts))
        self.calls.append(Call(tuple(prompts), tuple(params)))
        return self.inner.generate(prompts, params)

    def prompt_logprobs(self, texts: Sequence[str]) -> list[list[float | None]]:
        """Forwarded unchanged (Magpie does not use it)."""
        return self.inner.prompt_logprobs(texts)

    def chat_prompt(self, messages: Messages, *, add_generation_prompt: bool = True) -> str:
        """Forwarded unchanged."""
        return self.inner.chat_prompt(messages, add_generation_prompt=add_generation_prompt)

    def count_tokens(self, text: str) -> int:
        """Forwarded unchanged."""
        return self.inner.count_tokens(text)

    @property
    def chat_template(self) -> str | None:
        """The wrapped engine's chat template."""
        return self.inner.chat_template


@dataclass(frozen=True, kw_only=True)
class Measure:
    """One timed path: rows, engine calls, output tokens, wall and engine seconds."""

    path: str
    rows: int
    calls: int
    output_tokens: int
    seconds: float
    engine_seconds: float

    @property
    def tokens_per_s(self) -> float:
        """Output tokens per wall-clock second."""
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0


def seed_rows(n: int) -> pl.DataFrame:
    """The N blank seed rows Magpie reads (what `input: {rows: N}` gives the pipeline)."""
    return pl.DataFrame({"seed_index": pl.int_range(0, n, eager=True)})


def stage_context(engine: Engine, *, seed: int, run_dir: Path) -> StageContext:
    """A context like the pipeline's for stage 1, so seeds derive identically."""
    return StageContext(
        stage_name=Magpie.name,
        stage_index=1,
        seed=seed,
        run_dir=run_dir,
        engine_factory=lambda _name: engine,
        show_progress=False,
    )


def record_calls(engine: Engine, config: MagpieConfig, n: int, *, seed: int) -> list[Call]:
    """Run the stage once (untimed warm-up) and return the generate calls it made."""
    recorder = RecordingEngine(engine)
    with tempfile.TemporaryDirectory(prefix="gm-bench-") as tmp:
        Magpie(config).process(seed_rows(n), stage_context(recorder, seed=seed, run_dir=Path(tmp)))
    return recorder.calls


def time_raw(engine: Engine, calls: Sequence[Call], n: int) -> Measure:
    """Replay the recorded calls straight on the engine: the no-overhead baseline."""
    tokens = 0
    engine_seconds = 0.0
    start = time.perf_counter()
    for call in calls:
        t0 = time.perf_counter()
        out = engine.generate(list(call.prompts), list(call.samplings))
        engine_seconds += time.perf_counter() - t0
        tokens += sum(c.output_tokens for choices in out for c in choices)
    seconds = time.perf_counter() - start
    return Measure(
        path="raw",
        rows=n,
        calls=len(calls),
        output_tokens=tokens,
        seconds=seconds,
        engine_seconds=engine_seconds,
    )


def time_stage(engine: Engine, config: MagpieConfig, n: int, *, seed: int) -> Measure:
    """`Magpie.process` on all N rows in one batch, through a StageContext."""
    batch = seed_rows(n)
    stage = Magpie(config)
    with tempfile.TemporaryDirectory(prefix="gm-bench-") as tmp:
        ctx = stage_context(engine, seed=seed, run_dir=Path(tmp))
        start = time.perf_counter()
        stage.process(batch, ctx)
        seconds = time.perf_counter() - start
    stats = ctx.engine_stats
    return Measure(
        path="stage",
        rows=n,
        calls=stats.calls,
        output_tokens=stats.output_tokens,
        seconds=seconds,
        engine_seconds=stats.seconds,
    )


def bench_recipe(
    spec: EngineSpec, config: MagpieConfig, n: int, *, part_rows: int, seed: int
) -> dict[str, Any]:
    """A magpie-only recipe mapping over N seed rows on the benchmark's engine spec."""
    return {
        "name": "bench-magpie",
        "seed": seed,
        "part_rows": part_rows,
        "engine": spec.to_mapping(),
        "input": {"rows": n},
        "stages": [{"magpie": dataclasses.asdict(config)}],
    }


def time_pipeline(
    spec: EngineSpec, config: MagpieConfig, n: int, *, part_rows: int, seed: int
) -> Measure:
    """`Pipeline.run()` from an empty run folder: parts, checkpoints, stats and dataset."""
    recipe = Recipe.from_dict(
        bench_recipe(spec, config, n, part_rows=part_rows, seed=seed), where="bench/magpie.py"
    )
    if recipe.engine != spec:
        raise RuntimeError(f"bench recipe engine {recipe.engine} differs from {spec}")
    with tempfile.TemporaryDirectory(prefix="gm-bench-") as tmp:
        pipeline = Pipeline(recipe, Path(tmp) / "run", show_progress=False)
        start = time.perf_counter()
        pipeline.run(progress=lambda _line: None)
        seconds = time.perf_counter() - start
        summary = pipeline.success(pipeline.stages[0])
    if summary is None:
        raise RuntimeError("the pipeline finished without the magpie stage's _SUCCESS.json")
    engine = summary["engine"]
    return Measure(
        path="pipeline",
        rows=int(summary["rows_in"]),
        calls=int(engine["calls"]),
        output_tokens=int(engine["output_tokens"]),
        seconds=seconds,
        engine_seconds=float(engine["seconds"]),
    )


def best(measures: Sequence[Measure]) -> Measure:
    """The fastest round of one path (highest output tok/s)."""
    return max(measures, key=lambda m: m.tokens_per_s)


def ratio(a: Measure, b: Measure) -> float:
    """tok/s of `a` over tok/s of `b` (nan when `b` produced nothing)."""
    return a.tokens_per_s / b.tokens_per_s if b.tokens_per_s > 0 else math.nan


def format_table(measures: Sequence[Measure]) -> str:
    """The result table: one line per path, then the tok/s ratios to raw."""
    lines = [
        f"{'path':<9} {'rows':>5} {'calls':>5} {'out_tokens':>10} {'seconds':>8}"
        f" {'engine_s':>8} {'tok/s':>8}"
    ]
    for m in measures:
        lines.append(
            f"{m.path:<9} {m.rows:>5} {m.calls:>5} {m.output_tokens:>10} {m.seconds:>8.2f}"
            f" {m.engine_seconds:>8.2f} {m.tokens_per_s:>8.1f}"
        )
    by_path = {m.path: m for m in measures}
    raw = by_path["raw"]
    for name in ("stage", "pipeline"):
        if name in by_path:
            lines.append(f"{name}/raw tok/s: {ratio(by_path[name], raw):.3f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options: rows, token limits, part size, seed, rounds."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", "-n", type=int, default=64, help="seed rows N (default 64)")
    p.add_argument("--instruction-max-tokens", type=int, default=48, help="default 48")
    p.add_argument("--response-max-tokens", type=int, default=128, help="default 128")
    p.add_argument(
        "--part-rows", type=int, default=None, help="pipeline part size (default ceil(N/4))"
    )
    p.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    p.add_argument(
        "--repeats", type=int, default=1, help="timed rounds; the best per path is shown"
    )
    args = p.parse_args(argv)
    for name in ("rows", "instruction_max_tokens", "response_max_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.part_rows is not None and args.part_rows < 1:
        p.error("--part-rows must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Start the engine, warm up while recording Magpie's calls, time the paths, print."""
    args = parse_args(argv)
    load_before = os.getloadavg()
    n: int = args.rows
    part_rows: int = args.part_rows or math.ceil(n / 4)
    config = MagpieConfig(
        instruction_temperature=1.0,
        instruction_max_tokens=args.instruction_max_tokens,
        stop_at_newline=True,
        response_temperature=0.0,
        response_max_tokens=args.response_max_tokens,
    )
    spec = EngineSpec()
    try:
        engine = get_engine(spec)
        calls = record_calls(engine, config, n, seed=args.seed)
        rounds: dict[str, list[Measure]] = {"raw": [], "stage": [], "pipeline": []}
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits all paths
            rounds["raw"].append(time_raw(engine, calls, n))
            rounds["stage"].append(time_stage(engine, config, n, seed=args.seed))
            rounds["pipeline"].append(
                time_pipeline(spec, config, n, part_rows=part_rows, seed=args.seed)
            )
    finally:
        shutdown_engines()
    load = os.getloadavg()
    before = ",".join(f"{x:.2f}" for x in load_before)
    after = ",".join(f"{x:.2f}" for x in load)
    print(
        f"magpie bench: model={spec.model} rows={n} part_rows={part_rows} "
        f"instruction_max_tokens={args.instruction_max_tokens} "
        f"response_max_tokens={args.response_max_tokens} seed={args.seed} "
        f"repeats={args.repeats} (best shown) cpus={os.cpu_count()} "
        f"load(1m,5m,15m) before={before} after={after}"
    )
    print(format_table([best(rounds[k]) for k in ("raw", "stage", "pipeline")]))


if __name__ == "__main__":
    main()
