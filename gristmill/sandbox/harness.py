"""Tests in a process of their own: the program serves its top-level names to them over pipes,
plain values only, so nothing it does can reach or fake the proof that the tests ended.

Runs inside the cell's interpreter: its source is part of the bootstrap (`runner.py`), which
calls `fork_program` before any of the program's code runs. The cell's first process forks;
the child runs the program and then `Server.serve`s its names; the first process (made
non-dumpable first, so the child can neither ptrace it nor read its memory or descriptors)
only then reads the private channel (the token and the tests), runs the tests with proxies
for the program's names, and writes the token to the report pipe if, and only if, the tests
reached their end and the program kept to plain values. The child closes both private
descriptors before the program starts and never holds the token or the tests.

Across the pipes go length-prefixed JSON messages carrying plain values (`encode`/`decode`):
None, bool, int, float, complex, str, bytes, and lists, tuples, dicts, sets and frozensets of
them, exact types only. Anything else the program hands back (an object with its own
`__eq__`, a generator, a numpy scalar) stops the tests with `PlainValuesOnly`. Standard
library only, and light to import (no dataclasses or typing at run time): every cell with
tests pays for it.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import keyword
import os
import signal
import sys
import traceback
import types

TYPE_CHECKING = False  # no `typing` import at run time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

#: The tests' global holding every name the program exported (builtins' names included).
PROGRAM_NAMES = "__program__"
#: The largest message either side accepts, bytes.
MAX_MESSAGE = 64 << 20
#: Ints this wide or wider travel as hex text (no int-to-decimal digit limit applies).
_WIDE_INT_BITS = 1024
_HEADER = 4
#: Builtin exceptions the program may raise into the tests by name: every Exception class but
#: the two that end an iteration silently (a test's `for x in map(candidate, ...)` would stop)
#: and Exception itself (what else it raises arrives as ProgramException, class name kept).
_RAISABLE = {
    name: value
    for name, value in vars(builtins).items()
    if isinstance(value, type)
    and issubclass(value, Exception)
    and value not in (Exception, StopIteration, StopAsyncIteration)
}
_PR_SET_DUMPABLE = 4


class PlainValuesOnly(BaseException):
    """The program broke the harness's rules (a value that is not plain, a bad message).

    A BaseException, so a test's `except Exception` cannot swallow it; the harness also
    remembers it and refuses the proof even if a bare `except:` does."""


class ProgramEnded(BaseException):
    """The program's process ended; the cell ends the way it did (`wait_status`), except
    that a clean exit becomes exit code 1: only the tests' own end is a success."""

    def __init__(self, wait_status: int) -> None:
        if os.WIFSIGNALED(wait_status):
            how = f"was killed by signal {os.WTERMSIG(wait_status)}"
        else:
            how = f"exited with code {os.waitstatus_to_exitcode(wait_status)}"
        super().__init__(f"the program's process {how} before the tests ended")
        self.wait_status = wait_status


class NotPlain(Exception):
    """A value `encode` refuses."""


class ProgramException(Exception):
    """An exception the program raised whose class is not a builtin one."""


# --- plain values --------------------------------------------------------------------------


def encode(value: object) -> object:
    """`value` as JSON-ready data; NotPlain for anything but exact plain built-in types."""
    kind = type(value)
    if value is None or kind is bool or kind is str or kind is float:
        return value
    if kind is int:
        wide = value.bit_length() >= _WIDE_INT_BITS  # type: ignore[attr-defined]
        return {"int": hex(value)} if wide else value  # type: ignore[arg-type]
    try:
        if kind is list:
            return [encode(item) for item in value]  # type: ignore[attr-defined]
        if kind is tuple:
            return {"tuple": [encode(item) for item in value]}  # type: ignore[attr-defined]
        if kind is dict:
            pairs = value.items()  # type: ignore[attr-defined]
            return {"dict": [[encode(k), encode(v)] for k, v in pairs]}
        if kind is set or kind is frozenset:
            return {kind.__name__: [encode(item) for item in value]}  # type: ignore[attr-defined]
    except RecursionError:
        raise NotPlain("a container nested too deep (or holding itself)") from None
    if kind is bytes:
        return {"bytes": value.hex()}  # type: ignore[attr-defined]
    if kind is complex:
        return {"complex": [value.real, value.imag]}  # type: ignore[attr-defined]
    raise NotPlain(f"a {_describe(kind)} object")


