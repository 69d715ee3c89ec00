"""The `hint_infer` stage: START's Hint-infer tool loop, then Hint-RFT's filter and modify step.

After Li et al. 2025, "START: Self-taught Reasoner with Tools" (arXiv 2503.04625).

The tool loop. Each trajectory is the assistant's text so far; its prompt is the chat
prompt (`Engine.chat_prompt`, ending in the assistant's generation prompt) followed by that
text, so every round continues it. Every round is ONE `generate` call over all live
trajectories (each with its own seed and budget). A round ends a trajectory's generation at:

- the closing fence of a ```python block (stop string "\\n```\\n", or the end of the text
  right after such a fence): the cell runs in the sandbox and "```output\\n...\\n```" is
  appended; generation continues next round. All cells of a round run in parallel
  (`SandboxPool`). Cells share no process: each cell gets the earlier successful cells of
  its trajectory (and, with `prelude_prompt`, the problem's prompt, e.g. a HumanEval
  signature with its imports) replayed as a silent prelude, so variables and functions
  persist like in a notebook. Other fences (an untagged block, a model-written
  "```output") are put back and generation continues without running anything (a round
  that wrote nothing but such a fence ends the trajectory: `degenerate`);
- the end of the answer (`insert_at: [stop]`): the closing answer statement is cut
  (`hints.cut_final_answer`) and a hint is appended, up to `hint_rounds` times per
  trajectory (sequential test-time scaling).

Trigger hints (`insert_at: [trigger]`) go right before one of the model's own whole-word
"Wait" / "Alternatively", whose word then opens the hint ("Wait, I should test ..."). They
are not stop strings (vLLM stops at the first occurrence, inside words too: "Waiting"):
each round generates to its natural stop, the whole-word triggers in the prose it wrote are
found (`hints.trigger_matches`; none when the round opened a python block itself, the model
then turns to the tool unasked), and `trigger_position` picks one: the `first`, the `last`,
a seeded `random` one, or `every` (the first each time, without a cap: a hint after every
trigger the model writes). The round's text is cut there, the hint appended, and the next
round continues from it; the cut-away tokens are counted in `discarded_tokens`, not in the
budget. Up to `trigger_hints` trigger hints per trajectory (`every`: until the tool-call
cap), besides the `hint_rounds` stop hints; by default both kinds are inserted, as START
inserts hints after such conjunctions and before the stop token. `prefill_code_fence`
appends "```python\\n" after every hint, for models too small to open a code block on their
own.

Caps: `max_tool_calls` cells per trajectory (a block past the cap ends it, `tool_cap`),
`max_tokens` generated tokens per trajectory over all rounds, and the context: prompt plus
trajectory stay under `context_fraction` of the model's maximum length. `max_rounds` bounds
the loop. The trajectories are saved after every round in the part's state folder, so a
crashed run resumes at the last finished round; per-round seeds derive from (problem,
sample, round), so the resumed run continues exactly as an uninterrupted one would.

Hint-RFT. Each problem also gets one plain greedy answer (no hints, no tools), sent in the
first round's call. Trajectories are verified (math: the final answer stated in prose,
outside code and output blocks; code: the last block defining the entry point, against the
tests in the sandbox). A trajectory is kept when it finished within its caps, verifies, made
at least one successful tool call, is not repetitive and holds no output block the sandbox
did not write; the others go to `rejected/` with the reason. `hint_only_solved` marks
problems solved with hints (some trajectory kept) but not by the greedy answer (START's
seed set; `hint_only: true` keeps only those). Kept trajectories then go through Hint-RFT's
modify step (`hints.edit_hints`, `hint_edit`): a hint that begins a sentence and is followed
directly by its python block is stripped (the trajectory then reads as the model reaching
for Python on its own); any other hint stays and is marked (`hints[].edit`, with its offset
and sentence, for a trainer to mask). Kept trajectories become SFT records (code and outputs
inline) whose `parent_id` is the problem's id; the rejected keep their text as generated.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import polars as pl

from gristmill.engines.base import Completion, Message, Sampling
from gristmill.filters.heuristics import duplicate_ngram_fraction
from gristmill.pipelines.checkpoint import read_loop_state, write_loop_state
from gristmill.pipelines.stage import (
    ROW_COLUMN,
    LLMConfig,
    Map,
    MeteredEngine,
    StageConfig,
    StageContext,
)
from gristmill.pipelines.stats import ExtraStats, counts, most, summed, union
from gristmill.records import CORE_COLUMNS, DROP_REASON, make_record, records_frame
from gristmill.sandbox import (
    ISOLATION_SETTINGS,
    CellResult,
    IsolationSetting,
    Limits,
    SandboxPool,
    require_isolation,
)
from gristmill.synth.hints import (
    HINT_EDITS,
    TRIGGER_POSITIONS,
    Hint,
    HintEdit,
    TriggerMatch,
    TriggerPosition,
    cut_final_answer,
    edit_hints,
    hints_for,
    pick_trigger,
    trigger_matches,
)
from gristmill.synth.sampling import round_bar, usable_queries, with_rejected
from gristmill.verify import get_verifier
from gristmill.verify.base import Verdict, verify_many
from gristmill.verify.code import humaneval_reference

log = logging.getLogger("gristmill.hint_infer")

#: Stop string that ends a code block: a fence alone on its line ("\n```\n").
FENCE_STOP = "\n```\n"
PYTHON_TAGS = frozenset({"python", "py", "python3", "py3"})
CODE_FENCE = "```python\n"
STATE_FILE = "hint_infer.json"
#: Fewer free context tokens than this ends a trajectory (`context`).
MIN_ROUND_TOKENS = 8
InsertPoint = Literal["stop", "trigger"]
#: How a trajectory ended: the model finished (`eos`), a cap ended it, or it looped on empty
#: fenced blocks (`degenerate`: a round that wrote nothing but a fence outside python).
FINISHES = ("eos", "max_tokens", "context", "tool_cap", "max_rounds", "degenerate")


@dataclass(frozen=True, kw_only=True)
class HintInferConfig(LLMConfig):
    """Prompt, sampling, hints, caps, sandbox and Hint-RFT filter of the `hint_infer` stage."""

    #: The user turn; `{prompt}` is replaced by the problem's prompt.
    prompt_template: str = "{prompt}"
    system: str | None = None
    #: `math` (final answer vs reference) or `code` (the final program against tests).
    verifier: Literal["math", "code"] = "math"
    #: Math only: accept the last number of a trajectory that states no explicit answer.
    allow_last_number: bool = False
    #: Math only: when answer and reference both carry a unit, they must be the same one.
    compare_units: bool = False
    #: Code: a column naming the function under test (HumanEval `entry_point`); the reference
    #: then holds HumanEval's `test` code and is completed with `humaneval_reference`.
    entry_point_column: str | None = None
    #: Replay the problem's prompt before every cell (a HumanEval signature and its imports).
    prelude_prompt: bool = False
    #: Sampling of the hinted trajectories (START samples; the baseline is always greedy).
    temperature: float = 0.7
    top_p: float = 0.95
    #: Trajectories per problem (each with its own seeds).
    samples: int = 1
    #: Generated tokens per trajectory over all rounds (hints and outputs not counted).
    max_tokens: int = 1024
    #: Prompt plus trajectory stay under this fraction of the model's maximum length.
    context_fraction: float = 0.8
    #: The model's maximum length, when the engine does not say (vLLM does).
    max_model_len: int | None = None
    max_tool_calls: int = 6
    #: Safety bound on loop rounds (each live trajectory generates once per round).
    max_rounds: int = 32
    #: Library hint ids to draw from (empty: every hint of the verifier's domain).
    hint_ids: tuple[str, ...] = ()
    #: `random`: a seeded draw per insertion; `cycle`: the hints in order.
    hint_choice: Literal["random", "cycle"] = "random"
    #: Insertion points: `stop` (where the model ends its answer), `trigger` (before one of
    #: its own whole-word "Wait"/"Alternatively", whose word opens the hint).
    insert_at: tuple[InsertPoint, ...] = ("stop", "trigger")
    #: Whole words, case-sensitive ("Wait" is not found in "Waiting").
    triggers: tuple[str, ...] = ("Wait", "Alternatively")
    #: Which trigger of a round's text gets the hint: `first`, `last`, `random` (seeded) or
    #: `every` (each trigger in turn, `trigger_hints` not applying).
    trigger_position: TriggerPosition = "random"
    #: Most trigger hints per trajectory (`first`, `last`, `random`).
    trigger_hints: int = 1
    #: Most stop hints per trajectory (N rounds of sequential test-time scaling).
    hint_rounds: int = 1
    #: At `stop`: cut the closing answer statement before inserting the hint.
    cut_final_answer: bool = True
    #: Append "```python\n" after each hint so a small model starts writing code at once.
    prefill_code_fence: bool = False
    #: Sandbox limits of one cell, and the characters of output kept (head + tail).
    cell_timeout_s: float = 10.0
    cell_memory_mb: int = 1024
    max_output_chars: int = 1000
    sandbox_workers: int = 4
    #: `strong`: refuse to run cells where only a weak sandbox tier works (no namespaces;
    #: a cell running as root could write host files); `weak`: run there anyway, warned.
    isolation: IsolationSetting = "strong"
    #: Plain greedy decoding per problem (`solved_without_hints`, `hint_only_solved`).
    baseline: bool = True
    #: Hint-RFT: keep only trajectories with at least one successful tool call.
    require_tool_call: bool = True
    #: Hint-RFT: drop trajectories whose duplicate word n-gram fraction exceeds this.
    max_repetition: float | None = 0.5
    repetition_n: int = 5
    #: Hint-RFT: keep only problems the greedy answer got wrong (START's seed set).
    hint_only: bool = False
    #: Hint-RFT's modify step on kept trajectories: `strip` removes each hint that can go
    #: without breaking the text and marks the rest; `mark` removes none and marks all.
    hint_edit: HintEdit = "strip"
    verify_workers: int = 4

    def __post_init__(self) -> None:
        where = "hint_infer config"
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"{where}: prompt_template must contain {{prompt}}")
        if self.verifier not in ("math", "code"):
            raise ValueError(f"{where}: verifier must be 'math' or 'code', got {self.verifier!r}")
        if self.isolation not in ISOLATION_SETTINGS:
            raise ValueError(
                f"{where}: isolation must be 'strong' or 'weak', got {self.isolation!r}"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"{where}: need temperature >= 0 and top_p in (0, 1]")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"{where}: samples > 1 needs temperature > 0 (greedy repeats)")
        if not 0 < self.context_fraction <= 1:
            raise ValueError(f"{where}: context_fraction must be in (0, 1]")
        for name in ("samples", "max_tokens", "max_tool_calls", "max_rounds", "sandbox_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("hint_rounds", "trigger_hints", "max_output_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"{where}: {name} must be >= 0, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValueError(f"{where}: max_model_len must be >= 16, got {self.max_model_len}")
        object.__setattr__(self, "insert_at", tuple(self.insert_at))
        object.__setattr__(self, "triggers", tuple(self.triggers))
        object.__setattr__(self, "hint_ids", tuple(self.hint_ids))
        bad = [p for p in self.insert_at if p not in ("stop", "trigger")]
        if bad:
            raise ValueError(f"{where}: insert_at takes 'stop' and 'trigger', got {bad}")
        if "trigger" in self.insert_at and not (
            self.triggers and all(t.strip() for t in self.triggers)
        ):
            raise ValueError(f"{where}: insert_at 'trigger' needs non-empty triggers")
        if self.trigger_position not in TRIGGER_POSITIONS:
            raise ValueError(
                f"{where}: trigger_position must be one of {list(TRIGGER_POSITIONS)}, "
                f"got {self.trigger_position!r}"
            )
        if self.hint_edit not in HINT_EDITS:
            raise ValueError(
                f"{where}: hint_edit must be one of {list(HINT_EDITS)}, got {self.hint_edit!r}"
            )
        if self.max_repetition is not None and not 0 <= self.max_repetition <= 1:
            raise ValueError(f"{where}: max_repetition must be in [0, 1]")
        if self.verifier == "math" and self.entry_point_column is not None:
            raise ValueError(f"{where}: entry_point_column is for the code verifier")
        hints_for(self.verifier, self.hint_ids)  # unknown ids fail here, before any model time


# ---- trajectories -----------------------------------------------------------------------------


@dataclass
class ToolCall:
    """One executed cell: its code, how it ended, the output shown to the model."""

    code: str
    status: str
    output: str
    seconds: float
    #: Character offset of the "```output" block in the trajectory.
    position: int
    round: int


@dataclass
class HintUse:
    """One inserted hint: which, at which point (`stop` or `trigger:<word>`), where, and the
    sentence as it stands in the text (for a trigger, opened by the model's own word)."""

    hint_id: str
    point: str
    #: Character offset of the hint's first character in the trajectory.
    position: int
    round: int
    text: str

    @property
    def kind(self) -> str:
        """`stop` or `trigger`."""
        return self.point.split(":", 1)[0]


@dataclass
class Trajectory:
    """One hinted, tool-using answer to one problem, grown round by round."""

    query_id: str
    sample: int
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    hints: list[HintUse] = field(default_factory=list)
    rounds: int = 0
    #: Generated tokens in `text` (what `max_tokens` bounds).
    output_tokens: int = 0
    #: Generated tokens cut away again to put a hint before a trigger word.
    discarded_tokens: int = 0
    #: None while live; else one of FINISHES.
    finish: str | None = None
    seeds: list[int] = field(default_factory=list)

    @property
    def live(self) -> bool:
        """Whether the trajectory still generates (no finish yet)."""
        return self.finish is None

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Trajectory:
        """Rebuild a trajectory saved with `asdict`."""
        values = dict(data)
        values["tool_calls"] = [ToolCall(**c) for c in values["tool_calls"]]
        values["hints"] = [HintUse(**h) for h in values["hints"]]
        return Trajectory(**values)


@dataclass(frozen=True, kw_only=True)
class Baseline:
    """The plain greedy answer to one problem."""

    text: str
    finish_reason: str
    output_tokens: int


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One problem: its id, the rendered chat prompt, and cells to replay before each cell."""

    id: str
    prompt_text: str
    prelude: tuple[str, ...] = ()


@dataclass
class LoopState:
    """Everything a resumed loop needs: rounds and calls so far, trajectories, baselines."""

    rounds: int = 0
    calls: int = 0
    trajectories: list[Trajectory] = field(default_factory=list)
    baselines: dict[str, Baseline] = field(default_factory=dict)


# ---- fenced blocks ----------------------------------------------------------------------------

_FENCE_LINE = re.compile(r"^[ \t]*```[ \t]*([^\s`]*)[^\n]*$", re.MULTILINE)


@dataclass(frozen=True, kw_only=True)
class Block:
    """A fenced block of a trajectory: tag, body, span, and whether its fence is closed."""

    tag: str
    body: str
    start: int
    end: int
    closed: bool


def fenced_blocks(text: str) -> list[Block]:
    """Every ``` block of `text` in order; the last one may be open (no closing fence yet)."""
    blocks: list[Block] = []
    opened: tuple[str, int, int] | None = None  # tag, fence start, body start
    for m in _FENCE_LINE.finditer(text):
        tag = m.group(1).lower()
        if opened is None:
            opened = (tag, m.start(), min(m.end() + 1, len(text)))
        elif not tag:
            blocks.append(
                Block(
                    tag=opened[0],
                    body=text[opened[2] : m.start()],
                    start=opened[1],
                    end=m.end(),
                    closed=True,
                )
            )
            opened = None
    if opened is not None:
        blocks.append(
            Block(
                tag=opened[0], body=text[opened[2] :], start=opened[1], end=len(text), closed=False
            )
        )
    return blocks


def open_block(text: str) -> Block | None:
    """The block `text` ends inside of, if any."""
    blocks = fenced_blocks(text)
    return blocks[-1] if blocks and not blocks[-1].closed else None


def strip_outputs(text: str) -> str:
    """`text` without its ```output blocks: what the model itself wrote."""
    return _strip_blocks(text, lambda b: b.tag == "output")


def prose(text: str) -> str:
    """`text` without any fenced block: where a math answer must be stated (an answer
    printed by code, or written in a code string, is not the model's final answer)."""
    return _strip_blocks(text, lambda b: True)


def _strip_blocks(text: str, drop: Callable[[Block], bool]) -> str:
    out, last = [], 0
    for b in fenced_blocks(text):
        if drop(b):
            out.append(text[last : b.start])
            last = b.end
    out.append(text[last:])
    return "".join(out)


def final_program(text: str, entry_point: str | None) -> str | None:
    """The program a code trajectory settles on: its last ```python block that defines
    `entry_point` (any last python block when none does or no entry point is known)."""
    python = [b.body for b in fenced_blocks(text) if b.tag in PYTHON_TAGS and b.body.strip()]
    if not python:
        return None
    if entry_point:
        pattern = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.M)
        defining = [p for p in python if pattern.search(p)]
        if defining:
            return defining[-1]
    return python[-1]


def cell_output(result: CellResult, limit: int) -> str:
    """What the model sees of a cell: stdout, then the error (traceback or limit) if any,
    cut to `limit` characters (head and tail)."""
    text = result.stdout
    if result.status != "ok":
        error = result.stderr.strip()
        if result.status == "timeout":
            error = f"TimeoutError: the cell ran longer than the {result.seconds:.0f}s limit"
        elif not error:
            error = f"Error: {result.reason or result.status}"
        text = f"{text.rstrip()}\n{error}" if text.strip() else error
    text = text.rstrip()
    if len(text) <= limit:
        return text
    half = max(limit // 2, 1)
    return f"{text[:half]}\n...\n{text[-half:]}"


# ---- the loop ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LoopSettings:
    """The loop's knobs (taken from HintInferConfig) and the context limit in tokens."""

    temperature: float
    top_p: float
    samples: int
    max_tokens: int
    context_tokens: int
    max_tool_calls: int
    max_rounds: int
    hints: tuple[Hint, ...]
    hint_choice: str
    insert_at: tuple[str, ...]
    triggers: tuple[str, ...]
    trigger_position: str
    trigger_hints: int
    hint_rounds: int
    cut_final_answer: bool
    prefill_code_fence: bool
    max_output_chars: int
    baseline: bool

    @staticmethod
    def from_config(cfg: HintInferConfig, max_model_len: int) -> LoopSettings:
        """Settings for a model whose context holds `max_model_len` tokens."""
        return LoopSettings(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            samples=cfg.samples,
            max_tokens=cfg.max_tokens,
            context_tokens=int(cfg.context_fraction * max_model_len),
            max_tool_calls=cfg.max_tool_calls,
            max_rounds=cfg.max_rounds,
            hints=hints_for(cfg.verifier, cfg.hint_ids),
            hint_choice=cfg.hint_choice,
            insert_at=cfg.insert_at,
            triggers=cfg.triggers,
            trigger_position=cfg.trigger_position,
            trigger_hints=cfg.trigger_hints,
            hint_rounds=cfg.hint_rounds,
            cut_final_answer=cfg.cut_final_answer,
            prefill_code_fence=cfg.prefill_code_fence,
            max_output_chars=cfg.max_output_chars,
            baseline=cfg.baseline,
        )


SeedFor = Callable[..., int]


def _save(state_dir: Path, state: LoopState, ids: Sequence[str]) -> None:
    write_loop_state(
        state_dir / STATE_FILE,
        ids,
        rounds=state.rounds,
        calls=state.calls,
        trajectories=[asdict(t) for t in state.trajectories],
        baselines={k: asdict(v) for k, v in state.baselines.items()},
    )


def load_loop_state(state_dir: Path | None, ids: Sequence[str]) -> LoopState | None:
    """The saved state of an interrupted loop over the same problems, or None."""
    if state_dir is None:
        return None
    data = read_loop_state(state_dir / STATE_FILE, ids, "hint_infer")
    if data is None:
        return None
    return LoopState(
        rounds=int(data["rounds"]),
        calls=int(data["calls"]),
        trajectories=[Trajectory.from_json(t) for t in data["trajectories"]],
        baselines={k: Baseline(**v) for k, v in data["baselines"].items()},
    )


def _pick_hint(s: LoopSettings, t: Trajectory, seed_for: SeedFor) -> Hint:
    k = len(t.hints)
    if s.hint_choice == "cycle":
        return s.hints[(k + t.sample) % len(s.hints)]
    return s.hints[seed_for(t.query_id, t.sample, "hint", k) % len(s.hints)]


def _insert_hint(
    s: LoopSettings, t: Trajectory, point: str, round_: int, seed_for: SeedFor
) -> None:
    """Append a hint (after the trigger word, or in place of the closing answer)."""
    hint = _pick_hint(s, t, seed_for)
    if point == "stop":
        base = cut_final_answer(t.text) if s.cut_final_answer else t.text
        base = base.rstrip()
        sep = "\n\n" if base else ""
        position = len(base) + len(sep)
        sentence = hint.text
        t.text = base + sep
    else:
        position = len(t.text)
        sentence = hint.after(point.removeprefix("trigger:"))
    t.text += sentence + ("\n\n" + CODE_FENCE if s.prefill_code_fence else "\n")
    t.hints.append(
        HintUse(hint_id=hint.id, point=point, position=position, round=round_, text=sentence)
    )


def _hints_of(t: Trajectory, kind: str) -> int:
    return sum(1 for h in t.hints if h.kind == kind)


def _trigger_cut(
    s: LoopSettings, t: Trajectory, c: Completion, round_: int, seed_for: SeedFor
) -> TriggerMatch | None:
    """The trigger word in this round's text `c.text` a hint should go before (its offset
    relative to `c.text`), or None: not asked for, budget or tool cap reached, no whole-word
    trigger in the round's prose, or the round opened a python block of its own."""
    if "trigger" not in s.insert_at or len(t.tool_calls) >= s.max_tool_calls:
        return None
    if s.trigger_position != "every" and _hints_of(t, "trigger") >= s.trigger_hints:
        return None
    start = len(t.text)
    full = t.text + c.text
    blocks = fenced_blocks(full)
    if any(b.start >= start and b.tag in PYTHON_TAGS for b in blocks):
        return None
    skip = [(b.start, b.end) for b in blocks if b.end > start]
    matches = trigger_matches(full, s.triggers, start=start, skip=skip)
    if not matches:
        return None
    chosen = pick_trigger(
        matches, s.trigger_position, seed_for(t.query_id, t.sample, "trigger", round_)
    )
    return TriggerMatch(start=chosen.start - start, word=chosen.word)


@dataclass(frozen=True, kw_only=True)
class _Cell:
    trajectory: Trajectory
    code: str


def _advance(
    s: LoopSettings,
    t: Trajectory,
    c: Completion,
    budget_bound: str,
    round_: int,
    seed_for: SeedFor,
    count_tokens: Callable[[str], int],
) -> _Cell | None:
    """Apply one completion to a trajectory; a cell to run when it closed a python block."""
    t.rounds += 1
    trigger = _trigger_cut(s, t, c, round_, seed_for)
    if trigger is not None:  # cut before the trigger word: the hint continues from there
        kept = c.text[: trigger.start]
        tokens = min(count_tokens(kept), c.output_tokens) if kept else 0
        t.text += kept
        t.output_tokens += tokens
        t.discarded_tokens += c.output_tokens - tokens
        _insert_hint(s, t, f"trigger:{trigger.word}", round_, seed_for)
        return None
    t.text += c.text
    t.output_tokens += c.output_tokens
    if c.finish_reason != "stop":
        t.finish = budget_bound
        return None
    if c.stop == FENCE_STOP:
        block = open_block(t.text)
        t.text += FENCE_STOP
        if block is not None and block.tag in PYTHON_TAGS and block.body.strip():
            return _cell_or_cap(s, t, block.body)
        if not c.text.strip(" \n`"):  # nothing but fences: a loop of empty blocks
            t.finish = "degenerate"
        return None  # an untagged or non-python fence: put back, keep going
    # the model ended its answer (end of sequence)
    block = open_block(t.text)
    if block is not None:  # ended inside a block: close it, and run it if it is code
        t.text = t.text.rstrip("\n") + FENCE_STOP
        if block.tag in PYTHON_TAGS and block.body.strip():
            return _cell_or_cap(s, t, block.body)
        t.finish = "eos"
        return None
    blocks = fenced_blocks(t.text)
    last = blocks[-1] if blocks else None
    if (
        last is not None
        and last.tag in PYTHON_TAGS
        and last.body.strip()
        and not t.text[last.end :].strip()
    ):
        t.text = t.text[: last.end] + "\n"
        return _cell_or_cap(s, t, last.body)
    wants_hint = "stop" in s.insert_at and _hints_of(t, "stop") < s.hint_rounds
    if wants_hint and len(t.tool_calls) < s.max_tool_calls:
        _insert_hint(s, t, "stop", round_, seed_for)
        return None
    t.finish = "eos"
    return None


def _cell_or_cap(s: LoopSettings, t: Trajectory, code: str) -> _Cell | None:
    if len(t.tool_calls) >= s.max_tool_calls:
        t.finish = "tool_cap"
        return None
    return _Cell(trajectory=t, code=code.strip("\n"))


@dataclass(frozen=True)
class Request:
    """A trajectory's next request, and which budget would cut it short."""

    prompt: str
    sampling: Sampling
    bound: str


def next_request(
    s: LoopSettings,
    t: Trajectory,
    problem: Problem,
    count_tokens: Callable[[str], int],
    seed_for: SeedFor,
) -> Request | None:
    """The trajectory's next request (its seed recorded), or None when a token or context
    budget is spent (the trajectory then finishes with that reason)."""
    prompt = problem.prompt_text + t.text
    ctx_left = s.context_tokens - count_tokens(prompt)
    tok_left = s.max_tokens - t.output_tokens
    if tok_left < 1:
        t.finish = "max_tokens"
        return None
    if ctx_left < MIN_ROUND_TOKENS:
        t.finish = "context"
        return None
    seed = seed_for(t.query_id, t.sample, t.rounds)
    t.seeds.append(seed)
    sampling = Sampling(
        temperature=s.temperature,
        top_p=s.top_p,
        max_tokens=min(ctx_left, tok_left),
        stop=(FENCE_STOP,),
        seed=seed,
    )
    return Request(prompt, sampling, "context" if ctx_left < tok_left else "max_tokens")


def problem_ids(problems: Sequence[Problem]) -> tuple[list[str], dict[str, Problem]]:
    """The problems' ids in order and the problems by id; repeated ids are an error."""
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError("problems must have distinct ids")
    return ids, {p.id: p for p in problems}


def new_state(problems: Sequence[Problem], samples: int) -> LoopState:
    """A loop's start: `samples` empty trajectories per problem."""
    return LoopState(
        trajectories=[Trajectory(query_id=p.id, sample=j) for p in problems for j in range(samples)]
    )


def run_hint_loop(
    problems: Sequence[Problem],
    *,
    engine: MeteredEngine,
    settings: LoopSettings,
    pool: SandboxPool,
    seed_for: SeedFor,
    state_dir: Path | None = None,
    progress: Callable[[LoopState], None] | None = None,
) -> LoopState:
    """Run START's Hint-infer loop over `problems` until every trajectory has finished."""
    s = settings
    ids, by_id = problem_ids(problems)
    state = load_loop_state(state_dir, ids)
    if state is None:
        state = new_state(problems, s.samples)
    else:
        log.info("hint_infer: resuming after round %d", state.rounds)
    while True:
        live = [t for t in state.trajectories if t.live]
        if state.rounds >= s.max_rounds:
            for t in live:
                t.finish = "max_rounds"
            live = []
        prompts: list[str] = []
        params: list[Sampling] = []
        bounds: list[str] = []
        requests: list[Trajectory] = []
        for t in live:
            request = next_request(s, t, by_id[t.query_id], engine.count_tokens, seed_for)
            if request is None:
                continue
            prompts.append(request.prompt)
            params.append(request.sampling)
            bounds.append(request.bound)
            requests.append(t)
        greedy = []
        for p in problems if s.baseline else ():
            if p.id in state.baselines:
                continue
            ctx_left = s.context_tokens - engine.count_tokens(p.prompt_text)
            if ctx_left < MIN_ROUND_TOKENS:
                state.baselines[p.id] = Baseline(text="", finish_reason="context", output_tokens=0)
                continue
            greedy.append(p)
            prompts.append(p.prompt_text)
            params.append(
                Sampling(
                    temperature=0.0,
                    max_tokens=min(ctx_left, s.max_tokens),
                    seed=seed_for(p.id, "greedy"),
                )
            )
        if not prompts:
            return state
        outs = engine.generate(prompts, params)
        cells = []
        for t, out, bound in zip(requests, outs[: len(requests)], bounds, strict=True):
            cell = _advance(s, t, out[0], bound, state.rounds, seed_for, engine.count_tokens)
            if cell is not None:
                cells.append(cell)
        for p, out in zip(greedy, outs[len(requests) :], strict=True):
            c = out[0]
            state.baselines[p.id] = Baseline(
                text=c.text, finish_reason=c.finish_reason, output_tokens=c.output_tokens
            )
        _run_cells(cells, by_id, pool, s.max_output_chars, state.rounds)
        state.rounds += 1
        state.calls += 1
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
            _save(state_dir, state, ids)
        if progress is not None:
            progress(state)


def _run_cells(
    cells: Sequence[_Cell],
    problems: Mapping[str, Problem],
    pool: SandboxPool,
    limit: int,
    round_: int,
) -> None:
    """Run a round's cells in parallel and append each one's ```output block."""
    futures = []
    for cell in cells:
        t = cell.trajectory
        earlier = [c.code for c in t.tool_calls if c.status == "ok"]
        prelude = [*problems[t.query_id].prelude, *earlier]
        futures.append(pool.submit(cell.code, prelude=prelude))
    for cell, future in zip(cells, futures, strict=True):
        result = future.result()
        t = cell.trajectory
        output = cell_output(result, limit)
        position = len(t.text)
        t.text += f"```output\n{output}\n```\n" if output else "```output\n```\n"
        t.tool_calls.append(
            ToolCall(
                code=cell.code,
                status=result.status,
                output=output,
                seconds=round(result.seconds, 3),
                position=position,
                round=round_,
            )
        )


# ---- Hint-RFT ---------------------------------------------------------------------------------


def verifier_input(text: str, verifier: str, entry_point: str | None) -> str:
    """What the verifier checks: the model's prose (math) or its final program (code)."""
    if verifier == "math":
        return prose(text)
    program = final_program(text, entry_point)
    return f"```python\n{program}\n```" if program is not None else strip_outputs(text)


def drop_reason(
    t: Trajectory, verdict: Verdict, *, cfg: HintInferConfig, repetition: float
) -> str | None:
    """Why Hint-RFT rejects a trajectory (None: it solves the problem with the tool)."""
    if t.finish in ("max_tokens", "context", "max_rounds"):
        return "too_long"
    if t.finish == "tool_cap":
        return "too_many_tool_calls"
    if t.finish == "degenerate":
        return "degenerate"
    written = sum(1 for b in fenced_blocks(t.text) if b.tag == "output")
    if written > len(t.tool_calls):
        return "fake_output"
    if not verdict.correct:
        return "not_verified"
    if cfg.require_tool_call and not any(c.status == "ok" for c in t.tool_calls):
        return "no_tool_call"
    if cfg.max_repetition is not None and repetition > cfg.max_repetition:
        return "repetitive"
    return None


HINT_TYPE = pl.Struct(
    {
        "hint_id": pl.String(),
        "point": pl.String(),
        "position": pl.Int64(),
        "round": pl.Int64(),
        "text": pl.String(),
        #: Kept rows: `stripped` (no longer in the text; `position` is where it stood) or
        #: `marked` (still at `position`); null on rejected rows, whose text is as generated.
        "edit": pl.String(),
    }
)
TOOL_TYPE = pl.Struct(
    {
        "code": pl.String(),
        "status": pl.String(),
        "output": pl.String(),
        "seconds": pl.Float64(),
        "position": pl.Int64(),
        "round": pl.Int64(),
    }
)
#: Columns of a trajectory row (besides the record columns and the input's own columns).
TRAJECTORY_COLUMNS: dict[str, pl.DataType] = {
    "hints": pl.List(HINT_TYPE),
    "tool_calls": pl.List(TOOL_TYPE),
    "n_hints": pl.Int64(),
    "n_tool_calls": pl.Int64(),
    "n_tool_ok": pl.Int64(),
    "finish": pl.String(),
    "rounds": pl.Int64(),
    "output_tokens": pl.Int64(),
    "discarded_tokens": pl.Int64(),
    "sample_index": pl.Int64(),
    "sample_seeds": pl.List(pl.Int64()),
    "temperature": pl.Float64(),
    "top_p": pl.Float64(),
    "verified": pl.Boolean(),
    "verdict_extracted": pl.String(),
    "verdict_reason": pl.String(),
    "repetition": pl.Float64(),
    "solved_without_hints": pl.Boolean(),
    "baseline_extracted": pl.String(),
    "baseline_reason": pl.String(),
    "solved_with_hints": pl.Boolean(),
    "hint_only_solved": pl.Boolean(),
    DROP_REASON: pl.String(),
}
_NOT_PASSED = frozenset({*CORE_COLUMNS, ROW_COLUMN, DROP_REASON, "embedding"})


@dataclass(frozen=True, kw_only=True)
class _Shown:
    """A trajectory as its row shows it: the text, and the hints and tool calls with their
    offsets into that text."""

    text: str
    hints: list[dict[str, Any]]
    tool_calls: list[dict[str, Any]]

    @staticmethod
    def raw(t: Trajectory) -> _Shown:
        """As generated (rejected rows)."""
        return _Shown(
            text=t.text,
            hints=[{**asdict(h), "edit": None} for h in t.hints],
            tool_calls=[asdict(c) for c in t.tool_calls],
        )

    @staticmethod
    def edited(t: Trajectory, mode: str) -> _Shown:
        """After Hint-RFT's modify step (kept rows), offsets moved into the new text."""
        edit = edit_hints(t.text, [(h.position, h.text) for h in t.hints], mode)
        return _Shown(
            text=edit.text,
            hints=[
                {**asdict(h), "position": edit.moved(h.position), "edit": e}
                for h, e in zip(t.hints, edit.edits, strict=True)
            ],
            tool_calls=[{**asdict(c), "position": edit.moved(c.position)} for c in t.tool_calls],
        )


def problem_reference(cfg: HintInferConfig, row: Mapping[str, Any]) -> str:
    """What a problem's trajectories are checked against: its reference, or for HumanEval
    rows (`entry_point_column`) the tests completed by `humaneval_reference` (prompt-aware)."""
    column = cfg.entry_point_column
    if column is None:
        return str(row["reference"])
    return humaneval_reference(str(row["reference"]), str(row[column]), prompt=row["prompt"])


def conversation(cfg: HintInferConfig, prompt: str) -> list[Message]:
    """The conversation sent to the model for one problem (system turn optional)."""
    head: list[Message] = [{"role": "system", "content": cfg.system}] if cfg.system else []
    return [*head, {"role": "user", "content": cfg.prompt_template.replace("{prompt}", prompt)}]


@dataclass(frozen=True, kw_only=True)
class HintInferStats(ExtraStats):
    """What a part's loop did and what it kept; counts add up over parts."""

    problems: int = summed()
    trajectories: int = summed()
    #: Rounds of the loop: the stage took as many as its longest part.
    rounds: int = most()
    calls: int = summed()
    tool_calls: int = summed()
    tool_calls_ok: int = summed()
    trajectories_with_tool_ok: int = summed()
    #: Hints inserted, by insertion point (`stop`, `trigger`).
    hints: dict[str, int] = counts()
    #: Trigger hints, by the trigger word they went before.
    hint_triggers: dict[str, int] = counts()
    #: Hints of kept trajectories, by what the modify step did (`stripped`, `marked`).
    hint_edits: dict[str, int] = counts()
    #: Trajectories by how they ended.
    finish: dict[str, int] = counts()
    #: Trajectories by verdict reason (equal, not_equal, no_answer, ambiguous...).
    verdicts: dict[str, int] = counts()
    verified: int = summed()
    kept: int = summed()
    solved_with_hints: int = summed()
    solved_without_hints: int = summed()
    hint_only_solved: int = summed()
    output_tokens: int = summed()
    #: Tokens generated and cut away again to insert a trigger hint.
    discarded_tokens: int = summed()
    #: How sandbox cells were cut off from the network (`gristmill.sandbox.isolation`).
    sandbox: tuple[str, ...] = union()


class HintInfer(Map):
    """START: hints inserted into the reasoning, Python run in the sandbox, Hint-RFT keeps the
    verified tool-using trajectories."""

    name: ClassVar[str] = "hint_infer"
    needs_completions: ClassVar[str | None] = (
        "continues partial answers after hints and tool outputs (raw completions)"
    )
    version: ClassVar[str] = "2"
    kind: ClassVar[str] = "synth"
    citation: ClassVar[str | None] = (
        "Li et al., 2025. START: Self-taught Reasoner with Tools. arXiv:2503.04625"
    )
    Config: ClassVar[type[StageConfig]] = HintInferConfig
    Stats: ClassVar[type[ExtraStats] | None] = HintInferStats
    uses_engine: ClassVar[bool] = True
    unhashed: ClassVar[frozenset[str]] = frozenset(
        {"sandbox_workers", "verify_workers", "isolation"}
    )

    @property
    def cfg(self) -> HintInferConfig:
        """The stage config, typed."""
        assert isinstance(self.config, HintInferConfig)
        return self.config

    def requires(self) -> tuple[str, ...]:
        extra = (self.cfg.entry_point_column,) if self.cfg.entry_point_column else ()
        return ("id", "prompt", "reference", *extra)

    def produces(self) -> tuple[str, ...]:
        return ("parent_id", "hints", "tool_calls", "verified", "hint_only_solved")

    def process(self, batch: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
        cfg = self.cfg
        tier = require_isolation(self.name, cfg.isolation)  # before any model time is spent
        engine = ctx.engine()
        usable, rejected = usable_queries(batch.to_dicts(), self._bad_entry_point)
        max_len = cfg.max_model_len or getattr(engine.inner, "max_model_len", None)
        if not isinstance(max_len, int):
            raise ValueError(
                f"stage {self.name!r}: the engine does not report its maximum length; "
                "set max_model_len in the stage config"
            )
        problems = [
            Problem(
                id=row["id"],
                prompt_text=engine.chat_prompt(conversation(cfg, row["prompt"])),
                prelude=(row["prompt"],) if cfg.prelude_prompt else (),
            )
            for row in usable
        ]
        bar = round_bar(self.name, ctx)

        def progress(state: LoopState) -> None:
            bar.update(1)
            bar.set_postfix(live=sum(1 for t in state.trajectories if t.live))

        limits = Limits(
            timeout_s=cfg.cell_timeout_s,
            cpu_s=max(1, math.ceil(cfg.cell_timeout_s)),
            memory_mb=cfg.cell_memory_mb,
        )
        # the barrier-free loop builds on this module's pieces, so it is imported here
        from gristmill.synth.hint_flow import run_hint_steps

        with SandboxPool(max_workers=cfg.sandbox_workers, limits=limits) as pool:
            state = run_hint_steps(
                problems,
                engine=engine,
                settings=LoopSettings.from_config(cfg, max_len),
                pool=pool,
                seed_for=ctx.derive_seed,
                state_dir=ctx.state_dir,
                progress=progress,
            )
        bar.close()
        out = self._emit(usable, state, model=engine.model_id)
        stats = _stats(out, state, len(usable), sandbox=tier)
        ctx.extra_stats.update(stats.to_dict())
        return with_rejected(out, rejected)

    # ---- input and output ------------------------------------------------------------------
    def _bad_entry_point(self, row: dict[str, Any]) -> str | None:
        column = self.cfg.entry_point_column
        entry = row.get(column) if column else None
        if column and not (isinstance(entry, str) and entry.isidentifier()):
            return "bad_entry_point"
        return None

    def _emit(
        self, rows: Sequence[dict[str, Any]], state: LoopState, *, model: str
    ) -> pl.DataFrame:
        cfg = self.cfg
        verifier = (
            get_verifier(
                "math", allow_last_number=cfg.allow_last_number, compare_units=cfg.compare_units
            )
            if cfg.verifier == "math"
            else get_verifier("code", timeout_s=cfg.cell_timeout_s)
        )
        by_id = {row["id"]: row for row in rows}
        refs = {row["id"]: problem_reference(cfg, row) for row in rows}
        entry = {
            row["id"]: (str(row[cfg.entry_point_column]) if cfg.entry_point_column else None)
            for row in rows
        }
        trajs = state.trajectories
        base_ids = [qid for qid in by_id if qid in state.baselines]
        pairs = [
            (verifier_input(t.text, cfg.verifier, entry[t.query_id]), refs[t.query_id])
            for t in trajs
        ]
        pairs += [
            (verifier_input(state.baselines[q].text, cfg.verifier, entry[q]), refs[q])
            for q in base_ids
        ]
        verdicts = verify_many(verifier, pairs, cfg.verify_workers)
        traj_verdicts = verdicts[: len(trajs)]
        base = dict(zip(base_ids, verdicts[len(trajs) :], strict=True))
        greedy_ok = {
            q: v.correct and state.baselines[q].finish_reason == "stop" for q, v in base.items()
        }
        repetition = [
            duplicate_ngram_fraction(strip_outputs(t.text), cfg.repetition_n) for t in trajs
        ]
        reasons = [
            drop_reason(t, v, cfg=cfg, repetition=r)
            for t, v, r in zip(trajs, traj_verdicts, repetition, strict=True)
        ]
        # solved with hints: some trajectory passes Hint-RFT's filter
        solved = {t.query_id for t, r in zip(trajs, reasons, strict=True) if r is None}
        records: list[dict[str, Any]] = []
        kept_texts: dict[str, set[str]] = {}
        for t, verdict, rep, reason in zip(trajs, traj_verdicts, repetition, reasons, strict=True):
            row = by_id[t.query_id]
            g = greedy_ok.get(t.query_id)
            if reason is None and cfg.hint_only and g:
                reason = "solved_without_hints"
            shown = _Shown.raw(t)
            if reason is None:
                shown = _Shown.edited(t, cfg.hint_edit)
                seen = kept_texts.setdefault(t.query_id, set())
                if shown.text in seen:  # e.g. two samples that differed only in their hints
                    reason, shown = "duplicate", _Shown.raw(t)
                seen.add(shown.text)
            passed = {k: v for k, v in row.items() if k not in _NOT_PASSED}
            base_verdict = base.get(t.query_id)
            records.append(
                make_record(
                    [
                        *conversation(cfg, row["prompt"]),
                        {"role": "assistant", "content": shown.text},
                    ],
                    source=row["source"],
                    reference=refs[t.query_id],
                    parent_id=t.query_id,
                    model=model,
                    **passed,
                    hints=shown.hints,
                    tool_calls=shown.tool_calls,
                    n_hints=len(t.hints),
                    n_tool_calls=len(t.tool_calls),
                    n_tool_ok=sum(1 for c in t.tool_calls if c.status == "ok"),
                    finish=t.finish,
                    rounds=t.rounds,
                    output_tokens=t.output_tokens,
                    discarded_tokens=t.discarded_tokens,
                    sample_index=t.sample,
                    sample_seeds=list(t.seeds),
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    verified=verdict.correct,
                    verdict_extracted=verdict.extracted,
                    verdict_reason=verdict.reason,
                    repetition=round(rep, 6),
                    solved_without_hints=g,
                    baseline_extracted=base_verdict.extracted if base_verdict else None,
                    baseline_reason=base_verdict.reason if base_verdict else None,
                    solved_with_hints=t.query_id in solved,
                    hint_only_solved=(t.query_id in solved and g is False),
                    **{DROP_REASON: reason},
                )
            )
        schema = dict(TRAJECTORY_COLUMNS)
        if rows:
            frame = pl.DataFrame(list(rows), infer_schema_length=None)
            for k, v in frame.schema.items():
                if k not in _NOT_PASSED:
                    schema.setdefault(k, v)
        return records_frame(records, schema)


# ---- statistics -------------------------------------------------------------------------------


def _stats(out: pl.DataFrame, state: LoopState, problems: int, *, sandbox: str) -> HintInferStats:
    """One part's statistics from its output rows and its loop's final state."""
    trajs = state.trajectories
    hints: dict[str, int] = {}
    triggers: dict[str, int] = {}
    for t in trajs:
        for h in t.hints:
            hints[h.kind] = hints.get(h.kind, 0) + 1
            if h.kind == "trigger":
                word = h.point.split(":", 1)[1]
                triggers[word] = triggers.get(word, 0) + 1
    finish: dict[str, int] = {}
    for t in trajs:
        finish[str(t.finish)] = finish.get(str(t.finish), 0) + 1
    verdicts: dict[str, int] = {}
    for reason in out["verdict_reason"].drop_nulls() if out.height else ():
        verdicts[reason] = verdicts.get(reason, 0) + 1
    kept = out.filter(pl.col(DROP_REASON).is_null()) if out.height else out
    edits: dict[str, int] = {}
    for row_hints in kept["hints"].to_list() if kept.height else ():
        for h in row_hints:
            edits[h["edit"]] = edits.get(h["edit"], 0) + 1
    per_problem = (
        out.group_by("parent_id").agg(
            pl.col("solved_with_hints").first(),
            pl.col("solved_without_hints").first(),
            pl.col("hint_only_solved").first(),
        )
        if out.height
        else None
    )

    def count(column: str) -> int:
        return 0 if per_problem is None else int(per_problem[column].fill_null(False).sum())

    return HintInferStats(
        problems=problems,
        trajectories=len(trajs),
        rounds=state.rounds,
        calls=state.calls,
        tool_calls=sum(len(t.tool_calls) for t in trajs),
        tool_calls_ok=sum(1 for t in trajs for c in t.tool_calls if c.status == "ok"),
        trajectories_with_tool_ok=sum(
            1 for t in trajs if any(c.status == "ok" for c in t.tool_calls)
        ),
        hints=hints,
        hint_triggers=triggers,
        hint_edits=edits,
        finish=finish,
        verdicts=verdicts,
        verified=int(out["verified"].sum()) if out.height else 0,
        kept=kept.height,
        solved_with_hints=count("solved_with_hints"),
        solved_without_hints=count("solved_without_hints"),
        hint_only_solved=count("hint_only_solved"),
        output_tokens=sum(t.output_tokens for t in trajs),
        discarded_tokens=sum(t.discarded_tokens for t in trajs),
        sandbox=(sandbox,),
    )
