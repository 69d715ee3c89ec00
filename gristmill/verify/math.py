"""Math answer checking: pull the final answer out of a solution, then test equivalence.

Extraction (`extract_answer`), in order: the last `\\boxed{...}` / `\\fbox{...}` (nested
braces), GSM8K's `#### x`, the last "The answer is x" / "Final answer: x", and (only when
asked) the last number in the text.

Equivalence (`answers_equal`) has two paths. Plain numbers (integers, decimals, `1,000`,
`a/b`, `\\frac{a}{b}`, `50%`, `$5`, `5 dollars`, `1e-3`) are decided in-process with exact
fractions, no sympy: that covers almost every GSM8K and arithmetic answer. Everything else
(LaTeX expressions, sets, intervals, radicals...) goes to the `math-verify` package, run with
its own signal-based timeouts disabled inside a small pool of helper processes, each call
under a wall-clock limit (`timeout_s`); a call that runs over kills its helper and counts
as not equal (reason "timeout"). `signal.alarm` only works on the main thread, so this is
what makes the checker safe in Prefect task threads, Dask workers and thread pools.

Conventions:
- Integers and fractions compare exactly; when either side is written as a decimal (or in
  scientific notation) it is an approximation and the two agree within `rel_tol` (relative).
- Percentages follow math-verify: `50%` equals both `0.5` and `50` (word problems ask "what
  percent" and expect `50`); two percentages compare as they are written (`50%` != `0.5%`).
- Thousands separators must be well formed: `1,000` is 1000, `1.000` is 1, `1,5` is not a
  number to this path (math-verify reads it as the set {1, 5}).
- Trailing units are ignored (`5 cm`, `5 \\text{dollars}`); a leading currency sign too.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Any, Literal

from gristmill.verify.base import Verdict

Outcome = Literal["equal", "not_equal", "bad_reference", "timeout", "error"]

# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
# "answer is", "answer:", "Answer =": the word "answer" alone ("I will answer...") is not enough.
_ANSWER_PHRASE = re.compile(
    r"\banswer\b[ \t]*(?:\*\*|__)?[ \t]*(?:is\b[ \t]*:?|:|=)[ \t]*(?:\*\*|__)?", re.IGNORECASE
)
_BOX_TOKEN = re.compile(r" +([^\s${}]+)")
_SENTENCE_END = re.compile(r"\.(?=\s|$)|[;!?](?=\s|$)")
_NUMBER_TEXT = (
    r"[-+]?\s*(?:\\\$|\$|€|£)?\s*[-+]?\s*"
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*\d+)?(?:\s*\\?%)?"
)
# A number followed by prose ("42 apples because ...", "42, since ..."): keep the number.
_NUMBER_THEN_PROSE = re.compile(rf"({_NUMBER_TEXT})(?:\s+|,\s+)(?=[A-Za-z]{{2}})")
_LAST_NUMBER = re.compile(r"(-?)(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(\s*%)?")
_MATH_WORDS = frozenset(
    {"pi", "sqrt", "infty", "inf", "infinity", "ln", "log", "sin", "cos", "tan", "exp", "mod"}
)


def _scan_group(text: str, start: int) -> int | None:
    """Index just past the `}` closing the `{` at `start`, or None when it never closes."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # `\{` and `\}` are literal braces, not grouping
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _boxed_contents(text: str) -> list[str]:
    """The contents of every complete, outermost `\\boxed{...}` / `\\fbox{...}`, in order."""
    found: list[tuple[int, int, str]] = []
    for command in _BOX_COMMANDS:
        start = text.find(command)
        while start != -1:
            i = start + len(command)
            if text.startswith("{", i):
                end = _scan_group(text, i)
                if end is not None:
                    found.append((start, end, text[i + 1 : end - 1]))
            elif token := _BOX_TOKEN.match(text, i):  # `\boxed 5`: one token
                found.append((start, token.end(), token.group(1)))
            start = text.find(command, start + 1)
    outermost: list[str] = []
    reach = -1
    for start, end, body in sorted(found):
        if start >= reach:  # not inside the previous box
            outermost.append(body)
            reach = end
    return outermost


