"""Code answer checking: run the response's program followed by the reference tests, sandboxed.

The program is the last ```python block of the response (else the last untagged block; a
response without any fence is taken whole). The reference is test code that raises when the
program is wrong, e.g. HumanEval's `check(...)` plus the call (`humaneval_reference`). A
reference built with a prompt is prompt-aware: the response may either continue the prompt's
function signature with a body or give a complete solution (`humaneval_program`).

Reasons: "passed", "failed" (an assertion failed), "error" (anything else went wrong),
"timeout" (wall-clock or CPU limit) and "no_code".

What a passing verdict proves (the default, `harness="separate"`). The program runs as the
sandbox cell; the tests run in a process of their own, forked inside the cell before any of
the program's code runs (`gristmill.sandbox.harness`). They reach the program's top-level
functions through proxies: each call goes to the program's process as plain values and its
result comes back as plain values (None, bool, int, float, complex, str, bytes, and lists,
tuples, dicts, sets of them; exact types, so no object of the program's own, with a rigged
`__eq__` or arithmetic, ever reaches the tests: that is "error"). The proof is a random token
only the tests' process holds, written only once the tests have reached their end; the
program's process never has it (it is read after the fork), cannot read the tests' process
(made non-dumpable: no ptrace, no /proc memory or descriptors) and has nothing of the tests
in its own interpreter to inspect or patch, so stack frames, gc, trace hooks, patched or
shadowed builtins, printed markers and early exits (even `os._exit(0)`) cannot make a pass.
A prompt-aware reference's prompt runs in the tests' process too, so the tests call the
prompt's own helpers (HumanEval/32's `poly`), and only the functions the prompt leaves to
be written (`unwritten_functions`) come from the program. The program's names never replace
a builtin's in the tests (`def abs(x): return 0` does not fool `abs(f(x) - y) < 1e-6`).
In the weak sandbox tiers a cell that runs as root can still ptrace the tests' process or
rewrite the interpreter's files; the stages refuse those tiers unless told otherwise.

What the separate harness cannot run: tests that need the program's objects themselves
(instances of its classes, callbacks passed in, generators, numpy values) get "error".
For those, `harness="shared"` runs the tests as the cell's `epilogue`, in the program's own
interpreter and globals, as before: the token reaches the cell on a private pipe read before
the program starts, so early exits and markers searched for in the program's source, files,
argv, environment or stdin do not pass, and with `strict_compare` (the default) every
operand of a comparison in the tests (`==`, `!=`, `<`, `in`, ...; not `is`) must be a plain
built-in value, so an object whose `__eq__` always returns True fails. But code written
against that harness can fake a pass there, by inspecting the interpreter it shares with the
tests (frames, gc, trace hooks: the token is in it), patching builtins the harness uses, or
shadowing ones the tests call; `tests/verify/code_attacks.py` has one program for each.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from gristmill.sandbox import CellResult, Isolation, Limits, SandboxPool, run_cell
from gristmill.sandbox.harness import PROGRAM_NAMES
from gristmill.verify.base import Verdict

#: Line that separates a prompt (above) from the tests (below) in a prompt-aware reference.
PROMPT_SEPARATOR = "# gristmill: prompt above, tests below\n"
#: Where the tests run: in a process of their own (the default) or in the program's.
Harness = Literal["separate", "shared"]
HARNESSES: tuple[Harness, ...] = get_args(Harness)

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
    #: "separate": the tests run in a process of their own and reach the program's functions
    #: through proxies that carry plain values only; nothing the program does can fake a pass.
    #: "shared": the tests run in the program's interpreter and globals, for tests that need
    #: its objects themselves (instances of its classes, callbacks, generators, numpy
    #: values); a program written against this harness can fake a pass there (module doc).
    harness: Harness = "separate"
    #: Shared harness only: only plain built-in values may be compared in the tests (module
    #: doc); False accepts any object, e.g. numpy scalars, and with them rigged `__eq__`s.
    #: The separate harness needs no such check: every value it gets is plain.
    strict_compare: bool = True

    def __post_init__(self) -> None:
        if self.harness not in HARNESSES:
            raise ValueError(f"harness must be one of {list(HARNESSES)}, got {self.harness!r}")

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
        program, tests = self._cell(code, reference)
        separate = self.harness == "separate"
        result = run_cell(
            program,
            tests=tests if separate else None,
            epilogue=None if separate else tests,
            limits=self.limits,
            method=self.method,
        )
        return _verdict(code, result)

    def verify_many(self, responses: Sequence[str], references: Sequence[str]) -> list[Verdict]:
        """Verdicts for response/reference pairs, run in parallel sandboxes, in input order."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        codes = [extract_code(r) for r in responses]
        runnable = [
            (i, *self._cell(code, ref))
            for i, (code, ref) in enumerate(zip(codes, references, strict=True))
            if code is not None
        ]
        verdicts = [Verdict(correct=False, extracted=None, reason="no_code") for _ in responses]
        endings = [tests for _, _, tests in runnable]
        with SandboxPool(
            max_workers=self.max_workers, limits=self.limits, method=self.method
        ) as pool:
            results = pool.run_many(
                [program for _, program, _ in runnable],
                tests=endings if self.harness == "separate" else None,
                epilogues=endings if self.harness == "shared" else None,
            )
        for (i, _, _), result in zip(runnable, results, strict=True):
            code = codes[i]
            assert code is not None
            verdicts[i] = _verdict(code, result)
        return verdicts

    def _cell(self, code: str, reference: str) -> tuple[str, str]:
        """The program (the prompt continued by the code, when the reference has a prompt)
        and the test code for this harness."""
        prompt, tests = split_reference(reference)
        program = humaneval_program(prompt, code) if prompt is not None else code
        if self.harness == "separate":
            return program, separate_tests(prompt, tests)
        return program, strict_tests(tests) if self.strict_compare else tests


