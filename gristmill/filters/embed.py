"""The `embed` stage and the helpers every embedding-based stage shares.

`Embed` adds an `embedding` column (fixed-size float32 array, unit norm) computed from one
text field, so later stages (semantic dedup, k-means selection) can reuse it instead of
embedding the same texts again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import numpy as np
import polars as pl

from gristmill.pipelines.stage import Map, StageConfig, StageContext

#: Which text of a record to embed: the last user turn, the last assistant turn, or the
#: whole conversation (every turn as "role: content", joined by blank lines).
TextField = Literal["prompt", "response", "conversation"]
TEXT_FIELDS: tuple[str, ...] = get_args(TextField)

#: Default name of the column the `embed` stage writes.
EMBEDDING_COLUMN = "embedding"


def check_text_field(field: str, *, where: str) -> None:
    """Raise a clear error if `field` is not one of TEXT_FIELDS."""
    if field not in TEXT_FIELDS:
        raise ValueError(f"{where}: field must be one of {list(TEXT_FIELDS)}, got {field!r}")


def field_source_column(field: str) -> str:
    """The record column a text field is read from (`conversation` reads `messages`)."""
    return "messages" if field == "conversation" else field


def conversation_text(messages: list[dict[str, str]]) -> str:
    """All turns of a conversation as one text: "role: content" blocks joined by blank lines."""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def field_texts(frame: pl.DataFrame, field: str) -> list[str]:
    """The texts to embed for every row; a null text is an error naming the row's id."""
    check_text_field(field, where="field_texts")
    column = field_source_column(field)
    if column not in frame.columns:
        raise ValueError(f"cannot embed field {field!r}: the input has no {column!r} column")
    values = frame.get_column(column).to_list()
    ids = frame.get_column("id").to_list() if "id" in frame.columns else None
    texts: list[str] = []
    for i, value in enumerate(values):
        if value is None:
            who = f"id {ids[i]!r}" if ids is not None else f"row {i}"
            raise ValueError(f"cannot embed field {field!r}: it is null in {who}")
        texts.append(conversation_text(value) if field == "conversation" else str(value))
    return texts


def embedding_matrix(frame: pl.DataFrame, column: str) -> np.ndarray:
    """A stored embedding column as a C-contiguous float32 (n, d) matrix with unit-norm rows.

    Accepts fixed-size arrays (what `Embed` writes) and equal-length lists; nulls and ragged
    rows are errors. Rows are re-normalised so distances mean the same for any producer.
    """
    series = frame.get_column(column)
    if series.null_count():
        first = int(series.is_null().arg_true()[0])
        raise ValueError(f"embedding column {column!r} is null in row {first}")
    if isinstance(series.dtype, pl.List):
        lengths = series.list.len().unique().to_list()
        if len(lengths) != 1:
            raise ValueError(
                f"embedding column {column!r} has rows of different lengths {sorted(lengths)}"
            )
        series = series.cast(pl.Array(pl.Float32, int(lengths[0])))
    elif not isinstance(series.dtype, pl.Array):
        raise ValueError(
            f"embedding column {column!r} must hold arrays or lists of floats, got {series.dtype}"
        )
    if series.len() == 0:
        width = series.dtype.size if isinstance(series.dtype, pl.Array) else 0
        return np.zeros((0, width), dtype=np.float32)
    matrix = np.ascontiguousarray(series.to_numpy(), dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"embedding column {column!r} is not a flat vector per row")
    return normalize_rows(matrix)


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Divide every row by its L2 norm (all-zero rows stay zero)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.ascontiguousarray(matrix / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def embed_texts(ctx: StageContext, texts: list[str], *, batch_size: int) -> np.ndarray:
    """Embed `texts` with the run's embedder, `batch_size` texts per call."""
    embedder = ctx.embedder()
    if not texts:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    parts = [embedder.embed(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    return np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.float32)


def frame_embeddings(
    frame: pl.DataFrame,
    ctx: StageContext,
    *,
    column: str | None,
    field: str,
    batch_size: int = 256,
) -> np.ndarray:
    """Unit-norm embeddings of every row: `column` when set and present, else embed `field`."""
    if column is not None and column in frame.columns:
        return embedding_matrix(frame, column)
    return normalize_rows(embed_texts(ctx, field_texts(frame, field), batch_size=batch_size))


def embedding_series(name: str, matrix: np.ndarray) -> pl.Series:
    """A (n, d) matrix as a polars fixed-size float32 array column."""
    return pl.Series(
        name, matrix.astype(np.float32, copy=False), dtype=pl.Array(pl.Float32, matrix.shape[1])
    )


@dataclass(frozen=True, kw_only=True)
class EmbedConfig(StageConfig):
    """What to embed and where to write it."""

    #: Text to embed: "prompt", "response" or "conversation" (all turns joined).
    field: TextField = "prompt"
    #: Output column (fixed-size float32 array, unit norm).
    column: str = EMBEDDING_COLUMN
    #: Texts per embedder call; does not change the output.
    batch_size: int = 256

    def __post_init__(self) -> None:
        check_text_field(self.field, where="embed config")
        if self.batch_size < 1:
            raise ValueError(f"embed config: batch_size must be >= 1, got {self.batch_size}")
        if not self.column:
            raise ValueError("embed config: column must be a non-empty name")


class Embed(Map):
    """Adds an `embedding` column of one text field (the bundled MiniLM by default)."""

    name: ClassVar[str] = "embed"
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "map"
    Config: ClassVar[type[StageConfig]] = EmbedConfig
    unhashed: ClassVar[frozenset[str]] = frozenset({"batch_size"})
    uses_embedder: ClassVar[bool] = True
    config: EmbedConfig

    def requires(self) -> tuple[str, ...]:
        return (field_source_column(self.config.field),)

    def produces(self) -> tuple[str, ...]:
        return (self.config.column,)

    def process(self, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """Embed the configured field of every row of `batch`."""
        cfg = self.config
        vectors = embed_texts(ctx, field_texts(batch, cfg.field), batch_size=cfg.batch_size)
        return batch.with_columns(embedding_series(cfg.column, vectors))
