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

A bucket of k distinct signatures yields k(k-1)/2 pairs: cheap for the near-copy clusters
of real data, quadratic for a cluster of thousands of distinct near copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

#: Pairs compared per numpy pass (bounds memory to PAIR_CHUNK * num_perm bytes twice).
PAIR_CHUNK = 1 << 15


@dataclass(frozen=True)
class Banding:
    """LSH bands: `bands` bands of `rows` consecutive MinHash values each."""

    bands: int
    rows: int


def banding(threshold: float, num_perm: int) -> Banding:
    """datasketch's choice of bands for a threshold (false positives and negatives weighed
    equally); its errors (too few bands) are raised as they are."""
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


def representatives(signatures: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each of `rows` (ascending), the earliest of `rows` with an identical signature."""
    if not len(rows):
        return rows.copy()
    _, first, inverse = np.unique(
        fold_columns(signatures[rows]), return_index=True, return_inverse=True
    )
    rep = rows[first[inverse.ravel()]]
    same = np.ones(len(rows), dtype=bool)
    for lo in range(0, len(rows), PAIR_CHUNK):
        part = slice(lo, lo + PAIR_CHUNK)
        same[part] = (signatures[rows[part]] == signatures[rep[part]]).all(axis=1)
    return np.where(same, rep, rows)  # a key collision: the row stands for itself


def bucket_pairs(rows: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(earlier, later) row pairs that share a band key, each pair once, by a self-join."""
    bands = keys.shape[1]
    table = pl.DataFrame(
        {"row": np.repeat(rows.astype(np.int64), bands), "key": keys.ravel()}
    ).filter(pl.len().over("key") > 1)
    pairs = (
        table.join(table, on="key", suffix="_later")
        .filter(pl.col("row") < pl.col("row_later"))
        .select("row", "row_later")
        .unique()
        .sort("row_later", "row")
    )
    return pairs.get_column("row").to_numpy(), pairs.get_column("row_later").to_numpy()


@dataclass(frozen=True)
class CheckedPairs:
    """Candidate pairs that really share a band, with their count of equal MinHash values."""

    earlier: np.ndarray  # int64
    later: np.ndarray  # int64
    equal: np.ndarray  # int64


def check_pairs(
    signatures: np.ndarray, earlier: np.ndarray, later: np.ndarray, band: Banding
) -> CheckedPairs:
    """Keep the pairs with at least one band exactly equal; count their equal values."""
    width = band.bands * band.rows
    equal = np.zeros(len(earlier), dtype=np.int64)
    shares = np.zeros(len(earlier), dtype=bool)
    for lo in range(0, len(earlier), PAIR_CHUNK):
        part = slice(lo, lo + PAIR_CHUNK)
        same = signatures[earlier[part]] == signatures[later[part]]
        equal[part] = same.sum(axis=1)
        shares[part] = same[:, :width].reshape(-1, band.bands, band.rows).all(axis=2).any(axis=1)
    return CheckedPairs(earlier[shares], later[shares], equal[shares])


def greedy_twins(n_rows: int, pairs: CheckedPairs, need: float) -> tuple[np.ndarray, np.ndarray]:
    """(duplicate_of, equal values with it): walk rows in order; a row's twin is its earliest
    KEPT partner with at least `need` equal values (-1 and 0 for kept rows)."""
    ok = pairs.equal >= need
    earlier, later, equal = pairs.earlier[ok], pairs.later[ok], pairs.equal[ok]
    order = np.lexsort((earlier, later))
    sources, targets, counts = (
        earlier[order].tolist(),
        later[order].tolist(),
        equal[order].tolist(),
    )
    twin = np.full(n_rows, -1, dtype=np.int64)
    shared = np.zeros(n_rows, dtype=np.int64)
    dropped = bytearray(n_rows)
    k = 0
    while k < len(targets):  # all partners of a row sit together, earliest first
        row = targets[k]
        while k < len(targets) and targets[k] == row:
            if not dropped[row] and not dropped[sources[k]]:
                dropped[row] = 1
                twin[row], shared[row] = sources[k], counts[k]
            k += 1
    return twin, shared


@dataclass(frozen=True)
class LshResult:
    """Twins of every row (-1: kept), equal MinHash values with the twin, pair counts."""

    duplicate_of: np.ndarray  # int64
    equal: np.ndarray  # int64, 0 for kept rows
    candidates: int  # pairs sharing a band, plus one per copy of a representative
    below_threshold: int  # of them, fewer equal values than needed
    banding: Banding


def lsh_duplicates(signatures: np.ndarray, empty: np.ndarray, *, threshold: float) -> LshResult:
    """The greedy MinHash-LSH pass over `signatures` (rows flagged `empty` take no part)."""
    n, num_perm = signatures.shape
    band = banding(threshold, num_perm)
    need = threshold * num_perm - 1e-9  # equal values needed, without float surprises
    live = np.flatnonzero(~empty)
    rep = representatives(signatures, live)
    heads = live[rep == live]
    earlier, later = bucket_pairs(heads, band_keys(signatures[heads], band))
    pairs = check_pairs(signatures, earlier, later, band)
    twin, equal = greedy_twins(n, pairs, need)
    copies, of = live[rep != live], rep[rep != live]
    kept = twin[of] < 0
    twin[copies] = np.where(kept, of, twin[of])
    equal[copies] = np.where(kept, num_perm, equal[of])
    below = int((pairs.equal < need).sum())
    return LshResult(twin, equal, len(pairs.later) + len(copies), below, band)
