"""The `decontam` stage: drop rows that share a long word n-gram with an evaluation set.

After GPT-3 (Brown et al. 2020, section 4 and appendix C): a training row is contaminated
when one of its texts contains a 13-gram of an evaluation item, or the whole item when the
item is shorter than 13 words. GPT-3 also lowered N per task to the 5th-percentile item
length, but never below 8 words; we keep N fixed (`ngram`, default 13) and take that floor
as `min_words` (default 8): items of `min_words` to `ngram - 1` words must appear whole,
items shorter than `min_words` are not checked (a 3-word answer would match everywhere)
and are counted in the stats.

Tokens are the lowercase `\\w+` words of the NFKC-normalised text: punctuation and
whitespace do not matter (`don't` -> don, t; `3.5` -> 3, 5), and an n-gram never spans
two fields of a row or two texts of an item. Every eval text is indexed once per process
(cached by config and file stamps) as sorted 64-bit n-gram hashes; a batch's windows are
looked up with one `searchsorted`, and each hash hit is confirmed word for word.

A contaminated row gets drop reason `contaminated` and, for its first hit (in `fields`
order, then text order): `contam_eval` (the eval set's name), `contam_item` (the item's
`id_field` value, else its 0-based position in the file or split), `contam_field` (the
row's field) and `contam_ngram` (the shared words, space-joined). The stage's config
fingerprint holds the eval sets' paths, not their contents: pin a file with `sha256` so
a changed file is an error instead of a silently stale resume.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl

from gristmill.filters.dedup import TokenHashes, field_expr, ngram_windows, text_tokens
from gristmill.filters.embed import TextField, check_text_field, field_source_column
from gristmill.filters.ngrams import TokenWindows
from gristmill.pipelines.stage import Map, StageConfig, StageContext
from gristmill.pipelines.stats import ExtraStats, counts, first, summed
from gristmill.reader import MISSING, load_rows
from gristmill.records import (
    DROP_REASON,
    INPUT_FORMATS,
    RecordError,
    default_source,
    infer_format,
)
from gristmill.threads import thread_map

#: Columns the stage writes (null on clean rows).
CONTAM_COLUMNS = ("contam_eval", "contam_item", "contam_field", "contam_ngram")


@dataclass(frozen=True, kw_only=True)
class EvalSet:
    """One evaluation set: a file or a Hugging Face dataset, and the fields that must not leak.

    In a recipe: `{path: evals/gsm8k_test.jsonl, fields: [question]}` or
    `{hf: openai/gsm8k, subset: main, split: test, fields: [question, answer]}`.
    """

    #: Item fields whose text is checked: strings, or lists of strings (e.g. choices).
    fields: tuple[str, ...]
    #: A jsonl/json/parquet file (`.gz` allowed for JSON) or a `save_to_disk` folder.
    path: str | None = None
    #: A Hugging Face dataset name for `datasets.load_dataset`, read from the local cache.
    hf: str | None = None
    #: The HF dataset's config name (`main` for gsm8k).
    subset: str | None = None
    #: The split of an HF dataset or `save_to_disk` folder.
    split: str = "test"
    #: jsonl, json, parquet or hf; None: inferred from `path`.
    format: str | None = None
    #: Reported in `contam_eval`; default: the file name without suffixes, or `hf`.
    name: str | None = None
    #: Item field reported in `contam_item`; None: the item's 0-based position.
    id_field: str | None = None
    #: The file's expected sha256 (path only): a changed eval file is then an error.
    sha256: str | None = None

    def __post_init__(self) -> None:
        where = f"eval set {self.label!r}"
        if (self.path is None) == (self.hf is None):
            raise ValueError(f"{where}: give exactly one of `path` (a file) or `hf` (a dataset)")
        if isinstance(self.fields, str) or not isinstance(self.fields, Sequence):
            raise ValueError(f"{where}: fields must be a list of field names, got {self.fields!r}")
        object.__setattr__(self, "fields", tuple(self.fields))
        if not self.fields or not all(isinstance(f, str) and f for f in self.fields):
            raise ValueError(f"{where}: fields must name at least one text field")
        if self.format is not None and self.format not in INPUT_FORMATS:
            raise ValueError(f"{where}: format must be one of {list(INPUT_FORMATS)}")
        if self.sha256 is not None and self.path is None:
            raise ValueError(f"{where}: sha256 pins a file; it needs `path`")

    @property
    def label(self) -> str:
        """The name reported in `contam_eval`."""
        if self.name is not None:
            return self.name
        if self.path is not None:
            return default_source(self.path)
        return self.hf if self.hf is not None else "unnamed"

    @classmethod
    def coerce(cls, value: object, *, where: str) -> EvalSet:
        """An EvalSet from itself or from a recipe's mapping (unknown keys are errors)."""
        if isinstance(value, EvalSet):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping with `path` or `hf`, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {sorted(known)}")
        try:
            return cls(**{str(k): v for k, v in value.items()})
        except TypeError as exc:
            raise ValueError(f"{where}: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class DecontamConfig(StageConfig):
    """Which eval sets, which n-gram length, which row fields."""

    #: The evaluation sets (YAML: a list of mappings, see EvalSet).
    eval_sets: tuple[EvalSet, ...] = ()
    #: Words in a shared n-gram that makes a row contaminated (GPT-3: 13).
    ngram: int = 13
    #: Eval texts of min_words..ngram-1 words must appear whole; shorter ones are skipped.
    min_words: int = 8
    #: Row texts checked: "prompt", "response", "conversation" (every turn, system included).
    fields: tuple[TextField, ...] = ("prompt", "response")

    def __post_init__(self) -> None:
        where = "decontam config"
        if isinstance(self.eval_sets, Mapping | str) or not isinstance(self.eval_sets, Sequence):
            raise ValueError(f"{where}: eval_sets must be a list, got {self.eval_sets!r}")
        sets = tuple(
            EvalSet.coerce(v, where=f"{where}: eval_sets[{i}]")
            for i, v in enumerate(self.eval_sets)
        )
        if not sets:
            raise ValueError(f"{where}: eval_sets is empty; name at least one evaluation set")
        labels = [s.label for s in sets]
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise ValueError(f"{where}: eval set names repeat {repeated}; give each a `name`")
        object.__setattr__(self, "eval_sets", sets)
        object.__setattr__(self, "fields", tuple(self.fields))
        if not self.fields:
            raise ValueError(f"{where}: fields must name at least one row field")
        for f in self.fields:
            check_text_field(f, where=where)
        if not 1 <= self.ngram <= 256:
            raise ValueError(f"{where}: ngram must be in [1, 256], got {self.ngram}")
        if not 1 <= self.min_words <= self.ngram:
            raise ValueError(
                f"{where}: min_words must be in [1, ngram={self.ngram}], got {self.min_words}"
            )


# --------------------------------------------------------------------------------------------
# Eval sets: loading and the n-gram index
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    """Rows of one eval set: column values and how to name a row in errors."""

    where: str
    columns: tuple[str, ...]
    length: int
    values: Callable[[str], list[Any]]
    line_of: Callable[[int], int | None]


def _load_hf_dataset(es: EvalSet) -> _Table:
    where = f"eval set {es.label!r} (Hugging Face dataset {es.hf!r}, split {es.split!r})"
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError(f"{where}: the `datasets` package is not installed") from exc
    try:
        loaded = datasets.load_dataset(es.hf, es.subset, split=es.split)
    except Exception as exc:  # datasets raises many kinds (offline, not found, bad config)
        raise RuntimeError(
            f"{where}: cannot load it ({type(exc).__name__}: {exc}). It must already be in the "
            "local Hugging Face cache when the hub is offline; or export it to a jsonl or "
            "parquet file and give `path`"
        ) from exc
    if not isinstance(loaded, datasets.Dataset):
        raise RuntimeError(f"{where}: expected one split, got {type(loaded).__name__}")
    table = loaded.with_format("arrow")[:]
    return _Table(
        where=where,
        columns=tuple(table.column_names),
        length=table.num_rows,
        values=lambda c: list(table.column(c).to_pylist()),
        line_of=lambda i: None,
    )


def _load_eval_file(es: EvalSet) -> _Table:
    assert es.path is not None
    if es.sha256 is not None:
        digest = hashlib.sha256(Path(es.path).read_bytes()).hexdigest()
        if digest != es.sha256.lower():
            raise ValueError(
                f"eval set {es.label!r}: {es.path} has sha256 {digest}, but the recipe pins "
                f"{es.sha256}; update the pin if the eval set changed on purpose"
            )
    data = load_rows(es.path, es.format or infer_format(es.path), es.split)
    return _Table(
        where=data.where,
        columns=data.columns,
        length=data.length,
        values=data.values,
        line_of=data.line_of,
    )


def _item_texts(value: Any) -> list[str] | None:
    """The texts of one field value (str, or list of str); None if the value is not text."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _eval_items(es: EvalSet) -> tuple[list[str], list[str], list[str]]:
    """(texts, item label per text, item label per item) of one eval set."""
    table = _load_hf_dataset(es) if es.hf is not None else _load_eval_file(es)
    wanted = [*es.fields, *([es.id_field] if es.id_field is not None else [])]
    missing = [f for f in wanted if f not in table.columns]
    if missing:
        raise RecordError(
            table.where,
            f"eval set {es.label!r} names field(s) {missing}; the data has {list(table.columns)}",
            field=missing[0],
        )
    columns = {f: table.values(f) for f in wanted}
    texts: list[str] = []
    owners: list[str] = []
    items: list[str] = []
    for i in range(table.length):
        line = table.line_of(i)
        row = None if line is not None else i
        item = str(i)
        if es.id_field is not None:
            ident = columns[es.id_field][i]
            if ident is MISSING or ident is None:
                raise RecordError(
                    table.where, "the id field is missing", line=line, row=row, field=es.id_field
                )
            item = str(ident)
        items.append(item)
        for f in es.fields:
            value = columns[f][i]
            if value is MISSING:
                raise RecordError(table.where, "is missing", line=line, row=row, field=f)
            got = _item_texts(value)
            if got is None:
                raise RecordError(
                    table.where,
                    f"expected a string or a list of strings, got {type(value).__name__}",
                    line=line,
                    row=row,
                    field=f,
                )
            texts.extend(got)
            owners.extend([item] * len(got))
    return texts, owners, items


@dataclass(frozen=True)
class EvalIndex:
    """Every indexed n-gram of the eval sets, by window size, as sorted unique hashes."""

    keys: dict[int, np.ndarray]  # size -> sorted unique uint64 hashes
    text: dict[int, np.ndarray]  # size -> index (into texts) of the first text with it
    start: dict[int, np.ndarray]  # size -> word offset of the n-gram in that text
    texts: list[str]
    set_of: list[str]  # eval set label per text
    item_of: list[str]  # item label per text
    stats: dict[str, dict[str, int]]
    #: The tokens of every eval text (a list Series, kept in Arrow memory).
    tokens: pl.Series = field(repr=False)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Window sizes a row must be checked at."""
        return tuple(sorted(self.keys))

    def words(self, texts: np.ndarray) -> dict[int, list[str]]:
        """The tokens of the eval texts numbered `texts`, fetched in one call."""
        wanted = np.unique(texts)
        return dict(zip(wanted.tolist(), self.tokens.gather(wanted).to_list(), strict=True))


def local_token_hashes(tokens: pl.Series) -> TokenHashes:
    """Token hashes valid within this process (polars' hash, fixed seeds): the eval index is
    built in the process that matches against it, and every hit is confirmed word for word,
    so neither stability across versions nor freedom from collisions is needed."""
    lengths = tokens.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = tokens.explode().drop_nulls()
    return TokenHashes(flat.hash(seed=13).to_numpy(), lengths)


def build_eval_index(sets: Sequence[EvalSet], *, ngram: int, min_words: int) -> EvalIndex:
    """Load every eval set and index its n-grams (whole texts of min_words..ngram-1 words)."""
    texts: list[str] = []
    set_of: list[str] = []
    item_of: list[str] = []
    stats: dict[str, dict[str, int]] = {}
    for es in sets:
        got, owners, items = _eval_items(es)
        texts.extend(got)
        set_of.extend([es.label] * len(got))
        item_of.extend(owners)
        stats[es.label] = {"items": len(items), "texts": len(got)}
    words = text_tokens(pl.Series(texts, dtype=pl.String))
    tokens = local_token_hashes(words)
    windows = ngram_windows(tokens, [ngram], whole_texts_from=min_words)
    labels = np.array(set_of, dtype=object)
    short = (tokens.lengths < min_words) & (tokens.lengths > 0)
    for label in stats:
        mine = labels == label if len(labels) else np.zeros(0, dtype=bool)
        stats[label]["texts_too_short"] = int((short & mine).sum())
        stats[label]["ngrams"] = int(mine[windows.text].sum()) if len(windows.text) else 0
    keys, first_text, first_start = {}, {}, {}
    for size in np.unique(windows.size).tolist():
        sel = np.flatnonzero(windows.size == size)
        unique, first = np.unique(windows.hashes[sel], return_index=True)
        keys[size] = unique
        first_text[size] = windows.text[sel][first]
        first_start[size] = windows.start[sel][first]
    return EvalIndex(keys, first_text, first_start, texts, set_of, item_of, stats, words)


def _stamp(es: EvalSet) -> tuple[str, int, int] | None:
    """What identifies the current contents of a file eval set (path, mtime, size)."""
    if es.path is None or not Path(es.path).exists():
        return None  # a missing file fails in the loader, with its name
    st = Path(es.path).stat()
    return (str(Path(es.path).resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _cached_index(
    sets: tuple[EvalSet, ...],
    ngram: int,
    min_words: int,
    stamps: tuple[tuple[str, int, int] | None, ...],
) -> EvalIndex:
    return build_eval_index(sets, ngram=ngram, min_words=min_words)


def eval_index(cfg: DecontamConfig) -> EvalIndex:
    """The config's eval index, built once per process (rebuilt if an eval file changes)."""
    stamps = tuple(_stamp(es) for es in cfg.eval_sets)
    return _cached_index(cfg.eval_sets, cfg.ngram, cfg.min_words, stamps)


# --------------------------------------------------------------------------------------------
# Matching rows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    """A row's first confirmed overlap with an eval item."""

    eval_set: str
    item: str
    field: str
    ngram: str


def _window_hits(texts: pl.Series, index: EvalIndex) -> tuple[pl.Series, np.ndarray]:
    """The texts' tokens and (window start, size, key position) of every window whose hash is
    an indexed key, sorted by flat start then size; hashes are looked up in a hash set."""
    tokens = text_tokens(texts)
    hashes = local_token_hashes(tokens)
    layout = TokenWindows.of(hashes.values, hashes.lengths)
    found = []
    for size in index.sizes:
        keys = index.keys[size]
        starts = layout.starts(size)
        window = layout.hashes(starts, size)
        hit = pl.Series(window).is_in(pl.Series(keys).implode()).to_numpy()
        at, window = starts[hit], window[hit]
        found.append(np.stack([at, np.full(len(at), size), np.searchsorted(keys, window)], 1))
    hits = np.concatenate(found) if found else np.zeros((0, 3), dtype=np.int64)
    hits = hits[np.lexsort((hits[:, 1], hits[:, 0]))]
    at = hits[:, 0]
    return tokens, np.column_stack([layout.text_of[at], layout.positions(at), hits])


def find_hits(texts: pl.Series, index: EvalIndex) -> list[tuple[int, int, str]]:
    """Confirmed matches as (text, eval text, shared words), in text then position order.

    A window counts once its words equal the indexed n-gram's, word for word (a 64-bit hash
    match alone could be a collision).
    """
    if not index.sizes or texts.len() == 0:
        return []
    tokens, hits = _window_hits(texts, index)
    if not len(hits):
        return []
    sources = np.zeros(len(hits), dtype=np.int64)  # the eval text and offset of each key
    offsets = np.zeros(len(hits), dtype=np.int64)
    for size in index.sizes:
        mine = hits[:, 3] == size
        sources[mine] = index.text[size][hits[mine, 4]]
        offsets[mine] = index.start[size][hits[mine, 4]]
    rows = np.unique(hits[:, 0])
    row_words = dict(zip(rows.tolist(), tokens.gather(rows).to_list(), strict=True))
    eval_words = index.words(sources)
    found: list[tuple[int, int, str]] = []
    for (text, start, _, size, _), source, offset in zip(
        hits.tolist(), sources.tolist(), offsets.tolist(), strict=True
    ):
        shared = row_words[text][start : start + size]
        if shared == eval_words[source][offset : offset + size]:
            found.append((text, source, " ".join(shared)))
    return found


#: Rows matched per piece of a batch; pieces run side by side (`gristmill.threads`).
CHUNK_ROWS = 5_000


def first_hits(frame: pl.DataFrame, fields: Sequence[str], index: EvalIndex) -> list[Hit | None]:
    """Each row's first hit over `fields` (field order, then position), or None. A row's
    hits depend on its texts only, so pieces of CHUNK_ROWS rows are matched apart."""
    texts = frame.select(pl.concat_list([field_expr(f) for f in fields]).alias("t"))
    flat = texts.get_column("t").explode()
    hits: list[Hit | None] = [None] * frame.height
    n_fields = len(fields)
    step = CHUNK_ROWS * n_fields

    def piece(lo: int) -> list[tuple[int, int, str]]:
        return [(lo + t, s, g) for t, s, g in find_hits(flat.slice(lo, step), index)]

    found = thread_map(piece, range(0, max(flat.len(), 1), step))
    for text, source, ngram in (hit for part in found for hit in part):
        row = text // n_fields
        if hits[row] is None:
            hits[row] = Hit(
                eval_set=index.set_of[source],
                item=index.item_of[source],
                field=fields[text % n_fields],
                ngram=ngram,
            )
    return hits


@dataclass(frozen=True, kw_only=True)
class DecontamStats(ExtraStats):
    """Rows checked and caught (summed over parts), hits per eval set, the index's sizes."""

    rows: int = summed()
    contaminated: int = summed()
    by_eval_set: dict[str, int] = counts()
    #: Items, texts and n-grams per eval set: the same index in every part.
    index: dict[str, dict[str, int]] | None = first()


class Decontam(Map):
    """Drops rows sharing a 13-gram (by default) with named eval sets, naming the eval item hit."""

    name: ClassVar[str] = "decontam"
    version: ClassVar[str] = "1"
    kind: ClassVar[str] = "filter"
    citation: ClassVar[str | None] = (
        "Brown et al., 2020. Language Models are Few-Shot Learners (13-gram overlap "
        "decontamination). arXiv:2005.14165"
    )
    Config: ClassVar[type[StageConfig]] = DecontamConfig
    Stats: ClassVar[type[ExtraStats] | None] = DecontamStats
    config: DecontamConfig

    def requires(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(field_source_column(f) for f in self.config.fields))

    def produces(self) -> tuple[str, ...]:
        return CONTAM_COLUMNS

    def process(self, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        """Set `drop_reason = contaminated` and the `contam_*` columns on rows with a hit."""
        index = eval_index(self.config)
        hits = first_hits(batch, self.config.fields, index)
        columns = {
            "contam_eval": [h.eval_set if h else None for h in hits],
            "contam_item": [h.item if h else None for h in hits],
            "contam_field": [h.field if h else None for h in hits],
            "contam_ngram": [h.ngram if h else None for h in hits],
        }
        reason = pl.Series(
            DROP_REASON, ["contaminated" if h else None for h in hits], dtype=pl.String
        )
        if DROP_REASON in batch.columns:  # keep a reason an earlier step already gave
            reason = batch.get_column(DROP_REASON).cast(pl.String).fill_null(reason)
        stats = DecontamStats(
            rows=batch.height,
            contaminated=sum(h is not None for h in hits),
            by_eval_set=dict(Counter(h.eval_set for h in hits if h is not None)),
            index=index.stats,
        )
        ctx.extra_stats.update(stats.to_dict())
        return batch.with_columns(
            *(pl.Series(name, values, dtype=pl.String) for name, values in columns.items()),
            reason.alias(DROP_REASON),
        )