def _strip_wrappers(answer: str) -> str:
    """Drop emphasis, math delimiters and trailing punctuation around an answer."""
    s = answer.strip()
    previous = None
    while s != previous:
        previous = s
        s = s.strip()
        for left, right in (
            ("**", "**"),
            ("__", "__"),
            ("$$", "$$"),
            ("\\(", "\\)"),
            ("\\[", "\\]"),
        ):
            if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
                s = s[len(left) : len(s) - len(right)]
        if len(s) >= 2 and s.startswith("$") and s.endswith("$") and not s.startswith("$$"):
            s = s[1:-1]
        s = s.strip("*").strip()
        s = s.rstrip(",;:!").rstrip()
        if s.endswith(".") and not s.endswith(".."):
            s = s[:-1]
    return s.strip()


def _phrase_clause(rest: str) -> str:
    """What follows "the answer is": a math span, or the text up to the end of the sentence."""
    line = rest.split("\n", 1)[0].strip().lstrip("*").strip()
    for left, right in (("$$", "$$"), ("\\(", "\\)"), ("\\[", "\\]"), ("$", "$")):
        if line.startswith(left):
            close = line.find(right, len(left))
            # `$5 for each` is a currency sign, `$\frac{1}{2}$` a math span
            if close != -1 and (left != "$" or not re.match(r"\$\s*\d[\d,.]*\s+[A-Za-z]", line)):
                return line[len(left) : close]
    boxed = _boxed_contents(line)
    if boxed:
        return boxed[0]
    end = _SENTENCE_END.search(line)
    clause = line[: end.start()] if end else line
    head = _NUMBER_THEN_PROSE.match(clause)
    if head and clause[head.end() :].split(maxsplit=1)[0].lower() not in _MATH_WORDS:
        return head.group(1)
    return clause


