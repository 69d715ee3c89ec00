"""Build engines from a hashable spec, one per spec per process.

Starting vLLM takes a minute and holds gigabytes, so every stage, pipeline and test that asks
for the same `EngineSpec` shares one engine. Backends are chosen by an explicit `match`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gristmill.engines.base import Engine
from gristmill.engines.models import DEFAULT_MODEL

log = logging.getLogger(__name__)

BACKENDS = ("vllm", "openai")
_SPEC_KEYS = ("backend", "model", "options", "resident")


class FrozenMapping(tuple[tuple[str, Any], ...]):
    """A nested option mapping frozen into sorted (key, value) pairs, so specs stay hashable."""

    __slots__ = ()


def freeze_option(value: object, *, where: str) -> object:
    """A hashable copy of a YAML-like option value (mappings and lists frozen recursively)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings, got {key!r}")
        return FrozenMapping(
            (k, freeze_option(value[k], where=f"{where}.{k}")) for k in sorted(value)
        )
    if isinstance(value, list | tuple):
        return tuple(freeze_option(v, where=f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(
        f"{where}: {type(value).__name__} values are not allowed "
        "(use strings, numbers, booleans, null, lists or mappings)"
    )


def thaw_option(value: object) -> object:
    """Undo `freeze_option`: mappings back to dicts, tuples to lists."""
    if isinstance(value, FrozenMapping):
        return {k: thaw_option(v) for k, v in value}
    if isinstance(value, tuple):
        return [thaw_option(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """Which engine to build: backend, model name, and backend options.

    `options` may be given as a mapping (`Engine(model=..., options={"max_model_len": 2048})`);
    it is stored frozen, as sorted (name, value) pairs, so a spec is hashable: one engine per
    spec per process.
    """

    backend: str = "vllm"
    model: str = DEFAULT_MODEL
    options: tuple[tuple[str, object], ...] | Mapping[str, object] = ()
    #: Keep it loaded between the stages that use it; by default a run closes an engine as
    #: soon as the next stage does not need it, so one model is resident at a time.
    resident: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"engine backend must be one of {list(BACKENDS)}, got {self.backend!r}"
            )
        if not isinstance(self.resident, bool):
            raise ValueError(f"engine resident must be true or false, got {self.resident!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"engine model must be a non-empty string, got {self.model!r}")
        pairs: dict[str, object] = {}
        items = self.options.items() if isinstance(self.options, Mapping) else self.options
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(f"engine options must be (name, value) pairs, got {item!r}")
            key, value = item
            if key in pairs:
                raise ValueError(f"engine option {key!r} is given twice")
            pairs[key] = freeze_option(value, where=f"engine option {key!r}")
        object.__setattr__(self, "options", tuple(sorted(pairs.items())))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> EngineSpec:
        """Build a spec from a recipe's `engine:` mapping (keys: backend, model, options)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"engine must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_SPEC_KEYS))
        if unknown:
            raise ValueError(f"unknown engine key(s) {unknown}; allowed: {list(_SPEC_KEYS)}")
        options = data.get("options") or {}
        if not isinstance(options, Mapping):
            raise TypeError(f"engine options must be a mapping, got {type(options).__name__}")
        for key in options:
            if not isinstance(key, str):
                raise TypeError(f"engine option names must be strings, got {key!r}")
        return cls(
            backend=data.get("backend", "vllm"),
            model=data.get("model", DEFAULT_MODEL),
            options=tuple(options.items()),
            resident=data.get("resident", False),
        )

    def option_pairs(self) -> tuple[tuple[str, object], ...]:
        """The options as sorted (name, value) pairs, frozen."""
        assert isinstance(self.options, tuple)
        return self.options

    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments for the backend's constructor."""
        return {key: thaw_option(value) for key, value in self.option_pairs()}

    def to_mapping(self) -> dict[str, Any]:
        """Plain-dict form (inverse of `from_mapping`), for manifests and logs."""
        return {
            "backend": self.backend,
            "model": self.model,
            "options": self.kwargs(),
            "resident": self.resident,
        }


_ENGINES: dict[EngineSpec, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(spec: EngineSpec | None = None) -> Engine:
    """The process-wide engine for `spec` (default: in-process vLLM on the bundled model)."""
    spec = spec if spec is not None else EngineSpec()
    with _ENGINES_LOCK:  # held while building, so two threads never start the same engine
        engine = _ENGINES.get(spec)
        if engine is None:
            engine = build_engine(spec)
            _ENGINES[spec] = engine
        return engine


def is_running(spec: EngineSpec) -> bool:
    """Whether this process holds a started engine for `spec`."""
    with _ENGINES_LOCK:
        return spec in _ENGINES


def close_engine(spec: EngineSpec) -> bool:
    """Close this process's engine for `spec` (frees vLLM's processes and memory); whether
    there was one. A later `get_engine(spec)` starts a new one."""
    with _ENGINES_LOCK:
        engine = _ENGINES.pop(spec, None)
    if engine is None:
        return False
    _close(engine)
    return True


def _close(engine: Engine) -> None:
    close = getattr(engine, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # one engine failing to close must not keep the others alive
            log.exception("closing engine %s failed", engine.model_id)


def build_engine(spec: EngineSpec) -> Engine:
    """A new engine for `spec` (uncached; most callers want `get_engine`)."""
    options = spec.kwargs()
    log.info("starting %s engine for %s", spec.backend, spec.model)
    try:
        match spec.backend:
            case "vllm":
                from gristmill.engines.vllm import VLLMEngine

                return VLLMEngine(spec.model, **options)
            case "openai":
                from gristmill.engines.openai import OpenAIEngine

                return OpenAIEngine(spec.model, **options)
            case _:
                raise ValueError(
                    f"unknown engine backend {spec.backend!r}; known: {list(BACKENDS)}"
                )
    except TypeError as exc:  # most often an option the backend does not take
        raise TypeError(f"{spec.backend} engine for {spec.model!r}: {exc}") from exc


def shutdown_engines() -> None:
    """Close every cached engine (frees vLLM's processes and memory); later calls rebuild."""
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    for engine in engines:
        _close(engine)
