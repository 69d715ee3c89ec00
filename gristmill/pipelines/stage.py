"""Stage bases: Map (one batch at a time), Filter (one row at a time), Select (everything).

A stage class declares itself: its name, version, kind, citation, config fields, and the
columns it requires and produces (checked before any model time is spent). Config is either
annotated class attributes (datatrove style, for users' own stages):

    class MinWords(gm.Filter):
        min_words: int = 40
        def keep(self, row): return len(row["response"].split()) >= self.min_words or "short"

or, for stages with validation of their own, a frozen `Config` dataclass. Either way a stage
is built with keyword config (`MinWords(min_words=20)`) or from a recipe, through the same
checks. The pipeline owns batching, checkpoints, stats and the `rejected/` side output: a
stage marks rows to drop with `drop_reason`, it never writes files itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
import threading
import typing
from collections.abc import Callable, Sequence
from concurrent.futures import Future
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
from gristmill.pipelines.cluster import DaskCluster
from gristmill.pipelines.config import RecipeError, build_dataclass
from gristmill.pipelines.stats import ExtraStats
from gristmill.records import DROP_REASON

if TYPE_CHECKING:
    from gristmill.embed import Embedder


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """Base of every stage config: frozen and keyword-only, so it can be fingerprinted."""


@dataclass(frozen=True, kw_only=True)
class LLMConfig(StageConfig):
    """Config of a stage that calls an LLM: which of the recipe's named engines it uses."""

    #: A name from the recipe's `engines:`; None: the recipe's only engine.
    engine: str | None = None


#: Config fields that name engines: the engines' identity enters the fingerprint, not the
#: names, so renaming an engine in a recipe recomputes nothing.
ENGINE_FIELDS = frozenset({"engine", "engines"})


