"""Code answer checking: run the response's program followed by the reference tests, sandboxed.

The program is the last ```python block of the response (else the last untagged block; a
response without any fence is taken whole). The reference is test code that raises when the
program is wrong, e.g. HumanEval's `check(...)` plus the call (`humaneval_reference`). A
reference built with a prompt is prompt-aware: the response may either continue the prompt's
function signature with a body or give a complete solution (`humaneval_program`).

Reasons: "passed", "failed" (an assertion failed), "error" (anything else went wrong),
"timeout" (wall-clock or CPU limit) and "no_code". A program that exits early (for example
`sys.exit(0)` before the tests run) does not pass: the tests must reach their end, proven by a
random marker written after them.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from gristmill.sandbox import CellResult, Isolation, Limits, SandboxPool, run_cell
from gristmill.verify.base import Verdict

#: Line that separates a prompt (above) from the tests (below) in a prompt-aware reference.
PROMPT_SEPARATOR = "# gristmill: prompt above, tests below\n"

_FENCE = re.compile(
    r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.MULTILINE | re.DOTALL
)
_PYTHON_TAGS = frozenset({"python", "py", "python3", "py3"})
_ASSERTION = re.compile(r"^exit code \d+: AssertionError\b")


def extract_code(response: str) -> str | None:
    """The program in a response: last python block, else last untagged block, else all of it.

    None when there is nothing to run (empty, or only blocks in other languages).
    """
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(response)]
    python = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    untagged = [body for tag, body in blocks if not tag]
    if python or untagged:
        code = (python or untagged)[-1]
    elif blocks:
        return None
    else:
        code = response
    code = _trim(code)
    return code or None


def _trim(code: str) -> str:
    """Drop blank lines at the start and whitespace at the end; keep the first line's indent."""
    lines = code.rstrip().splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines)


def humaneval_reference(test: str, entry_point: str, prompt: str | None = None) -> str:
    """HumanEval's `test` code and the `check(entry_point)` call; prompt-aware when given one."""
    if not entry_point.isidentifier():
        raise ValueError(f"entry_point must be a Python identifier, got {entry_point!r}")
    tests = f"{test.rstrip()}\n\n\ncheck({entry_point})\n"
    if prompt is None:
        return tests
    head = prompt if prompt.endswith("\n") else prompt + "\n"
    return f"{head}{PROMPT_SEPARATOR}{tests}"


def split_reference(reference: str) -> tuple[str | None, str]:
    """(prompt or None, tests) of a reference made by `humaneval_reference`."""
    prompt, separator, tests = reference.partition(PROMPT_SEPARATOR)
    return (prompt, tests) if separator else (None, reference)


def humaneval_program(prompt: str, completion: str) -> str:
    """The program for a completion: the prompt continued by a function body when the
    completion is indented, else the prompt followed by the completion's full solution."""
    head = prompt if prompt.endswith("\n") else prompt + "\n"
    code_lines = [
        line
        for line in completion.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if code_lines and code_lines[0][:1] in (" ", "\t"):
        return head + completion
    return f"{head}\n\n{completion}"


@dataclass(frozen=True, kw_only=True)
class CodeVerifier:
    """Runs a response's code with the reference tests in the sandbox; a Verifier."""

    #: Wall-clock seconds for the program and its tests.
    timeout_s: float = 10.0
    #: CPU seconds; defaults to the wall-clock limit rounded up.
    cpu_s: int | None = None
    memory_mb: int = 1024
    max_processes: int = 32
    #: Force an isolation (see gristmill.sandbox.ISOLATIONS); default: the strongest here.
    method: Isolation | None = None
    #: Parallel sandboxes for `verify_many`; default: one per CPU.
    max_workers: int | None = None

    @property
    def limits(self) -> Limits:
        """Sandbox limits for one verification."""
        cpu = self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s)
        return Limits(
            timeout_s=self.timeout_s,
            cpu_s=cpu,
            memory_mb=self.memory_mb,
            max_processes=self.max_processes,
        )

    def __call__(self, response: str, reference: str) -> Verdict:
        """Verdict for one response against one reference; never raises for bad code."""
        code = extract_code(response)
        if code is None:
            return Verdict(correct=False, extracted=None, reason="no_code")
        program, marker = _program(code, reference)
        result = run_cell(program, limits=self.limits, method=self.method)
        return _verdict(code, result, marker)

    def verify_many(self, responses: Sequence[str], references: Sequence[str]) -> list[Verdict]:
        """Verdicts for response/reference pairs, run in parallel sandboxes, in input order."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        codes = [extract_code(r) for r in responses]
        runnable = [
            (i, *_program(code, ref))
            for i, (code, ref) in enumerate(zip(codes, references, strict=True))
            if code is not None
        ]
        verdicts = [Verdict(correct=False, extracted=None, reason="no_code") for _ in responses]
        with SandboxPool(
            max_workers=self.max_workers, limits=self.limits, method=self.method
        ) as pool:
            results = pool.run_many([program for _, program, _ in runnable])
        for (i, _, marker), result in zip(runnable, results, strict=True):
            code = codes[i]
            assert code is not None
            verdicts[i] = _verdict(code, result, marker)
        return verdicts


def _program(code: str, reference: str) -> tuple[str, str]:
    """The full program (code, tests, end marker) and the marker the tests must print."""
    prompt, tests = split_reference(reference)
    program = humaneval_program(prompt, code) if prompt is not None else code
    marker = f"gristmill-tests-done-{secrets.token_hex(16)}"
    ending = f"__import__('os').write(1, b'\\n{marker}\\n')\n"
    return f"{program}\n\n\n{tests.rstrip()}\n\n\n{ending}", marker


def _verdict(code: str, result: CellResult, marker: str) -> Verdict:
    if result.status == "ok" and marker in result.stdout:
        return Verdict(correct=True, extracted=code, reason="passed")
    if result.status == "timeout" or (result.reason or "").startswith("cpu limit"):
        return Verdict(correct=False, extracted=code, reason="timeout")
    if result.status == "error" and _ASSERTION.match(result.reason or ""):
        return Verdict(correct=False, extracted=code, reason="failed")
    return Verdict(correct=False, extracted=code, reason="error")
