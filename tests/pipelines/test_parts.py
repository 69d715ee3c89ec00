"""Walking parts one at a time gives what a whole relaxed read gives; rows cut into parts."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from gristmill.frames import cut_into_parts
from gristmill.pipelines.checkpoint import read_parts
from gristmill.pipelines.parts import common_schema, read_part


def parts(tmp_path: Path) -> list[Path]:
    """Parts with different schemas: a Null-typed column, an int widened to float, a column
    only some parts have, and an empty part with a column of its own."""
    frames = [
        pl.DataFrame({"a": [1, 2], "b": [None, None], "c": [1, 2]}),
        pl.DataFrame({"a": [3], "b": ["x"], "c": [1.5]}),
        pl.DataFrame(schema={"a": pl.Int64, "z": pl.String}),
        pl.DataFrame({"d": [True, False], "a": [4, 5]}),
    ]
    paths = []
    for k, frame in enumerate(frames):
        paths.append(tmp_path / f"part-{k:05d}.parquet")
        frame.write_parquet(paths[-1])
    return paths


def test_parts_read_one_by_one_equal_the_relaxed_whole(tmp_path: Path) -> None:
    paths = parts(tmp_path)
    whole = read_parts(paths)
    schema = common_schema(paths)
    assert schema == whole.schema
    assert list(schema) == ["a", "b", "c", "d"]  # the empty part's `z` is left out, as there
    one_by_one = pl.concat([read_part(p, schema) for p in paths])
    assert_frame_equal(one_by_one, whole)
    picked = read_part(paths[3], schema, ["c", "a"], index="row", offset=3)
    assert picked.columns == ["row", "c", "a"]
    assert picked.rows() == [(3, None, 4), (4, None, 5)]
    assert read_part(paths[0], schema, [], index="row").get_column("row").to_list() == [0, 1]


def test_all_empty_parts_keep_their_columns(tmp_path: Path) -> None:
    path = tmp_path / "part-00000.parquet"
    pl.DataFrame(schema={"a": pl.Int64, "b": pl.String}).write_parquet(path)
    assert common_schema([path]) == read_parts([path]).schema
    assert common_schema([]) == pl.Schema()


@pytest.mark.parametrize("sizes", [[5, 0, 7, 1, 10], [0, 0], [4, 4, 4], [23]])
def test_cut_into_parts(sizes: list[int]) -> None:
    start = 0
    frames = []
    for size in sizes:
        frames.append(pl.DataFrame({"x": list(range(start, start + size))}, schema={"x": pl.Int64}))
        start += size
    out = list(cut_into_parts(frames, 4))
    total = sum(sizes)
    expected = [min(4, total - i) for i in range(0, total, 4)] or [0]
    assert [f.height for f in out] == expected
    assert pl.concat(out).get_column("x").to_list() == list(range(total))
    assert all(f.columns == ["x"] for f in out)
    assert list(cut_into_parts([], 4)) == []
