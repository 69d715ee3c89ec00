"""MinHash LSH as joins: band keys, candidate pairs, and the greedy earliest-kept pass.

The result is the one datasketch's `MinHashLSH` gives when rows are queried and inserted in
order (`insert` only the rows kept): a row is a near duplicate of the earliest KEPT row that
shares at least one band with it (all `rows` values of the band equal) and whose estimated
Jaccard (share of equal MinHash values) reaches the threshold. Here it is computed without
an index:

1. rows with identical signatures collapse onto their earliest one (the representative),
   which decides for all of them: a copy of a kept representative is its duplicate, a copy
   of a dropped one shares its twin (so exact copies cost no pairs);
2. every (row, band) of a representative gets a 64-bit key; a self-join on the keys gives
   the candidate pairs, which are then checked exactly (some band really equal; the
   estimated Jaccard at or above the threshold);
3. the greedy pass walks the checked pairs by their later row, in row order.

A bucket of k representatives would yield k(k-1)/2 pairs: cheap for the near-copy clusters
of real data (a handful of rows), quadratic for a cluster of thousands of distinct near
copies. Buckets above PAIR_LIMIT members are therefore not paired: as the walk reaches one
of their rows, it compares the row with the bucket's kept rows only (datasketch's way),
which costs (members x kept members), small when the bucket is one big near-copy cluster.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

#: Pairs compared per numpy pass (bounds memory to PAIR_CHUNK * num_perm bytes twice).
PAIR_CHUNK = 1 << 15


@dataclass(frozen=True)
class Banding:
    """LSH bands: `bands` bands of `rows` consecutive MinHash values each."""

    bands: int
    rows: int


@functools.lru_cache(maxsize=64)
def banding(threshold: float, num_perm: int) -> Banding:
    """datasketch's choice of bands for a threshold (false positives and negatives weighed
    equally); its errors (too few bands) are raised as they are. Cached: datasketch finds
    it by numerical integration (about 30 ms), and every condensed part asks."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return Banding(lsh.b, lsh.r)


def _mix64(h: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: spreads every input bit over the 64-bit output."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def fold_columns(values: np.ndarray, salt: int = 0) -> np.ndarray:
    """A 64-bit key per row of a 2-d uint32 array; equal rows get equal keys."""
    key = np.full(len(values), _mix64(np.array([salt], dtype=np.uint64))[0], dtype=np.uint64)
    for column in values.T:
        key = _mix64(key ^ column.astype(np.uint64))
    return key


def band_keys(signatures: np.ndarray, band: Banding) -> np.ndarray:
    """(rows, bands) uint64: a key per band of every signature, salted by the band number,
    so equal keys mean (up to 64-bit collisions, checked later) the same band, equal."""
    keys = np.empty((len(signatures), band.bands), dtype=np.uint64)
    for b in range(band.bands):
        keys[:, b] = fold_columns(signatures[:, b * band.rows : (b + 1) * band.rows], salt=b)
    return keys


#: Signatures as an array, or a function from rows to their signatures (rows of an array).
SignatureSource = np.ndarray | Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ChunkedSignatures:
    """Signatures held as consecutive arrays (one per condensed part, say), or as `.npy`
    files of them, read by row without ever being put together: a file is mapped only while
    its rows are copied out, so only the rows asked for take memory."""

    chunks: tuple[np.ndarray | Path, ...]  # (rows, num_perm) uint32 each, or its .npy file
    starts: np.ndarray  # int64 first row of each chunk, then the total
    num_perm: int

    @classmethod
    def of(cls, chunks: Sequence[np.ndarray | Path], num_perm: int) -> ChunkedSignatures:
        """The rows of `chunks`, in order."""
        sizes = [len(c) if isinstance(c, np.ndarray) else _npy_rows(c) for c in chunks]
        starts = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64))).astype(np.int64)
        return cls(tuple(chunks), starts, num_perm)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """The signatures of `rows` (any order), as one (len, num_perm) array."""
        out = np.empty((len(rows), self.num_perm), dtype=np.uint32)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for k in np.unique(which).tolist():
            at = np.flatnonzero(which == k)
            chunk = self.chunks[k]
            values = chunk if isinstance(chunk, np.ndarray) else np.load(chunk, mmap_mode="r")
            out[at] = values[rows[at] - self.starts[k]]
            del values  # a mapped file is unmapped here
        return out


