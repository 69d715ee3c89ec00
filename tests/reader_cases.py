"""Inputs for the reader tests: every committed input with the mappings its users give, and
synthetic files that stress the corners (types, ids, parsing), plus bad inputs.

`tests/data/reader_expected.json` holds what the per-row reader of commit ee563ee made of
each case (schema, ids, a digest of every value) and the exact message of each bad input;
`tests/test_reader.py` checks that the reader still makes the same.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
EXPECTED = TESTS / "data" / "reader_expected.json"

ALPACA_MAP = {"prompt": "instruction", "input": "input", "response": "output"}
GSM8K_MAP = {"prompt": "question", "reference": "answer"}


def describe(frame: pl.DataFrame) -> dict[str, Any]:
    """What a reader made: shape, column order, dtypes, ids, and a digest of every value."""
    values = json.dumps(frame.to_dicts(), ensure_ascii=False, default=repr)
    return {
        "height": frame.height,
        "columns": frame.columns,
        "dtypes": [str(t) for t in frame.dtypes],
        "ids": frame["id"].to_list(),
        "digest": hashlib.sha256(values.encode("utf-8")).hexdigest(),
    }


@dataclass(frozen=True)
class Case:
    """One input: `make` writes it under a folder (or returns a committed file)."""

    name: str
    make: Callable[[Path], Path]
    options: dict[str, Any] = field(default_factory=dict)


def committed(relative: str) -> Callable[[Path], Path]:
    return lambda _folder: ROOT / relative


def _gsm8k_rows() -> list[dict[str, Any]]:
    text = (TESTS / "data" / "gsm8k_train_20.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def _alpaca_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(
        (TESTS / "data" / "alpaca_farm_eval_20.json").read_text(encoding="utf-8")
    )
    return rows


#: Texts that JSON-escape, strip or encode in unusual ways (ids must match `record_id`).
ODD_TEXTS = (
    'quote " and backslash \\ and slash /',
    "tab\tnew\nline\r\x00\x01\x1f\x7f",
    "caf\u00e9 \u4e2d\u6587 \U0001f600 \u2028\u2029 \ufeff",
    "\x1c trailing unit separator \x1f",
    "\u00a0non-breaking\u3000",
)


def prompt_rows() -> list[dict[str, Any]]:
    """Valid prompt-style rows whose extras mix types (int with float, structs whose keys
    vary, lists, nulls) and whose optional fields take every branch."""
    rows: list[dict[str, Any]] = []
    for i, base in enumerate(_gsm8k_rows()):
        odd = ODD_TEXTS[i % len(ODD_TEXTS)]
        row: dict[str, Any] = {
            "q": f"{base['question']} {odd}" if i % 3 == 0 else base["question"],
            "ctx": [None, "", "  ", "\x1c", odd, "extra context"][i % 6],
            "a": None if i % 7 == 3 else f"{base['answer']}{odd if i % 2 else ''}",
            "sys": [None, "", " ", "Be brief."][i % 4],
            "gold": base["answer"].split("#### ")[-1] if i % 5 else None,
            "src": f"gsm8k/{i % 3}",
            "who": None if i % 2 else "m-1",
            "up": f"p{i}" if i % 4 == 1 else None,
            "n": i if i % 2 else i + 0.5,
            "tags": [f"t{i}", "x"] if i % 3 else [],
            "meta": {"k": i, "s": None} if i % 4 else {"t": "x", "k": None},
            "big": 2**40 + i,
            "flag": i % 2 == 0,
        }
        if i % 5 == 0:
            del row["up"]  # a non-explicit field missing from some rows
        if i % 6 == 2:
            row["late"] = f"only some rows {i}"
        rows.append(row)
    return rows


PROMPT_MAP = {
    "prompt": "q",
    "input": "ctx",
    "response": "a",
    "system": "sys",
    "reference": "gold",
    "source": "src",
    "model": "who",
}


def message_rows() -> list[dict[str, Any]]:
    """Valid conversations: system, multi-turn, odd texts, a null extra key in a message, a
    file `id` and `prompt` (derived again), numeric references."""
    rows: list[dict[str, Any]] = []
    for i, base in enumerate(_alpaca_rows()):
        odd = ODD_TEXTS[i % len(ODD_TEXTS)]
        conv: list[dict[str, Any]] = [{"role": "user", "content": base["instruction"]}]
        if i % 3 == 0:
            conv.insert(0, {"role": "system", "content": f"System {odd}"})
        conv.append({"role": "assistant", "content": base["output"]})
        if i % 4 == 1:
            conv += [
                {"role": "user", "content": f"And {odd}?"},
                {"role": "assistant", "content": ""},
            ]
        if i % 5 == 2:
            conv[-1] = {**conv[-1], "name": None}
        if i % 6 == 5:
            conv = conv[:-1]  # ends with the user: no response
        reference: Any = [None, "ref", 42, 4.0, 1e16, -0.5][i % 6]
        rows.append(
            {
                "messages": conv,
                "reference": reference,
                "id": f"own-{i}",
                "prompt": "ignored",
                "dataset": base["dataset"],
                "parent_id": f"p{i}" if i % 2 else None,
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _prompt_jsonl(folder: Path) -> Path:
    return write_jsonl(folder / "prompts.jsonl", prompt_rows())


def _prompt_gz(folder: Path) -> Path:
    path = folder / "prompts.jsonl.gz"
    path.write_bytes(gzip.compress(_prompt_jsonl(folder).read_bytes(), mtime=0))
    return path


def _prompt_array(folder: Path) -> Path:
    path = folder / "prompts.json"
    path.write_text(json.dumps(prompt_rows(), indent=1), encoding="utf-8")
    return path


def _messages_jsonl(folder: Path) -> Path:
    return write_jsonl(folder / "chats.jsonl", message_rows())


def _rough_jsonl(folder: Path) -> Path:
    """Valid JSON lines the json module reads and fast parsers may not: a BOM, CRLF, blank
    and whitespace-only lines, NaN and Infinity, duplicate keys, a huge float."""
    lines = [json.dumps(r) for r in _gsm8k_rows()[:8]]
    lines[1] = lines[1].replace('{"question"', '{"question": "dropped", "question"', 1)
    lines[2] = lines[2][:-1] + ', "score": NaN}'
    lines[3] = lines[3][:-1] + ', "score": Infinity}'
    lines[4] = lines[4][:-1] + ', "score": 1e400}'
    lines[5] = lines[5][:-1] + ', "score": -0.0}'
    text = "\ufeff" + "\r\n".join(lines[:3]) + "\r\n\n   \n" + "\n".join(lines[3:]) + "\n\n"
    path = folder / "rough.jsonl"
    path.write_bytes(text.encode("utf-8"))
    return path


def _lines_in_json(folder: Path) -> Path:
    path = folder / "lines.json"
    path.write_bytes(_prompt_jsonl(folder).read_bytes())
    return path


def _prompt_parquet(folder: Path) -> Path:
    rows = [{k: v for k, v in r.items() if k != "late"} for r in prompt_rows()]
    for r in rows:
        r["n"] = float(r["n"])
    path = folder / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _polars_parquet(folder: Path) -> Path:
    """Large strings and numeric references, as polars writes them."""
    frame = pl.DataFrame(
        {
            "question": [r["question"] for r in _gsm8k_rows()],
            "gold": [float(i) / 4 for i in range(20)],
            "level": list(range(20)),
        }
    )
    path = folder / "polars.parquet"
    frame.write_parquet(path)
    return path


def _int_reference_parquet(folder: Path) -> Path:
    rows = [{"question": r["question"], "gold": i * 1000} for i, r in enumerate(_gsm8k_rows())]
    path = folder / "ints.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _messages_parquet(folder: Path) -> Path:
    rows = [{k: v for k, v in r.items() if k != "reference"} for r in message_rows()]
    for r in rows:
        r["messages"] = [{"name": None, **m} for m in r["messages"]]
    path = folder / "chats.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _alpaca_hf(folder: Path) -> Path:
    import datasets

    path = folder / "alpaca_hf"
    datasets.Dataset.from_list(_alpaca_rows()).save_to_disk(str(path))
    return path


def _messages_hf(folder: Path) -> Path:
    import datasets

    rows = [{k: v for k, v in r.items() if k != "reference"} for r in message_rows()]
    for r in rows:
        r["messages"] = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
    path = folder / "chats_hf"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:5])}
    ).save_to_disk(str(path))
    return path


CASES: tuple[Case, ...] = (
    Case("alpaca20", committed("tests/data/alpaca_farm_eval_20.json"), {"mapping": ALPACA_MAP}),
    Case(
        "alpaca20-source",
        committed("tests/data/alpaca_farm_eval_20.json"),
        {"mapping": {**ALPACA_MAP, "source": "dataset"}},
    ),
    Case("gsm8k20", committed("tests/data/gsm8k_train_20.jsonl"), {"mapping": GSM8K_MAP}),
    Case(
        "gsm8k20-prompt",
        committed("tests/data/gsm8k_train_20.jsonl"),
        {"mapping": {"prompt": "question"}, "source": "gsm8k"},
    ),
    Case("humaneval10", committed("tests/data/humaneval_10.jsonl"), {}),
    Case(
        "humaneval10-test",
        committed("tests/data/humaneval_10.jsonl"),
        {"mapping": {"prompt": "prompt", "reference": "test"}, "source": "humaneval"},
    ),
    Case(
        "gsm8k-decontam",
        committed("tests/filters/data/gsm8k_train_20_119.jsonl"),
        {"mapping": GSM8K_MAP},
    ),
    Case(
        "alpaca100",
        committed("tests/selectors/data/alpaca_farm_eval_gpt35_100.jsonl"),
        {"mapping": {**ALPACA_MAP, "model": "generator"}},
    ),
    Case(
        "alpaca100-select",
        committed("tests/selectors/data/alpaca_farm_eval_gpt35_100.jsonl"),
        {"mapping": {**ALPACA_MAP, "model": "generator", "source": "dataset"}},
    ),
    Case(
        "self-instruct",
        committed("tests/selectors/data/self_instruct_user_oriented_20x8.jsonl"),
        {"mapping": {"prompt": "instruction", "input": "input"}},
    ),
    Case(
        "recipe-gsm8k200",
        committed("recipes/data/gsm8k_train_200.jsonl"),
        {"mapping": GSM8K_MAP, "source": "gsm8k"},
    ),
    Case(
        "recipe-alpaca160",
        committed("recipes/data/alpaca_farm_eval_gpt35_160.jsonl"),
        {"mapping": {**ALPACA_MAP, "model": "generator"}, "source": "alpaca_farm"},
    ),
    Case(
        "recipe-grape",
        committed("recipes/data/alpaca_farm_eval_gpt35_160.jsonl"),
        {"mapping": {"prompt": "instruction", "input": "input"}, "source": "alpaca_farm"},
    ),
    Case(
        "recipe-humaneval",
        committed("recipes/data/humaneval_easy_20.jsonl"),
        {"mapping": {"prompt": "prompt", "reference": "test"}, "source": "humaneval"},
    ),
    Case(
        "recipe-self-instruct",
        committed("recipes/data/self_instruct_user_oriented_252.jsonl"),
        {"mapping": {"prompt": "instruction"}},
    ),
    Case("prompts-jsonl", _prompt_jsonl, {"mapping": PROMPT_MAP}),
    Case("prompts-gz", _prompt_gz, {"mapping": PROMPT_MAP}),
    Case("prompts-array", _prompt_array, {"mapping": PROMPT_MAP}),
    Case("prompts-lines-in-json", _lines_in_json, {"mapping": PROMPT_MAP}),
    Case("prompts-default-source", _prompt_jsonl, {"mapping": {"prompt": "q", "input": "ctx"}}),
    Case("chats-jsonl", _messages_jsonl, {}),
    Case("rough-jsonl", _rough_jsonl, {"mapping": GSM8K_MAP}),
    Case("prompts-parquet", _prompt_parquet, {"mapping": PROMPT_MAP}),
    Case(
        "polars-parquet", _polars_parquet, {"mapping": {"prompt": "question", "reference": "gold"}}
    ),
    Case(
        "ints-parquet",
        _int_reference_parquet,
        {"mapping": {"prompt": "question", "reference": "gold"}},
    ),
    Case("chats-parquet", _messages_parquet, {}),
    Case("alpaca-hf", _alpaca_hf, {"mapping": ALPACA_MAP}),
    Case("chats-hf", _messages_hf, {}),
    Case("chats-hf-test", _messages_hf, {"split": "test"}),
)


# ------------------------------------------------------------------------------------------
# Bad inputs: (name, file name, content, options); the expected message has `{path}` for the
# file's path
# ------------------------------------------------------------------------------------------


def _lines(*rows: Any) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


GOOD_Q = {"question": "q", "answer": "a"}
GOOD_M = {"messages": [{"role": "user", "content": "q"}]}
BAD_INPUTS: tuple[tuple[str, str, bytes, dict[str, Any]], ...] = (
    (
        "truncated-line",
        "t.jsonl",
        _lines(GOOD_Q, GOOD_Q, '{"question": "q", "answer": "a"'),
        {"mapping": GSM8K_MAP},
    ),
    ("truncated-no-newline", "t.jsonl", _lines(GOOD_Q)[:-2], {"mapping": GSM8K_MAP}),
    ("invalid-json", "j.jsonl", _lines(GOOD_Q, '{"question": q}', GOOD_Q), {"mapping": GSM8K_MAP}),
    ("two-objects-on-a-line", "two.jsonl", _lines(GOOD_Q, "{}{}"), {"mapping": GSM8K_MAP}),
    (
        "object-over-two-lines",
        "split.jsonl",
        _lines(GOOD_Q, '{"question":', '"q"}'),
        {"mapping": GSM8K_MAP},
    ),
    ("not-an-object", "list.jsonl", _lines(GOOD_Q, "", "[1, 2]"), {"mapping": GSM8K_MAP}),
    ("string-line", "str.jsonl", _lines(GOOD_Q, '"q"'), {"mapping": GSM8K_MAP}),
    (
        "non-utf8",
        "latin1.jsonl",
        _lines(GOOD_Q) + b'{"question": "caf\xe9"}\n',
        {"mapping": GSM8K_MAP},
    ),
    (
        "non-utf8-after-bom",
        "bom.jsonl",
        b"\xef\xbb\xbf" + _lines(GOOD_Q) + b'{"question": "\xff"}\n',
        {"mapping": GSM8K_MAP},
    ),
    (
        "non-utf8-blank-line",
        "blank8.jsonl",
        _lines(GOOD_Q) + b"\xa0\n" + _lines(GOOD_Q),
        {"mapping": GSM8K_MAP},
    ),
    (
        "control-char-in-string",
        "ctl.jsonl",
        _lines(GOOD_Q) + b'{"question": "a\tb"}\n',
        {"mapping": GSM8K_MAP},
    ),
    ("empty", "empty.jsonl", b"", {"mapping": GSM8K_MAP}),
    ("blank", "blank.jsonl", b"\n \n\t\n", {"mapping": GSM8K_MAP}),
    ("empty-array", "empty.json", b"[]", {"mapping": GSM8K_MAP}),
    (
        "array-invalid",
        "bad.json",
        b'[\n {"question": "q"},\n {"question": }\n]\n',
        {"mapping": GSM8K_MAP},
    ),
    ("array-non-object", "arr.json", b'[{"question": "q"}, "oops"]', {"mapping": GSM8K_MAP}),
    (
        "array-non-utf8",
        "arr8.json",
        b'[\n{"question": "q"},\n{"question": "caf\xe9"}\n]',
        {"mapping": GSM8K_MAP},
    ),
    (
        "array-wrong-type",
        "arrt.json",
        b'[{"question": "q"}, {"question": 7}]',
        {"mapping": {"prompt": "question"}},
    ),
    (
        "mapped-missing-everywhere",
        "m.jsonl",
        _lines(GOOD_Q),
        {"mapping": {"prompt": "instruction"}},
    ),
    (
        "mapped-missing-one-line",
        "holes.jsonl",
        _lines(GOOD_Q, {"question": "q"}),
        {"mapping": GSM8K_MAP},
    ),
    (
        "explicit-source-missing",
        "src.jsonl",
        _lines({**GOOD_Q, "s": "x"}, GOOD_Q),
        {"mapping": {**GSM8K_MAP, "source": "s"}},
    ),
    ("prompt-int", "p.jsonl", _lines(GOOD_Q, {"question": 12}), {"mapping": GSM8K_MAP}),
    ("prompt-list", "p.jsonl", _lines(GOOD_Q, {"question": ["a"]}), {"mapping": GSM8K_MAP}),
    ("prompt-null", "p.jsonl", _lines(GOOD_Q, {"question": None}), {"mapping": GSM8K_MAP}),
    ("prompt-blank", "p.jsonl", _lines(GOOD_Q, {"question": " \t"}), {"mapping": GSM8K_MAP}),
    (
        "prompt-unit-separator",
        "p.jsonl",
        _lines(GOOD_Q, {"question": "\x1f\u3000"}),
        {"mapping": GSM8K_MAP},
    ),
    ("prompt-bool", "p.jsonl", _lines(GOOD_Q, {"question": True}), {"mapping": GSM8K_MAP}),
    ("prompt-nan", "p.jsonl", _lines(GOOD_Q, '{"question": NaN}'), {"mapping": GSM8K_MAP}),
    (
        "reference-list",
        "r.jsonl",
        _lines(GOOD_Q, {"question": "q", "answer": ["a"]}),
        {"mapping": GSM8K_MAP},
    ),
    (
        "reference-bool",
        "r.jsonl",
        _lines(GOOD_Q, {"question": "q", "answer": False}),
        {"mapping": GSM8K_MAP},
    ),
    (
        "reference-dict",
        "r.jsonl",
        _lines(GOOD_Q, {"question": "q", "answer": {"x": 1}}),
        {"mapping": GSM8K_MAP},
    ),
    (
        "input-int",
        "i.jsonl",
        _lines({"q": "x", "i": "y"}, {"q": "x", "i": 3}),
        {"mapping": {"prompt": "q", "input": "i"}},
    ),
    (
        "system-list",
        "s.jsonl",
        _lines({"q": "x", "s": ["y"]}),
        {"mapping": {"prompt": "q", "system": "s"}},
    ),
    (
        "response-int",
        "o.jsonl",
        _lines({"q": "x", "o": "y"}, {"q": "x", "o": 3}),
        {"mapping": {"prompt": "q", "response": "o"}},
    ),
    ("model-int", "md.jsonl", _lines({"q": "x", "model": 1}), {"mapping": {"prompt": "q"}}),
    (
        "parent-id-list",
        "pi.jsonl",
        _lines({"q": "x", "parent_id": ["a"]}),
        {"mapping": {"prompt": "q"}},
    ),
    (
        "source-column-null",
        "sc.jsonl",
        _lines({"q": "x", "source": "s"}, {"q": "x", "source": None}),
        {"mapping": {"prompt": "q"}},
    ),
    (
        "source-column-empty",
        "se.jsonl",
        _lines({"q": "x", "source": " "}),
        {"mapping": {"prompt": "q"}},
    ),
    ("messages-str", "msgs.jsonl", _lines(GOOD_M, {"messages": "hello"}), {}),
    ("messages-null", "msgs.jsonl", _lines(GOOD_M, {"messages": None}), {}),
    ("messages-empty", "msgs.jsonl", _lines(GOOD_M, {"messages": []}), {}),
    ("messages-str-item", "msgs.jsonl", _lines(GOOD_M, {"messages": ["hello"]}), {}),
    ("messages-null-item", "msgs.jsonl", _lines(GOOD_M, {"messages": [None]}), {}),
    ("messages-no-content", "msgs.jsonl", _lines(GOOD_M, {"messages": [{"role": "user"}]}), {}),
    (
        "messages-null-content",
        "msgs.jsonl",
        _lines(GOOD_M, {"messages": [{"role": "user", "content": None}]}),
        {},
    ),
    (
        "messages-bad-role",
        "msgs.jsonl",
        _lines(
            GOOD_M,
            {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
        ),
        {},
    ),
    (
        "messages-int-content",
        "msgs.jsonl",
        _lines(GOOD_M, {"messages": [{"role": "user", "content": 5}]}),
        {},
    ),
    (
        "messages-extra-key",
        "msgs.jsonl",
        _lines(GOOD_M, {"messages": [{"role": "user", "content": "q", "name": "x"}]}),
        {},
    ),
    (
        "messages-no-user",
        "msgs.jsonl",
        _lines(
            GOOD_M,
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "a"},
                ]
            },
        ),
        {},
    ),
    (
        "messages-blank-user",
        "msgs.jsonl",
        _lines(GOOD_M, {"messages": [{"role": "user", "content": " "}]}),
        {},
    ),
    (
        "messages-blank-last-user",
        "msgs.jsonl",
        _lines(
            GOOD_M,
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "\x1c"},
                ]
            },
        ),
        {},
    ),
    (
        "mixed-extra",
        "mixed.jsonl",
        _lines(
            {"question": "q", "n": 1}, {"question": "q", "n": 2.5}, {"question": "q", "n": "three"}
        ),
        {"mapping": {"prompt": "question"}},
    ),
    (
        "extra-bigint",
        "big.jsonl",
        _lines({"question": "q", "n": 1}, {"question": "q", "n": 2**70}),
        {"mapping": {"prompt": "question"}},
    ),
    (
        "lone-surrogate",
        "sur.jsonl",
        _lines(GOOD_Q, '{"question": "\\ud800", "answer": "a"}'),
        {"mapping": GSM8K_MAP},
    ),
    ("no-conversation", "nc.jsonl", _lines(GOOD_Q), {}),
    (
        "unknown-field",
        "uf.jsonl",
        _lines(GOOD_Q),
        {"mapping": {"prompt": "question", "answer": "answer"}},
    ),
    (
        "gzip-truncated",
        "g.jsonl.gz",
        gzip.compress(_lines(GOOD_Q, GOOD_Q), mtime=0)[:-6],
        {"mapping": GSM8K_MAP},
    ),
    ("gzip-not-gzip", "n.jsonl.gz", b"not gzip at all", {"mapping": GSM8K_MAP}),
    ("parquet-corrupt", "c.parquet", b"PAR1 half a file", {"mapping": GSM8K_MAP}),
)


def bad_parquet_inputs(folder: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """Bad typed inputs, written with pyarrow: (name, path, options)."""
    out: list[tuple[str, Path, dict[str, Any]]] = []

    def write(name: str, table: pa.Table, options: dict[str, Any]) -> None:
        path = folder / f"{name}.parquet"
        pq.write_table(table, path)
        out.append((name, path, options))

    q = ["q0", "q1", "q2"]
    write("pq-int-prompt", pa.table({"question": [1, 2, 3]}), {"mapping": {"prompt": "question"}})
    write(
        "pq-null-prompt",
        pa.table({"question": ["q", None, "q"]}),
        {"mapping": {"prompt": "question"}},
    )
    write(
        "pq-bool-reference",
        pa.table({"question": q, "a": [True, False, True]}),
        {"mapping": {"prompt": "question", "reference": "a"}},
    )
    write(
        "pq-list-response",
        pa.table({"question": q, "o": [["x"], ["y"], []]}),
        {"mapping": {"prompt": "question", "response": "o"}},
    )
    write(
        "pq-missing-column",
        pa.table({"question": q}),
        {"mapping": {"prompt": "question", "reference": "gold"}},
    )
    conv = [{"role": "user", "content": "q", "name": None}]
    named = [{"role": "user", "content": "q", "name": "bob"}]
    write("pq-message-key", pa.Table.from_pylist([{"messages": conv}, {"messages": named}]), {})
    write(
        "pq-message-role",
        pa.Table.from_pylist(
            [{"messages": conv}, {"messages": [{"role": "tool", "content": "x", "name": None}]}]
        ),
        {},
    )
    write(
        "pq-empty",
        pa.table({"question": pa.array([], pa.string())}),
        {"mapping": {"prompt": "question"}},
    )
    return out
