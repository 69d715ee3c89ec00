"""Stage bases: MapStage (streams one batch at a time) and GlobalStage (sees everything).

A stage is a small class with a frozen, keyword-only config dataclass, declared
`requires`/`produces` columns (checked before any model time is spent) and one method.
The pipeline owns batching, checkpoints, stats and the `rejected/` side output: a stage
marks rows to drop by setting `drop_reason`, it never writes files itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import polars as pl

from gristmill.engines.base import (
    Completion,
    Engine,
    EngineStats,
    Messages,
    Sampling,
    per_prompt,
)

if TYPE_CHECKING:
    from gristmill.embed import Embedder


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """Base of every stage config: frozen and keyword-only, so it can be fingerprinted."""


class Stage:
    """Common declarations of every stage."""

    #: Name used in recipes and run folders.
    name: ClassVar[str] = "stage"
    #: Bump when a change to the code changes the output for the same config.
    version: ClassVar[str] = "1"
    #: The config dataclass this stage takes.
    Config: ClassVar[type[StageConfig]] = StageConfig
    #: Config fields that do not change the output (batching, concurrency): not fingerprinted.
    unhashed: ClassVar[frozenset[str]] = frozenset()
    #: Whether the stage calls the LLM engine (its model id then enters the fingerprint).
    uses_engine: ClassVar[bool] = False
    #: Whether the stage calls the embedding model (its id then enters the fingerprint).
    uses_embedder: ClassVar[bool] = False

    def __init__(self, config: StageConfig | None = None) -> None:
        cfg = config if config is not None else self.Config()
        if not isinstance(cfg, self.Config):
            raise TypeError(
                f"stage {self.name!r} takes {self.Config.__name__}, got {type(cfg).__name__}"
            )
        self.config = cfg

    def requires(self) -> tuple[str, ...]:
        """Columns that must exist in the input."""
        return ()

    def produces(self) -> tuple[str, ...]:
        """Columns this stage adds (or guarantees) in its output."""
        return ()

    def check_columns(self, available: Sequence[str], *, where: str) -> None:
        """Raise a clear error if a required column is missing."""
        missing = [c for c in self.requires() if c not in available]
        if missing:
            raise ValueError(
                f"{where}: stage {self.name!r} requires column(s) {missing}, "
                f"but its input only has {sorted(available)}"
            )

    def config_for_fingerprint(self) -> dict[str, Any]:
        """The config fields that change output, as JSON-able values; unhashable is an error."""
        values = {
            f.name: getattr(self.config, f.name)
            for f in dataclasses.fields(self.config)
            if f.name not in self.unhashed
        }
        try:
            json.dumps(values, sort_keys=True, default=_strict_json)
        except TypeError as exc:
            raise TypeError(f"stage {self.name!r}: config is not fingerprintable: {exc}") from exc
        return values


class MapStage(Stage):
    """A row-local stage: sees one batch, returns its rows (plus `drop_reason` for drops)."""

    def process(self, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """Transform one batch. Set `drop_reason` (non-null) on rows to reject."""
        raise NotImplementedError

    def merge_extra(self, parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Combine the parts' `extra_stats` into stage-level stats (default: none)."""
        return {}


#: Internal column the pipeline adds before `GlobalStage.select` (position in the input)
#: and uses to find rows that were not chosen. Stages must pass it through untouched.
ROW_COLUMN = "_gm_row"


class GlobalStage(Stage):
    """A whole-dataset stage (selectors, dedup): returns the chosen rows.

    Rows absent from the result go to `rejected/` with drop reason `not_selected`; a result
    may also keep rows with a non-null `drop_reason` to give a more specific reason.
    The input's row order is the data order ("earliest" means smallest ROW_COLUMN).
    """

    def select(self, data: pl.LazyFrame, ctx: StageContext) -> pl.LazyFrame:
        """Choose rows of `data`."""
        raise NotImplementedError


