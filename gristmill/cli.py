"""`gristmill run | check | stages | serve | query | report | evaluate | models`: the command
line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    # Prefect's temporary server can take longer than its 20 s default on a loaded box
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


#: Commands whose every child process (Prefect's temporary server, Dask workers, engines,
#: flow runs) is killed if the command is: see `gristmill.reaper.watch_tree`.
WATCHED_COMMANDS = ("run", "serve")


def _setenv() -> None:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def cmd_run(args: argparse.Namespace) -> int:
    """Run a recipe through the Prefect flow and print rows per stage."""
    from gristmill.catalog import query, render
    from gristmill.flows.options import retry_from_args, runner_from_args
    from gristmill.flows.recipe import run_recipe
    from gristmill.pipelines.recipe import Recipe
    from gristmill.runlog import route_logs

    recipe = Recipe.from_yaml(args.recipe, args.set)  # a bad recipe fails before Prefect starts
    log_path = route_logs(args.out, verbose=args.verbose)
    shown = "shown here too" if args.verbose else "-v shows them here"
    print(f"run folder: {args.out}\nlog: {log_path} (vLLM, Prefect and library logs; {shown})")
    start = time.perf_counter()
    dataset = run_recipe(
        recipe,
        args.out,
        runner=runner_from_args(args),
        retry=retry_from_args(args),
        # bars redraw a terminal line; into a pipe or file they are noise (the log has
        # a line per finished part and stage)
        show_progress=not args.no_progress and sys.stderr.isatty(),
    )
    wall = time.perf_counter() - start
    columns, rows = query(
        args.out,
        "select index, stage, rows_in, rows_out, drops, round(seconds, 1) as seconds, "
        "engine_calls, output_tokens, output_tokens_per_s from stage_stats order by index",
    )
    print(render(columns, rows, "table"))
    n = query(args.out, "select count(*) from dataset")[1][0][0]
    print(f"\ndataset: {dataset} ({n} rows)")
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    print(f'query it: gristmill query --run {args.out} "select * from dataset limit 5"')
    print(f"wall time: {wall:.1f}s")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Load and validate recipes without running them; print each resolved (`--resolved`)."""
    from gristmill.pipelines.recipe import Recipe

    for path in args.recipes:
        recipe = Recipe.from_yaml(path, args.set)
        keys = ", ".join(type(s).name for s in recipe.stages)
        print(f"{path}: ok ({len(recipe.stages)} stages: {keys})")
        if args.resolved:
            print(recipe.to_yaml())
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    """List the built-in stages with their config fields, or one stage (built-in or a path)."""
    from gristmill.stages import BUILTIN, describe, resolve_stage, stage_table

    if args.markdown:
        print(stage_table())
    elif args.stage:
        print(describe(resolve_stage(args.stage, where="gristmill stages")))
    else:
        print("\n\n".join(describe(cls) for cls in BUILTIN))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve recipes as Prefect deployments on their schedules until interrupted."""
    from gristmill.flows.options import retry_from_args, runner_from_args
    from gristmill.flows.serve import plan_recipe, serve_plans

    plans = [
        plan_recipe(
            path,
            out_root=args.out_root,
            overrides=args.set,
            runner=runner_from_args(args),
            retry=retry_from_args(args),
            cron=args.cron,
            interval=args.interval,
            timezone=args.timezone,
        )
        for path in args.recipes
    ]
    for plan in plans:
        print(f"serving {plan.describe()}", flush=True)
    if not args.verbose:  # the runner polls the API every few seconds: one httpx line each
        logging.getLogger("httpx").setLevel(logging.WARNING)
    serve_plans(plans, limit=args.limit)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    """Run SQL over one run folder (`--run`) or every run under a root (`--root`)."""
    import duckdb

    from gristmill.catalog import query, query_runs, render

    if args.run is not None and args.root is not None:
        raise ValueError("give --run (one run) or --root (every run under it), not both")
    try:
        if args.run is not None:
            columns, rows = query(args.run, args.sql)
        else:
            columns, rows = query_runs(args.root, args.sql)
    except duckdb.Error as exc:
        raise ValueError(f"query failed: {exc}") from exc
    print(render(columns, rows, args.format))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write a run's HTML report and print its path."""
    from gristmill.report import write_report

    print(write_report(args.dir, args.out))
    return 0