def extract_answer(text: str, *, allow_last_number: bool = False) -> str | None:
    """The final answer written in a solution, or None when it states none.

    Tries the last `\\boxed{}` / `\\fbox{}`, then GSM8K's `#### x`, then the last "the answer
    is x" / "final answer: x"; the last number in the text only when `allow_last_number`.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer needs a str, got {type(text).__name__}")
    for body in reversed(_boxed_contents(text)):
        answer = _strip_wrappers(body)
        if answer:
            return answer
    for match in reversed(list(_HASHES.finditer(text))):
        answer = _strip_wrappers(match.group(1))
        if answer:
            return answer
    for match in reversed(list(_ANSWER_PHRASE.finditer(text))):
        line_end = text.find("\n", match.end())
        rest = text[match.end() : None if line_end == -1 else line_end]
        answer = _strip_wrappers(_phrase_clause(rest))
        if answer:
            return answer
    if allow_last_number:
        numbers = list(_LAST_NUMBER.finditer(text))
        if numbers:
            last = numbers[-1]
            sign = last.group(1)
            if sign and last.start() > 0 and text[last.start() - 1].isalnum():
                sign = ""  # a hyphen ("3-4"), not a minus
            return f"{sign}{last.group(2)}{'%' if last.group(3) else ''}"
    return None


# --------------------------------------------------------------------------------------------
# Plain numbers, decided in-process
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Plain:
    """A plain number: its exact value, whether it was a percentage, whether it was a decimal."""

    value: Fraction
    percent: bool
    inexact: bool


_LATEX_SPACING = re.compile(r"\\[,!;: ]|\\(?:displaystyle|left|right)\b|~")
_UNIT_TEXT = re.compile(r"\\(?:text|mbox|mathrm|textrm|textbf|operatorname)\s*\{([^{}]*)\}")
_DECIMAL = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,4})?"
_PLAIN = re.compile(
    r"(?P<sign1>[-+])?(?:\\\$|\$|€|£|USD\b)?(?P<sign2>[-+])?"
    r"(?:(?P<num>\d+)/(?P<den>\d+)"
    r"|\\[dt]?frac\{(?P<fsign>-)?(?P<fnum>\d+)\}\{(?P<fden>\d+)\}"
    r"|\\[dt]?frac(?P<snum>\d)(?P<sden>\d)"
    rf"|(?P<dec>{_DECIMAL}))"
    r"(?P<pct>\\?%|percent\b)?"
)
_SINGLE_LETTER_UNITS = frozenset("mgslhL")


def _is_unit(rest: str, *, spaced: bool) -> bool:
    """Whether the text after a number reads as a unit ("cm", "dollars", "km/h", "m^2")."""
    if not rest:
        return True
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9 ./^²³-]*", rest):
        return False
    first = re.match(r"[A-Za-z]+", rest)
    assert first is not None
    word = first.group(0)
    if len(word) == 1:
        return spaced and word in _SINGLE_LETTER_UNITS and (len(rest) == 1 or not rest[1].isalpha())
    return word.lower() not in _MATH_WORDS


def _parse_plain(text: str) -> _Plain | None:
    """`text` as a plain number (with sign, currency, percent, units), or None."""
    if len(text) > 200:
        return None
    s = text.replace("−", "-").replace("{,}", ",")
    s = _LATEX_SPACING.sub(" ", s)
    s = _UNIT_TEXT.sub(lambda m: " " + m.group(1) + " ", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"(?<=[-+$])\s+|\s+(?=\\?%)", "", s)  # "- 5", "$ 5", "5 %"
    m = _PLAIN.match(s)
    if m is None:
        return None
    rest = s[m.end() :]
    if not _is_unit(rest.strip(), spaced=rest.startswith(" ")):
        return None
    if m.group("sign1") and m.group("sign2"):
        return None
    negative = "-" in (m.group("sign1") or "", m.group("sign2") or "", m.group("fsign") or "")
    inexact = False
    try:
        if m.group("num") is not None:
            value = Fraction(int(m.group("num")), int(m.group("den")))
        elif m.group("fnum") is not None:
            value = Fraction(int(m.group("fnum")), int(m.group("fden")))
        elif m.group("snum") is not None:
            value = Fraction(int(m.group("snum")), int(m.group("sden")))
        else:
            digits = m.group("dec").replace(",", "")
            inexact = "." in digits or "e" in digits.lower()
            value = Fraction(digits)
    except (ZeroDivisionError, ValueError):
        return None
    return _Plain(
        value=-value if negative else value, percent=bool(m.group("pct")), inexact=inexact
    )


def _close(a: Fraction, b: Fraction, *, approximate: bool, rel_tol: float) -> bool:
    if not approximate:
        return a == b
    return abs(a - b) <= Fraction(rel_tol) * max(abs(a), abs(b))


def _plain_equal(a: _Plain, b: _Plain, rel_tol: float) -> bool:
    """Equality of two plain numbers under the module's percent and tolerance conventions."""
    approximate = a.inexact or b.inexact
    if a.percent == b.percent:
        return _close(a.value, b.value, approximate=approximate, rel_tol=rel_tol)
    pct, other = (a, b) if a.percent else (b, a)
    return any(
        _close(v, other.value, approximate=approximate, rel_tol=rel_tol)
        for v in (pct.value, pct.value / 100)
    )


# --------------------------------------------------------------------------------------------
# math-verify in helper processes, with a wall-clock limit per call
# --------------------------------------------------------------------------------------------

_STARTUP_TIMEOUT_S = 180.0  # importing sympy on a loaded 2-core box can take a while
_WORKER_CODE = "from gristmill.verify.math import serve_worker; serve_worker()"