def decode(data: object) -> object:
    """The plain value `encode` made `data` from; ValueError for anything it cannot make."""
    kind = type(data)
    if data is None or kind is bool or kind is int or kind is float or kind is str:
        return data
    if kind is list:
        return [decode(item) for item in data]  # type: ignore[attr-defined]
    if kind is not dict or len(data) != 1:  # type: ignore[arg-type]
        raise ValueError(f"not an encoded value: {kind.__name__}")
    ((tag, body),) = data.items()  # type: ignore[attr-defined]
    if tag == "int" and type(body) is str:
        return int(body, 16)
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "complex" and type(body) is list and len(body) == 2:
        real, imag = (part if type(part) in (int, float) else _bad(part) for part in body)
        return complex(real, imag)
    if type(body) is not list:
        raise ValueError(f"not an encoded value: tag {tag!r}")
    if tag == "tuple":
        return tuple(decode(item) for item in body)
    if tag == "set":
        return {decode(item) for item in body}
    if tag == "frozenset":
        return frozenset(decode(item) for item in body)
    if tag == "dict" and all(type(pair) is list and len(pair) == 2 for pair in body):
        return {decode(k): decode(v) for k, v in body}
    raise ValueError(f"not an encoded value: tag {tag!r}")


def _bad(part: object) -> float:
    raise ValueError(f"not a number: {type(part).__name__}")


def _describe(kind: type) -> str:
    module = getattr(kind, "__module__", "")
    name = getattr(kind, "__qualname__", kind.__name__)
    return name if module in ("builtins", "__main__", "") else f"{module}.{name}"


# --- messages ------------------------------------------------------------------------------


def send(fd: int, message: object) -> None:
    """Write one length-prefixed JSON message."""
    body = json.dumps(message, separators=(",", ":")).encode()
    data = len(body).to_bytes(_HEADER, "big") + body
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def receive(fd: int) -> object | None:
    """Read one message; None at end of file. ValueError for a malformed one."""
    header = _read_exactly(fd, _HEADER)
    if header is None:
        return None
    size = int.from_bytes(header, "big")
    if size > MAX_MESSAGE:
        raise ValueError(f"a message of {size} bytes (at most {MAX_MESSAGE})")
    body = _read_exactly(fd, size)
    if body is None:
        raise ValueError("the pipe closed in the middle of a message")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"unreadable message: {exc}") from None


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks: list[bytes] = []
    left = size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            if chunks:
                raise ValueError("the pipe closed in the middle of a message")
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# --- the program's side --------------------------------------------------------------------


class Server:
    """In the program's process: export its top-level names, then answer calls until the
    tests close the pipe."""

    def __init__(self, requests: int, replies: int) -> None:
        self.requests = requests
        self.replies = replies

    def serve(self, namespace: dict[str, object]) -> None:
        """Answer calls on `namespace`'s names; ends the process when the tests are done."""
        send(self.replies, {"exports": exports(namespace)})
        while True:
            try:
                message = receive(self.requests)
            except (OSError, ValueError):
                message = None
            if message is None:
                _flush()
                os._exit(0)
            send(self.replies, self._answer(namespace, message))

    def _answer(self, namespace: dict[str, object], message: object) -> object:
        try:
            assert isinstance(message, dict)
            name = str(message["call"])
            args = [decode(a) for a in message["args"]]
            kwargs = {str(k): decode(v) for k, v in message["kwargs"].items()}
        except Exception as exc:  # the tests' side is ours: this is a harness bug
            return {"bad": f"harness: unreadable call: {exc!r}"}
        function = namespace.get(name)
        if not callable(function):
            return {"bad": f"the program has no function {name} any more"}
        try:
            result = function(*args, **kwargs)
        except Exception as exc:
            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)  # type: ignore[union-attr]
            names = [cls.__name__ for cls in type(exc).__mro__]
            return {"raise": names, "message": _text(exc)}
        try:
            return {
                "return": encode(result),
                "args": {str(i): encode(a) for i, a in enumerate(args) if _mutable(a)},
                "kwargs": {k: encode(v) for k, v in kwargs.items() if _mutable(v)},
            }
        except NotPlain as exc:
            return {"bad": f"{name} returned {exc}"}


def _mutable(value: object) -> bool:
    return type(value) in (list, dict, set)


def _text(exc: BaseException) -> str:
    try:
        return str(exc)[:2000]
    except Exception:
        return "(unprintable)"


def exports(namespace: dict[str, object]) -> list[list[object]]:
    """The names the tests get: [name, "call"], [name, "module", module name] or
    [name, "value", encoded]; other values and dunder names are left out."""
    out: list[list[object]] = []
    for name, value in list(namespace.items()):
        if not isinstance(name, str) or name.startswith("__"):
            continue
        if isinstance(value, types.ModuleType):
            out.append([name, "module", str(value.__name__)])
        elif callable(value):
            out.append([name, "call"])
        else:
            try:
                out.append([name, "value", encode(value)])
            except NotPlain:
                continue
    return out


