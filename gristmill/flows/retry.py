"""Task retries for transient failures only: exponential backoff with jitter.

An engine server answering 5xx or 429, a timeout, a dropped connection: worth another try
after a pause. A bad record, a config error or a bug fails the same way every time, so it
fails the part at once (the stage's other parts are kept; a rerun redoes only that part).
Which errors are transient is the engines' vocabulary (`gristmill.engines.base`); this
module only wires it into Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import Task

from gristmill.engines.base import is_transient


def retry_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect `retry_condition_fn`: retry a failed task run only on a transient error."""
    del task, task_run
    exc = state.data
    return isinstance(exc, BaseException) and is_transient(exc)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently a part is retried on a transient error."""

    retries: int = 2
    #: First delay in seconds; retry k waits delay_s · 2^k, then jittered.
    delay_s: float = 2.0
    #: Prefect's jitter factor: each delay is drawn around its value, at most (1 + jitter)×.
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.delay_s < 0:
            raise ValueError(f"retry delay must be >= 0 seconds, got {self.delay_s}")
        if self.jitter < 0:
            raise ValueError(f"retry jitter must be >= 0, got {self.jitter}")

    def delays(self) -> list[float]:
        """Delay before each retry, before jitter: exponential backoff."""
        return [self.delay_s * 2.0**k for k in range(self.retries)]

    def task_options(self) -> dict[str, Any]:
        """Keyword arguments for `Task.with_options`."""
        return {
            "retries": self.retries,
            "retry_delay_seconds": self.delays(),
            "retry_jitter_factor": self.jitter if self.retries else None,
            "retry_condition_fn": retry_transient,
        }
