"""START's Hint-infer loop and Hint-RFT on a scripted engine with the real sandbox: stop at a
code fence, execute, append the output, continue; caps; hints at both insertion points and
for N rounds; one generate call per round; Hint-RFT keeps only verified tool-using
trajectories; resume. The real-engine run is in tests/e2e/test_start_flow.py."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest
from scripted import ScriptedBase

from gristmill.engines.base import Completion, EngineStats, Sampling
from gristmill.engines.factory import EngineSpec
from gristmill.pipelines.recipe import Recipe, RecipeError
from gristmill.pipelines.stage import MeteredEngine, StageContext
from gristmill.records import DROP_REASON, make_record, read_records, records_frame, validate_frame
from gristmill.sandbox import SandboxPool
from gristmill.synth.hint_infer import (
    CODE_FENCE,
    FENCE_STOP,
    HintInfer,
    HintInferConfig,
    HintInferStats,
    LoopSettings,
    LoopState,
    Problem,
    fenced_blocks,
    final_program,
    problem_reference,
    run_hint_loop,
    strip_outputs,
    verifier_input,
)
from gristmill.synth.hints import (
    LIBRARY,
    TriggerMatch,
    cut_final_answer,
    edit_hints,
    get_hint,
    hints_for,
    trigger_matches,
)
from gristmill.verify import get_verifier

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"

#: A scripted model: (user prompt, assistant text so far) -> the full continuation it would
#: write if nothing stopped it (stop strings and max_tokens are applied by the engine).
Script = Callable[[str, str], str]


def _words(text: str) -> int:
    return len(text.split())


@dataclass
class ScriptedEngine(ScriptedBase):
    """Continues raw prompts with a script, applying stop strings and max_tokens as vLLM does
    (stop string excluded from the text, `Completion.stop` naming it). A token is a word."""

    script: Script
    max_model_len: int | None = 4096
    model_id: str = field(default="scripted/start", kw_only=True)
    completions: list[Completion] = field(default_factory=list, kw_only=True)

    def generate(
        self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling]
    ) -> list[list[Completion]]:
        params = self.record(prompts, sampling)
        out = []
        for prompt, s in zip(prompts, params, strict=True):
            user, _, so_far = prompt.partition("<assistant>")
            full = self.script(user, so_far)
            cut, stop = full, None
            hits = [(full.find(x), x) for x in s.stop if x in full]
            if hits:
                index, stop = min(hits)
                cut = full[:index]
            finish = "stop"
            spans = list(re.finditer(r"\S+", cut))
            if len(spans) > s.max_tokens:
                cut, stop, finish = cut[: spans[s.max_tokens - 1].end()], None, "length"
            tokens = min(len(spans), s.max_tokens)
            out.append([Completion(cut, finish, _words(prompt), tokens, stop)])  # type: ignore[arg-type]
        self.completions.extend(c for (c,) in out)
        return out


def solver(user: str, so_far: str) -> str:
    """Gets `a + b` wrong in its head, right with Python."""
    a, b = (int(x) for x in re.findall(r"\d+", user.split("<user>")[-1])[:2])
    if so_far.endswith("```python\n"):
        return f"x = {a} + {b}\nprint(x)\n```\nThat printed the sum."
    if so_far.rstrip().endswith("```"):
        return f"So the answer is {so_far.rsplit('```output', 1)[-1].split()[0]}."
    return f"{a} + {b} = {a + b + 1}. The answer is {a + b + 1}."


def problems_frame(pairs: Sequence[tuple[int, int]]) -> pl.DataFrame:
    rows = [
        make_record(
            [{"role": "user", "content": f"What is {a} + {b}?"}],
            source="scripted",
            reference=str(a + b),
            level=i,
        )
        for i, (a, b) in enumerate(pairs)
    ]
    return records_frame(rows, {"level": pl.Int64()})


def context(tmp_path: Path, engine: ScriptedEngine) -> StageContext:
    return StageContext(
        stage_name="hint_infer",
        stage_index=1,
        seed=3,
        run_dir=tmp_path,
        engine_factory=lambda _name: engine,
        show_progress=False,
        state_dir=tmp_path / "state" / "part-00000",
    )


def fixed(full: str) -> Script:
    """A model that always writes `full`: it continues wherever the loop left it."""

    def script(user: str, so_far: str) -> str:
        assert full.startswith(so_far), (full, so_far)
        return full[len(so_far) :]

    return script


def sha_seed(*keys: object) -> int:
    return int(hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:7], 16)


def loop(
    script: Script,
    prompts: Sequence[str] = ("What is 2 + 3?",),
    *,
    max_model_len: int = 4096,
    state_dir: Path | None = None,
    **changes: object,
) -> tuple[LoopState, ScriptedEngine]:
    engine = ScriptedEngine(script, max_model_len=max_model_len)
    cfg = HintInferConfig(**{"prefill_code_fence": True, **changes})  # type: ignore[arg-type]
    problems = [
        Problem(id=f"q{i}", prompt_text=engine.chat_prompt([{"role": "user", "content": p}]))
        for i, p in enumerate(prompts)
    ]
    metered = MeteredEngine(engine, EngineStats(), threading.Lock())
    with SandboxPool(max_workers=2) as pool:
        state = run_hint_loop(
            problems,
            engine=metered,
            settings=LoopSettings.from_config(cfg, max_model_len),
            pool=pool,
            seed_for=sha_seed,
            state_dir=state_dir,
        )
    return state, engine


# ---- the loop -------------------------------------------------------------------------------


def test_stop_execute_append_continue() -> None:
    state, engine = loop(solver)
    (t,) = state.trajectories
    hint = get_hint(t.hints[0].hint_id)
    assert t.text == (
        f"2 + 3 = 6.\n\n{hint.text}\n\n```python\nx = 2 + 3\nprint(x)\n```\n"
        "```output\n5\n```\nSo the answer is 5."
    )
    assert t.finish == "eos" and t.rounds == 3
    (call,) = t.tool_calls
    assert (call.code, call.status, call.output) == ("x = 2 + 3\nprint(x)", "ok", "5")
    assert t.text[call.position :].startswith("```output\n5\n```")
    (use,) = t.hints
    assert use.point == "stop" and t.text[use.position :].startswith(hint.text)
    # round 0 carries the greedy baseline; round 1 stops at the closing fence
    assert len(engine.calls) == state.calls == state.rounds == 3
    assert [s.temperature for _, s in engine.calls[0]] == [0.7, 0.0]
    assert engine.calls[1][0][1].stop == (FENCE_STOP,)
    assert state.baselines["q0"].text == "2 + 3 = 6. The answer is 6."


def test_one_generate_call_per_round_across_all_live_trajectories() -> None:
    def mixed(user: str, so_far: str) -> str:
        if "9 + 9" in user:  # finishes at once with a python block it wrote itself
            if not so_far:
                return "```python\nprint(9 + 9)\n```"
            return "The answer is 18."
        return solver(user, so_far)

    prompts = ("What is 2 + 3?", "What is 9 + 9?", "What is 40 + 2?")
    state, engine = loop(mixed, prompts, samples=2, baseline=True)
    assert len(state.trajectories) == 6
    assert len(engine.calls) == state.calls == state.rounds
    assert len(engine.calls[0]) == 6 + 3  # every trajectory and every greedy baseline
    for round_, call in enumerate(engine.calls[1:], start=1):
        live_before = [t for t in state.trajectories if t.rounds > round_]
        assert len(call) == len(live_before)
    seeds = [s.seed for _, s in engine.calls[0][:6]]
    assert len(set(seeds)) == 6, "every trajectory has its own seed"
    nine = [t for t in state.trajectories if t.query_id == "q1"]
    for t in nine:  # EOS right after its own closing fence: the block runs, generation goes on
        assert t.tool_calls[0].output == "18"
        assert t.text.startswith("```python\nprint(9 + 9)\n```\n```output\n18\n```\n")


def test_other_fences_are_put_back_and_not_run() -> None:
    full = "Here:\n```\nprint(1)\n```\nand\n```bash\nls\n```\nthen the answer is 2."
    state, engine = loop(fixed(full), insert_at=("trigger",), baseline=False)
    (t,) = state.trajectories
    assert t.tool_calls == [] and t.finish == "eos"
    # stops: the untagged block opening and closing, the bash block closing, the end
    assert t.text == full and len(engine.calls) == 4


def test_a_loop_of_empty_fences_ends_the_trajectory() -> None:
    def looping(user: str, so_far: str) -> str:
        return "Let me see.\n```\n```\n```\n" if not so_far else "```\n```\n```\n```\n"

    state, engine = loop(looping, baseline=False)
    (t,) = state.trajectories
    assert t.finish == "degenerate" and len(engine.calls) == 2
    assert t.text == "Let me see.\n```\n```\n```\n"


def test_an_empty_block_is_not_a_tool_call() -> None:
    def quitter(user: str, so_far: str) -> str:
        return "" if so_far.endswith("```python\n") else "It is 6. The answer is 6."

    state, _ = loop(quitter, baseline=False)
    (t,) = state.trajectories
    assert t.tool_calls == [] and t.finish == "eos"
    assert t.text.endswith("\n\n```python\n```\n")


def test_cells_keep_state_across_calls_and_errors_are_shown() -> None:
    def stateful(user: str, so_far: str) -> str:
        if not so_far:
            return "```python\nx = 40\nprint(x)\n```"
        if so_far.count("```output") == 1:
            return "```python\nprint(x + 2)\n```"
        if so_far.count("```output") == 2:
            return "```python\nprint(1 / 0)\n```"
        return "The answer is 42."

    state, _ = loop(stateful, insert_at=("trigger",))
    (t,) = state.trajectories
    assert [c.output for c in t.tool_calls][:2] == ["40", "42"]
    bad = t.tool_calls[2]
    assert bad.status == "error" and "ZeroDivisionError" in bad.output
    assert t.finish == "eos"


def test_tool_call_cap_ends_the_trajectory() -> None:
    def forever(user: str, so_far: str) -> str:
        return f"```python\nprint({so_far.count('```output')})\n```\nmore"

    state, _ = loop(forever, baseline=False)
    (t,) = state.trajectories
    assert len(t.tool_calls) == 6 and t.finish == "tool_cap"
    assert [c.output for c in t.tool_calls] == [str(i) for i in range(6)]
    assert t.text.count("```python") == 7 and t.text.count("```output") == 6


def chatty(user: str, so_far: str) -> str:
    """One short cell, then words without end."""
    if "```output" in so_far:
        return "and so on " * 500
    return "```python\nprint('a b c d e f g h')\n```\n"


def test_token_cap_spans_rounds() -> None:
    state, engine = loop(chatty, max_tokens=30, baseline=False)
    (t,) = state.trajectories
    assert t.finish == "max_tokens" and t.output_tokens == 30
    assert t.tool_calls[0].output == "a b c d e f g h"
    budgets = [s.max_tokens for call in engine.calls for _, s in call]
    assert budgets == [30, 30 - 9]  # the cell took 9 of the 30 tokens


def test_context_cap_stops_at_the_fraction_of_max_model_len() -> None:
    state, engine = loop(chatty, max_model_len=100, max_tokens=10_000, baseline=False)
    (t,) = state.trajectories
    assert t.finish == "context"
    for call in engine.calls:
        for prompt, s in call:
            assert _words(prompt) + s.max_tokens <= 80  # 0.8 * max_model_len
    prompt = engine.calls[0][0][0]
    assert _words(prompt + t.text) <= 80 + 2  # the last output block may add a little


def test_hint_after_the_models_own_wait() -> None:
    def hesitant(user: str, so_far: str) -> str:
        if so_far.endswith("```python\n"):
            return "print(2 + 3)\n```"
        if "```output" in so_far:
            return "The answer is 5. Wait, that is right."
        return "Two plus three is six.\n\nWait, let me recount. The answer is 6."

    state, engine = loop(hesitant, insert_at=("trigger",), hint_rounds=1, baseline=False)
    (t,) = state.trajectories
    (use,) = t.hints
    assert use.point == "trigger:Wait"
    hint = get_hint(use.hint_id)
    assert t.text.startswith(f"Two plus three is six.\n\n{hint.after('Wait')}\n\n```python\n")
    assert t.text[use.position :].startswith("Wait, ") and use.text == hint.after("Wait")
    # triggers are no stop strings: the round ran to its end and was cut back at "Wait"
    assert all(s.stop == (FENCE_STOP,) for call in engine.calls for _, s in call)
    assert t.discarded_tokens == _words("Wait, let me recount. The answer is 6.")
    # the budget is spent: the model's later "Wait" gets no hint
    assert t.text.endswith("The answer is 5. Wait, that is right.") and t.finish == "eos"
    assert t.output_tokens == sum(c.output_tokens for c in engine.completions) - 8


def test_alternatively_trigger_keeps_the_models_word() -> None:
    def other(user: str, so_far: str) -> str:
        if not so_far:
            return "It is 5. Alternatively, count on fingers."
        return "The answer is 5."

    state, _ = loop(other, insert_at=("trigger",), prefill_code_fence=False, baseline=False)
    (t,) = state.trajectories
    body = get_hint(t.hints[0].hint_id).body
    assert t.text == f"It is 5. Alternatively, {body}\nThe answer is 5."


#: A reasoning with three whole-word triggers (B, D, E) and one inside a word (C).
REASONING = (
    "A is 2. ",
    "Wait, B is 3. ",
    "Waiting for C is no trigger. ",
    "Alternatively, D is 4. ",
    "Wait, E is 5. ",
    "The answer is 5.",
)
CANDIDATES = (1, 3, 4)  # the sentences a trigger hint may go before
CALC = get_hint("math-calc")


def reasoner(user: str, so_far: str) -> str:
    """Writes REASONING; after a hint it writes code (with a "Wait" in a comment) and, once
    the output is back, goes on after the sentence each hint took the place of."""
    if so_far.endswith(CODE_FENCE):
        return "# Wait for it\nprint(5)\n```\n"
    present = [(so_far.rfind(x), i) for i, x in enumerate(REASONING) if x in so_far]
    if not present:
        return "".join(REASONING)
    at, last = max(present)
    return "".join(REASONING[last + 1 + so_far.count(CALC.body, at) :])


RAN = "```python\n# Wait for it\nprint(5)\n```\n```output\n5\n```\n"


@pytest.mark.parametrize("policy", ["first", "last", "random", "every"])
def test_hint_positions_land_where_the_policy_says(policy: str) -> None:
    samples = 4 if policy == "random" else 1  # seeded per sample: 4 show the spread
    state, engine = loop(
        reasoner,
        insert_at=("trigger",),
        trigger_position=policy,
        hint_ids=(CALC.id,),
        samples=samples,
        baseline=False,
    )
    # whole words only, found in the finished round: no trigger is a stop string
    assert all(s.stop == (FENCE_STOP,) for call in engine.calls for _, s in call)
    chosen = set()
    for t in state.trajectories:
        assert t.finish == "eos" and "Waiting for C" in t.text
        assert all(t.text[h.position :].startswith(h.text) for h in t.hints)
        if policy == "every":  # one before each trigger the model writes, in turn
            assert [h.point for h in t.hints] == [
                "trigger:Wait",
                "trigger:Alternatively",
                "trigger:Wait",
            ]
            assert t.text == (
                f"A is 2. {CALC.after('Wait')}\n\n{RAN}Waiting for C is no trigger. "
                f"{CALC.after('Alternatively')}\n\n{RAN}{CALC.after('Wait')}\n\n{RAN}"
                "The answer is 5."
            )
            assert len(t.tool_calls) == 3
            continue
        (use,) = t.hints  # trigger_hints=1: one hint, the later triggers get none
        if policy == "random":
            index = CANDIDATES[sha_seed(t.query_id, t.sample, "trigger", 0) % 3]
        else:
            index = CANDIDATES[0] if policy == "first" else CANDIDATES[-1]
        chosen.add(index)
        word = REASONING[index].split(",")[0]
        assert use.point == f"trigger:{word}" and use.round == 0
        assert t.text == (
            "".join(REASONING[:index])
            + f"{CALC.after(word)}\n\n{RAN}"
            + "".join(REASONING[index + 1 :])
        )
        assert t.discarded_tokens == _words("".join(REASONING[index:]))
    if policy == "random":  # seeded per sample: the samples do not all take the same one
        assert len(chosen) > 1


def test_a_round_that_ran_out_of_tokens_is_cut_back_at_its_trigger() -> None:
    def rambler(user: str, so_far: str) -> str:
        if so_far.endswith(CODE_FENCE):
            return "print(2 + 3)\n```\n"
        return "It is 6. Wait, " + "and so on " * 50 if not so_far else "The answer is 5."

    state, engine = loop(rambler, insert_at=("trigger",), max_tokens=30, baseline=False)
    (t,) = state.trajectories
    (use,) = t.hints
    assert use.point == "trigger:Wait" and t.text.startswith(f"It is 6. {use.text}")
    assert t.finish == "eos" and t.tool_calls[0].output == "5"
    first, second = (call[0][1].max_tokens for call in engine.calls[:2])
    assert engine.completions[0].finish_reason == "length" and first == 30
    assert t.discarded_tokens == 30 - 3 and second == 30 - 3  # only "It is 6." was kept


def test_trigger_matches_whole_words_outside_blocks() -> None:
    text = "Wait. Waiting, await; wait. (Wait) Alternatively\n```\nWait\n```\nWait"
    block = (text.index("```"), text.rindex("```") + 3)
    found = trigger_matches(text, ("Wait", "Alternatively"), skip=[block])
    assert found == [
        TriggerMatch(start=0, word="Wait"),
        TriggerMatch(start=text.index("(Wait") + 1, word="Wait"),
        TriggerMatch(start=text.index("Alternatively"), word="Alternatively"),
        TriggerMatch(start=len(text) - 4, word="Wait"),
    ]
    assert trigger_matches(text, ("Wait",), start=1, skip=[block])[0].start == text.index("(W") + 1


def test_no_trigger_hint_when_the_model_opens_python_itself() -> None:
    def coder(user: str, so_far: str) -> str:
        if not so_far:
            return "Wait, let me compute it.\n```python\nprint(2 + 3)\n```\n"
        return "The answer is 5."

    state, _ = loop(coder, insert_at=("trigger",), baseline=False)
    (t,) = state.trajectories
    assert t.hints == [] and [c.output for c in t.tool_calls] == ["5"]
    assert t.text.startswith("Wait, let me compute it.\n```python\n")


def thinker(user: str, so_far: str) -> str:
    """Hesitates once ("Wait") and is wrong; right with Python, after each hint."""
    if so_far.endswith(CODE_FENCE):
        return "print(2 + 3)\n```\n"
    if not so_far:
        return "2 + 3 is 6. Wait, maybe it is 6. The answer is 6."
    if so_far.count("```output") == 1:
        return "So it is 5. The answer is 5."
    return "The answer is 5."


def test_default_hints_a_trigger_and_the_stop_point_then_strips_them(tmp_path: Path) -> None:
    frame = problems_frame([(2, 3)])
    cfg = HintInferConfig(
        prefill_code_fence=True,
        samples=2,
        hint_choice="cycle",
        hint_ids=("math-calc", "math-check"),
    )
    ctx = context(tmp_path, ScriptedEngine(thinker))
    out = HintInfer(cfg).process(frame, ctx)
    first, second = out.sort("sample_index").iter_rows(named=True)
    ran = "```python\nprint(2 + 3)\n```\n```output\n5\n```\n"
    # both hints began a sentence and were followed by their code: the modify step strips them
    assert first[DROP_REASON] is None
    assert first["response"] == f"2 + 3 is 6.\n\n{ran}So it is 5.\n\n{ran}The answer is 5."
    assert [(h["point"], h["edit"]) for h in first["hints"]] == [
        ("trigger:Wait", "stripped"),
        ("stop", "stripped"),
    ]
    for h in first["hints"]:
        assert first["response"][h["position"] :].startswith("```python\n")
        assert h["text"] not in first["response"]
    for call in first["tool_calls"]:
        assert first["response"][call["position"] :].startswith("```output\n5\n```")
    assert first["messages"][-1]["content"] == first["response"]
    assert first["hint_only_solved"] and first["verified"]
    # the second sample differed only in its hints: once they are gone it is a duplicate,
    # and a rejected row keeps its text as generated
    assert second[DROP_REASON] == "duplicate" and second["hints"][0]["edit"] is None
    for h in second["hints"]:
        assert second["response"][h["position"] :].startswith(h["text"])
    stats = ctx.extra_stats
    assert stats["hints"] == {"trigger": 2, "stop": 2} and stats["hint_triggers"] == {"Wait": 2}
    assert stats["hint_edits"] == {"stripped": 2}
    assert stats["discarded_tokens"] == 2 * _words("Wait, maybe it is 6. The answer is 6.")
    # `mark`: the text stays as generated, every hint is marked where it stands
    marked = HintInfer(HintInferConfig(prefill_code_fence=True, hint_edit="mark")).process(
        frame, context(tmp_path / "mark", ScriptedEngine(thinker))
    )
    (row,) = marked.iter_rows(named=True)
    assert [h["edit"] for h in row["hints"]] == ["marked", "marked"]
    for h in row["hints"]:
        assert row["response"][h["position"] :].startswith(h["text"])
    assert row["response"].startswith("2 + 3 is 6. Wait, ")


def test_modify_step_strips_only_where_the_text_stays_coherent() -> None:
    hint = CALC.after("Wait")
    code = "```python\nprint(5)\n```\n```output\n5\n```\nThe answer is 5."
    # mid-line, before its code: stripped, and the fence moves to a line of its own
    text = f"It is 5. {hint}\n{code}"
    edit = edit_hints(text, [(9, hint)], "strip")
    assert edit.text == f"It is 5.\n\n{code}" and edit.edits == ("stripped",)
    assert [b.tag for b in fenced_blocks(edit.text)] == ["python", "output"]
    assert edit.text[edit.moved(text.index("```output")) :].startswith("```output")
    assert edit.moved(9) == edit.text.index("```python") and edit.moved(3) == 3
    # at the very start: nothing is left before the code
    assert edit_hints(f"{hint}\n\n{code}", [(0, hint)], "strip").text == code
    # answered in words before the code, or not beginning a sentence: it stays, marked
    for text, at in (
        (f"It is 5. {hint}\nSure, let me do that.\n{code}", 9),
        (f"It is 5, {hint}\n{code}", 9),
        (f"It is 5. {hint}\nThe answer is 5.", 9),
    ):
        edit = edit_hints(text, [(at, hint)], "strip")
        assert (edit.text, edit.edits) == (text, ("marked",))
    # `mark` never strips; a hint no longer found where recorded is never cut
    text = f"It is 5. {hint}\n{code}"
    assert edit_hints(text, [(9, hint)], "mark").edits == ("marked",)
    assert edit_hints(text, [(8, hint)], "strip").text == text


def test_repeated_insertion_for_n_rounds() -> None:
    def stubborn(user: str, so_far: str) -> str:
        return "2 + 3 = 6. The answer is 6."

    state, engine = loop(stubborn, prefill_code_fence=False, hint_rounds=3, baseline=False)
    (t,) = state.trajectories
    assert [h.point for h in t.hints] == ["stop"] * 3
    assert t.rounds == 4 and t.finish == "eos" and len(engine.calls) == 4
    # each hint replaced the answer it followed: only the last answer is left
    assert t.text.count("The answer is") == 1 and t.text.endswith("The answer is 6.")
    positions = [h.position for h in t.hints]
    assert positions == sorted(positions)
    for h in t.hints:
        assert t.text[h.position :].startswith(get_hint(h.hint_id).text)


def test_cycle_hint_choice_walks_the_list() -> None:
    def stubborn(user: str, so_far: str) -> str:
        return "The answer is 6."

    ids = ("math-check", "math-alt")
    state, _ = loop(
        stubborn, hint_rounds=3, hint_ids=ids, hint_choice="cycle", prefill_code_fence=False
    )
    assert [h.hint_id for h in state.trajectories[0].hints] == [*ids, ids[0]]


@pytest.mark.parametrize("script", [solver, thinker], ids=["stop", "trigger-and-stop"])
def test_resume_after_a_crash_continues_to_the_same_result(tmp_path: Path, script: Script) -> None:
    frame = problems_frame([(2, 3), (7, 8)])
    clean_engine = ScriptedEngine(script)
    clean = HintInfer(HintInferConfig(prefill_code_fence=True)).process(
        frame, context(tmp_path / "clean", clean_engine)
    )
    crashing = ScriptedEngine(script, fail_on_call=2)
    ctx = context(tmp_path / "resumed", crashing)
    stage = HintInfer(HintInferConfig(prefill_code_fence=True))
    with pytest.raises(RuntimeError, match="engine died"):
        stage.process(frame, ctx)
    saved = json.loads((ctx.state_dir / "hint_infer.json").read_text())  # type: ignore[operator]
    assert saved["rounds"] == 2
    crashing.fail_on_call = None
    resumed = stage.process(frame, ctx)
    assert len(crashing.calls) == len(clean_engine.calls)  # the 2 saved rounds ran once
    assert resumed.drop("tool_calls").equals(clean.drop("tool_calls"))


# ---- Hint-RFT -------------------------------------------------------------------------------


def graded(user: str, so_far: str) -> str:
    """Different fates by problem: 2+3 solved with the tool; 4+4 wrong even with Python;
    1+1 right, but its only cell fails; 6+6 solved but repetitive; 3+3 fakes an output
    block; 5+5 right already when greedy (and with the tool)."""
    in_code = so_far.endswith("```python\n")
    ran = "```output" in so_far
    if "4 + 4" in user:
        if in_code:
            return "print(4 * 4)\n```"
        return "The answer is 16." if ran else "It is 9. The answer is 9."
    if "1 + 1" in user:
        return "print(undefined_name)\n```" if in_code else "One and one. The answer is 2."
    if "6 + 6" in user and ran:
        return "twelve is the sum " * 30 + "The answer is 12."
    if "3 + 3" in user and ran:
        tail = so_far.split("```output\n```\n", 1)[1]
        return "```output\n6\n```\nThe answer is 6."[len(tail) :]
    if "3 + 3" in user and in_code:
        return "y = 3 + 3\n```\n"
    if "5 + 5" in user and not ran and not in_code:
        return "5 + 5 = 10. The answer is 10."
    return solver(user, so_far)


def test_hint_rft_keeps_only_verified_tool_using_trajectories(tmp_path: Path) -> None:
    frame = problems_frame([(2, 3), (4, 4), (1, 1), (6, 6), (3, 3), (5, 5)])
    engine = ScriptedEngine(graded)
    ctx = context(tmp_path, engine)
    out = HintInfer(HintInferConfig(prefill_code_fence=True)).process(frame, ctx)
    by_question = {
        row["prompt"]: row for row in out.iter_rows(named=True) if row["parent_id"] is not None
    }
    reasons = {q: r[DROP_REASON] for q, r in by_question.items()}
    assert reasons == {
        "What is 2 + 3?": None,
        "What is 4 + 4?": "not_verified",
        "What is 1 + 1?": "no_tool_call",
        "What is 6 + 6?": "repetitive",
        "What is 3 + 3?": "fake_output",
        "What is 5 + 5?": None,
    }
    kept = out.filter(pl.col(DROP_REASON).is_null())
    validate_frame(kept.drop(DROP_REASON), "hint_infer output")
    for row in kept.iter_rows(named=True):
        assert row["verified"] and row["n_tool_ok"] >= 1
        assert row["messages"][-1] == {"role": "assistant", "content": row["response"]}
        assert row["messages"][0]["content"] == row["prompt"]
        assert row["parent_id"] in frame["id"].to_list()
        assert "```output\n" in row["response"] and row["hints"][0]["point"] == "stop"
        assert row["level"] is not None  # input columns ride along
    flags = {q: (r["solved_without_hints"], r["hint_only_solved"]) for q, r in by_question.items()}
    assert flags["What is 2 + 3?"] == (False, True)
    assert flags["What is 5 + 5?"] == (True, False)
    assert flags["What is 1 + 1?"] == (True, False)
    for q in ("What is 4 + 4?", "What is 6 + 6?", "What is 3 + 3?"):
        assert flags[q] == (False, False)  # not solved: no trajectory passes the filter
    one = by_question["What is 1 + 1?"]
    assert one["verified"] and one["n_tool_calls"] == 1 and one["n_tool_ok"] == 0
    assert "NameError" in one["tool_calls"][0]["output"]
    assert by_question["What is 6 + 6?"]["repetition"] > 0.5
    stats = ctx.extra_stats
    assert stats["problems"] == 6 and stats["kept"] == 2 and stats["hint_only_solved"] == 1
    assert stats["solved_without_hints"] == 2 and stats["verified"] == 5
    assert stats["verdicts"]["equal"] == 5
    assert sum(stats["verdicts"].values()) == stats["trajectories"]
    assert stats["sandbox"] in (
        ["namespace-unshare"],
        ["socket-denied-seccomp"],
        ["socket-denied-audit"],
    )
    part = HintInferStats.from_dict(stats)
    merged = HintInferStats.merge([part, part]).to_dict()
    assert merged["kept"] == 4 and merged["rounds"] == stats["rounds"]
    assert merged["hints"] == {"stop": 2 * stats["hints"]["stop"]}
    assert merged["sandbox"] == stats["sandbox"]
    assert merged["verdicts"] == {k: 2 * n for k, n in stats["verdicts"].items()}
    assert stats["calls"] == stats["rounds"] == len(engine.calls)
    # START's seed set: only problems greedy decoding got wrong
    only = HintInfer(HintInferConfig(prefill_code_fence=True, hint_only=True)).process(
        frame, context(tmp_path / "only", ScriptedEngine(graded))
    )
    kept_only = only.filter(pl.col(DROP_REASON).is_null())
    assert kept_only["prompt"].to_list() == ["What is 2 + 3?"]
    assert "solved_without_hints" in only[DROP_REASON].to_list()


def test_rows_without_reference_are_rejected(tmp_path: Path) -> None:
    frame = problems_frame([(2, 3)]).with_columns(pl.lit(None, pl.String()).alias("reference"))
    out = HintInfer(HintInferConfig()).process(frame, context(tmp_path, ScriptedEngine(solver)))
    assert out[DROP_REASON].to_list() == ["no_reference"]


def test_code_problems_run_humaneval_tests(tmp_path: Path) -> None:
    frame = read_records(
        DATA / "humaneval_10.jsonl", mapping={"prompt": "prompt", "reference": "test"}
    ).head(2)
    solutions = dict(zip(frame["entry_point"], frame["canonical_solution"], strict=True))
    prompts = dict(zip(frame["entry_point"], frame["prompt"], strict=True))

    def coder(user: str, so_far: str) -> str:
        name = next(n for n in solutions if f"def {n}(" in user)
        wrong = name == "separate_paren_groups"  # returns nothing, tests it wrongly
        if so_far.endswith("```python\n"):
            call = "('(()) ()')" if wrong else "([1.0, 2.0, 2.1], 0.3)"
            return f"print({name}{call})\n```"
        ran = so_far.count("```output")
        if ran == 0:
            body = "    return []\n" if wrong else solutions[name]
            return f"```python\n{prompts[name]}{body}```"
        return "It should be right." if ran == 1 else "The function works."

    cfg = HintInferConfig(
        verifier="code",
        entry_point_column="entry_point",
        prelude_prompt=True,
        prefill_code_fence=True,
    )
    out = HintInfer(cfg).process(frame, context(tmp_path, ScriptedEngine(coder)))
    rows = {r["entry_point"]: r for r in out.iter_rows(named=True)}
    good = rows["has_close_elements"]
    assert good[DROP_REASON] is None and good["verified"]
    assert [c["output"] for c in good["tool_calls"]] == ["", "True"]
    assert good["hints"][0]["hint_id"].startswith("code-")
    assert "check(has_close_elements)" in good["reference"]
    assert final_program(good["response"], "has_close_elements").startswith("from typing")
    bad = rows["separate_paren_groups"]
    assert bad[DROP_REASON] == "not_verified" and bad["verdict_reason"] == "failed"
    assert [c["output"] for c in bad["tool_calls"]] == ["", "[]"]


# ---- helpers and config ---------------------------------------------------------------------


def test_fenced_blocks_and_outputs() -> None:
    text = "a\n```python\nx = 1\n```\n```output\n1\n```\nb\n```py\nopen"
    blocks = fenced_blocks(text)
    assert [(b.tag, b.body, b.closed) for b in blocks] == [
        ("python", "x = 1\n", True),
        ("output", "1\n", True),
        ("py", "open", False),
    ]
    assert strip_outputs(text) == "a\n```python\nx = 1\n```\n\nb\n```py\nopen"


def test_cut_final_answer() -> None:
    assert cut_final_answer("2 + 3 = 5.\nThe answer is 5.") == "2 + 3 = 5."
    assert cut_final_answer("So x = 5. The answer is 5.\nThe answer is 5.") == "So x = 5."
    assert cut_final_answer("Thus \\boxed{5}") == ""
    assert cut_final_answer("no answer stated") == "no answer stated"
    assert cut_final_answer("The answer is 4.\n5. Done.\nFinal answer: 5") == (
        "The answer is 4.\n5. Done."
    )


def test_hint_library() -> None:
    kinds = {(h.domain, h.kind) for h in LIBRARY}
    assert {
        ("math", "calculation"),
        ("math", "self-check"),
        ("math", "alternative"),
        ("code", "debug"),
        ("code", "test"),
    } <= kinds
    assert all(h.domain == "code" for h in hints_for("code"))
    assert hints_for("math", ("code-test",)) == (get_hint("code-test"),)
    with pytest.raises(ValueError, match="unknown hint"):
        get_hint("nope")


def test_config_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="unknown hint"):
        HintInferConfig(hint_ids=("math-nope",))
    with pytest.raises(ValueError, match="insert_at"):
        HintInferConfig(insert_at=("middle",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="samples > 1"):
        HintInferConfig(samples=2, temperature=0.0)
    with pytest.raises(ValueError, match="trigger_position"):
        HintInferConfig(trigger_position="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hint_edit"):
        HintInferConfig(hint_edit="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trigger_hints"):
        HintInferConfig(trigger_hints=-1)
    with pytest.raises(ValueError, match="triggers"):
        HintInferConfig(triggers=())
    with pytest.raises(RecipeError, match="insert_at"):
        Recipe.from_dict(
            {"input": {"rows": 1}, "stages": [{"hint_infer": {"insert_at": ["end"]}}]}, where="r"
        )


def test_engine_without_max_model_len_needs_config(tmp_path: Path) -> None:
    engine = ScriptedEngine(solver, max_model_len=None)
    frame = problems_frame([(2, 3)])
    with pytest.raises(ValueError, match="max_model_len"):
        HintInfer(HintInferConfig()).process(frame, context(tmp_path, engine))
    out = HintInfer(HintInferConfig(max_model_len=1000, prefill_code_fence=True)).process(
        frame, context(tmp_path / "b", engine)
    )
    assert out[DROP_REASON].to_list() == [None]


def test_a_weak_sandbox_needs_the_recipes_opt_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from gristmill.sandbox import WeakIsolationError, probes

    monkeypatch.setattr(probes, "isolation", lambda: "socket-denied-audit")
    engine = ScriptedEngine(solver)
    frame = problems_frame([(2, 3)])
    with pytest.raises(WeakIsolationError, match=r"stage 'hint_infer'.*isolation: weak"):
        HintInfer(HintInferConfig()).process(frame, context(tmp_path, engine))
    assert engine.calls == []  # refused before any model time was spent
    cfg = HintInferConfig(prefill_code_fence=True, isolation="weak")
    with caplog.at_level("WARNING", logger="gristmill.sandbox"):
        ctx = context(tmp_path / "weak", engine)
        out = HintInfer(cfg).process(frame, ctx)
    assert out[DROP_REASON].to_list() == [None]
    assert ctx.extra_stats["sandbox"] == ["socket-denied-audit"]
    assert "isolation: weak" in caplog.text
    with pytest.raises(ValueError, match="isolation"):
        HintInferConfig(isolation="none")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["start-math", "start-code"])
def test_recipes_load_with_the_shared_engine(name: str) -> None:
    recipe = Recipe.from_yaml(ROOT / "recipes" / f"{name}.yaml")
    assert recipe.engine == EngineSpec()  # tests share the session's engine
    (entry,) = recipe.stages
    assert type(entry) is HintInfer
    cfg = entry.config
    assert isinstance(cfg, HintInferConfig) and cfg.prefill_code_fence
    assert cfg.insert_at == ("stop", "trigger") and cfg.hint_edit == "strip"
    if name == "start-code":
        assert recipe.input.path is not None and (ROOT / recipe.input.path).exists()
        frame = read_records(ROOT / recipe.input.path, mapping=dict(recipe.input.mapping))
        assert frame.height == 20 and set(HintInfer(cfg).requires()) <= set(frame.columns)


def test_recipe_code_slice_canonical_solutions_verify() -> None:
    """The start-code data: a trajectory ending in each canonical solution passes its tests
    through the stage's own reference and program extraction (and an empty body fails)."""
    frame = read_records(
        ROOT / "recipes" / "data" / "humaneval_easy_20.jsonl",
        mapping={"prompt": "prompt", "reference": "test"},
    )
    cfg = HintInferConfig(verifier="code", entry_point_column="entry_point")
    verify = get_verifier("code", timeout_s=10)
    for row in frame.iter_rows(named=True):
        good = f"```python\n{row['prompt']}{row['canonical_solution']}```\n```output\n```\nDone."
        bad = f"```python\n{row['prompt']}    pass\n```"
        reference = problem_reference(cfg, row)
        for text, expected in ((good, True), (bad, False)):
            shown = verifier_input(text, "code", row["entry_point"])
            assert verify(shown, reference).correct is expected, (row["task_id"], expected)