def separate_tests(prompt: str | None, tests: str) -> str:
    """Test code for the separate harness. When the tests use a name the prompt defines
    beyond the functions it leaves to be written (a helper such as HumanEval/32's `poly`, or
    an import), the prompt's own code comes first, so those are the reference's, never the
    program's versions, then the program's functions for the ones left to write, then the
    tests. Otherwise (most prompts; it saves the tests' process the prompt's imports) the
    tests alone, as also without a prompt or with one that does not parse."""
    if prompt is None:
        return tests
    try:
        tree = ast.parse(prompt)
        used = {node.id for node in ast.walk(ast.parse(tests)) if isinstance(node, ast.Name)}
    except SyntaxError:
        return tests
    todo = unwritten_functions(prompt)
    if not (_defined(tree) - set(todo)) & used:
        return tests
    head = prompt if prompt.endswith("\n") else prompt + "\n"
    names = PROGRAM_NAMES
    take = f"globals().update({{n: {names}[n] for n in {todo!r} if n in {names}}})\n"
    return f"{head}{take}{PROMPT_SEPARATOR}{tests}"


def _defined(tree: ast.Module) -> set[str]:
    """Names a module's top level binds (definitions, imports, assignments)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        else:
            names.update(
                n.id
                for n in ast.walk(node)
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
            )
    return names


def unwritten_functions(prompt: str) -> list[str]:
    """Top-level functions of `prompt` left for the response to write: their bodies hold
    nothing but docstrings, `pass`, `...` and imports (HumanEval's signatures)."""
    names = []
    for node in ast.parse(prompt).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and all(
            _placeholder(statement) for statement in node.body
        ):
            names.append(node.name)
    return names


def _placeholder(statement: ast.stmt) -> bool:
    if isinstance(statement, ast.Pass | ast.Import | ast.ImportFrom):
        return True
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and (isinstance(statement.value.value, str) or statement.value.value is Ellipsis)
    )


#: Defined first in the epilogue (so a program cannot pre-empt it); exact types only, since
#: a class's `__eq__`, even its metaclass's, is the program's to define.
_PLAIN_CHECK = """\
def __gristmill_plain__(value, _plain=(int, float, complex, bool, str, bytes, type(None),
                                       list, tuple, dict, set, frozenset, range, type),
                        _nested=(list, tuple, set, frozenset)):
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        kind = type(item)
        if not any(kind is t for t in _plain):
            raise TypeError(
                f"the tests compared a {kind.__qualname__} object; with strict_compare only "
                "built-in values count (an object can make == and < say anything)"
            )
        if (kind is dict or any(kind is t for t in _nested)) and id(item) not in seen:
            seen.add(id(item))
            stack.extend(item.items() if kind is dict else item)
    return value
"""


class _PlainOperands(ast.NodeTransformer):
    """Wraps every operand of a comparison other than a pure `is` chain in the check."""

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        if all(isinstance(op, ast.Is | ast.IsNot) for op in node.ops):
            return node
        node.left = _checked(node.left)
        node.comparators = [_checked(c) for c in node.comparators]
        return node


def _checked(expr: ast.expr) -> ast.expr:
    call = ast.Call(func=ast.Name("__gristmill_plain__", ast.Load()), args=[expr], keywords=[])
    return ast.copy_location(call, expr)


def strict_tests(tests: str) -> str:
    """`tests` with every compared value checked to be a plain built-in one (see module doc);
    tests that do not parse are returned as they are (they fail on their own)."""
    try:
        tree = ast.parse(tests)
    except SyntaxError:
        return tests
    checked = ast.fix_missing_locations(_PlainOperands().visit(tree))
    return f"{_PLAIN_CHECK}\n{ast.unparse(checked)}\n"


def _verdict(code: str, result: CellResult) -> Verdict:
    if result.status == "ok" and result.completed:
        return Verdict(correct=True, extracted=code, reason="passed")
    if result.status == "timeout" or (result.reason or "").startswith("cpu limit"):
        return Verdict(correct=False, extracted=code, reason="timeout")
    if result.status == "error" and _ASSERTION.match(result.reason or ""):
        return Verdict(correct=False, extracted=code, reason="failed")
    return Verdict(correct=False, extracted=code, reason="error")
