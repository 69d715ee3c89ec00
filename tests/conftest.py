"""Session-wide test setup: offline hubs, vLLM CPU defaults, and one shared real engine."""

from __future__ import annotations

import os

# Before anything imports transformers, huggingface_hub, vLLM or Prefect.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prefect's temporary server logs "Stopping…" at exit, after pytest has closed its streams.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from gristmill.engines.base import Engine
from gristmill.engines.factory import EngineSpec, get_engine, shutdown_engines
from gristmill.engines.models import prepare_model
from gristmill.records import read_records


@pytest.fixture(scope="session")
def bundled_model_path() -> Path:
    """The bundled SmolLM2 as a prepared HF folder (converted once per cache)."""
    return prepare_model()


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """The one real vLLM engine on the bundled model, shared by every test in the session.

    Pipeline tests that call `get_engine(EngineSpec())` get this same instance.
    """
    yield get_engine(EngineSpec())
    shutdown_engines()


ALPACA = Path(__file__).resolve().parent / "selectors" / "data" / "alpaca_farm_eval_gpt35_100.jsonl"
ALPACA_MAPPING = {
    "prompt": "instruction",
    "input": "input",
    "response": "output",
    "model": "generator",
}


@pytest.fixture(scope="session")
def alpaca() -> pl.DataFrame:
    """The 100 committed AlpacaFarm eval records (gpt-3.5 answers), source alpaca_farm/<dataset>.

    Same frame the tests used to build by hand; the `dataset`/`datasplit` extras are dropped.
    """
    frame = read_records(ALPACA, mapping=ALPACA_MAPPING)
    source = pl.concat_str(pl.lit("alpaca_farm/"), pl.col("dataset")).alias("source")
    return frame.with_columns(source).drop("dataset", "datasplit")