class _Worker:
    """One helper process running `serve_worker`, spoken to by JSON lines over pipes."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        reply = self._read(_STARTUP_TIMEOUT_S)
        if reply is None or "ready" not in reply:
            self.kill()
            detail = reply.get("error") if reply else "no reply"
            raise RuntimeError(f"math-verify helper process failed to start: {detail}")

    def _read(self, timeout_s: float) -> dict[str, Any] | None:
        """The next reply; None when none comes within `timeout_s`; an error if it died."""
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], timeout_s)
        if not ready:
            return None
        line = out.readline()
        try:
            reply = json.loads(line) if line else None
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            return {"error": f"helper process gave no reply (exit status {self.proc.poll()})"}
        return reply

    def ask(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """Send one request; its reply, or None when it ran over `timeout_s`."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            return {"error": f"helper process is gone: {exc}"}
        return self._read(timeout_s)

    def alive(self) -> bool:
        """Whether the helper is still running."""
        return self.proc.poll() is None

    def kill(self) -> None:
        """Stop the helper now and release its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


class _Pool:
    """Up to `size` helpers shared by all threads; a helper that times out is replaced."""

    def __init__(self, size: int) -> None:
        self.pid = os.getpid()
        self.size = size
        self.idle: list[_Worker] = []
        self.live = 0
        self.cond = threading.Condition()

    def _acquire(self) -> _Worker:
        with self.cond:
            while not self.idle and self.live >= self.size:
                self.cond.wait()
            if self.idle:
                return self.idle.pop()
            self.live += 1
        try:
            return _Worker()
        except BaseException:
            with self.cond:
                self.live -= 1
                self.cond.notify()
            raise

    def _release(self, worker: _Worker, *, healthy: bool) -> None:
        if not healthy:
            worker.kill()
        with self.cond:
            if healthy:
                self.idle.append(worker)
            else:
                self.live -= 1
            self.cond.notify()

    def call(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """Run one request on some helper; None when it ran over `timeout_s` (helper killed).

        A helper that timed out or died is replaced by a fresh one on a later call."""
        for attempt in range(2):  # a helper found dead (killed from outside) gets one retry
            worker = self._acquire()
            reply = None
            try:
                reply = worker.ask(request, timeout_s)
            finally:
                alive = worker.alive()
                self._release(worker, healthy=reply is not None and alive)
            if reply is None or alive or "error" not in reply or attempt == 1:
                return reply
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Stop every idle helper (at interpreter exit)."""
        with self.cond:
            workers, self.idle = self.idle, []
            self.live -= len(workers)
        for worker in workers:
            worker.kill()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _Pool:
    """This process's helper pool (a forked child gets a fresh one, never its parent's)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = _Pool(size=max(1, min(4, os.cpu_count() or 1)))
            atexit.register(_POOL.close)
        return _POOL


def _math_verify_compare(a: str, b: str, rel_tol: float, timeout_s: float) -> Outcome:
    """Compare in a helper process; "timeout" when it runs past `timeout_s`."""
    request = {"a": a, "b": b, "rel_tol": rel_tol, "timeout_s": timeout_s}
    reply = _pool().call(request, timeout_s)
    if reply is None:
        return "timeout"
    match reply.get("result"):
        case "equal":
            return "equal"
        case "not_equal":
            return "not_equal"
        case "bad_reference":
            return "bad_reference"
        case _:  # the comparison raised inside the helper
            return "error"


def serve_worker() -> None:
    """Helper-process main loop: answer comparison requests read from stdin, one per line.

    Not for direct use: `answers_equal` starts helpers running this. It exits when stdin
    closes (its parent is gone).
    """
    import logging

    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints must not corrupt the protocol
    try:
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)
        import math_verify  # noqa: F401  (fail here, with a clear message, if missing)
    except Exception as exc:
        protocol.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        protocol.flush()
        return
    protocol.write(json.dumps({"ready": True}) + "\n")
    protocol.flush()
    # Backstop should the parent die mid-call and never kill us: SIGALRM's default action
    # ends the process even inside a long C-level computation.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    for line in sys.stdin:
        request = json.loads(line)
        signal.alarm(math.ceil(request["timeout_s"]) + 10)
        try:
            result: str = _compare_with_math_verify(request["a"], request["b"], request["rel_tol"])
            reply: dict[str, Any] = {"result": result}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        signal.alarm(0)
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()


def _compare_with_math_verify(a: str, b: str, rel_tol: float) -> str:
    """math-verify's verdict on answer `a` against reference `b` (runs in the helper)."""
    import sympy
    from math_verify import parse, verify

    gold = parse(f"\\boxed{{{b}}}", parsing_timeout=None)
    if not gold:
        return "bad_reference"
    pred = parse(f"\\boxed{{{a}}}", parsing_timeout=None)
    if not pred:
        return "not_equal"
    g, p = gold[0], pred[0]
    plain = _is_plain_sympy_number(g) and _is_plain_sympy_number(p)
    if plain and (g.has(sympy.Float) or p.has(sympy.Float)):  # approximate: relative tolerance
        gv, pv = complex(g.evalf(30)), complex(p.evalf(30))
        if gv.imag == 0 and pv.imag == 0:
            close = abs(gv.real - pv.real) <= rel_tol * max(abs(gv.real), abs(pv.real))
            return "equal" if close else "not_equal"
    equal = verify(gold, pred, timeout_seconds=None)
    return "equal" if equal else "not_equal"


