"""DART and rejection sampling on a scripted engine: stop rules, Prop2Diff allocation, DPO
pairs, dedup, and resume between rounds (the real-engine run is in tests/e2e)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from scripted import ScriptedBase

from gristmill.engines.base import Completion, Sampling
from gristmill.pipelines.checkpoint import atomic_write_json, atomic_write_parquet
from gristmill.pipelines.layout import SUCCESS, RunLayout
from gristmill.pipelines.stage import StageContext
from gristmill.records import DROP_REASON, make_record, records_frame, validate_frame
from gristmill.synth.dart import Dart, DartConfig, prop2diff_target
from gristmill.synth.difficulty import read_counters
from gristmill.synth.rejection import (
    BucketStats,
    RejectionConfig,
    RejectionSample,
    SamplerStats,
    build_verifier,
)
from gristmill.synth.sampling import equation_key, load_state
from gristmill.verify import get_verifier
from gristmill.verify.math import MathVerifier

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
    #: Every correct answer of a question has the same text (duplicates for `dedup`).
    same_correct_text: bool = False

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
                work = "same" if (right and self.same_correct_text) else seed % 1000
                text = f"Work {work}: 2 + 2 = 4. The answer is {answer}."
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
        engine_factory=lambda _name: engine,
        show_progress=False,
        state_dir=tmp_path / "state" / "part-00000",
    )


def kept_and_dropped(out: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    if DROP_REASON not in out.columns:
        return out, out.head(0)
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
    # every sample is counted once by its verdict reason
    assert sum(stats["verdicts"].values()) == sum(b["trials"] for b in stats["buckets"].values())
    assert stats["verdicts"]["equal"] >= len(kept)


def test_compare_units_reaches_the_math_verifier() -> None:
    assert build_verifier(DartConfig()) == MathVerifier()
    strict = build_verifier(RejectionConfig(compare_units=True, allow_last_number=True))
    assert strict == MathVerifier(compare_units=True, allow_last_number=True)
    assert strict("\\boxed{5 cm}", "5 m").reason == "wrong_unit"


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


def test_code_verification_on_a_weak_sandbox_needs_the_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gristmill.sandbox import WeakIsolationError, probes

    monkeypatch.setattr(probes, "isolation", lambda: "socket-denied-seccomp")
    engine = ScriptedEngine()
    with pytest.raises(WeakIsolationError, match=r"stage 'rejection'.*isolation: weak"):
        RejectionSample(RejectionConfig(verifier="code")).process(
            queries(), ctx(tmp_path, engine, "rejection")
        )
    assert engine.calls == []
    # math answers run no code: no sandbox needed, no opt-in
    out = RejectionSample(RejectionConfig(k=1)).process(queries(), ctx(tmp_path, engine))
    assert out.height > 0
    with pytest.raises(ValueError, match="isolation"):
        RejectionConfig(isolation="off")  # type: ignore[arg-type]


def test_equation_dedup_collapses_paths_with_the_same_equations() -> None:
    a = "First 12 + 5 = 17 apples. Then 17 * 2 = 34. The answer is 34."
    b = "We add: 12+5=17. Doubling, 17*2 = 34 so the answer is 34"
    c = "12 * 2 = 24 and 24 + 10 = 34. The answer is 34."
    assert equation_key(a) == equation_key(b)
    assert equation_key(a) != equation_key(c)
    assert equation_key("no equations here") == "no equations here"


def test_part_stats_merge_into_stage_stats_in_bucket_order() -> None:
    one = SamplerStats(
        buckets={"10": BucketStats(queries=2, covered=1, trials=8, sample_tokens=80)},
        rounds=3,
        calls=3,
    )
    two = SamplerStats(
        buckets={
            "10": BucketStats(queries=2, covered=2, trials=4, kept=2, kept_tokens=30),
            "2": BucketStats(queries=1, covered=1, trials=2, kept=1, kept_tokens=12),
        },
        rounds=5,
        calls=5,
    )
    parts = [SamplerStats.from_dict(s.to_dict()) for s in (one, two)]
    merged = SamplerStats.merge(parts).to_dict()
    assert list(merged["buckets"]) == ["2", "10"]  # numeric bucket names by value
    assert merged["rounds"] == 5 and merged["calls"] == 8
    ten = merged["buckets"]["10"]
    assert (ten["queries"], ten["covered"], ten["trials"]) == (4, 3, 12)
    assert ten["coverage"] == 0.75  # from the sums, not the parts' 0.5 and 1.0
    assert ten["mean_response_tokens"] == 15.0 and ten["mean_sample_tokens"] == 6.7


# ---- difficulty from an earlier run, and what a target counts ------------------------------


def sampled_counts(engine: ScriptedEngine) -> dict[str, tuple[int, int]]:
    """Per question: (trials, correct) recounted from the engine's calls, independently of the
    stage's counters (each sample's correctness follows from its question and seed)."""
    out: dict[str, tuple[int, int]] = {}
    for call in engine.calls:
        for prompt, s in call:
            q = next(k for k in SKILL if k in prompt)
            assert s.seed is not None
            right = sum(_unit(q, s.seed + j) < SKILL[q] for j in range(s.n))
            trials, correct = out.get(q, (0, 0))
            out[q] = (trials + s.n, correct + right)
    return out


def write_stage(run: Path, out: pl.DataFrame, *, index: int = 1, name: str = "dart") -> Path:
    """`out` saved as a finished stage of run folder `run`, as the pipeline lays it out."""
    layout = RunLayout(run)
    folder = layout.stage_dir(index, name, f"{index:02d}abcdef0123456789")
    kept, dropped = kept_and_dropped(out)
    atomic_write_parquet(kept, layout.part(folder, 0))
    atomic_write_parquet(dropped, layout.rejected(folder, 0))
    success = {"stage": name, "fingerprint": f"fp-{name}-{index}", "parts": ["part-00000.parquet"]}
    atomic_write_json(success, layout.success(folder))
    earlier = json.loads(layout.manifest.read_text())["stages"] if index > 1 else []
    atomic_write_json({"stages": [*earlier, {"stage": name, "dir": folder.name}]}, layout.manifest)
    return folder


def by_question(out: pl.DataFrame, column: str) -> dict[str, Any]:
    """`column` per question, from kept rows (by parent_id) and dropped rows (by id)."""
    names = dict(zip(queries()["id"], SKILL, strict=True))
    kept, dropped = kept_and_dropped(out)
    got: dict[str, Any] = {}
    for key, frame in (("parent_id", kept), ("id", dropped)):
        for qid, value in zip(frame[key], frame[column], strict=True):
            assert got.setdefault(names[qid], value) == value, (qid, column)
    return got


def test_difficulty_from_reproduces_an_earlier_runs_fail_rates(tmp_path: Path) -> None:
    # run 1: Prop2Diff with a 4-sample probe, then more rounds for the hard questions
    first = ScriptedEngine()
    cfg1 = DartConfig(k_p=6, probe_samples=4, samples_per_round=4, max_trials=24)
    out1 = Dart(cfg1).process(queries(), ctx(tmp_path / "one", first))
    run = tmp_path / "run-one"
    folder = write_stage(run, out1)
    pool = sampled_counts(first)
    expected = {q: round((t - c) / t, 6) for q, (t, c) in pool.items()}
    assert by_question(out1, "query_trials") == {q: t for q, (t, _) in pool.items()}
    assert by_question(out1, "query_raw_correct") == {q: c for q, (_, c) in pool.items()}
    # the pool's rate is not the probe's 1/4 steps: at least one question moved
    assert by_question(out1, "fail_rate") != expected

    # run 2 reads run 1's counters: the same per-query fail rates, and no probe
    second = ScriptedEngine()
    cfg2 = DartConfig(
        k_p=6, probe_samples=3, samples_per_round=5, max_trials=5, difficulty_from=str(run)
    )
    context = ctx(tmp_path / "two", second)
    out2 = Dart(cfg2).process(queries(), context)
    assert by_question(out2, "fail_rate") == expected
    targets = {q: prop2diff_target(6, t - c, t) for q, (t, c) in pool.items()}
    assert by_question(out2, "query_target") == targets
    assert len(second.calls) == 1  # one round of samples_per_round, no probing round
    assert [s.n for _, s in second.calls[0]] == [5, 5, 5, 5]
    source = context.extra_stats["difficulty"]
    assert source["source"] == "earlier_run" and source["difficulty_from"] == str(run)
    assert source["stage_dir"] == str(folder) and source["fingerprint"] == "fp-dart-1"
    assert source["queries"] == 4
    # the stage folder itself gives the same counters
    assert read_counters(folder).counts == read_counters(run).counts


def test_difficulty_from_names_the_queries_it_lacks(tmp_path: Path) -> None:
    engine = ScriptedEngine()
    out = Dart(DartConfig(strategy="uniform", k_u=1, max_trials=8)).process(
        queries(), ctx(tmp_path / "one", engine)
    )
    run = tmp_path / "run"
    folder = write_stage(run, out)
    never = queries()["id"][3]
    # a dataset holds kept rows only: the never-solved question has no counters there
    data = folder / "part-00000.parquet"
    calls = len(engine.calls)
    with pytest.raises(ValueError, match=rf"for 1 of 4 queries: {never}\. "):
        Dart(DartConfig(difficulty_from=str(data))).process(queries(), ctx(tmp_path / "d", engine))
    assert len(engine.calls) == calls  # checked before any sample is drawn
    # rows written before query_raw_correct existed: the error names the column
    old = tmp_path / "old.parquet"
    pl.read_parquet(data).drop("query_raw_correct").write_parquet(old)
    with pytest.raises(ValueError, match=r"old.parquet has no column\(s\) \['query_raw_correct'\]"):
        read_counters(old)
    # a second sampling stage in the run: it must be named
    write_stage(run, out, index=2, name="rejection")
    with pytest.raises(ValueError, match=r"2 sampling stages .*name one folder"):
        read_counters(run)
    (folder / SUCCESS).unlink()
    with pytest.raises(ValueError, match="has not finished"):
        read_counters(folder)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_counters(tmp_path / "nowhere")


def test_count_raw_counts_duplicate_correct_answers_toward_the_target(tmp_path: Path) -> None:
    """q-easy answers right every time with the same text: one distinct answer only."""
    base = {"strategy": "uniform", "k_u": 3, "samples_per_round": 4, "max_trials": 16}
    runs = {}
    for count, dedup in (("distinct", "text"), ("raw", "text"), ("raw", "none")):
        engine = ScriptedEngine(same_correct_text=True)
        cfg = DartConfig(count=count, dedup=dedup, **base)  # type: ignore[arg-type]
        out = Dart(cfg).process(queries(("q-easy",)), ctx(tmp_path / f"{count}-{dedup}", engine))
        runs[count, dedup] = kept_and_dropped(out)[0]
    distinct = runs["distinct", "text"]
    assert distinct["query_trials"][0] == 16  # never 3 distinct answers: sampled to the cap
    assert distinct.height == 1
    raw = runs["raw", "text"]
    assert raw["query_trials"][0] == 4 and raw["query_raw_correct"][0] == 4  # one round
    assert raw.height == 1  # the stop is the reference's, the rows stay deduplicated
    reference = runs["raw", "none"]  # the reference's rule: the first k_u correct answers
    assert reference["query_trials"][0] == 4 and reference.height == 3


def test_dart_config_defaults_and_difficulty_options() -> None:
    cfg = DartConfig()
    # DART-Math's synthesis settings (README, scripts/synth-vrt.sh, scripts/synth-onpolicy.sh)
    assert (cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.max_trials) == (1.6, 0.95, 2048, 2048)
    assert cfg.count == "distinct" and cfg.probing
    assert not DartConfig(difficulty_from="runs/pool").probing
    # no probe: probe_samples may exceed a small cap
    DartConfig(difficulty_from="runs/pool", probe_samples=8, max_trials=2)
    with pytest.raises(ValueError, match="not both"):
        DartConfig(difficulty_from="runs/pool", difficulty_column="rate")
    with pytest.raises(ValueError, match="only apply to strategy 'prop2diff'"):
        DartConfig(strategy="uniform", difficulty_from="runs/pool")
    with pytest.raises(ValueError, match="count must be"):
        DartConfig(count="all")  # type: ignore[arg-type]
