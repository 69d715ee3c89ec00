"""Write `reader_expected.json`: what `read_records` makes of every case in
`tests/reader_cases.py` (schema, ids, value digest) and the message of every bad input.

Run once, against the per-row reader of commit ee563ee, to freeze its behaviour for
`tests/test_reader.py`. Running it against a later reader only copies that reader's output,
so the file must not be regenerated to make a failing test pass.

    PYTHONPATH=. python tests/data/capture_reader_expected.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reader_cases import BAD_INPUTS, CASES, EXPECTED, bad_parquet_inputs, describe

from gristmill.records import read_records


def _error(path: Path, options: dict[str, Any]) -> str:
    try:
        read_records(path, **options)
    except Exception as exc:  # every kind of failure is recorded
        return f"{type(exc).__name__}: {exc}".replace(str(path), "{path}")
    raise AssertionError(f"{path}: expected an error")


def main() -> None:
    out: dict[str, Any] = {"cases": {}, "errors": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            folder = Path(tmp) / case.name
            folder.mkdir()
            out["cases"][case.name] = describe(read_records(case.make(folder), **case.options))
        for name, file_name, content, options in BAD_INPUTS:
            folder = Path(tmp) / f"bad-{name}"
            folder.mkdir()
            path = folder / file_name
            path.write_bytes(content)
            out["errors"][name] = _error(path, options)
        folder = Path(tmp) / "bad-parquet"
        folder.mkdir()
        for name, path, options in bad_parquet_inputs(folder):
            out["errors"][name] = _error(path, options)
    EXPECTED.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
