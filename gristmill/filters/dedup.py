"""Dedup stages: exact (normalised text), near-duplicate (MinHash LSH), semantic (embeddings).

All three are Select stages that decide rows greedily in input order (smallest ROW_COLUMN
first) and compare a row only with rows already KEPT: a row is dropped iff an earlier kept
row is its duplicate, and `duplicate_of` names that row's id. Connected components (or
Magpie's "no earlier neighbour at all") would let a chain A~B~C drop C although C is far
from A, the only survivor; the greedy pass keeps C, so every dropped row has a kept twin.
For exact dedup, equality is transitive and both rules agree.

`exact_dedup` (drop reason `exact_duplicate`) compares the chosen fields after
normalisation (NFKC, lowercase, whitespace collapsed; punctuation stripping optional), by a
128-bit hash of them: the pipeline hashes the input part by part (`condense`), so the texts
are never all in memory; two different keys share a hash with odds about 2^-128 per pair
(below 1e-26 among a million rows). On Dask the keys themselves are compared.

`minhash_dedup` (drop reason `near_duplicate`, column `duplicate_jaccard`) estimates the
Jaccard similarity of shingle sets (Broder 1997) with datasketch's MinHash permutations
("affine32" scheme) and finds the candidates datasketch's `MinHashLSH` would (its bands,
computed as a join of band keys: see filters.lsh); a candidate counts only if its
estimated Jaccard (share of equal MinHash values) is at least the threshold,
which cuts the LSH's false positives. Shingles are word (or character) n-grams of each
field; a text shorter than n tokens is one shingle; rows with no tokens at all are left to
`exact_dedup`. Shingle hashing is vectorised with numpy (a stable per-word hash, combined
over the window) and gives the same signatures as `datasketch.MinHash.update_batch` fed
the same 32-bit shingle hashes.

`semantic_dedup` after Magpie (Xu et al. 2024, `exp/gen_dis.py` in magpie-align/magpie).
Distances are squared Euclidean distances between unit vectors, `d = |a - b|^2 = 2 - 2
cos(a, b)`, which is the number Magpie's FAISS `IndexFlatL2` search returns; its default
threshold of 0.05 (cosine above 0.975) is ours too. Per row the stage writes

- `min_neighbor_distance`: distance to the nearest other row (null for a single row);
- `repeat_count`: how many other rows lie strictly within the threshold;
- `duplicate_of`: id of the earliest kept row within the threshold, for dropped rows.

Where we differ from Magpie: the search is an exact FAISS range search, so `repeat_count`
counts every neighbour (Magpie inspects only the 500 nearest); Magpie keeps a row only if
no earlier row at all is within the threshold (see above); Magpie embeds the instruction
with all-mpnet-base-v2, we use the run's embedder (MiniLM by default) on a chosen field.
The search is exact and brute force, O(n^2 d): fine to a few hundred thousand rows on CPU.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import polars as pl

from gristmill.filters.embed import (
    EMBEDDING_COLUMN,
    TextField,
    check_text_field,
    field_source_column,
    frame_embeddings,
)
from gristmill.filters.lsh import (
    Banding,
    ChunkedSignatures,
    LshResult,
    Minhashes,
    banding,
    lsh_duplicates,
    lsh_of,
    signature_keys,
)
from gristmill.filters.ngrams import BASE, TokenWindows
from gristmill.pipelines.cluster import DaskCluster
from gristmill.pipelines.stage import ROW_COLUMN, Select, StageConfig, StageContext
from gristmill.records import DROP_REASON


@dataclass(frozen=True)
class NeighborStats:
    """Per-row results of the near-duplicate search (arrays in input order)."""

    min_distance: np.ndarray  # float64, NaN where a row has no other row
    repeat_count: np.ndarray  # int64
    keep: np.ndarray  # bool
    duplicate_of: np.ndarray  # int64 row index of the earliest kept twin, -1 if kept


def near_duplicates(
    vectors: np.ndarray, threshold: float, *, batch_size: int = 4096
) -> NeighborStats:
    """Exact min-neighbour distances, within-threshold counts and the greedy keep mask.

    `vectors` must be unit-norm float32 rows; a pair is near when `2 - 2 cos < threshold`.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    min_distance = np.full(n, np.nan)
    repeat_count = np.zeros(n, dtype=np.int64)
    keep = np.ones(n, dtype=bool)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return NeighborStats(min_distance, repeat_count, keep, duplicate_of)
    import faiss  # heavy: only when a stage runs

    index = faiss.IndexFlatIP(d)
    index.add(x)
    # distance < threshold  <=>  inner product > 1 - threshold / 2 (range search is strict)
    radius = 1.0 - threshold / 2.0
    for start in range(0, n, batch_size):
        queries = x[start : start + batch_size]
        rows = np.arange(start, start + len(queries))
        sims, ids = index.search(queries, 2)
        nearest = np.where(ids[:, 0] == rows, sims[:, 1], sims[:, 0])
        min_distance[rows] = np.maximum(0.0, 2.0 - 2.0 * nearest.astype(np.float64))
        lims, _, found = index.range_search(queries, radius)
        for q, row in enumerate(rows):
            neighbors = found[lims[q] : lims[q + 1]]
            neighbors = neighbors[neighbors != row]
            repeat_count[row] = len(neighbors)
            earlier = neighbors[neighbors < row]
            kept_earlier = earlier[keep[earlier]]
            if len(kept_earlier):
                keep[row] = False
                duplicate_of[row] = int(kept_earlier.min())
    return NeighborStats(min_distance, repeat_count, keep, duplicate_of)


