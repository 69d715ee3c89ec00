"""Running cells: `run_cell` for one, `SandboxPool` for many in parallel."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from gristmill.sandbox.probes import isolation, probe_isolation
from gristmill.sandbox.results import CellResult, Isolation, Limits
from gristmill.sandbox.runner import CELL_FILE, PRELUDE_FILE, run


def run_cell(
    code: str,
    *,
    limits: Limits = Limits(),
    stdin: str | None = None,
    files: Mapping[str, str | bytes] | None = None,
    prelude: Sequence[str] = (),
    epilogue: str | None = None,
    tests: str | None = None,
    method: Isolation | None = None,
) -> CellResult:
    """Run `code` as a fresh sandboxed Python script; never raises for anything the code does.

    `files` are written into the working directory first (relative paths); `prelude` cells run
    before `code` in the same globals with their output discarded and exceptions ignored.
    After `code` returns, one of two endings may run, and `CellResult.completed` says whether
    it reached its end, as proven by a random token from the host coming back:

    - `tests` (test code) run in a process of their own, forked before `code` starts, whose
      globals hold proxies for `code`'s top-level functions and copies of its plain values;
      calls and results cross a pipe as plain values only (`harness.py`). Nothing `code` does
      in its own process (frames, gc, trace hooks, patched builtins, exiting, printing) can
      produce the proof, nor can it read the tests' process, which is non-dumpable (a cell
      that runs as root, possible in the weak tiers only, can). Tests that need `code`'s own
      objects need the epilogue.
    - `epilogue` runs in `code`'s interpreter and globals. Its text and token reach the cell
      on a pipe read before `code` starts and the token leaves on a pipe of its own, so `code`
      cannot find them in its files, argv, environment or stdin, nor fake them by printing;
      but code that inspects or patches the interpreter (frames, gc, builtins) can.

    `method` forces an isolation (ValueError when it does not work here).
    """
    check_cell_args(code, stdin, files, prelude, epilogue, tests)
    if method is None:
        method = isolation()
    else:
        reason = probe_isolation(method)
        if reason is not None:
            raise ValueError(f"isolation {method!r} does not work here: {reason}")
    return run(
        code,
        limits=limits,
        stdin=stdin,
        files=files,
        prelude=prelude,
        epilogue=epilogue,
        tests=tests,
        method=method,
    )


class SandboxPool:
    """Runs many cells in parallel, each in its own sandbox; results keep the input order."""

    def __init__(
        self,
        *,
        max_workers: int | None = None,
        limits: Limits = Limits(),
        method: Isolation | None = None,
    ) -> None:
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self.limits = limits
        self.method = method
        self.max_workers = max_workers or os.cpu_count() or 1
        self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="sandbox")

    def submit(
        self,
        code: str,
        *,
        stdin: str | None = None,
        files: Mapping[str, str | bytes] | None = None,
        prelude: Sequence[str] = (),
        epilogue: str | None = None,
        tests: str | None = None,
        limits: Limits | None = None,
    ) -> Future[CellResult]:
        """Queue one cell; the future's result is its CellResult."""
        check_cell_args(code, stdin, files, prelude, epilogue, tests)
        return self._executor.submit(
            run_cell,
            code,
            limits=limits or self.limits,
            stdin=stdin,
            files=files,
            prelude=prelude,
            epilogue=epilogue,
            tests=tests,
            method=self.method,
        )

    def run_many(
        self,
        codes: Sequence[str],
        *,
        stdins: Sequence[str | None] | None = None,
        files: Mapping[str, str | bytes] | None = None,
        epilogues: Sequence[str | None] | None = None,
        tests: Sequence[str | None] | None = None,
        limits: Limits | None = None,
    ) -> list[CellResult]:
        """Run every code in parallel (at most max_workers at once); results in input order."""
        if isinstance(codes, str):
            raise TypeError("run_many takes a sequence of code strings, not one string")
        for name, given in (("stdins", stdins), ("epilogues", epilogues), ("tests", tests)):
            if given is not None and len(given) != len(codes):
                raise ValueError(f"{len(given)} {name} for {len(codes)} codes")
        none: list[str | None] = [None] * len(codes)
        inputs = stdins if stdins is not None else none
        endings = epilogues if epilogues is not None else none
        checks = tests if tests is not None else none
        futures = [
            self.submit(code, stdin=given, files=files, epilogue=ending, tests=check, limits=limits)
            for code, given, ending, check in zip(codes, inputs, endings, checks, strict=True)
        ]
        return [future.result() for future in futures]

    def close(self) -> None:
        """Wait for running cells and stop the worker threads."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def check_cell_args(
    code: object,
    stdin: object,
    files: Mapping[str, str | bytes] | None,
    prelude: Sequence[str],
    epilogue: object = None,
    tests: object = None,
) -> None:
    """TypeError or ValueError for arguments no cell could run with."""
    if not isinstance(code, str):
        raise TypeError(f"code must be str, got {type(code).__name__}")
    for name, value in (("stdin", stdin), ("epilogue", epilogue), ("tests", tests)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be str or None, got {type(value).__name__}")
    if epilogue is not None and tests is not None:
        raise ValueError("a cell takes an epilogue or tests, not both")
    if isinstance(prelude, str) or not all(isinstance(p, str) for p in prelude):
        raise TypeError("prelude must be a sequence of code strings")
    reserved = {CELL_FILE} | {PRELUDE_FILE.format(i) for i in range(len(prelude))}
    for name, content in (files or {}).items():
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or name in reserved:
            raise ValueError(f"files: {name!r} must be a relative path inside the cell's folder")
        if not isinstance(content, str | bytes):
            raise TypeError(f"files[{name!r}] must be str or bytes")
