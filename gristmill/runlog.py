"""Where a run's logs go: everything into `RUN/logs/run.log`, only what needs a human on the
terminal.

A `gristmill run` used to print ~140 lines of vLLM start-up chatter (from three processes),
one httpx line per Prefect API request and faiss-loader INFO lines around its progress bars.
`route_logs` keeps the terminal for the progress bars, gristmill's own warnings and any
error; the file gets every INFO record of this process, and vLLM's engine processes log
into the same file through `VLLM_LOGGING_CONFIG_PATH`, which they inherit. `-v` (verbose)
restores everything on the terminal.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import sys
from pathlib import Path
from typing import Any

from gristmill.pipelines.layout import RunLayout

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
#: Noisy at INFO wherever they log: one line per HTTP request.
CHATTY = ("httpx", "httpcore")


class QuietConsole(logging.Filter):
    """Lets through gristmill's warnings and anyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        return record.levelno >= logging.WARNING and record.name.startswith("gristmill")


def vllm_logging_config(log_path: Path) -> dict[str, Any]:
    """A logging dictConfig for vLLM's processes (this one included, where vLLM applies it on
    import): INFO and up into the run's log; on the terminal, what `QuietConsole` lets by."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": FORMAT},
            "console": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        },
        "filters": {"quiet": {"()": f"{__name__}.QuietConsole"}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": str(log_path),
                "mode": "a",
                "encoding": "utf-8",
                "formatter": "plain",
                "level": "INFO",
            },
            "console": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "console",
                "filters": ["quiet"],
            },
        },
        "loggers": {"vllm": {"handlers": ["file", "console"], "level": "INFO", "propagate": False}},
        # the engine processes' other libraries (triton probing, torch) log here
        "root": {"handlers": ["file", "console"], "level": "INFO"},
    }


def _is_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return not isinstance(handler, logging.FileHandler) and stream in (sys.stderr, sys.stdout)


def route_logs(run_dir: str | Path, *, verbose: bool = False) -> Path:
    """Send this process's logs (and vLLM's, in processes started after this call) to
    `RUN/logs/run.log`; keep the terminal quiet unless `verbose`. Returns the log's path."""
    layout = RunLayout(Path(run_dir))
    layout.logs_dir.mkdir(parents=True, exist_ok=True)
    log_path = layout.run_log
    root = logging.getLogger()
    for handler in [h for h in root.handlers if _is_console(h)]:
        root.removeHandler(handler)
    file_handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(FORMAT))
    file_handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if not verbose:
        console.addFilter(QuietConsole())
    root.addHandler(file_handler)
    root.addHandler(console)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)  # Python warnings become `py.warnings` records: the file
    if verbose:
        return log_path
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    config = layout.vllm_logging_config
    config.write_text(json.dumps(vllm_logging_config(log_path), indent=2) + "\n")
    os.environ.setdefault("VLLM_LOGGING_CONFIG_PATH", str(config))
    # vLLM's engine processes print deprecation warnings of torch's straight to stderr
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    # transformers' and the hub's loading bars (read when huggingface_hub is imported)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "vllm" in sys.modules:  # imported already (in-process use): reroute its logger now
        logging.config.dictConfig(vllm_logging_config(log_path))
    return log_path
