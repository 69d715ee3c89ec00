"""ExtraStats: each field merges as it declares, derived values follow the merged fields, and
the JSON form reads back to the same stats."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from gristmill.pipelines.stats import (
    ExtraStats,
    by_key,
    counts,
    first,
    most,
    per_round,
    summed,
    union,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bucket(ExtraStats):
    """A nested stats class: two sums and a rate derived from them."""

    queries: int = summed()
    covered: int = summed()

    def derived(self) -> dict[str, Any]:
        return {"coverage": round(self.covered / self.queries, 4) if self.queries else 0.0}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Part(ExtraStats):
    """One field of every merge kind."""

    rows: int = summed()
    seconds: float = summed(0.0)
    rounds: int = most()
    reasons: dict[str, int] = counts()
    corrected: tuple[int, ...] = per_round()
    methods: tuple[str, ...] = union()
    index: dict[str, int] | None = first()
    buckets: dict[str, Bucket] = by_key(Bucket)

    def derived(self) -> dict[str, Any]:
        return {"seconds_per_row": round(self.seconds / self.rows, 3) if self.rows else 0.0}


A = Part(
    rows=3,
    seconds=1.5,
    rounds=2,
    reasons={"short": 1, "empty": 2},
    corrected=(2, 1),
    methods=("unshare",),
    index={"items": 20},
    buckets={"easy": Bucket(queries=2, covered=2), "hard": Bucket(queries=1, covered=0)},
)
B = Part(
    rows=5,
    seconds=0.5,
    rounds=4,
    reasons={"short": 3, "long": 1},
    corrected=(1, 0, 4),
    methods=("seccomp", "unshare"),
    index=None,
    buckets={"hard": Bucket(queries=3, covered=1)},
)


def test_each_field_merges_as_declared() -> None:
    merged = Part.merge([A, B])
    assert merged.rows == 8  # summed
    assert merged.seconds == pytest.approx(2.0)
    assert merged.rounds == 4  # most
    assert merged.reasons == {"short": 4, "empty": 2, "long": 1}  # counts, key by key
    assert merged.corrected == (3, 1, 4)  # per_round, round by round (A stopped after 2)
    assert merged.methods == ("seccomp", "unshare")  # union, sorted and distinct
    assert merged.index == {"items": 20}  # first part's that is not None
    assert merged.buckets == {  # by_key: name by name, with the nested class's merge
        "easy": Bucket(queries=2, covered=2),
        "hard": Bucket(queries=4, covered=1),
    }


def test_first_skips_parts_without_a_value() -> None:
    assert Part.merge([B, A]).index == {"items": 20}
    assert Part.merge([B, B]).index is None


def test_derived_values_are_recomputed_after_the_merge() -> None:
    merged = Part.merge([A, B]).to_dict()
    assert merged["seconds_per_row"] == 0.25  # 2.0 / 8, not a sum of the parts' 0.5 and 0.1
    assert merged["buckets"]["hard"]["coverage"] == 0.25  # 1 / 4, not 0.0 + 0.3333
    assert merged["buckets"]["easy"]["coverage"] == 1.0


def test_merging_the_json_form_gives_the_same_result() -> None:
    parts = [Part.from_dict(p.to_dict()) for p in (A, B)]
    assert Part.merge(parts).to_dict() == Part.merge([A, B]).to_dict()


def test_to_dict_is_json_shaped() -> None:
    out = A.to_dict()
    assert out == {
        "rows": 3,
        "seconds": 1.5,
        "rounds": 2,
        "reasons": {"short": 1, "empty": 2},
        "corrected": [2, 1],
        "methods": ["unshare"],
        "index": {"items": 20},
        "buckets": {
            "easy": {"queries": 2, "covered": 2, "coverage": 1.0},
            "hard": {"queries": 1, "covered": 0, "coverage": 0.0},
        },
        "seconds_per_row": 0.5,
    }


@pytest.mark.parametrize("stats", [A, B, Part(), Part.merge([A, B])])
def test_from_dict_reads_back_to_dict(stats: Part) -> None:
    assert Part.from_dict(stats.to_dict()) == stats


def test_from_dict_ignores_derived_and_unknown_keys_and_defaults_missing_ones() -> None:
    got = Part.from_dict({"rows": 2, "seconds_per_row": 9.0, "not_a_field": 1})
    assert got == Part(rows=2)


def test_merge_of_one_part_is_that_part() -> None:
    assert Part.merge([A]) == A


def test_a_field_without_a_merge_kind_is_an_error() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Undeclared(ExtraStats):
        rows: int = 0

    with pytest.raises(TypeError, match=r"Undeclared\.rows: declare how it merges"):
        Undeclared.merge([Undeclared(rows=1)])
