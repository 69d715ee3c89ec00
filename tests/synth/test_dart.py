"""DART and rejection sampling on a scripted engine: stop rules, Prop2Diff allocation, DPO
pairs, dedup, and resume between rounds (the real-engine run is in tests/e2e)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from scripted import ScriptedBase

from gristmill.engines.base import Completion, Sampling
from gristmill.pipelines.stage import StageContext
from gristmill.records import DROP_REASON, make_record, records_frame, validate_frame
from gristmill.synth.dart import Dart, DartConfig, prop2diff_target
from gristmill.synth.rejection import RejectionConfig, RejectionSample
from gristmill.synth.sampling import equation_key, load_state
from gristmill.verify import get_verifier

#: Probability that the scripted model answers each question correctly.
SKILL = {"q-easy": 1.0, "q-mid": 0.5, "q-hard": 0.15, "q-never": 0.0}
ANSWERS = {"q-easy": "4", "q-mid": "17", "q-hard": "391", "q-never": "1234"}


def _unit(*keys: object) -> float:
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


@dataclass(kw_only=True)
class ScriptedEngine(ScriptedBase):
    """Answers `q-*` questions right with probability SKILL[q], decided by the request seed, so
    results depend only on (question, seed) like a seeded real engine. Records every call."""

    model_id: str = "scripted/solver"
    truncate_wrong: bool = False

    def generate(
        self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling]
    ) -> list[list[Completion]]:
        params = self.record(prompts, sampling)
        out = []
        for prompt, s in zip(prompts, params, strict=True):
            q = next(k for k in SKILL if k in prompt)
            assert s.seed is not None
            cands = []
            for j in range(s.n):
                seed = s.seed + j
                right = _unit(q, seed) < SKILL[q]
                answer = ANSWERS[q] if right else str(int(ANSWERS[q]) + 1 + seed % 7)
                text = f"Work {seed % 1000}: 2 + 2 = 4. The answer is {answer}."
                finish = "length" if (self.truncate_wrong and not right and j % 2) else "stop"
                cands.append(Completion(text, finish, len(prompt.split()), 12))
            out.append(cands)
        return out


def queries(names: Sequence[str] = tuple(SKILL), **extra: Any) -> pl.DataFrame:
    rows = [
        make_record(
            [{"role": "user", "content": f"Question {q}: what is it?"}],
            source="scripted",
            reference=ANSWERS[q],
            level=i + 1,
            **{k: v[i] for k, v in extra.items()},
        )
        for i, q in enumerate(names)
    ]
    return records_frame(rows, {"level": pl.Int64()})


def ctx(tmp_path: Path, engine: ScriptedEngine, name: str = "dart") -> StageContext:
    return StageContext(
        stage_name=name,
        stage_index=1,
        seed=7,
        run_dir=tmp_path,
        engine_factory=lambda: engine,
        show_progress=False,
        state_dir=tmp_path / "state" / "part-00000",
    )


def kept_and_dropped(out: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    dropped = out.filter(pl.col(DROP_REASON).is_not_null())
    kept = out.filter(pl.col(DROP_REASON).is_null()).drop(DROP_REASON)
    return kept, dropped


def per_query(kept: pl.DataFrame) -> dict[str, int]:
    base = queries()
    names = dict(zip(base["id"], SKILL, strict=True))
    counts = kept.group_by("parent_id").len()
    return {names[p]: n for p, n in counts.iter_rows()}


def test_uniform_stops_at_exactly_k_u_and_caps_trials(tmp_path: Path) -> None:
    engine = ScriptedEngine()
    cfg = DartConfig(strategy="uniform", k_u=3, samples_per_round=4, max_trials=16)
    out = Dart(cfg).process(queries(), ctx(tmp_path, engine))
    kept, dropped = kept_and_dropped(out)
    validate_frame(kept, "dart output")
    counts = per_query(kept)
    assert counts["q-easy"] == 3  # a round of 4 finds 4 correct: exactly k_u are kept
    assert counts["q-mid"] == 3
    assert dropped[DROP_REASON].to_list() == ["no_correct_sample"]
    never = dropped.row(0, named=True)
    assert never["query_trials"] == 16 and never["query_correct"] == 0
    # every round is one call over the unfinished queries, never more than the cap
    first = [p for p, _ in engine.calls[0]]
    assert len(first) == 4
    assert all(len(call) <= 4 for call in engine.calls)
    assert sum(s.n for call in engine.calls for _, s in call if "q-never" in _) == 16
    assert len(engine.calls) == 4  # q-never needs 16 / 4 rounds; the others finish earlier
    # each kept row re-verifies
    verify = get_verifier("math")
    for row in kept.iter_rows(named=True):
        assert verify(row["response"], row["reference"]).correct


def test_prop2diff_targets_follow_probe_fail_rates(tmp_path: Path) -> None:
    engine = ScriptedEngine()
    cfg = DartConfig(
        strategy="prop2diff", k_p=6, probe_samples=8, samples_per_round=8, max_trials=64
    )
    stage = Dart(cfg)
    context = ctx(tmp_path, engine)
    out = stage.process(queries(), context)
    kept, dropped = kept_and_dropped(out)
    probe = engine.calls[0]
    assert len(probe) == 4 and all(s.n == 8 for _, s in probe)
    rows = {r["parent_id"]: r for r in kept.iter_rows(named=True)}
    base = dict(zip(SKILL, queries()["id"], strict=True))
    for q in ("q-easy", "q-mid", "q-hard"):
        row = rows[base[q]]
        expected = max(1, math.ceil(6 * row["fail_rate"] - 1e-9))
        assert row["query_target"] == expected
        assert per_query(kept)[q] == min(expected, row["query_correct"])
    assert rows[base["q-easy"]]["query_target"] == 1  # never fails: at least one
    never = dropped.row(0, named=True)
    assert never["fail_rate"] == 1.0 and never["query_target"] == 6  # the hardest gets k_p
    assert never["query_trials"] == 64
    stats = context.extra_stats
    assert stats["calls"] == len(engine.calls)
    assert sum(b["queries"] for b in stats["buckets"].values()) == 4
    assert stats["buckets"]["fail=1"]["coverage"] == 0.0


def test_prop2diff_target_is_exact_integer_ceiling() -> None:
    assert prop2diff_target(8, 3, 8) == 3
    assert prop2diff_target(8, 8, 8) == 8
    assert prop2diff_target(8, 0, 8) == 1
    assert prop2diff_target(10, 1, 3) == 4
    assert prop2diff_target(5, 7, 7) == 5


def test_prop2diff_reads_a_provided_difficulty_without_probing(tmp_path: Path) -> None:
    engine = ScriptedEngine()
    cfg = DartConfig(strategy="prop2diff", k_p=4, difficulty_column="rate", max_trials=16)
    frame = queries(rate=[0.0, 0.5, 0.9, 1.0])
    out = Dart(cfg).process(frame, ctx(tmp_path, engine))
    assert all(s.n == 8 for _, s in engine.calls[0])  # samples_per_round, not a probe
    targets = dict(zip(out["parent_id"].fill_null(out["id"]), out["query_target"], strict=True))
    by_name = dict(zip(frame["id"], SKILL, strict=True))
    got = {by_name[k]: v for k, v in targets.items()}
    assert got == {"q-easy": 1, "q-mid": 2, "q-hard": 4, "q-never": 4}
    with pytest.raises(ValueError, match="fail rate in"):
        Dart(cfg).process(queries(rate=[0.0, 2.0, 0.5, 0.5]), ctx(tmp_path / "b", engine))


def test_resume_between_rounds_continues_the_counters(tmp_path: Path) -> None:
    cfg = DartConfig(strategy="uniform", k_u=2, samples_per_round=2, max_trials=10)
    clean_engine = ScriptedEngine()
    clean = Dart(cfg).process(queries(), ctx(tmp_path / "clean", clean_engine))

    dying = ScriptedEngine(fail_on_call=2)
    with pytest.raises(RuntimeError, match="engine died"):
        Dart(cfg).process(queries(), ctx(tmp_path / "run", dying))
    saved = load_state(tmp_path / "run" / "state" / "part-00000", list(queries()["id"]))
    assert saved is not None and saved.rounds == 2
    trials_before = {k: c.trials for k, c in saved.counters.items()}
    assert sum(trials_before.values()) > 0

    fresh = ScriptedEngine()
    resumed = Dart(cfg).process(queries(), ctx(tmp_path / "run", fresh))
    first_run = {(p, s.seed) for call in dying.calls for p, s in call}
    second_run = {(p, s.seed) for call in fresh.calls for p, s in call}
    assert first_run and second_run and not first_run & second_run  # nothing sampled twice
    assert len(dying.calls) + len(fresh.calls) == len(clean_engine.calls)
    assert resumed.sort("id").equals(clean.sort("id"))


def test_dpo_pairs_pair_a_correct_with_an_incorrect_sample(tmp_path: Path) -> None:
    engine = ScriptedEngine(truncate_wrong=True)
    cfg = RejectionConfig(k=6, emit="dpo", max_pairs=2)
    out = RejectionSample(cfg).process(queries(), ctx(tmp_path, engine, "rejection"))
    kept, dropped = kept_and_dropped(out)
    validate_frame(kept, "pairs")
    verify = get_verifier("math")
    assert kept.height > 0
    for row in kept.iter_rows(named=True):
        assert verify(row["chosen"], row["reference"]).correct
        assert not verify(row["rejected"], row["reference"]).correct
        assert row["chosen"] != row["rejected"] and row["response"] == row["chosen"]
        assert row["rejected_finish_reason"] == "stop" or row["rejected_reason"]
    assert kept["id"].n_unique() == kept.height
    assert kept.group_by("parent_id").len()["len"].max() <= 2
    reasons = dict(zip(dropped["prompt"], dropped[DROP_REASON], strict=True))
    assert reasons["Question q-easy: what is it?"] == "no_incorrect_sample"
    assert reasons["Question q-never: what is it?"] == "no_correct_sample"
    # finished wrong answers are preferred over truncated ones as `rejected`
    mid = kept.filter(pl.col("prompt").str.contains("q-mid"))
    assert mid["rejected_finish_reason"][0] == "stop"


def test_rejection_rounds_are_one_call_each_and_dedup_by_text(tmp_path: Path) -> None:
    engine = ScriptedEngine()
    cfg = RejectionConfig(k=3, rounds=2, dedup="text")
    out = RejectionSample(cfg).process(queries(), ctx(tmp_path, engine, "rejection"))
    kept, _ = kept_and_dropped(out)
    assert len(engine.calls) == 2 and all(len(c) == 4 for c in engine.calls)
    assert kept.filter(pl.col("prompt").str.contains("q-easy")).height == 6
    assert kept["response"].n_unique() == kept.height
    assert set(kept["verdict_reason"]) == {"equal"}


def test_equation_dedup_collapses_paths_with_the_same_equations() -> None:
    a = "First 12 + 5 = 17 apples. Then 17 * 2 = 34. The answer is 34."
    b = "We add: 12+5=17. Doubling, 17*2 = 34 so the answer is 34"
    c = "12 * 2 = 24 and 24 + 10 = 34. The answer is 34."
    assert equation_key(a) == equation_key(b)
    assert equation_key(a) != equation_key(c)
    assert equation_key("no equations here") == "no equations here"
