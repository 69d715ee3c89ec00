"""The sandbox's per-cell overhead: median milliseconds per trivial cell.

Runs `--cells` trivial cells (`pass`) one at a time through `run_cell`, then the same number
through a one-worker `SandboxPool` (so cells do not overlap and each figure is one cell's
cost), and prints the median and quartiles of each. The isolation probes run once before
timing. Prints numbers only; it never asserts a timing.

    PYTHONPATH=$PWD .venv/bin/python bench/sandbox_overhead.py             # 100 cells each
    PYTHONPATH=$PWD .venv/bin/python bench/sandbox_overhead.py --cells 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from gristmill import sandbox


def _timings(run: Callable[[], object], cells: int) -> list[float]:
    """Milliseconds of each of `cells` calls to `run`."""
    out = []
    for _ in range(cells):
        start = time.perf_counter()
        run()
        out.append((time.perf_counter() - start) * 1000)
    return out


def _row(name: str, ms: list[float]) -> str:
    q1, median, q3 = statistics.quantiles(ms, n=4)
    return f"{name:<12} {len(ms):>5} {median:>9.1f} {q1:>8.1f} {q3:>8.1f} {min(ms):>8.1f}"


def main() -> None:
    """Probe once, time both paths and print one row each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=100)
    args = parser.parse_args()
    method = sandbox.isolation()
    first = sandbox.run_cell("pass")
    if not first.ok:
        raise SystemExit(f"a trivial cell failed: {first.reason}: {first.stderr[-300:]}")
    extra = {k: getattr(first, k) for k in ("memory",) if hasattr(first, k)}
    print(f"isolation {method} {extra}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'path':<12} {'cells':>5} {'median_ms':>9} {'q1_ms':>8} {'q3_ms':>8} {'min_ms':>8}")
    print(_row("run_cell", _timings(lambda: sandbox.run_cell("pass"), args.cells)))
    with sandbox.SandboxPool(max_workers=1) as pool:
        ms = _timings(lambda: pool.submit("pass").result(), args.cells)
    print(_row("SandboxPool", ms))
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
