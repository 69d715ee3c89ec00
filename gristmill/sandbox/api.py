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
    method: Isolation | None = None,
) -> CellResult:
    """Run `code` as a fresh sandboxed Python script; never raises for anything the code does.

    `files` are written into the working directory first (relative paths); `prelude` cells run
    before `code` in the same globals with their output discarded and exceptions ignored;
    `epilogue` runs after `code` in the same globals, only if `code` returned, and
    `CellResult.completed` says whether it reached its end (test code, say). The epilogue's
    text and the token that proves its end reach the cell on a pipe it reads before `code`
    starts, and the token leaves on a pipe of its own: `code` cannot find them in its files,
    argv, environment or stdin, nor fake them by printing. It runs in the same interpreter,
    though, so code that inspects the interpreter (frames, gc) can still find both.
    `method` forces an isolation (ValueError when it does not work here).
    """
    check_cell_args(code, stdin, files, prelude, epilogue)
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
        limits: Limits | None = None,
    ) -> Future[CellResult]:
        """Queue one cell; the future's result is its CellResult."""
        check_cell_args(code, stdin, files, prelude, epilogue)
        return self._executor.submit(
            run_cell,
            code,
            limits=limits or self.limits,
            stdin=stdin,
            files=files,
            prelude=prelude,
            epilogue=epilogue,
            method=self.method,
        )

    def run_many(
        self,
        codes: Sequence[str],
        *,
        stdins: Sequence[str | None] | None = None,
        files: Mapping[str, str | bytes] | None = None,
        epilogues: Sequence[str | None] | None = None,
        limits: Limits | None = None,
    ) -> list[CellResult]:
        """Run every code in parallel (at most max_workers at once); results in input order."""
        if isinstance(codes, str):
            raise TypeError("run_many takes a sequence of code strings, not one string")
        for name, given in (("stdins", stdins), ("epilogues", epilogues)):
            if given is not None and len(given) != len(codes):
                raise ValueError(f"{len(given)} {name} for {len(codes)} codes")
        inputs = stdins if stdins is not None else [None] * len(codes)
        endings = epilogues if epilogues is not None else [None] * len(codes)
        futures = [
            self.submit(code, stdin=given, files=files, epilogue=ending, limits=limits)
            for code, given, ending in zip(codes, inputs, endings, strict=True)
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
) -> None:
    """TypeError or ValueError for arguments no cell could run with."""
    if not isinstance(code, str):
        raise TypeError(f"code must be str, got {type(code).__name__}")
    if stdin is not None and not isinstance(stdin, str):
        raise TypeError(f"stdin must be str or None, got {type(stdin).__name__}")
    if epilogue is not None and not isinstance(epilogue, str):
        raise TypeError(f"epilogue must be str or None, got {type(epilogue).__name__}")
    if isinstance(prelude, str) or not all(isinstance(p, str) for p in prelude):
        raise TypeError("prelude must be a sequence of code strings")
    reserved = {CELL_FILE} | {PRELUDE_FILE.format(i) for i in range(len(prelude))}
    for name, content in (files or {}).items():
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or name in reserved:
            raise ValueError(f"files: {name!r} must be a relative path inside the cell's folder")
        if not isinstance(content, str | bytes):
            raise TypeError(f"files[{name!r}] must be str or bytes")
