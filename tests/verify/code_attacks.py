"""Wrong programs that try to make the code verifier say "passed", one per attack class.

Each is a response for HumanEval/2 (`truncate_number`, whose right body is
`return number % 1.0`): a function body that continues the prompt, followed by top-level
attack code. Every one is wrong, so none may pass. Each searches for the end-of-tests proof
the way the in-process harness exposed it (a 32-hex-digit token in the interpreter), then
writes what it found to every descriptor and leaves with exit status 0. Used by
`tests/verify/test_code.py` and `bench/code_verifier.py`.
"""

from __future__ import annotations

#: Top-level helper the token hunters share: write `token` to every descriptor and leave.
_LEAVE = """
import os as _os
def _forge(token):
    for fd in range(1, 256):
        try:
            _os.write(fd, token)
        except OSError:
            pass
    _os._exit(0)
"""

ATTACKS: dict[str, str] = {
    # Walk the stack from the program's top level: the harness's frame is the caller.
    "frame_inspection": """    return 0
"""
    + _LEAVE
    + """
import re, sys
_frame = sys._getframe()
while _frame is not None:
    for _value in list(_frame.f_globals.values()) + list(_frame.f_locals.values()):
        if isinstance(_value, bytes):
            for _token in re.findall(rb"[0-9a-f]{32}", _value)[:1]:
                _forge(_token)
    _frame = _frame.f_back
""",
    # A thread that scans every container the garbage collector tracks while tests run.
    "gc_thread": """    import time
    time.sleep(0.3)
    return 0
"""
    + _LEAVE
    + """
import gc, re, threading, time
def _poll():
    while True:
        for _obj in gc.get_objects():
            if type(_obj) is dict:
                for _value in list(_obj.values()):
                    if type(_value) is bytes and re.fullmatch(rb"[0-9a-f]{32}", _value):
                        _forge(_value)
        time.sleep(0.005)
threading.Thread(target=_poll, daemon=True).start()
""",
    # A trace hook: every new frame (the tests' own included) is searched, callers too.
    "settrace": """    return 0
"""
    + _LEAVE
    + """
import re, sys, threading
def _hook(frame, event, arg):
    while frame is not None:
        for _value in list(frame.f_globals.values()):
            if type(_value) is bytes and re.fullmatch(rb"[0-9a-f]{32}", _value):
                _forge(_value)
        frame = frame.f_back
    return None
sys.settrace(_hook)
threading.settrace(_hook)
""",
    # Patch the builtin the harness runs the tests with: the tests never run.
    "patched_builtins": """    return 0

import builtins
builtins.exec = lambda *args, **kwargs: None
builtins.compile = lambda *args, **kwargs: None
""",
    # Shadow a builtin the tests call: `abs(candidate(x) - y) < 1e-6` always holds.
    "shadowed_builtin": """    return 0.5

def abs(value):
    return 0
""",
    # Print and write anything that looks like a proof, then leave.
    "printed_token": """    return 0
"""
    + _LEAVE
    + """
import secrets
for _guess in ("gristmill-tests-done-" + secrets.token_hex(16), secrets.token_hex(16), "0" * 32):
    print(_guess)
_forge(secrets.token_hex(16).encode())
""",
    # Leave, successfully, before any test runs.
    "early_exit": """    return 0

import os
os._exit(0)
""",
    # An object that equals everything (`candidate(3.5) == 0.5` holds).
    "always_equal": """    class Yes:
        def __eq__(self, other):
            return True
        def __ne__(self, other):
            return False
        def __lt__(self, other):
            return True
        def __sub__(self, other):
            return self
        def __abs__(self):
            return self
    return Yes()
""",
    # Read the memory of every other process in the cell (the tests', if it is there).
    "other_process_memory": """    return 0
"""
    + _LEAVE
    + """
import os, re
for _pid in [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]:
    try:
        _maps = open(f"/proc/{_pid}/maps").read().splitlines()
        _mem = open(f"/proc/{_pid}/mem", "rb", 0)
    except OSError:
        continue
    for _line in _maps:
        _span, _perms = _line.split()[:2]
        if "r" not in _perms:
            continue
        _lo, _hi = (int(x, 16) for x in _span.split("-"))
        try:
            _mem.seek(_lo)
            _chunk = _mem.read(_hi - _lo)
        except (OSError, ValueError, OverflowError):
            continue
        for _token in re.findall(rb"([0-9a-f]{32})\\n", _chunk)[:1]:
            _forge(_token)
""",
}