def _npy_rows(path: Path) -> int:
    """Rows of the array in a .npy file (mapped, not read: only its header is)."""
    return int(np.load(path, mmap_mode="r").shape[0])


def signature_reader(signatures: SignatureSource) -> Callable[[np.ndarray], np.ndarray]:
    """rows -> their (len, num_perm) signatures, from an array or such a function."""
    return signatures.__getitem__ if isinstance(signatures, np.ndarray) else signatures


def representatives(signatures: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each of `rows` (ascending), the earliest of `rows` with an identical signature."""
    return representatives_by(fold_columns(signatures[rows]), rows, signatures)


def representatives_by(
    keys: np.ndarray, rows: np.ndarray, signatures: SignatureSource
) -> np.ndarray:
    """`representatives`, given each row's `fold_columns` key: only the rows whose key an
    earlier row shares are read back, to confirm the signatures are really equal."""
    if not len(rows):
        return rows.copy()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    rep = rows[first[inverse.ravel()]]
    read = signature_reader(signatures)
    same = np.ones(len(rows), dtype=bool)
    moved = np.flatnonzero(rep != rows)
    for lo in range(0, len(moved), PAIR_CHUNK):
        part = moved[lo : lo + PAIR_CHUNK]
        same[part] = (read(rows[part]) == read(rep[part])).all(axis=1)
    return np.where(same, rep, rows)  # a key collision: the row stands for itself


#: Buckets with more members than this are not paired up (k members make k(k-1)/2 pairs):
#: their rows look up the bucket's kept rows as the walk reaches them, as datasketch does.
PAIR_LIMIT = 64


def split_buckets(table: pl.DataFrame, limit: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """From (row, key) rows: the (row, later) pairs of each bucket of 2..limit members (each
    pair once), and the (row, key) members of the buckets above `limit`."""
    sized = table.with_columns(pl.len().over("key").alias("size"))
    small = sized.filter((pl.col("size") > 1) & (pl.col("size") <= limit)).select("row", "key")
    large = sized.filter(pl.col("size") > limit).select("row", "key")
    pairs = (
        small.join(small, on="key", suffix="_later")
        .filter(pl.col("row") < pl.col("row_later"))
        .select("row", later=pl.col("row_later"))
        .unique()
    )
    return pairs, large


@dataclass(frozen=True)
class Buckets:
    """Rows that share band keys: pairs from small buckets, members of large ones."""

    earlier: np.ndarray  # int64
    later: np.ndarray  # int64
    large_rows: np.ndarray  # int64
    large_keys: np.ndarray  # uint64, the bucket of each large-bucket member


def bucket_candidates(rows: np.ndarray, keys: np.ndarray, limit: int | None = None) -> Buckets:
    """The candidates of `rows` (with their (rows, bands) band keys), by a self-join per
    band (keys are salted by band, so no bucket spans two: one band's table at a time is
    in memory); `limit` defaults to PAIR_LIMIT."""
    limit = PAIR_LIMIT if limit is None else limit
    found, large = [], []
    for band in range(keys.shape[1]):
        table = pl.DataFrame({"row": rows.astype(np.int64), "key": keys[:, band]})
        band_pairs, band_large = split_buckets(table, limit)
        found.append(band_pairs)
        large.append(band_large)
    pairs = pl.concat(found).unique() if found else pl.DataFrame(schema=_PAIRS)
    members = pl.concat(large) if large else pl.DataFrame(schema=_MEMBERS)
    return Buckets(
        pairs.get_column("row").to_numpy(),
        pairs.get_column("later").to_numpy(),
        members.get_column("row").to_numpy(),
        members.get_column("key").to_numpy(),
    )


_PAIRS = {"row": pl.Int64, "later": pl.Int64}
_MEMBERS = {"row": pl.Int64, "key": pl.UInt64}


@dataclass(frozen=True)
class CheckedPairs:
    """Candidate pairs that really share a band, with their count of equal MinHash values."""

    earlier: np.ndarray  # int64
    later: np.ndarray  # int64
    equal: np.ndarray  # int64


def check_pairs(
    signatures: SignatureSource, earlier: np.ndarray, later: np.ndarray, band: Banding
) -> CheckedPairs:
    """Keep the pairs with at least one band exactly equal; count their equal values."""
    read = signature_reader(signatures)
    width = band.bands * band.rows
    equal = np.zeros(len(earlier), dtype=np.int64)
    shares = np.zeros(len(earlier), dtype=bool)
    for lo in range(0, len(earlier), PAIR_CHUNK):
        part = slice(lo, lo + PAIR_CHUNK)
        same = read(earlier[part]) == read(later[part])
        equal[part] = same.sum(axis=1)
        shares[part] = same[:, :width].reshape(-1, band.bands, band.rows).all(axis=2).any(axis=1)
    return CheckedPairs(earlier[shares], later[shares], equal[shares])


@dataclass(frozen=True)
class LargeBuckets:
    """Members of the buckets too large to pair, and how to read their signatures."""

    rows: np.ndarray  # int64
    keys: np.ndarray  # uint64 bucket of each member
    signature_of: Callable[[np.ndarray], np.ndarray]  # rows -> (len, num_perm) uint32
    band: Banding


@dataclass(frozen=True)
class Walk:
    """The greedy pass: twins (-1 kept), equal values with the twin, large-bucket checks."""

    duplicate_of: np.ndarray  # int64
    equal: np.ndarray  # int64
    checked: int  # kept rows of large buckets compared that really share a band
    below: int  # of them, fewer equal values than needed


def _partners(
    pairs: CheckedPairs, need: float
) -> tuple[dict[int, tuple[int, int]], list[int], list[int]]:
    """Passing pairs grouped by their later row: row -> (from, to) into sources and counts,
    sources ascending within a row."""
    ok = pairs.equal >= need
    earlier, later, equal = pairs.earlier[ok], pairs.later[ok], pairs.equal[ok]
    order = np.lexsort((earlier, later))
    earlier, later, equal = earlier[order], later[order], equal[order]
    targets, starts = np.unique(later, return_index=True)
    ends = np.append(starts[1:], len(later))[: len(starts)]
    spans = zip(targets.tolist(), starts.tolist(), ends.tolist(), strict=True)
    return {t: (a, b) for t, a, b in spans}, earlier.tolist(), equal.tolist()


def _large_matches(
    large: LargeBuckets, row: int, kept: list[int], need: float
) -> tuple[int, int, int, int]:
    """(earliest passing kept row or -1, its equal values, rows really banded, of them
    below the threshold) among `kept`, the kept rows of `row`'s large buckets."""
    found = np.array(kept, dtype=np.int64)
    same = large.signature_of(found) == large.signature_of(np.array([row], dtype=np.int64))
    band = large.band
    width = band.bands * band.rows
    shares = same[:, :width].reshape(-1, band.bands, band.rows).all(axis=2).any(axis=1)
    equal = same.sum(axis=1)
    hits = np.flatnonzero(shares & (equal >= need))
    below = int((shares & (equal < need)).sum())
    if not len(hits):
        return -1, 0, int(shares.sum()), below
    return int(found[hits[0]]), int(equal[hits[0]]), int(shares.sum()), below


def greedy_twins(
    n_rows: int, pairs: CheckedPairs, need: float, large: LargeBuckets | None = None
) -> Walk:
    """Walk rows in order; a row's twin is its earliest KEPT partner with at least `need`
    equal values: a checked pair's earlier row, or a kept member of a large bucket it is in
    (kept rows join their large buckets, dropped rows do not)."""
    partners, sources, counts = _partners(pairs, need)
    buckets_of: dict[int, list[int]] = {}
    if large is not None:
        for r, key in zip(large.rows.tolist(), large.keys.tolist(), strict=True):
            buckets_of.setdefault(r, []).append(key)
    twin = np.full(n_rows, -1, dtype=np.int64)
    shared = np.zeros(n_rows, dtype=np.int64)
    dropped = bytearray(n_rows)
    kept_in: dict[int, list[int]] = {}
    checked = below = 0
    for row in sorted(partners.keys() | buckets_of.keys()):
        best, best_equal = -1, 0
        lo, hi = partners.get(row, (0, 0))
        for k in range(lo, hi):
            if not dropped[sources[k]]:
                best, best_equal = sources[k], counts[k]
                break
        mine = buckets_of.get(row, [])
        kept = sorted({r for key in mine for r in kept_in.get(key, ())})
        if kept and large is not None:
            found, equal, banded, failed = _large_matches(large, row, kept, need)
            checked, below = checked + banded, below + failed
            if found >= 0 and (best < 0 or found < best):
                best, best_equal = found, equal
        if best >= 0:
            dropped[row] = 1
            twin[row], shared[row] = best, best_equal
        else:
            for key in mine:
                kept_in.setdefault(key, []).append(row)
    return Walk(twin, shared, checked, below)


@dataclass(frozen=True)
class LshResult:
    """Twins of every row (-1: kept), equal MinHash values with the twin, pair counts."""

    duplicate_of: np.ndarray  # int64
    equal: np.ndarray  # int64, 0 for kept rows
    candidates: int  # pairs sharing a band, plus one per copy of a representative
    below_threshold: int  # of them, fewer equal values than needed
    banding: Banding


@dataclass(frozen=True)
class Minhashes:
    """What the LSH pass needs of n rows: which have no shingles, a key of each whole
    signature and of each band, and the signatures themselves, of which it reads back only
    those of rows that share a key (so they may live elsewhere than in one array)."""

    empty: np.ndarray  # bool
    whole: np.ndarray  # uint64 `fold_columns` of each signature
    bands: np.ndarray  # (rows, bands) uint64 `band_keys`
    signatures: SignatureSource
    num_perm: int

    @classmethod
    def of(cls, signatures: np.ndarray, empty: np.ndarray, band: Banding) -> Minhashes:
        """The keys of an array of signatures."""
        whole, bands = signature_keys(signatures, band)
        return cls(empty, whole, bands, signatures, signatures.shape[1])


def signature_keys(signatures: np.ndarray, band: Banding) -> tuple[np.ndarray, np.ndarray]:
    """The whole-signature key and the band keys of every row of `signatures`."""
    return fold_columns(signatures), band_keys(signatures, band)


def lsh_duplicates(signatures: np.ndarray, empty: np.ndarray, *, threshold: float) -> LshResult:
    """The greedy MinHash-LSH pass over `signatures` (rows flagged `empty` take no part)."""
    band = banding(threshold, signatures.shape[1])
    return lsh_of(Minhashes.of(signatures, empty, band), threshold=threshold)


def lsh_of(hashes: Minhashes, *, threshold: float) -> LshResult:
    """`lsh_duplicates` of rows given by their keys (`hashes.bands` must be the bands of
    `banding(threshold, num_perm)`)."""
    n, num_perm = len(hashes.empty), hashes.num_perm
    band = banding(threshold, num_perm)
    if hashes.bands.shape[1:] != (band.bands,):
        raise ValueError(f"band keys have shape {hashes.bands.shape}; {band.bands} bands needed")
    need = threshold * num_perm - 1e-9  # equal values needed, without float surprises
    live = np.flatnonzero(~hashes.empty)
    rep = representatives_by(hashes.whole[live], live, hashes.signatures)
    heads = live[rep == live]
    buckets = bucket_candidates(heads, hashes.bands[heads])
    pairs = check_pairs(hashes.signatures, buckets.earlier, buckets.later, band)
    read = signature_reader(hashes.signatures)
    large = LargeBuckets(buckets.large_rows, buckets.large_keys, read, band)
    walk = greedy_twins(n, pairs, need, large)
    return finish(walk, pairs, live, rep, need=need, num_perm=num_perm, band=band)


def finish(
    walk: Walk,
    pairs: CheckedPairs,
    live: np.ndarray,
    rep: np.ndarray,
    *,
    need: float,
    num_perm: int,
    band: Banding,
) -> LshResult:
    """Copies of a representative follow it (its duplicates if it is kept, else sharing its
    twin); the counts of candidates checked."""
    twin, equal = walk.duplicate_of, walk.equal
    copies, of = live[rep != live], rep[rep != live]
    kept = twin[of] < 0
    twin[copies] = np.where(kept, of, twin[of])
    equal[copies] = np.where(kept, num_perm, equal[of])
    candidates = len(pairs.later) + walk.checked + len(copies)
    below = int((pairs.equal < need).sum()) + walk.below
    return LshResult(twin, equal, candidates, below, band)