@dataclass(frozen=True, kw_only=True)
class SemanticDedupConfig(StageConfig):
    """What to compare and how near counts as a duplicate."""

    #: Text to embed when no embedding column is used: "prompt", "response", "conversation".
    field: TextField = "prompt"
    #: Reuse this column (e.g. from the `embed` stage) when the input has it; None: always
    #: embed `field`. The column should have been computed from the same field.
    embedding_column: str | None = EMBEDDING_COLUMN
    #: Rows nearer than this are duplicates; squared L2 between unit vectors (2 - 2 cos).
    threshold: float = 0.05
    #: Query rows per FAISS search call; does not change the output.
    batch_size: int = 4096

    def __post_init__(self) -> None:
        check_text_field(self.field, where="semantic_dedup config")
        if not 0 <= self.threshold <= 4:
            raise ValueError(
                f"semantic_dedup config: threshold must be in [0, 4] (squared L2 between unit "
                f"vectors), got {self.threshold}"
            )
        if self.batch_size < 1:
            raise ValueError(
                f"semantic_dedup config: batch_size must be >= 1, got {self.batch_size}"
            )


class SemanticDedup(Select):
    """Min-neighbour-distance near-duplicate removal over embeddings with FAISS, keeping the
    earliest."""

    name: ClassVar[str] = "semantic_dedup"
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "dedup"
    citation: ClassVar[str | None] = (
        "Xu et al., 2024 (Magpie): min-neighbour-distance deduplication over sentence embeddings"
    )
    Config: ClassVar[type[StageConfig]] = SemanticDedupConfig
    unhashed: ClassVar[frozenset[str]] = frozenset({"batch_size"})
    uses_embedder: ClassVar[bool] = True
    config: SemanticDedupConfig

    def requires(self) -> tuple[str, ...]:
        return ("id", field_source_column(self.config.field))

    def reads(self) -> tuple[str, ...]:
        """The ids, the embedded field and a stored embedding column."""
        column = self.config.embedding_column
        return (*self.requires(), *((column,) if column is not None else ()))

    def produces(self) -> tuple[str, ...]:
        return ("min_neighbor_distance", "repeat_count", "duplicate_of")

    def select(self, data: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """Every row, with the neighbour columns; near-duplicates get `drop_reason`."""
        cfg = self.config
        vectors = frame_embeddings(data, ctx, column=cfg.embedding_column, field=cfg.field)
        stats = near_duplicates(vectors, cfg.threshold, batch_size=cfg.batch_size)
        ids = data.get_column("id")
        twin = pl.Series(stats.duplicate_of)
        duplicate_of = ids.gather(twin.clip(lower_bound=0)).alias("duplicate_of")
        out = data.with_columns(
            pl.Series("min_neighbor_distance", stats.min_distance, dtype=pl.Float64).fill_nan(None),
            pl.Series("repeat_count", stats.repeat_count, dtype=pl.Int64),
            pl.when(twin >= 0).then(duplicate_of).otherwise(None).alias("duplicate_of"),
            pl.when(pl.Series(~stats.keep))
            .then(pl.lit("near_duplicate"))
            .otherwise(None)
            .cast(pl.String)
            .alias(DROP_REASON),
        )
        ctx.extra_stats.update(
            {
                "threshold": cfg.threshold,
                "distance": "squared L2 between unit vectors (2 - 2 cos)",
                "rows": data.height,
                "near_duplicates": int((~stats.keep).sum()),
                "rows_with_neighbors": int((stats.repeat_count > 0).sum()),
            }
        )
        return out


# --------------------------------------------------------------------------------------------
# Texts, tokens and n-gram hashes (shared by exact/MinHash dedup and decontamination)
# --------------------------------------------------------------------------------------------

#: How a text is cut into tokens for n-grams: words (`\w+` runs) or characters.
TokenUnit = Literal["word", "char"]

#: Polars regex of a word: a run of Unicode letters, digits and underscores.
WORD_PATTERN = r"\w+"


def field_expr(field: str) -> pl.Expr:
    """A record text field as a String expression; `conversation` joins every turn of
    `messages` as "role: content" blocks (as filters.embed.conversation_text does)."""
    check_text_field(field, where="field_expr")
    if field != "conversation":
        return pl.col(field).cast(pl.String)
    turn = pl.concat_str(
        pl.element().struct.field("role"), pl.lit(": "), pl.element().struct.field("content")
    )
    return pl.col("messages").list.eval(turn).list.join("\n\n")


def normalize_expr(
    text: pl.Expr,
    *,
    nfkc: bool = True,
    lowercase: bool = True,
    strip_punctuation: bool = False,
    collapse_whitespace: bool = True,
) -> pl.Expr:
    """Normalise a String expression: Unicode NFKC, lowercase, drop punctuation (Unicode
    category P), collapse whitespace runs to one space and trim; nulls stay null."""
    if nfkc:
        text = text.str.normalize("NFKC")
    if lowercase:
        text = text.str.to_lowercase()
    if strip_punctuation:
        text = text.str.replace_all(r"\p{P}+", "")
    if collapse_whitespace:
        text = text.str.replace_all(r"\s+", " ").str.strip_chars()
    return text


def _nfkc(texts: pl.Series) -> pl.Series:
    """Unicode NFKC of every text; pure-ASCII texts, which NFKC leaves as they are, skip it."""
    wide = (texts.str.len_bytes() != texts.str.len_chars()).arg_true()
    if not len(wide):
        return texts
    return texts.clone().scatter(wide, texts.gather(wide).str.normalize("NFKC"))


def text_tokens(texts: pl.Series, unit: TokenUnit = "word") -> pl.Series:
    """Each text's tokens (a list of strings) after NFKC and lowercasing: `word` keeps runs
    of letters/digits/underscore and drops punctuation (`don't` -> don, t; `3.5` -> 3, 5);
    `char` keeps every character with whitespace runs collapsed to one space. Null -> []."""
    norm = _nfkc(texts.cast(pl.String).fill_null("")).str.to_lowercase()
    if unit == "word":
        return norm.str.extract_all(WORD_PATTERN)
    return norm.str.replace_all(r"\s+", " ").str.strip_chars().str.split("")


@dataclass(frozen=True)
class TokenHashes:
    """Tokens of many texts as one flat array of stable 64-bit hashes, text after text."""

    values: np.ndarray  # uint64, one per token
    lengths: np.ndarray  # int64, tokens per text

    @property
    def offsets(self) -> np.ndarray:
        """Index of each text's first token in `values`."""
        return np.concatenate(([0], np.cumsum(self.lengths)[:-1])).astype(np.int64)


def _token_hash(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")


def token_hashes(tokens: pl.Series) -> TokenHashes:
    """Hash every token (blake2b, stable across processes and platforms) of a list Series."""
    lengths = tokens.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = tokens.explode().drop_nulls()
    if flat.len() == 0:
        return TokenHashes(np.zeros(0, dtype=np.uint64), lengths)
    vocab = flat.unique(maintain_order=True)
    codes = flat.cast(pl.Enum(vocab)).to_physical().to_numpy()
    table = np.fromiter((_token_hash(t) for t in vocab), dtype=np.uint64, count=vocab.len())
    return TokenHashes(table[codes], lengths)


#: Odd 64-bit multipliers, one per window position: a window's hash is sum(h_j * M_j) mod 2^64.
#: M_j = BASE^(j+1), odd since BASE is (the `| 1` never changes it).
_WINDOW_MULTIPLIERS = np.array([(pow(BASE, j + 1, 1 << 64) | 1) for j in range(256)], np.uint64)


@dataclass(frozen=True)
class Windows:
    """Token windows (n-grams) of many texts, in text order then position order."""

    hashes: np.ndarray  # uint64 hash of the window's tokens
    text: np.ndarray  # int64 index of the text the window lies in
    size: np.ndarray  # int64 tokens in the window
    flat: np.ndarray  # int64 first token of the window, among all texts' tokens
    text_offsets: np.ndarray  # int64 first token of each text

    @property
    def start(self) -> np.ndarray:
        """int64 first token of each window, within its text (computed when asked)."""
        return self.flat - self.text_offsets[self.text]


def ngram_windows(
    tokens: TokenHashes, sizes: Iterable[int], *, whole_texts_from: int | None = None
) -> Windows:
    """Every window of each size in `sizes` that lies inside one text, with its hash.

    With `whole_texts_from=m`, a text of at least m but fewer than max(sizes) tokens also
    counts as one window of its own length (a short text is one n-gram). Equal token
    sequences get equal hashes in every process; different ones collide with odds 2^-64.
    A window's hash is sum_j h_j * _WINDOW_MULTIPLIERS[j], from prefix sums (filters.ngrams).
    """
    wanted = sorted(set(sizes))
    if not wanted or wanted[0] < 1 or wanted[-1] > len(_WINDOW_MULTIPLIERS):
        raise ValueError(f"window sizes must be in [1, {len(_WINDOW_MULTIPLIERS)}], got {wanted}")
    layout = TokenWindows.of(tokens.values, tokens.lengths)
    lengths = layout.lengths
    short = np.zeros(len(lengths), dtype=bool)
    if whole_texts_from is not None:  # texts of a wanted size have that window already
        short = (lengths >= whole_texts_from) & (lengths < wanted[-1]) & (lengths > 0)
        short &= ~np.isin(lengths, wanted)
    if len(wanted) == 1:  # at most one window per start: no sort needed
        fits = layout.room >= wanted[0]
        fits[layout.offsets[short]] = True
        flat = np.flatnonzero(fits)
        size_of = np.minimum(layout.room[flat], wanted[0])
    else:
        starts = [layout.starts(size) for size in wanted] + [layout.offsets[short]]
        flat = np.concatenate(starts)
        size_of = np.concatenate(
            [
                np.full(len(at), size, dtype=np.int64)
                for at, size in zip(starts, wanted, strict=False)
            ]
            + [lengths[short]]
        )
        order = np.lexsort((size_of, flat))
        flat, size_of = flat[order], size_of[order]
    hashes = layout.hashes(flat, size_of)
    return Windows(hashes, layout.text_of[flat], size_of, flat, layout.offsets)


def _check_fields(fields: tuple[str, ...], *, where: str) -> tuple[str, ...]:
    fields = tuple(fields)
    if not fields:
        raise ValueError(f"{where}: fields must name at least one text field")
    for f in fields:
        check_text_field(f, where=where)
    if len(set(fields)) != len(fields):
        raise ValueError(f"{where}: fields has repeats: {list(fields)}")
    return fields


def _required_columns(fields: tuple[str, ...]) -> tuple[str, ...]:
    return ("id", *dict.fromkeys(field_source_column(f) for f in fields))


def _cluster_stats(duplicate_of: np.ndarray) -> dict[str, int]:
    """Duplicates, clusters (kept rows with at least one duplicate) and the largest cluster."""
    twins = duplicate_of[duplicate_of >= 0]
    if not len(twins):
        return {"duplicates": 0, "clusters": 0, "largest_cluster": 1 if len(duplicate_of) else 0}
    sizes = np.unique(twins, return_counts=True)[1] + 1
    return {"duplicates": len(twins), "clusters": len(sizes), "largest_cluster": int(sizes.max())}


def _with_duplicates(
    frame: pl.DataFrame, duplicate_of: np.ndarray, reason: str, *extra: pl.Series
) -> pl.DataFrame:
    """`frame` plus `duplicate_of` (the kept twin's id) and `drop_reason` on duplicates."""
    twin = pl.Series(duplicate_of)
    ids = frame.get_column("id").gather(twin.clip(lower_bound=0))
    return frame.with_columns(
        pl.when(twin >= 0).then(ids).otherwise(None).cast(pl.String).alias("duplicate_of"),
        *extra,
        pl.when(twin >= 0).then(pl.lit(reason)).otherwise(None).cast(pl.String).alias(DROP_REASON),
    )


# --------------------------------------------------------------------------------------------
# exact_dedup
# --------------------------------------------------------------------------------------------

#: What dedup compares by default: the whole single-turn record. `fields: [prompt]` dedups
#: instructions as Magpie does, but also drops the other candidates of a prompt (rows that
#: share a `parent_id`), which GRAPE, DART and CLEAR need: put it before those stages only.
DEFAULT_DEDUP_FIELDS: tuple[TextField, ...] = ("prompt", "response")


@dataclass(frozen=True, kw_only=True)
class ExactDedupConfig(StageConfig):
    """Which fields must match, after which normalisation."""

    #: Texts that must all be equal: "prompt", "response", "conversation" (every turn).
    #: A null text equals only another null.
    fields: tuple[TextField, ...] = DEFAULT_DEDUP_FIELDS
    #: Unicode NFKC (full-width letters, ligatures, non-breaking spaces -> plain forms).
    nfkc: bool = True
    lowercase: bool = True
    #: Collapse whitespace runs to one space and trim the ends.
    collapse_whitespace: bool = True
    #: Drop punctuation (Unicode category P); off by default: `x-1` and `x1` differ in math.
    strip_punctuation: bool = False

    def __post_init__(self) -> None:
        fields = _check_fields(self.fields, where="exact_dedup config")
        object.__setattr__(self, "fields", fields)


class ExactDedup(Select):
    """Normalised-text hash duplicates, keeping the earliest; `duplicate_of` audit column."""

    name: ClassVar[str] = "exact_dedup"
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "dedup"
    Config: ClassVar[type[StageConfig]] = ExactDedupConfig
    config: ExactDedupConfig

    def requires(self) -> tuple[str, ...]:
        return _required_columns(self.config.fields)

    def reads(self) -> tuple[str, ...]:
        """The ids (named in `duplicate_of`) and the compared texts."""
        return _required_columns(self.config.fields)

    def produces(self) -> tuple[str, ...]:
        return ("duplicate_of",)

    def condense(self, part: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """The ids and the 128-bit hash of each row's keys (on a Dask cluster: the texts,
        which are hashed and compared there)."""
        if ctx.cluster is not None:
            return part
        hashes = key_hashes(exact_keys(field_texts(part, self.config.fields), self.config))
        ids = part.select(c for c in (ROW_COLUMN, "id", DROP_REASON) if c in part.columns)
        return pl.concat([ids, hashes], how="horizontal")

    def select(self, data: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """Every row, with `duplicate_of`; later copies get drop reason `exact_duplicate`.

        `data` is the whole input or its condensed parts (their key hashes). On a Dask
        cluster (`ctx.cluster`) the keys are computed and grouped there.
        """
        cfg = self.config
        if ctx.cluster is None:
            if EXACT_HASH_COLUMNS[0] not in data.columns:
                data = data.with_columns(key_hashes(exact_keys(field_texts(data, cfg.fields), cfg)))
            hashes = data.select(EXACT_HASH_COLUMNS).with_row_index("row")
            first = hashes.select(pl.col("row").min().over(EXACT_HASH_COLUMNS))
            first_row = first.to_series().to_numpy().astype(np.int64)
            data = data.drop(EXACT_HASH_COLUMNS)
        else:
            from gristmill.filters.dedup_dask import first_rows_on_dask

            with ctx.cluster.client() as client:
                first_row = first_rows_on_dask(
                    client, field_texts(data, cfg.fields), functools.partial(exact_keys, cfg=cfg)
                )
            ctx.extra_stats["dask_scheduler"] = ctx.cluster.address
        rows = np.arange(data.height, dtype=np.int64)
        duplicate_of = np.where(first_row < rows, first_row, -1)
        ctx.extra_stats.update(
            {"rows": data.height, "fields": list(cfg.fields), **_cluster_stats(duplicate_of)}
        )
        return _with_duplicates(data, duplicate_of, "exact_duplicate")


def field_texts(frame: pl.DataFrame, fields: tuple[str, ...]) -> pl.DataFrame:
    """The fields' texts as String columns t0, t1, ... (what the dedup keys are made of)."""
    return frame.select(field_expr(f).alias(f"t{i}") for i, f in enumerate(fields))


#: The columns `ExactDedup.condense` adds: two 64-bit hashes of a row's keys.
EXACT_HASH_COLUMNS = ("_gm_exact_hash0", "_gm_exact_hash1")
#: Their seeds: two independent polars hashes (fixed seeds, so one process agrees with itself).
_EXACT_HASH_SEEDS = (0x5EED0, 0x5EED1)


def key_hashes(keys: pl.DataFrame) -> pl.DataFrame:
    """EXACT_HASH_COLUMNS of each row of `keys` (see `exact_keys`); a null key hashes apart
    from every text, the empty one included. Rows with equal keys get equal hashes; unequal
    keys share both with odds about 2^-128 (polars' hash, not stable across its versions:
    compare only hashes made in one run)."""
    row = pl.struct(keys.columns)
    return keys.select(
        row.hash(seed=seed).alias(name)
        for seed, name in zip(_EXACT_HASH_SEEDS, EXACT_HASH_COLUMNS, strict=True)
    )


def exact_keys(texts: pl.DataFrame, cfg: ExactDedupConfig) -> pl.DataFrame:
    """The normalised texts (key0, key1, ...) that must all match for an exact duplicate
    (NFKC and the whitespace regex applied only where they can change a text: see `_nfkc`
    and `_collapsed`)."""
    if cfg.nfkc:
        texts = texts.with_columns(_nfkc(texts.get_column(c)) for c in texts.columns)
    keys = texts.select(
        normalize_expr(
            pl.col(c),
            nfkc=False,
            lowercase=cfg.lowercase,
            strip_punctuation=cfg.strip_punctuation,
            collapse_whitespace=False,
        ).alias(f"key{i}")
        for i, c in enumerate(texts.columns)
    )
    if cfg.collapse_whitespace:
        keys = keys.with_columns(_collapsed(keys.get_column(c)) for c in keys.columns)
    return keys


#: A text the whitespace regex must see: two white characters in a row, or one other than
#: a space or a newline (Unicode White_Space, as polars' `\s`).
_UNEVEN_SPACE = r"\s\s|[\s--[ \n]]"


def _collapsed(texts: pl.Series) -> pl.Series:
    """`normalize_expr`'s whitespace step (runs to one space, ends trimmed) of every text:
    where every white character is a lone space or newline, a newline-to-space literal
    replace gives the same as the regex, which only the other texts go through."""
    uneven = texts.str.contains(_UNEVEN_SPACE).fill_null(False).arg_true()
    out = texts.str.replace_all("\n", " ", literal=True)
    if len(uneven):
        out = out.scatter(uneven, texts.gather(uneven).str.replace_all(r"\s+", " "))
    return out.str.strip_chars()


# --------------------------------------------------------------------------------------------
# minhash_dedup
# --------------------------------------------------------------------------------------------


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (the pre-mix of datasketch's "affine32" scheme)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _field_salts(count: int) -> np.ndarray:
    """A fixed 32-bit tag per field, so a prompt shingle never equals a response shingle."""
    return np.array([_token_hash(f"\x00field{i}") & 0xFFFFFFFF for i in range(count)], np.uint32)


@dataclass(frozen=True)
class Shingles:
    """32-bit shingle hashes of many rows, row after row (what MinHash.update_batch takes)."""

    hashes: np.ndarray  # uint32
    row: np.ndarray  # int64, non-decreasing


def row_shingles(
    frame: pl.DataFrame, fields: tuple[str, ...], *, ngram: int, unit: TokenUnit
) -> Shingles:
    """Every row's shingles: token n-grams of each field (a shorter text is one shingle),
    tagged by field, hashed to 32 bits."""
    return text_shingles(field_texts(frame, fields), ngram=ngram, unit=unit)


def text_shingles(texts: pl.DataFrame, *, ngram: int, unit: TokenUnit) -> Shingles:
    """`row_shingles` of field-text columns (t0, t1, ...: see `field_texts`)."""
    flat = texts.select(pl.concat_list(pl.all()).alias("t")).get_column("t").explode()
    tokens = token_hashes(text_tokens(flat, unit))
    windows = ngram_windows(tokens, [ngram], whole_texts_from=1)
    n_fields = texts.width
    salts = _field_salts(n_fields)[windows.text % n_fields]
    hashes = (windows.hashes >> np.uint64(32)).astype(np.uint32) ^ salts
    return Shingles(hashes, windows.text // n_fields)


#: Shingles hashed per pass over the permutations: small enough (512 KiB of uint32) for a
#: block and its temporary to stay in cache through all of them (about 2x faster).
SHINGLE_BLOCK = 1 << 17


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine permutations (a, b) for `MinHash(num_perm, seed)`, as uint32."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed).permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def minhash_signatures(
    shingles: Shingles, n_rows: int, *, num_perm: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(n_rows, num_perm) uint32 MinHash signatures and a mask of rows with no shingles.

    Same values as datasketch `MinHash(num_perm, seed)` (scheme "affine32") updated with
    each row's shingle hashes; computed one permutation at a time over the rows of a block
    of about SHINGLE_BLOCK shingles (whole rows), block after block.
    """
    a, b = _permutations(num_perm, seed)
    signatures = np.full((n_rows, num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    counts = np.bincount(shingles.row, minlength=n_rows)
    present = np.flatnonzero(counts)
    if len(present):
        ends = np.cumsum(counts[present])
        starts = ends - counts[present]
        mixed = _fmix32(shingles.hashes)
        columns = np.empty((num_perm, len(present)), dtype=np.uint32)
        scratch = np.empty(min(len(mixed), max(SHINGLE_BLOCK, int(counts.max()))), np.uint32)
        lo = 0
        while lo < len(present):  # rows lo..hi-1: at least one, else up to a block
            hi = max(lo + 1, int(np.searchsorted(ends, starts[lo] + SHINGLE_BLOCK, "right")))
            first, last = int(starts[lo]), int(ends[hi - 1])
            block, out = mixed[first:last], scratch[: last - first]
            cuts = starts[lo:hi] - first
            for k in range(num_perm):
                np.multiply(block, a[k], out=out)
                np.add(out, b[k], out=out)
                np.minimum.reduceat(out, cuts, out=columns[k, lo:hi])
            lo = hi
        signatures[present] = columns.T
    return signatures, counts == 0


@dataclass(frozen=True, kw_only=True)
class MinHashDedupConfig(StageConfig):
    """Shingles, MinHash size and the Jaccard threshold of a near duplicate."""

    #: Texts whose shingles form a row's set (each field's n-grams kept apart).
    fields: tuple[TextField, ...] = DEFAULT_DEDUP_FIELDS
    #: `word`: n-grams of `\w+` words (punctuation dropped); `char`: of characters.
    unit: TokenUnit = "word"
    #: Tokens per shingle (a text with fewer tokens is one shingle).
    ngram: int = 5
    #: MinHash permutations: the Jaccard estimate's standard error is ~ sqrt(J(1-J)/num_perm).
    num_perm: int = 128
    #: Estimated Jaccard similarity at or above which a row duplicates a kept row.
    threshold: float = 0.8
    #: Seed of the MinHash permutations (datasketch's default is 1).
    seed: int = 1
    #: Rows hashed per numpy pass; bounds memory, does not change the output (4,000 rows of
    #: GSM8K pairs: about 100 MB of working arrays per part condensed at once).
    batch_size: int = 4_000

    def __post_init__(self) -> None:
        where = "minhash_dedup config"
        object.__setattr__(self, "fields", _check_fields(self.fields, where=where))
        if self.unit not in ("word", "char"):
            raise ValueError(f"{where}: unit must be 'word' or 'char', got {self.unit!r}")
        if not 1 <= self.ngram <= len(_WINDOW_MULTIPLIERS):
            raise ValueError(
                f"{where}: ngram must be in [1, {len(_WINDOW_MULTIPLIERS)}], got {self.ngram}"
            )
        if self.num_perm < 2:
            raise ValueError(f"{where}: num_perm must be >= 2, got {self.num_perm}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"{where}: threshold must be in (0, 1], got {self.threshold}")
        if self.batch_size < 1:
            raise ValueError(f"{where}: batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class NearDuplicates:
    """Result of the greedy LSH pass (arrays in input order)."""

    duplicate_of: np.ndarray  # int64 row index of the kept twin, -1 if kept
    jaccard: np.ndarray  # float64 estimated Jaccard with that twin, NaN if kept
    candidates: int  # LSH candidate pairs checked (an identical signature counts as one)
    rejected_candidates: int  # of them, below the threshold (LSH false positives)
    bands: int
    rows_per_band: int


def greedy_near_duplicates(
    signatures: np.ndarray, empty: np.ndarray, *, threshold: float
) -> NearDuplicates:
    """Walk rows in order; a row duplicates the earliest KEPT row that LSH proposes and
    whose estimated Jaccard is >= threshold; kept rows enter the index, duplicates do not.

    Computed with band-key joins (see filters.lsh), with datasketch's bands and results.
    """
    return near_duplicates_of(
        lsh_duplicates(signatures, empty, threshold=threshold), signatures.shape[1]
    )


def near_duplicates_of(result: LshResult, num_perm: int) -> NearDuplicates:
    """The stage's view of an LSH pass: twins, their estimated Jaccard, pair counts."""
    twins = result.duplicate_of
    jaccard = np.where(twins >= 0, result.equal / num_perm, np.nan)
    return NearDuplicates(
        twins,
        jaccard,
        result.candidates,
        result.below_threshold,
        result.banding.bands,
        result.banding.rows,
    )


class MinHashDedup(Select):
    """MinHash-LSH near duplicates (estimated Jaccard of shingles), keeping the earliest;
    `duplicate_of` audit column."""

    name: ClassVar[str] = "minhash_dedup"
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "dedup"
    citation: ClassVar[str | None] = (
        "Lee et al., 2022. Deduplicating Training Data Makes Language Models Better. "
        "arXiv:2107.06499"
    )
    Config: ClassVar[type[StageConfig]] = MinHashDedupConfig
    unhashed: ClassVar[frozenset[str]] = frozenset({"batch_size"})
    config: MinHashDedupConfig

    def requires(self) -> tuple[str, ...]:
        return _required_columns(self.config.fields)

    def reads(self) -> tuple[str, ...]:
        """The ids (named in `duplicate_of`) and the shingled texts."""
        return _required_columns(self.config.fields)

    def produces(self) -> tuple[str, ...]:
        return ("duplicate_of", "duplicate_jaccard")

    def signatures(self, frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """MinHash signatures of every row of `frame` and the mask of rows without tokens."""
        return text_signatures(field_texts(frame, self.config.fields), self.config)

    def condense(self, part: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """The ids, MinHash signatures and their LSH keys (MINHASH_COLUMNS). With a
        `ctx.state_dir` the signatures go to a file there (`spill_path`) and only the keys
        stay: the LSH pass reads back the few signatures it checks. On a Dask cluster: the
        texts, which are hashed there."""
        if ctx.cluster is not None:
            return part
        ids = part.select(c for c in (ROW_COLUMN, "id", DROP_REASON) if c in part.columns)
        columns = self._minhash_columns(part)
        if ctx.state_dir is not None and part.height:
            path = spill_path(ctx.state_dir, int(part.get_column(ROW_COLUMN)[0]))
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, columns[0].to_numpy())
            columns = columns[1:]
        return ids.with_columns(columns)

    def _minhash_columns(self, frame: pl.DataFrame) -> list[pl.Series]:
        signatures, empty = self.signatures(frame)
        band = banding(self.config.threshold, self.config.num_perm)
        return minhash_columns(signatures, empty, band)

    def select(self, data: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """Every row, with `duplicate_of`/`duplicate_jaccard`; near duplicates get a reason.

        `data` is the whole input or its condensed parts (their signatures and keys). On a
        Dask cluster (`ctx.cluster`) signatures and LSH buckets are computed there.
        """
        cfg = self.config
        start = time.perf_counter()
        if ctx.cluster is None:
            seconds: dict[str, object] = {}
            if MINHASH_COLUMNS[1] not in data.columns:  # not condensed: hash the texts here
                data = data.with_columns(self._minhash_columns(data))
                seconds["minhash_seconds"] = round(time.perf_counter() - start, 3)
            hashed = time.perf_counter()
            hashes = minhashes_in(data, cfg.num_perm, spilled=ctx.state_dir)
            near = near_duplicates_of(lsh_of(hashes, threshold=cfg.threshold), cfg.num_perm)
            seconds["rows_without_tokens"] = int(hashes.empty.sum())
            seconds["lsh_seconds"] = round(time.perf_counter() - hashed, 3)
            del hashes
            data = data.drop(MINHASH_COLUMNS, strict=False)
        else:
            near = self._near_duplicates_on(ctx.cluster, data)
            seconds = {
                "dask_scheduler": ctx.cluster.address,
                "dask_seconds": round(time.perf_counter() - start, 3),
            }
        ctx.extra_stats.update(
            {
                "rows": data.height,
                "threshold": cfg.threshold,
                "lsh_bands": near.bands,
                "lsh_rows_per_band": near.rows_per_band,
                "candidate_pairs": near.candidates,
                "candidates_below_threshold": near.rejected_candidates,
                **seconds,
                **_cluster_stats(near.duplicate_of),
            }
        )
        similarity = pl.Series("duplicate_jaccard", near.jaccard, dtype=pl.Float64).fill_nan(None)
        return _with_duplicates(data, near.duplicate_of, "near_duplicate", similarity)

    def _near_duplicates_on(self, cluster: DaskCluster, data: pl.DataFrame) -> NearDuplicates:
        """`greedy_near_duplicates` as Dask jobs (filters.dedup_dask), in `batch_size` parts."""
        from gristmill.filters.dedup_dask import lsh_on_dask

        cfg = self.config
        with cluster.client() as client:
            result = lsh_on_dask(
                client,
                field_texts(data, cfg.fields),
                functools.partial(text_signatures, cfg=cfg),
                threshold=cfg.threshold,
                num_perm=cfg.num_perm,
                partition_rows=cfg.batch_size,
            )
        return near_duplicates_of(result, cfg.num_perm)


#: The columns `MinHashDedup.condense` adds: each row's signature (Array of num_perm UInt32),
#: its `fold_columns` key, its band keys (Array of UInt64) and whether it has no shingles.
MINHASH_COLUMNS = ("_gm_minhash", "_gm_minhash_key", "_gm_minhash_bands", "_gm_minhash_empty")


def minhash_columns(signatures: np.ndarray, empty: np.ndarray, band: Banding) -> list[pl.Series]:
    """MINHASH_COLUMNS of these rows."""
    whole, bands = signature_keys(signatures, band)
    values = (signatures, whole, bands, empty)
    return [pl.Series(name, v) for name, v in zip(MINHASH_COLUMNS, values, strict=True)]


#: The files of `spill_path`.
SPILL_GLOB = "minhash-*.npy"


def spill_path(folder: Path, first_row: int) -> Path:
    """Where `MinHashDedup.condense` leaves the signatures of the part from `first_row` on
    (names sort in row order)."""
    return folder / f"minhash-{first_row:012d}.npy"


def minhashes_in(data: pl.DataFrame, num_perm: int, *, spilled: Path | None = None) -> Minhashes:
    """The LSH view of MINHASH_COLUMNS: keys as arrays, signatures read back on demand from
    the column's chunks (numpy views of them: the column is never copied whole) or, when
    the column is absent, from the parts' files in `spilled`."""
    whole, bands, empty = (data.get_column(c) for c in MINHASH_COLUMNS[1:])
    if MINHASH_COLUMNS[0] in data.columns:
        column = data.get_column(MINHASH_COLUMNS[0])
        chunks: list[np.ndarray | Path] = [
            c.to_numpy().reshape(c.len(), num_perm) for c in column.get_chunks()
        ]
    else:
        chunks = sorted(spilled.glob(SPILL_GLOB)) if spilled is not None else []
    signatures = ChunkedSignatures.of(chunks, num_perm)
    if signatures.starts[-1] != data.height:
        raise RuntimeError(
            f"minhash_dedup: {signatures.starts[-1]} signatures for {data.height} rows"
            + (f" in {spilled}" if spilled is not None else "")
        )
    return Minhashes(
        empty.to_numpy(),
        whole.to_numpy(),
        bands.to_numpy().reshape(data.height, -1),
        signatures,
        num_perm,
    )


def text_signatures(texts: pl.DataFrame, cfg: MinHashDedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signatures of field-text columns (see `field_texts`), `batch_size` rows per pass,
    and the mask of rows without tokens."""
    sigs, empties = [], []
    for start in range(0, max(texts.height, 1), cfg.batch_size):
        chunk = texts.slice(start, cfg.batch_size)
        shingles = text_shingles(chunk, ngram=cfg.ngram, unit=cfg.unit)
        sig, empty = minhash_signatures(
            shingles, chunk.height, num_perm=cfg.num_perm, seed=cfg.seed
        )
        sigs.append(sig)
        empties.append(empty)
    return np.concatenate(sigs), np.concatenate(empties)