# --- the tests' side -----------------------------------------------------------------------


class Program:
    """In the tests' process: the program's process seen through its pipes."""

    def __init__(self, pid: int, requests: int, replies: int) -> None:
        self.pid = pid
        self.requests = requests
        self.replies = replies
        #: The first rule the program broke, or its end; raised again by every later call.
        self.failure: BaseException | None = None

    def start(self) -> list[list[object]]:
        """Wait for the program's code to return; the names it exports."""
        message = self._receive()
        if not isinstance(message, dict) or not isinstance(message.get("exports"), list):
            raise self._fail(PlainValuesOnly("the program's first message is not its names"))
        return list(message["exports"])

    def names(self, exported: list[list[object]]) -> tuple[dict[str, object], dict[str, str]]:
        """(name -> proxy or value, name -> module name) for the valid exported names."""
        values: dict[str, object] = {}
        modules: dict[str, str] = {}
        for entry in exported:
            if not isinstance(entry, list) or len(entry) < 2:
                raise self._fail(PlainValuesOnly(f"a malformed export: {entry!r:.200}"))
            name, kind = entry[0], entry[1]
            if not _usable(name):
                continue
            assert isinstance(name, str)
            if kind == "call":
                values[name] = self.proxy(name)
            elif kind == "module" and len(entry) == 3 and isinstance(entry[2], str):
                modules[name] = entry[2]
            elif kind == "value" and len(entry) == 3:
                values[name] = self._decoded(entry[2], f"the value of {name}")
        return values, modules

    def proxy(self, name: str) -> Callable[..., object]:
        """A function that calls the program's `name` with plain arguments."""

        def call(*args: object, **kwargs: object) -> object:
            return self.call(name, args, kwargs)

        call.__name__ = call.__qualname__ = name
        return call

    def call(self, name: str, args: tuple[object, ...], kwargs: dict[str, object]) -> object:
        """Call the program's `name`; its result, or the exception it raised, here."""
        if self.failure is not None:
            raise self.failure
        try:
            message = {
                "call": name,
                "args": [encode(a) for a in args],
                "kwargs": {k: encode(v) for k, v in kwargs.items()},
            }
        except NotPlain as exc:
            raise self._fail(
                PlainValuesOnly(f"the tests passed {exc} to {name}; only plain values cross")
            ) from None
        try:
            send(self.requests, message)
        except OSError:
            raise self._ended() from None
        reply = self._receive()
        if not isinstance(reply, dict):
            raise self._fail(PlainValuesOnly(f"a malformed reply to a call of {name}"))
        if "raise" in reply:
            raise rebuild_exception(reply.get("raise"), reply.get("message"))
        if "return" not in reply:
            raise self._fail(PlainValuesOnly(str(reply.get("bad", "a reply without a value"))))
        self._write_back(name, args, kwargs, reply)
        return self._decoded(reply["return"], f"the result of {name}")

    def _write_back(
        self, name: str, args: tuple[object, ...], kwargs: dict[str, object], reply: dict
    ) -> None:
        """Copy changes the program made to list, dict and set arguments onto the tests' own."""
        changed = reply.get("args", {}), reply.get("kwargs", {})
        if not all(isinstance(part, dict) for part in changed):
            raise self._fail(PlainValuesOnly(f"a malformed reply to a call of {name}"))
        for key, data in [*changed[0].items(), *changed[1].items()]:
            original = _argument(args, kwargs, key)
            new = self._decoded(data, f"an argument of {name} after the call")
            if original is None or type(new) is not type(original):
                raise self._fail(PlainValuesOnly(f"a malformed reply to a call of {name}"))
            if new == original:
                continue
            if isinstance(original, list) and isinstance(new, list):
                original[:] = new
            elif isinstance(original, dict | set) and isinstance(new, dict | set):
                original.clear()
                original.update(new)

    def _decoded(self, data: object, what: str) -> object:
        try:
            return decode(data)
        except (ValueError, TypeError, RecursionError) as exc:
            raise self._fail(PlainValuesOnly(f"{what} is not a plain value: {exc}")) from None

    def _receive(self) -> object:
        try:
            message = receive(self.replies)
        except ValueError as exc:
            raise self._fail(PlainValuesOnly(f"a malformed message: {exc}")) from None
        except OSError:
            message = None
        if message is None:
            raise self._ended()
        return message

    def _ended(self) -> BaseException:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = 0
        return self._fail(ProgramEnded(status))

    def _fail(self, exc: BaseException) -> BaseException:
        if self.failure is None:
            self.failure = exc
        return self.failure

    def stop(self) -> None:
        """Kill the program's process (the tests are done with it)."""
        os.close(self.requests)
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _usable(name: object) -> bool:
    """Whether an exported name may be bound in the tests (identifiers, never dunders)."""
    return (
        isinstance(name, str)
        and name.isidentifier()
        and not keyword.iskeyword(name)
        and not name.startswith("__")
    )


