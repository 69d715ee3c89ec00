"""Exact and MinHash dedup as Dask dataframe jobs, for the Dask runner's cluster.

Both give what the local stages give, row for row: the input's field texts are scattered to
the workers in partitions of consecutive rows (`row` is the global row index, so "earliest"
still means the smallest row), the per-row work runs in the partitions, and the choices
need only a shuffle:

- exact: every row's normalised key gets a 64-bit hash; a shuffle by that hash puts equal
  keys in one partition, where each row learns the smallest row with its exact keys;
- MinHash: signatures and band keys are computed in the partitions; a shuffle by signature
  hash finds each signature's earliest row (its representative), a shuffle by band key
  pairs up the representatives that share a band (a bucket above `lsh.PAIR_LIMIT` members
  sends back its members instead), and the pairs are checked against both signatures after
  two joins on `row`. Only the checked pairs, the large buckets' members (with their
  signatures) and the representative of each row come back; the greedy earliest-kept pass
  (`filters.lsh.greedy_twins`) runs here, as in the local path, on those.

The per-row functions (`keys`, `signatures`) are passed in, so this module knows nothing of
the stages' configs; they must be picklable (module-level functions or partials of them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from gristmill.filters import lsh
from gristmill.filters.lsh import (
    Banding,
    CheckedPairs,
    LargeBuckets,
    LshResult,
    band_keys,
    banding,
    check_pairs,
    finish,
    fold_columns,
    greedy_twins,
    split_buckets,
)

#: Rows per partition when a stage does not say.
PARTITION_ROWS = 50_000

#: texts (columns t0..tk) -> key columns of the same height
KeysFn = Callable[[pl.DataFrame], pl.DataFrame]
#: texts (columns t0..tk) -> (uint32 signatures, mask of rows without shingles)
SignaturesFn = Callable[[pl.DataFrame], tuple[np.ndarray, np.ndarray]]


def _with_rows(texts: pl.DataFrame) -> pl.DataFrame:
    return texts.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))


def _empty_part(texts: pl.DataFrame) -> Any:
    """A partition with no rows, as `scatter_texts` makes them (for Dask's `meta`)."""
    return _with_rows(texts.head(0)).to_pandas().set_index("row")


def scatter_texts(client: Any, texts: pl.DataFrame, partition_rows: int) -> Any:
    """`texts` as a Dask dataframe indexed by `row` (0..n-1), in partitions of consecutive
    rows held by the workers (divisions known, so joins on `row` need no sort)."""
    import dask.dataframe as dd

    frame = _with_rows(texts)
    parts = [
        frame.slice(lo, partition_rows).to_pandas().set_index("row")
        for lo in range(0, max(frame.height, 1), partition_rows)
    ]
    divisions = [int(p.index[0]) for p in parts] + [int(parts[-1].index[-1])]
    futures = client.scatter(parts)
    return dd.from_delayed(futures, meta=parts[0].iloc[:0], divisions=tuple(divisions))


# --------------------------------------------------------------------------------------------
# exact
# --------------------------------------------------------------------------------------------


def _hashed_keys(part: Any, keys: KeysFn) -> Any:
    """A partition's rows with their keys (k0..) and a 64-bit hash of them."""
    frame = pl.from_pandas(part.reset_index())
    keyed = keys(frame.drop("row"))
    keyed = keyed.rename({c: f"k{i}" for i, c in enumerate(keyed.columns)})
    return pl.concat(
        [frame.select("row"), keyed, keyed.select(pl.struct(pl.all()).hash(seed=7).alias("hash"))],
        how="horizontal",
    ).to_pandas()


def _first_with_keys(part: Any) -> Any:
    """Each row of a partition with the smallest row of equal keys (nulls equal nulls)."""
    frame = pl.from_pandas(part)
    keys = [c for c in frame.columns if c not in ("row", "hash")]
    if not frame.height:
        return frame.select("row", pl.col("row").alias("first")).to_pandas()
    return frame.select("row", pl.col("row").min().over(keys).alias("first")).to_pandas()


def first_rows_on_dask(
    client: Any, texts: pl.DataFrame, keys: KeysFn, *, partition_rows: int | None = None
) -> np.ndarray:
    """For every row of `texts`, the first row whose keys equal its own (itself if none)."""
    data = scatter_texts(client, texts, partition_rows or PARTITION_ROWS)
    sample = _hashed_keys(_empty_part(texts), keys)
    keyed = data.map_partitions(_hashed_keys, keys, meta=sample)
    firsts = keyed.shuffle(on="hash").map_partitions(
        _first_with_keys, meta={"row": "int64", "first": "int64"}
    )
    found = firsts.compute()
    first = np.arange(texts.height, dtype=np.int64)
    first[found["row"].to_numpy()] = found["first"].to_numpy()
    return first


# --------------------------------------------------------------------------------------------
# MinHash LSH
# --------------------------------------------------------------------------------------------


def _columns(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def _signature_part(part: Any, signatures: SignaturesFn, band: Banding, num_perm: int) -> Any:
    """A partition's signatures (s0..), band keys (b0..), signature hash and empty flag."""
    import pandas as pd

    sigs, empty = signatures(pl.from_pandas(part.reset_index(drop=True)))
    sigs = sigs.reshape(len(part), num_perm)
    columns: dict[str, Any] = {"empty": empty, "sighash": fold_columns(sigs)}
    columns.update(zip(_columns("s", num_perm), sigs.T, strict=True))
    columns.update(zip(_columns("b", band.bands), band_keys(sigs, band).T, strict=True))
    return pd.DataFrame(columns, index=part.index)


def _signature_meta(band: Banding, num_perm: int) -> dict[str, str]:
    meta = {"empty": "bool", "sighash": "uint64"}
    meta.update(dict.fromkeys(_columns("s", num_perm), "uint32"))
    meta.update(dict.fromkeys(_columns("b", band.bands), "uint64"))
    return meta


def _representative_part(part: Any, num_perm: int, bands: int) -> Any:
    """Each row's representative: the smallest row with its signature hash, if the signatures
    really are equal (else itself), as `filters.lsh.representatives` decides."""
    import pandas as pd

    part = part.sort_values("row")
    rows = part["row"].to_numpy()
    sigs = part[_columns("s", num_perm)].to_numpy()
    first = part.groupby("sighash")["row"].transform("min").to_numpy()
    position = np.searchsorted(rows, first)
    same = (sigs == sigs[position]).all(axis=1)
    out = {"row": rows, "rep": np.where(same, first, rows)}
    out.update({c: part[c].to_numpy() for c in _columns("b", bands)})
    return pd.DataFrame(out)


def _band_rows(part: Any, bands: int) -> Any:
    """(row, key) for every band of every representative in a partition."""
    import pandas as pd

    heads = part[part["rep"] == part["row"]]
    keys = heads[_columns("b", bands)].to_numpy()
    return pd.DataFrame({"row": np.repeat(heads["row"].to_numpy(), bands), "key": keys.ravel()})


def _pairs_in_buckets(part: Any, limit: int) -> Any:
    """(row, later, key): the pairs of a partition's small buckets (key 0) and the members
    of its large ones (later -1). A bucket is never split across partitions: the shuffle
    was by key."""
    pairs, large = split_buckets(pl.from_pandas(part), limit)
    return pl.concat(
        [
            pairs.with_columns(pl.lit(0, dtype=pl.UInt64).alias("key")),
            large.select("row", pl.lit(-1, dtype=pl.Int64).alias("later"), "key"),
        ]
    ).to_pandas()


def _checked_part(part: Any, band: Banding, num_perm: int) -> Any:
    """A partition of pairs joined to both signatures, reduced to the really-banded pairs
    and their counts of equal values."""
    import pandas as pd

    left = part[[f"{c}_l" for c in _columns("s", num_perm)]].to_numpy()
    right = part[[f"{c}_r" for c in _columns("s", num_perm)]].to_numpy()
    stacked = np.concatenate([left, right])
    n = len(part)
    checked = check_pairs(stacked, np.arange(n), np.arange(n, 2 * n), band)
    rows, later = part["row"].to_numpy(), part["later"].to_numpy()
    return pd.DataFrame(
        {"row": rows[checked.earlier], "later": later[checked.earlier], "equal": checked.equal}
    )


def lsh_on_dask(
    client: Any,
    texts: pl.DataFrame,
    signatures: SignaturesFn,
    *,
    threshold: float,
    num_perm: int,
    partition_rows: int | None = None,
) -> LshResult:
    """`filters.lsh.lsh_duplicates` of the texts' signatures, computed on the cluster."""
    band = banding(threshold, num_perm)
    need = threshold * num_perm - 1e-9
    data = scatter_texts(client, texts, partition_rows or PARTITION_ROWS)
    sig = data.map_partitions(
        _signature_part, signatures, band, num_perm, meta=_signature_meta(band, num_perm)
    )
    live = sig[~sig["empty"]].drop(columns=["empty"])
    rep_meta = {
        "row": "int64",
        "rep": "int64",
        **dict.fromkeys(_columns("b", band.bands), "uint64"),
    }
    reps = (
        live.reset_index()
        .shuffle(on="sighash")
        .map_partitions(_representative_part, num_perm, band.bands, meta=rep_meta)
    )
    reps = reps.persist()
    bands = reps.map_partitions(_band_rows, band.bands, meta={"row": "int64", "key": "uint64"})
    candidates = bands.shuffle(on="key").map_partitions(
        _pairs_in_buckets,
        lsh.PAIR_LIMIT,
        meta={"row": "int64", "later": "int64", "key": "uint64"},
    )
    candidates = candidates.persist()
    pairs = candidates[candidates["later"] >= 0][["row", "later"]].drop_duplicates()
    values = sig[_columns("s", num_perm)]
    joined = pairs.merge(
        values.rename(columns={c: f"{c}_l" for c in values.columns}),
        left_on="row",
        right_index=True,
    ).merge(
        values.rename(columns={c: f"{c}_r" for c in values.columns}),
        left_on="later",
        right_index=True,
    )
    checked = joined.map_partitions(
        _checked_part, band, num_perm, meta={"row": "int64", "later": "int64", "equal": "int64"}
    )
    large = candidates[candidates["later"] < 0][["row", "key"]]
    found, members, rep_table = client.compute([checked, large, reps[["row", "rep"]]], sync=True)
    pairs_found = CheckedPairs(
        found["row"].to_numpy(np.int64),
        found["later"].to_numpy(np.int64),
        found["equal"].to_numpy(np.int64),
    )
    large_rows = members["row"].to_numpy(np.int64)
    walk = greedy_twins(
        texts.height,
        pairs_found,
        need,
        LargeBuckets(
            large_rows,
            members["key"].to_numpy(np.uint64),
            _signature_lookup(client, values, np.unique(large_rows)),
            band,
        ),
    )
    live = rep_table["row"].to_numpy(np.int64)
    order = np.argsort(live)
    live, rep = live[order], rep_table["rep"].to_numpy(np.int64)[order]
    return finish(walk, pairs_found, live, rep, need=need, num_perm=num_perm, band=band)


def _rows_in(part: Any, rows: np.ndarray) -> Any:
    return part[part.index.isin(rows)]


def _signature_lookup(client: Any, values: Any, rows: np.ndarray) -> Callable[[np.ndarray], Any]:
    """rows -> their signatures, for the (few) members of large buckets, fetched once."""
    if not len(rows):
        return lambda wanted: np.zeros((len(wanted), len(values.columns)), dtype=np.uint32)
    table = client.compute(values.map_partitions(_rows_in, rows), sync=True).sort_index()
    index, sigs = table.index.to_numpy(np.int64), table.to_numpy(np.uint32)
    return lambda wanted: sigs[np.searchsorted(index, wanted)]
