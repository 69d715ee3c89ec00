"""A Dask worker plugin that closes the worker's engines when the worker shuts down.

Without it the nanny kills a worker whose vLLM engine still runs, leaking the engine's
helper processes (reaped later) and shared memory.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from gristmill.engines.factory import shutdown_engines

PLUGIN_NAME = "gristmill-engines"


class EngineShutdown(WorkerPlugin):
    """Close every engine the worker process built, on worker teardown."""

    name = PLUGIN_NAME

    def teardown(self, worker: Any) -> None:
        """Called by Dask as the worker closes."""
        del worker
        shutdown_engines()