def _strict_json(value: object) -> object:
    if isinstance(value, tuple | list):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} value {value!r} cannot be fingerprinted")


def fingerprint(*parts: object) -> str:
    """Stable short hash of JSON-able parts (tuples and Paths allowed, nothing else)."""
    blob = json.dumps(parts, sort_keys=True, default=_strict_json, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class MeteredEngine:
    """Wraps an engine to count calls, tokens and time for one stage part.

    vLLM's in-process engine is not thread-safe, so calls through one shared engine are
    serialized with the lock shared by every wrapper of it.
    """

    def __init__(self, engine: Engine, stats: EngineStats, lock: threading.Lock) -> None:
        self._engine = engine
        self.stats = stats
        self._lock = lock

    @property
    def model_id(self) -> str:
        return self._engine.model_id

    @property
    def chat_template(self) -> str | None:
        return self._engine.chat_template

    @property
    def inner(self) -> Engine:
        """The wrapped engine."""
        return self._engine

    def generate(
        self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling]
    ) -> list[list[Completion]]:
        if not prompts:
            return []
        params = per_prompt(sampling, len(prompts))
        with self._lock:
            start = time.perf_counter()
            out = self._engine.generate(prompts, params)
            seconds = time.perf_counter() - start
        self.stats.record(
            prompts=len(prompts),
            prompt_tokens=sum(c[0].prompt_tokens for c in out if c),
            output_tokens=sum(x.output_tokens for c in out for x in c),
            seconds=seconds,
        )
        return out

    def prompt_logprobs(self, texts: Sequence[str]) -> list[list[float | None]]:
        if not texts:
            return []
        with self._lock:
            start = time.perf_counter()
            out = self._engine.prompt_logprobs(texts)
            seconds = time.perf_counter() - start
        self.stats.record(
            prompts=len(texts),
            prompt_tokens=sum(len(x) for x in out),
            output_tokens=0,
            seconds=seconds,
        )
        return out

    def chat_prompt(self, messages: Messages, *, add_generation_prompt: bool = True) -> str:
        return self._engine.chat_prompt(messages, add_generation_prompt=add_generation_prompt)

    def count_tokens(self, text: str) -> int:
        return self._engine.count_tokens(text)


@dataclass
class StageContext:
    """What a stage may use while it runs: seeds, lazily created models, where it writes."""

    stage_name: str
    stage_index: int
    seed: int
    run_dir: Path
    part_index: int = 0
    engine_factory: Callable[[], Engine] | None = None
    embedder_factory: Callable[[], Embedder] | None = None
    engine_lock: threading.Lock = field(default_factory=threading.Lock)
    engine_stats: EngineStats = field(default_factory=EngineStats)
    show_progress: bool = True
    #: A folder private to this stage part for resumable intermediate state (rounds of a
    #: sampling loop); the pipeline removes it once the part's output is written.
    state_dir: Path | None = None
    #: Stage-specific statistics (cluster sizes, thresholds used...) saved in _SUCCESS.json.
    extra_stats: dict[str, Any] = field(default_factory=dict)

    def engine(self) -> MeteredEngine:
        """The run's LLM engine (created on first use, shared by the whole process)."""
        if self.engine_factory is None:
            raise RuntimeError(
                f"stage {self.stage_name!r} needs an LLM engine but the recipe configures none "
                "(add an `engine:` section)"
            )
        return MeteredEngine(self.engine_factory(), self.engine_stats, self.engine_lock)

    def embedder(self) -> Embedder:
        """The run's embedding model (created on first use, shared by the whole process)."""
        if self.embedder_factory is None:
            raise RuntimeError(f"stage {self.stage_name!r} needs an embedder but none is set")
        return self.embedder_factory()

    def derive_seed(self, *keys: object) -> int:
        """A deterministic 31-bit seed from the run seed, this stage and `keys`."""
        digest = hashlib.sha256(
            json.dumps([self.seed, self.stage_name, *keys], default=str).encode()
        ).digest()
        return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
