"""Command-line options shared by `gristmill run` and `gristmill serve`: runner and retries."""

from __future__ import annotations

import argparse

from gristmill.flows.retry import RetryPolicy
from gristmill.flows.runners import RUNNERS, RunnerSpec


def add_runner_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --runner, --workers, --threads-per-worker, --address, --retries, --retry-delay."""
    group = parser.add_argument_group("scale-out and retries")
    group.add_argument(
        "--runner",
        choices=RUNNERS,
        default="threads",
        help="task runner for stage parts: threads (default), dask (prefect-dask) or ray "
        "(prefect-ray)",
    )
    group.add_argument(
        "--workers",
        type=int,
        default=1,
        help="threads (runner threads) or local worker processes (dask, ray); default 1",
    )
    group.add_argument(
        "--threads-per-worker",
        type=int,
        default=1,
        help="threads per Dask worker process; they share the worker's one engine",
    )
    group.add_argument(
        "--gpus-per-worker",
        type=int,
        default=0,
        metavar="N",
        help="local Dask workers: N GPUs each, as their own CUDA_VISIBLE_DEVICES slice of "
        "the visible GPUs (one vLLM engine per worker: data parallel); default 0, unchanged",
    )
    group.add_argument(
        "--address",
        "--dask-address",
        dest="address",
        default=None,
        help="an existing cluster instead of a local one: Dask scheduler (tcp://host:8786) "
        "or Ray address",
    )
    group.add_argument(
        "--retries",
        type=int,
        default=RetryPolicy().retries,
        help="retries of a part that fails with a transient error (engine 5xx, timeout)",
    )
    group.add_argument(
        "--retry-delay",
        type=float,
        default=RetryPolicy().delay_s,
        metavar="SECONDS",
        help="first retry delay; doubles on each retry, with jitter",
    )


def runner_from_args(args: argparse.Namespace) -> RunnerSpec:
    """The RunnerSpec the options ask for."""
    return RunnerSpec(
        kind=args.runner,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        address=args.address,
        gpus_per_worker=args.gpus_per_worker,
    )


def retry_from_args(args: argparse.Namespace) -> RetryPolicy:
    """The RetryPolicy the options ask for."""
    return RetryPolicy(retries=args.retries, delay_s=args.retry_delay)