def _argument(args: tuple[object, ...], kwargs: dict[str, object], key: str) -> object:
    value = args[int(key)] if key.isdigit() and int(key) < len(args) else kwargs.get(key)
    return value if type(value) in (list, dict, set) else None


def rebuild_exception(names: object, message: object) -> Exception:
    """The program's exception as this process can raise it: its first builtin class."""
    text = message if isinstance(message, str) else ""
    classes = names if isinstance(names, list) else []
    for name in classes:
        cls = _RAISABLE.get(name) if isinstance(name, str) else None
        if cls is not None:
            try:
                return cls(text)
            except Exception:
                break
    shown = classes[0] if classes and isinstance(classes[0], str) else "an exception"
    return ProgramException(f"{shown}: {text}" if text else shown)


def bind(
    scope: dict[str, object],
    values: dict[str, object],
    modules: dict[str, str],
    code: types.CodeType,
) -> None:
    """Put the program's names into the tests' globals: never over a builtin's name (a program
    may not redefine `abs` for the tests), modules only when the tests use the name, imported
    here from the interpreter's own path."""
    shadowing = set(vars(builtins))
    for name, value in values.items():
        if name not in shadowing:
            scope[name] = value
    used = _names(code)
    for name, module in modules.items():
        if name in used and name not in shadowing:
            try:
                scope[name] = __import__(module, fromlist=["_"])
            except Exception:
                continue


def _names(code: types.CodeType) -> set[str]:
    """Every global or attribute name `code` and the code nested in it refer to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


# --- the split -----------------------------------------------------------------------------


def fork_program(*, private_fd: int, report_fd: int, tests_name: str) -> Server:
    """Fork: return a Server in the child, which goes on to run the program; in the first
    process run the tests against it and end, never returning."""
    requests, replies = os.pipe(), os.pipe()
    set_dumpable(False)
    _flush()
    child = os.fork()
    if child == 0:
        for fd in (private_fd, report_fd, requests[1], replies[0]):
            os.close(fd)
        set_dumpable(True)
        return Server(requests[0], replies[1])
    os.close(requests[0])
    os.close(replies[1])
    program = Program(child, requests[1], replies[0])
    run_tests(program, private_fd=private_fd, report_fd=report_fd, tests_name=tests_name)


def run_tests(program: Program, *, private_fd: int, report_fd: int, tests_name: str) -> NoReturn:
    """Read the token and the tests, run them against `program`, end the process: exit 0
    after writing the token when they reached their end, else as the tests or program did."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a signal from the program only ends us
    token, _, raw = _read_all(private_fd).partition(b"\n")
    source = raw.decode("utf-8")
    try:
        values, modules = program.names(program.start())
        import linecache

        linecache.cache[tests_name] = (len(source), None, source.splitlines(True), tests_name)
        code = compile(source, tests_name, "exec")
        scope: dict[str, object] = {
            "__name__": "__main__",
            "__builtins__": builtins,
            PROGRAM_NAMES: dict(values),
        }
        bind(scope, values, modules, code)
        exec(code, scope)
        if program.failure is not None:
            raise program.failure
    except ProgramEnded as ended:
        program.stop()
        if ended.wait_status != 0:  # a clean exit 0 is the tests' to give, never the program's
            _end_like(ended.wait_status)
        _print_tests_traceback(ended)
        _flush()
        os._exit(1)
    except BaseException as exc:
        program.stop()
        _print_tests_traceback(exc)
        _flush()
        os._exit(1)
    program.stop()
    _flush()
    os.write(report_fd, token)
    os._exit(0)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _print_tests_traceback(exc: BaseException) -> None:
    """The traceback without the harness's frames (compiled from "<string>")."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != "<string>"]
    lines = ["Traceback (most recent call last):\n"] if frames else []
    lines += traceback.format_list(frames)
    lines += traceback.format_exception_only(type(exc), exc)
    sys.stderr.write("".join(lines))


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _end_like(wait_status: int) -> NoReturn:
    """End this process the way the program's ended: same exit code, or same signal."""
    _flush()
    if os.WIFSIGNALED(wait_status):
        number = os.WTERMSIG(wait_status)
        with contextlib.suppress(OSError, ValueError):
            signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        os._exit(128 + number)
    os._exit(os.waitstatus_to_exitcode(wait_status))


def set_dumpable(on: bool) -> None:
    """prctl(PR_SET_DUMPABLE): off, a process of the same uid without CAP_SYS_PTRACE can
    neither ptrace this one nor open its /proc memory, descriptors or environment."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