def class_path(cls: type) -> str:
    """`package.module:Class`, the name a recipe uses for a stage that is not built in."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


#: Names a stage's annotated config attributes may not take (the base class uses them).
_RESERVED = frozenset({"config", "name", "version", "kind", "citation", "Config", "Stats"})


class Stage:
    """Common declarations of every stage."""

    #: Name used in run folders, stats and the catalog (built-in stages: also in recipes).
    name: ClassVar[str] = "stage"
    #: Bump when a change to the code changes the output for the same config.
    version: ClassVar[str] = "1"
    #: synth, filter, map, select, dedup... (the README's stage table).
    kind: ClassVar[str] = "stage"
    #: The method's paper, for the dataset card; None for plain data plumbing.
    citation: ClassVar[str | None] = None
    #: The config dataclass this stage takes (derived from annotated attributes if not set).
    Config: ClassVar[type[StageConfig]] = StageConfig
    #: Config fields that do not change the output (batching, concurrency): not fingerprinted.
    unhashed: ClassVar[frozenset[str]] = frozenset()
    #: Whether the stage calls the LLM engine (its model id then enters the fingerprint).
    uses_engine: ClassVar[bool] = False
    #: Whether the stage calls the embedding model (its id then enters the fingerprint).
    uses_embedder: ClassVar[bool] = False
    #: Why the stage needs raw completions or prompt log-probabilities (None: a chat API
    #: serves it); such a stage is refused at recipe load on an engine with `api: chat`.
    needs_completions: ClassVar[str | None] = None
    #: Whether config fields are also plain attributes (`self.min_words`): set for configs
    #: declared as annotated class attributes.
    _config_attributes: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = _snake(cls.__name__)
        declared = _declared_fields(cls)
        if declared and "Config" not in cls.__dict__:
            config = dataclasses.make_dataclass(
                f"{cls.__name__}Config", declared, bases=(cls.Config,), frozen=True, kw_only=True
            )
            # found (and pickled) as the stage's attribute: `my_stages.MinWords.Config`
            config.__module__ = cls.__module__
            config.__qualname__ = f"{cls.__qualname__}.Config"
            cls.Config = config
            cls._config_attributes = True

    def __init__(self, config: StageConfig | None = None, /, **values: Any) -> None:
        if config is not None and values:
            raise TypeError(f"stage {self.name!r}: give a config object or keywords, not both")
        if config is None:
            config = build_dataclass(self.Config, values, where=f"stage {self.name!r}")
        if not isinstance(config, self.Config):
            raise TypeError(
                f"stage {self.name!r} takes {self.Config.__name__}, got {type(config).__name__}"
            )
        self.config = config
        if self._config_attributes:
            for f in dataclasses.fields(config):
                setattr(self, f.name, getattr(config, f.name))
        try:
            self.validate()
        except ValueError as exc:
            raise RecipeError(f"stage {self.name!r}: {exc}") from exc

    def validate(self) -> None:
        """Check the config (raise ValueError with the reason); called once when built."""

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Stage) and type(other) is type(self) and other.config == self.config
        )

    def __hash__(self) -> int:
        return hash((type(self), self.config))

    def __repr__(self) -> str:
        changed = ", ".join(
            f"{f.name}={getattr(self.config, f.name)!r}"
            for f in dataclasses.fields(self.config)
            if _differs_from_default(f, getattr(self.config, f.name))
        )
        return f"{type(self).__name__}({changed})"

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

    def completions_reason(self) -> str | None:
        """Why this stage, as configured, cannot run on a chat-completions API (None: it can)."""
        return self.needs_completions

    def engine_names(self) -> tuple[str | None, ...]:
        """The recipe engines this stage calls, by name (None: the recipe's only engine)."""
        if not self.uses_engine:
            return ()
        return (getattr(self.config, "engine", None),)

    def config_for_fingerprint(self) -> dict[str, Any]:
        """The config fields that change output, as JSON-able values; unhashable is an error."""
        skip = self.unhashed | (ENGINE_FIELDS if self.uses_engine else frozenset())
        values = {
            f.name: getattr(self.config, f.name)
            for f in dataclasses.fields(self.config)
            if f.name not in skip
        }
        try:
            json.dumps(values, sort_keys=True, default=_strict_json)
        except TypeError as exc:
            raise TypeError(f"stage {self.name!r}: config is not fingerprintable: {exc}") from exc
        return values


def _declared_fields(cls: type) -> list[tuple[str, Any, Any]]:
    """The class's own annotated, non-ClassVar attributes as dataclass field specs."""
    own = inspect.get_annotations(cls)
    if not own or "Config" in cls.__dict__:
        return []
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:  # a forward reference the class's module cannot resolve
        raise TypeError(
            f"stage {cls.__qualname__}: cannot read its config annotations: {exc}"
        ) from exc
    out: list[tuple[str, Any, Any]] = []
    for name in own:
        hint = hints[name]
        if typing.get_origin(hint) is ClassVar or name.startswith("_") or name == "config":
            continue
        if name in _RESERVED:
            raise TypeError(f"stage {cls.__qualname__}: {name!r} cannot be a config field")
        default = cls.__dict__.get(name, dataclasses.MISSING)
        if isinstance(default, list | dict | set):
            raise TypeError(
                f"stage {cls.__qualname__}: config field {name!r} has a mutable default "
                f"{default!r}; use a tuple"
            )
        out.append((name, hint, dataclasses.field(default=default)))
    return out


def _differs_from_default(f: dataclasses.Field[Any], value: object) -> bool:
    if f.default is not dataclasses.MISSING:
        return bool(value != f.default)
    if f.default_factory is not dataclasses.MISSING:
        return bool(value != f.default_factory())
    return True


class Map(Stage):
    """A row-local stage: sees one batch, returns its rows (plus `drop_reason` for drops)."""

    kind: ClassVar[str] = "map"
    #: The typed statistics its parts record in `ctx.extra_stats` (merged per stage).
    Stats: ClassVar[type[ExtraStats] | None] = None

    def process(self, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """Transform one batch. Set `drop_reason` (non-null) on rows to reject."""
        raise NotImplementedError


class Filter(Map):
    """A stage that keeps or drops one row at a time: `keep(row)` returns True to keep it,
    False to drop it (the drop reason is the stage's name) or a drop-reason string."""

    kind: ClassVar[str] = "filter"

    def keep(self, row: dict[str, Any]) -> bool | str:
        """Whether to keep `row` (a dict of its columns), or why not."""
        raise NotImplementedError

    def process(self, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """Ask `keep` about every row; rows already dropped upstream keep their reason."""
        reasons: list[str | None] = []
        for i, row in enumerate(batch.iter_rows(named=True)):
            verdict = self.keep(row)
            if isinstance(verdict, str) and verdict:
                reasons.append(verdict)
            elif isinstance(verdict, bool) or type(verdict).__name__ == "bool_":
                reasons.append(None if verdict else self.name)
            else:
                who = f"id {row['id']!r}" if "id" in row else f"row {i}"
                raise TypeError(
                    f"stage {self.name!r}: keep() must return True, False or a drop reason "
                    f"(a non-empty string); it returned {verdict!r} for {who}"
                )
        new = pl.Series(DROP_REASON, reasons, dtype=pl.String)
        if DROP_REASON in batch.columns:
            new = batch.get_column(DROP_REASON).cast(pl.String).fill_null(new)
        return batch.with_columns(new.alias(DROP_REASON))


#: Internal column the pipeline adds before `Select.select` (position in the input)
#: and uses to find rows that were not chosen. Stages must pass it through untouched.
ROW_COLUMN = "_gm_row"


class Select(Stage):
    """A whole-dataset stage (selectors, dedup): returns the chosen rows.

    `select` gets the whole input, collected and in input order ("earliest" means first),
    with the internal ROW_COLUMN that the result must keep. Rows absent from the result go
    to `rejected/` with drop reason `not_selected`; a result may also keep rows with a
    non-null `drop_reason` to give a more specific reason.

    A stage that names its columns in `reads()` gets only those (the ones the input has, in
    input order, after ROW_COLUMN; `drop_reason` too when the input has it), and its result
    is a decision: the pipeline takes from it the row index, `drop_reason`, the columns the
    stage added and those it lists in `produces()`, and joins them back onto the full input
    rows part by part, so memory grows with the columns read, not with every column. Every
    other column of a kept row is the input's, unchanged: a stage that rewrites a column it
    reads must list it in `produces()`. The default, None, passes every column and writes
    the result as it is.

    A stage that needs only a little of each row (a hash, a signature) also overrides
    `condense`: the pipeline then reads the input one part at a time (several at once, so
    `condense` must be thread-safe and leave `ctx.extra_stats` alone), condenses each, and
    hands `select` the condensed parts in order; the texts are never all in memory. `select`
    must give the same decision for the whole input and for its condensed form, and its
    result must not carry the columns `condense` added (they are not joined back).
    """

    kind: ClassVar[str] = "select"

    def reads(self) -> tuple[str, ...] | None:
        """The input columns `select` looks at (absent ones are skipped); None: all of them."""
        return None

    def condense(self, part: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """What `select` needs of one input part (its `reads()` columns after ROW_COLUMN):
        the same rows, in order, with ROW_COLUMN. The default keeps the part as it is."""
        return part

    def select(self, data: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
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

    Continuous (the default where the engine can `submit`): every request joins the
    engine's running batch, from any thread, without a lock. Otherwise (deterministic mode,
    or an engine without `submit`) each `generate` is one batch, serialized with the lock
    shared by every wrapper of that engine, since vLLM's `LLM` is not thread-safe.
    """

    def __init__(
        self,
        engine: Engine,
        stats: EngineStats,
        lock: threading.Lock,
        *,
        continuous: bool = False,
    ) -> None:
        self._engine = engine
        self.stats = stats
        self._lock = lock
        self._submit: Callable[[str, Sampling], Future[list[Completion]]] | None = (
            getattr(engine, "submit", None) if continuous else None
        )
        #: Where the engine can take a batch of requests at once (they enter together).
        self._submit_many: (
            Callable[[Sequence[str], Sequence[Sampling]], list[Future[list[Completion]]]] | None
        ) = getattr(engine, "submit_many", None) if self._submit is not None else None
        #: Prompt log-probs as requests of the running batch, where the engine offers it.
        self._submit_logprobs: (
            Callable[[Sequence[str]], list[Future[list[float | None]]]] | None
        ) = getattr(engine, "submit_prompt_logprobs", None) if self._submit is not None else None

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

    @property
    def continuous(self) -> bool:
        """Whether requests go into the engine's running batch (no per-call barrier)."""
        return self._submit is not None

    def generate(
        self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling]
    ) -> list[list[Completion]]:
        """`n` completions per prompt; continuous: each prompt its own request, all in
        flight at once; otherwise one locked batch."""
        if not prompts:
            return []
        params = per_prompt(sampling, len(prompts))
        self.stats.begin()
        out: list[list[Completion]] = []
        try:
            if self._submit_many is not None:
                out = [f.result() for f in self._submit_many(prompts, params)]
            elif self._submit is not None:
                futures = [self._submit(p, s) for p, s in zip(prompts, params, strict=True)]
                out = [f.result() for f in futures]
            else:
                with self._lock:
                    out = self._engine.generate(prompts, params)
        finally:
            self.stats.end(
                prompts=len(prompts),
                prompt_tokens=sum(c[0].prompt_tokens for c in out if c),
                output_tokens=sum(x.output_tokens for c in out for x in c),
            )
        return out

    def submit(self, prompt: str, sampling: Sampling) -> Future[list[Completion]]:
        """One request whose result is wanted as soon as it is back (a loop without round
        barriers); without continuous submission it runs now and the future is done."""
        if self._submit is None:
            done: Future[list[Completion]] = Future()
            try:
                done.set_result(self.generate([prompt], sampling)[0])
            except Exception as exc:
                done.set_exception(exc)
            return done
        self.stats.begin()
        future = self._submit(prompt, sampling)
        future.add_done_callback(self._count_one)
        return future

    def _count_one(self, future: Future[list[Completion]]) -> None:
        completions = [] if future.exception() is not None else future.result()
        self.stats.end(
            prompts=1,
            prompt_tokens=completions[0].prompt_tokens if completions else 0,
            output_tokens=sum(c.output_tokens for c in completions),
        )

    def prompt_logprobs(self, texts: Sequence[str]) -> list[list[float | None]]:
        if not texts:
            return []
        self.stats.begin()
        out: list[list[float | None]] = []
        try:
            if self._submit_logprobs is not None:  # prefills join the running batch
                out = [f.result() for f in self._submit_logprobs(texts)]
            else:
                with self._lock:
                    out = self._engine.prompt_logprobs(texts)
        finally:
            self.stats.end(
                prompts=len(texts), prompt_tokens=sum(len(x) for x in out), output_tokens=0
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
    #: The recipe engines this stage may call, by name; the first is its default.
    engine_names: tuple[str, ...] = ("default",)
    #: Starts (or returns) the named engine.
    engine_factory: Callable[[str], Engine] | None = None
    embedder_factory: Callable[[], Embedder] | None = None
    #: One lock per named engine, shared by every part of the run in this process.
    engine_locks: dict[str, threading.Lock] = field(default_factory=dict)
    engine_stats: EngineStats = field(default_factory=EngineStats)
    show_progress: bool = True
    #: A folder private to this stage part for resumable intermediate state (rounds of a
    #: sampling loop), or to a global stage's run for scratch files (made by the stage when
    #: it needs them); the pipeline removes it once the output is written.
    state_dir: Path | None = None
    #: Stage-specific statistics (cluster sizes, thresholds used...) saved in _SUCCESS.json.
    extra_stats: dict[str, Any] = field(default_factory=dict)
    #: The Dask cluster a global stage may spread its work over (the Dask runner's), or None.
    cluster: DaskCluster | None = None
    #: Requests join the engine's running batch (throughput); False: one batch per call,
    #: reproducible where batch composition changes numerics (the recipe's `deterministic`).
    continuous: bool = True

    def engine(self, name: str | None = None) -> MeteredEngine:
        """A recipe engine this stage declared (None: its first), started on first use and
        shared by the whole process."""
        if self.engine_factory is None or not self.engine_names:
            raise RuntimeError(
                f"stage {self.stage_name!r} needs an LLM engine but the recipe configures none "
                "(add an `engine:` or `engines:` section)"
            )
        name = self.engine_names[0] if name is None else name
        if name not in self.engine_names:
            raise RuntimeError(
                f"stage {self.stage_name!r} asked for engine {name!r} but declared only "
                f"{list(self.engine_names)} (see Stage.engine_names)"
            )
        lock = self.engine_locks.setdefault(name, threading.Lock())
        return MeteredEngine(
            self.engine_factory(name), self.engine_stats, lock, continuous=self.continuous
        )

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