def _is_plain_sympy_number(expr: object) -> bool:
    """A finite numeric sympy expression that is not a percentage (math-verify keeps those as
    `x * UnevaluatedExpr(1/100)` and has its own rules for them)."""
    import sympy

    if not isinstance(expr, sympy.Expr) or not expr.is_number:
        return False
    if expr.has(sympy.UnevaluatedExpr):
        return False
    return bool(expr.is_finite)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_options(rel_tol: float, timeout_s: float) -> None:
    if not (isinstance(rel_tol, int | float) and 0 <= rel_tol < 1):
        raise ValueError(f"rel_tol must be a number in [0, 1), got {rel_tol!r}")
    if not (isinstance(timeout_s, int | float) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")


def _compare(a: str, b: str, rel_tol: float, timeout_s: float) -> Outcome:
    """Compare answer `a` with reference answer `b`: fast path first, then math-verify."""
    pa, pb = _parse_plain(a), _parse_plain(b)
    if pa is not None and pb is not None:
        return "equal" if _plain_equal(pa, pb, rel_tol) else "not_equal"
    return _math_verify_compare(a, b, rel_tol, timeout_s)


def answers_equal(a: str, b: str, *, rel_tol: float = 1e-6, timeout_s: float = 5.0) -> bool:
    """Whether two extracted answers are mathematically the same (`b` is the reference).

    Plain numbers are compared in-process; anything else through math-verify in a helper
    process limited to `timeout_s` seconds (running over counts as not equal).
    """
    _check_options(rel_tol, timeout_s)
    return _compare(a.strip(), b.strip(), rel_tol, timeout_s) == "equal"


def verify_math(
    response: str,
    reference: str,
    *,
    allow_last_number: bool = False,
    rel_tol: float = 1e-6,
    timeout_s: float = 5.0,
) -> Verdict:
    """Check a model's math answer against a reference; never raises on bad model output.

    `reference` may be a full solution (GSM8K `#### x`, `\\boxed{}`) or a bare answer.
    Reasons: equal, not_equal, no_answer, bad_reference, timeout (and error if a helper
    process crashed).
    """
    _check_options(rel_tol, timeout_s)
    gold = extract_answer(reference) if isinstance(reference, str) else None
    if gold is None and isinstance(reference, str):
        gold = _strip_wrappers(reference) or None
    if gold is None:
        return Verdict(correct=False, extracted=None, reason="bad_reference")
    answer = extract_answer(response, allow_last_number=allow_last_number)
    if answer is None:
        return Verdict(correct=False, extracted=None, reason="no_answer")
    outcome = _compare(answer, gold, rel_tol, timeout_s)
    return Verdict(correct=outcome == "equal", extracted=answer, reason=outcome)


@dataclass(frozen=True, kw_only=True)
class MathVerifier:
    """`verify_math` with its options bound: a picklable `(response, reference) -> Verdict`."""

    allow_last_number: bool = False
    rel_tol: float = 1e-6
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.allow_last_number, bool):
            raise TypeError(f"allow_last_number must be a bool, got {self.allow_last_number!r}")
        _check_options(self.rel_tol, self.timeout_s)

    def __call__(self, response: str, reference: str) -> Verdict:
        """Check `response` against `reference` (see `verify_math`)."""
        return verify_math(
            response,
            reference,
            allow_last_number=self.allow_last_number,
            rel_tol=self.rel_tol,
            timeout_s=self.timeout_s,
        )