def _mapping(pairs: Sequence[str]) -> dict[str, str]:
    """`field=column` pairs as a mapping."""
    out = {}
    for pair in pairs:
        field, sep, column = pair.partition("=")
        if not sep or not field or not column:
            raise ValueError(f"--eval-map takes FIELD=COLUMN (e.g. prompt=question), got {pair!r}")
        out[field] = column
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Fine-tune the base model on each dataset per seed at one budget; print the results."""
    from gristmill.catalog import render
    from gristmill.evaluation import Budget, TrainConfig, evaluate, read_evals, summary

    if not args.verbose:  # a line per run and step instead of loading and mapping bars
        import datasets
        from transformers.utils import logging as hf_logging

        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    budget = Budget(tokens=args.budget_tokens, steps=args.budget_steps)
    defaults = TrainConfig()
    config = TrainConfig(
        learning_rate=args.learning_rate or defaults.learning_rate,
        batch_size=args.batch_size or defaults.batch_size,
        max_length=args.max_length or defaults.max_length,
    )
    start = time.perf_counter()
    evaluate(
        args.datasets,
        eval_set=args.eval_set,
        eval_mapping=_mapping(args.eval_map),
        verifier=args.verifier,
        budget=budget,
        out=args.out,
        base_model=args.base_model,
        seeds=seeds,
        config=config,
        accuracy=args.accuracy,
        max_new_tokens=args.max_new_tokens,
        progress=lambda line: print(line, flush=True),
        redo=args.redo,
    )
    table = summary(read_evals(args.out))
    print(render(table.columns, table.rows(), "table"))
    print(f"results: {Path(args.out) / 'evals.parquet'} (table `evals` of gristmill query --root)")
    print(f"wall time: {time.perf_counter() - start:.1f}s")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """Prepare a bundled model, or list the bundled and the prepared ones."""
    from gristmill.engines.models import (
        BUNDLED,
        DEFAULT_MODEL,
        models_dir,
        prepare_model,
        read_marker,
    )

    match args.action:
        case "prepare":
            start = time.perf_counter()
            path = prepare_model(args.name or DEFAULT_MODEL, force=args.force)
            print(f"{args.name or DEFAULT_MODEL}: {path} ({time.perf_counter() - start:.1f}s)")
        case "list":
            root = models_dir()
            names = (
                sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
                if root.exists()
                else []
            )
            print("bundled:")
            width = max(len(name) for name in BUNDLED)
            for name, spec in BUNDLED.items():
                state = "prepared" if read_marker(root / name) else "not prepared"
                default = " (default)" if name == DEFAULT_MODEL else ""
                print(f"  {name:<{width}}  {spec.description}{default} [{state}]")
            print(f"prepared in {root}: {', '.join(names) or 'none'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the docs)."""
    from gristmill.flows.options import add_runner_arguments

    parser = argparse.ArgumentParser(prog="gristmill", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe into a run folder")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("--out", required=True, help="run folder (resumes if it exists)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. stages.magpie.turns=2 or input.rows=50",
    )
    run.add_argument(
        "--no-progress", action="store_true", help="hide progress bars (shown only on a terminal)"
    )
    add_runner_arguments(run)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="load and validate recipes without running them")
    check.add_argument("recipes", nargs="+", help="recipe YAML files")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--resolved", action="store_true", help="print each resolved recipe")
    check.set_defaults(func=cmd_check)

    stages = sub.add_parser("stages", help="list stages and their config fields")
    stages.add_argument("stage", nargs="?", help="one stage: a built-in name or module:Class")
    stages.add_argument("--markdown", action="store_true", help="the README's stage table")
    stages.set_defaults(func=cmd_stages)

    serve = sub.add_parser(
        "serve", help="serve recipes as scheduled Prefect deployments (needs PREFECT_API_URL)"
    )
    serve.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe YAML files")
    when = serve.add_mutually_exclusive_group()
    when.add_argument("--cron", help='cron schedule for every recipe, e.g. "0 3 * * *"')
    when.add_argument("--interval", type=float, metavar="SECONDS", help="interval schedule")
    serve.add_argument("--timezone", help="IANA time zone of the schedule (default UTC)")
    serve.add_argument(
        "--out-root",
        default="runs",
        help="each run writes a fresh folder OUT_ROOT/<recipe>/<time>-<run id> (default runs)",
    )
    serve.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value in every served recipe",
    )
    serve.add_argument("--limit", type=int, help="most flow runs at once (default: no limit)")
    add_runner_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    q = sub.add_parser("query", help="SQL over one run or every run, with DuckDB")
    q.add_argument("sql")
    q.add_argument("--run", help="one run folder (views dataset, input, <stage>, stage_stats)")
    q.add_argument(
        "--root",
        help="folder holding runs, searched recursively (default: $GRISTMILL_RUNS or ./runs); "
        "views <run>, <run>__<stage>, datasets, records, origins, lineage; tables runs, "
        "stage_stats",
    )
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")
    q.set_defaults(func=cmd_query)

    rep = sub.add_parser("report", help="write a run's self-contained HTML report")
    rep.add_argument("dir", help="run folder")
    rep.add_argument("--out", help="output file (default: DIR/report.html)")
    rep.set_defaults(func=cmd_report)

    ev = sub.add_parser(
        "evaluate", help="fine-tune a base model on each dataset at one budget and measure it"
    )
    ev.add_argument("datasets", nargs="+", metavar="RUN_OR_DATASET", help="run or dataset folders")
    ev.add_argument("--eval-set", required=True, help="held-out JSONL/Parquet with references")
    ev.add_argument(
        "--eval-map",
        action="append",
        default=[],
        metavar="FIELD=COLUMN",
        help="map an eval-set column to a record field, e.g. prompt=question response=answer",
    )
    ev.add_argument("--verifier", choices=["math", "code"], help="checks greedy answers")
    ev.add_argument("--accuracy", action="store_true", help="also greedy accuracy (starts vLLM)")
    ev.add_argument("--max-new-tokens", type=int, default=256, help="greedy answer length")
    ev.add_argument("--base-model", default="smollm2-135m-instruct", help="bundled name or folder")
    size = ev.add_mutually_exclusive_group(required=True)
    size.add_argument("--budget-tokens", type=int, help="loss tokens each run trains on")
    size.add_argument("--budget-steps", type=int, help="optimizer steps of each run")
    ev.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ev.add_argument("--learning-rate", type=float, help="default 1e-4")
    ev.add_argument("--batch-size", type=int, help="rows per step (default 4)")
    ev.add_argument("--max-length", type=int, help="tokens per row (default 512)")
    ev.add_argument("--out", required=True, help="evaluation folder (results merge into it)")
    ev.add_argument(
        "--redo", action="store_true", help="train runs again that --out already has results for"
    )
    ev.set_defaults(func=cmd_evaluate)

    m = sub.add_parser("models", help="prepare or list models")
    m.add_argument("action", choices=["prepare", "list"])
    m.add_argument("name", nargs="?", help="model name (default: the bundled SmolLM2)")
    m.add_argument("--force", action="store_true", help="convert again")
    m.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gristmill` command.

    Run as the command (no `argv`), `run` and `serve` first start a watcher that kills every
    process they start once they die, even by `kill -9`; called from Python with `argv`,
    the process is the caller's, and so are its children.
    """
    _setenv()
    args = build_parser().parse_args(argv)
    if argv is None and args.command in WATCHED_COMMANDS:
        from gristmill.reaper import watch_tree

        watch_tree()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"gristmill: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
