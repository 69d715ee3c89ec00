"""The columnar, streaming reader makes the records, ids and errors the per-row reader made.

`tests/data/reader_expected.json` froze the per-row reader's output on every input in
`reader_cases.py` (see its docstring); these tests compare against it, compare the streaming
path with `read_records`, and spot-check ids against `record_id`.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from reader_cases import (
    BAD_INPUTS,
    CASES,
    EXPECTED,
    GSM8K_MAP,
    ODD_TEXTS,
    PROMPT_MAP,
    Case,
    bad_parquet_inputs,
    describe,
    prompt_rows,
    write_jsonl,
)

from gristmill.reader import (
    MISSING,
    BlockSize,
    SchemaDrift,
    iter_record_batches,
    load_rows,
    read_records,
    stream,
)
from gristmill.reader.columnar import PY_WHITESPACE
from gristmill.records import RecordError, record_id, record_ids
from gristmill.records import read_records as records_read_records

FROZEN: dict[str, Any] = json.loads(EXPECTED.read_text(encoding="utf-8"))
SMALL = BlockSize(bytes=1 << 10, rows=7)  # many blocks even for the small inputs
GSM8K_PATH = Path(__file__).parent / "data" / "gsm8k_train_20.jsonl"


def _make(case: Case, tmp_path: Path) -> Path:
    folder = tmp_path / case.name
    folder.mkdir()
    return case.make(folder)


def _error(path: Path, options: dict[str, Any], *, streamed: BlockSize | None = None) -> str:
    try:
        if streamed is None:
            read_records(path, **options)
        else:
            for _ in iter_record_batches(path, rows=3, size=streamed, **options):
                pass
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".replace(str(path), "{path}")
    raise AssertionError(f"{path}: expected an error")


# ------------------------------------------------------------------------------------------
# Same records and ids as the per-row reader
# ------------------------------------------------------------------------------------------


def test_every_case_is_frozen(tmp_path: Path) -> None:
    assert sorted(FROZEN["cases"]) == sorted(c.name for c in CASES)
    names = [n for n, *_ in BAD_INPUTS] + [n for n, *_ in bad_parquet_inputs(tmp_path)]
    assert sorted(FROZEN["errors"]) == sorted(names)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_same_records_as_the_per_row_reader(case: Case, tmp_path: Path) -> None:
    path = _make(case, tmp_path)
    frame = read_records(path, **case.options)
    assert describe(frame) == FROZEN["cases"][case.name]
    assert records_read_records(path, **case.options).equals(frame)
    for row in frame.head(5).iter_rows(named=True):
        assert row["id"] == record_id(row["messages"], row["reference"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_streamed_batches_are_read_records_cut_into_slices(
    case: Case, rows: int, tmp_path: Path
) -> None:
    path = _make(case, tmp_path)
    whole = read_records(path, **case.options)
    try:
        batches = list(iter_record_batches(path, rows=rows, size=SMALL, **case.options))
    except SchemaDrift:
        # blocks of 7 rows or 1 KiB: some synthetic inputs widen a type or add a column
        # after the first block; the default block holds all of them
        batches = list(iter_record_batches(path, rows=rows, **case.options))
    assert [b.height for b in batches] == [
        min(rows, whole.height - start) for start in range(0, whole.height, rows)
    ]
    for k, batch in enumerate(batches):
        assert batch.equals(whole.slice(k * rows, rows)), k


def test_small_blocks_read_like_one_block(tmp_path: Path) -> None:
    """Blocks of a few rows (JSON lines plain, gzip, with a BOM and CRLF; JSON arrays,
    Parquet, HF) give the same records, with no SchemaDrift on these inputs."""
    names = {"alpaca20", "gsm8k20", "alpaca100", "alpaca-hf", "chats-parquet", "gsm8k-decontam"}
    paths = [(_make(c, tmp_path), c.options) for c in CASES if c.name in names]
    lines = GSM8K_PATH.read_bytes()
    gz = tmp_path / "g.jsonl.gz"
    gz.write_bytes(gzip.compress(lines))
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(b"\xef\xbb\xbf" + lines.replace(b"\n", b"\r\n"))
    paths += [(gz, {"mapping": GSM8K_MAP}), (crlf, {"mapping": GSM8K_MAP})]
    for path, options in paths:
        batches = list(iter_record_batches(path, rows=5, size=SMALL, **options))
        assert pl.concat(batches).equals(read_records(path, **options)), path


def test_record_ids_match_record_id_on_every_odd_character() -> None:
    texts = [chr(c) for c in range(0x3000)] + list(ODD_TEXTS) + ["", "\U0010ffff"]
    convs = [
        [{"role": "system", "content": t}, {"role": "user", "content": t[::-1] + "?"}]
        for t in texts
    ]
    references = [None if i % 3 else texts[-i] for i in range(len(texts))]
    messages = pl.Series(convs, dtype=pl.List(pl.Struct({"role": pl.String, "content": pl.String})))
    ids = record_ids(messages, pl.Series(references, dtype=pl.String))
    assert ids.to_list() == [record_id(c, r) for c, r in zip(convs, references, strict=True)]


def test_python_whitespace_is_what_str_strip_removes() -> None:
    assert "".join(c for c in map(chr, range(0x110000)) if c.isspace()) == PY_WHITESPACE


def test_load_rows_keeps_positions(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", prompt_rows())
    data = load_rows(path, "jsonl", "train")
    assert data.length == 20
    assert data.line_of(4) == 5
    assert data.values("up")[0] is MISSING  # the key is absent from row 0
    assert data.values("up")[1] == "p1"


# ------------------------------------------------------------------------------------------
# Same errors as the per-row reader
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "file_name", "content", "options"), BAD_INPUTS, ids=str)
def test_same_error_as_the_per_row_reader(
    name: str, file_name: str, content: bytes, options: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / file_name
    path.write_bytes(content)
    assert _error(path, options) == FROZEN["errors"][name]
    assert _error(path, options, streamed=BlockSize()) == FROZEN["errors"][name]


def test_same_errors_on_typed_inputs(tmp_path: Path) -> None:
    for name, path, options in bad_parquet_inputs(tmp_path):
        assert _error(path, options) == FROZEN["errors"][name], name
        assert _error(path, options, streamed=SMALL) == FROZEN["errors"][name], name


def _gsm8k_lines(n: int, bad: dict[int, str]) -> bytes:
    """n short GSM8K-style lines; `bad` replaces some 1-based lines."""
    lines = [bad.get(i, f'{{"question": "q{i}", "answer": "a{i}"}}') for i in range(1, n + 1)]
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            '{"question": null, "answer": "a"}',
            "line 150001: field 'prompt' (column 'question'): is null, expected a string",
        ),
        ('{"question": "q", "answer": "a"', "line 150001: invalid JSON at column 32"),
        ('{"question": "q"}', "line 150001: field 'reference' (column 'answer'): column"),
        (
            '{"question": "  ", "answer": "a"}',
            "line 150001: field 'prompt' (column 'question'): is",
        ),
    ],
)
def test_a_bad_row_in_a_later_part_names_its_global_line(
    bad: str, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "big.jsonl"
    path.write_bytes(_gsm8k_lines(150_010, {150_001: bad}))
    seen = 0
    with pytest.raises(RecordError) as err:
        for batch in iter_record_batches(path, rows=1000, mapping=GSM8K_MAP):
            seen += batch.height
    assert str(err.value).startswith(f"{path}: {message}")
    assert err.value.line == 150_001
    assert seen < 150_001  # the parts before the bad row were handed out first
    with pytest.raises(RecordError, match="line 150001: "):
        read_records(path, mapping=GSM8K_MAP)


def test_a_bad_row_in_a_later_parquet_batch_names_its_global_row(tmp_path: Path) -> None:
    questions: list[str | None] = [f"q{i}" for i in range(150_010)]
    questions[150_000] = None
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"question": questions}), path, row_group_size=20_000)
    with pytest.raises(
        RecordError,
        match=r"big\.parquet: row 150000 \(0-based\): field 'prompt' \(column 'question'\): "
        r"is null",
    ):
        for _ in iter_record_batches(path, rows=1000, mapping={"prompt": "question"}):
            pass


def test_non_utf8_in_a_later_block_names_line_and_file_offset(tmp_path: Path) -> None:
    head = _gsm8k_lines(30_000, {})
    path = tmp_path / "late.jsonl"
    path.write_bytes(head + b'{"question": "caf\xe9", "answer": "a"}\n')
    offset = len(head) + len(b'{"question": "caf')
    with pytest.raises(RecordError) as err:
        for _ in iter_record_batches(
            path, rows=100, size=BlockSize(bytes=4096), **{"mapping": GSM8K_MAP}
        ):
            pass
    assert str(err.value) == (
        f"{path}: line 30001: invalid UTF-8 (invalid continuation byte) at byte 17 of the line "
        f"(byte offset {offset} of the file)"
    )


# ------------------------------------------------------------------------------------------
# Streaming: bounded batches, limits, schema drift
# ------------------------------------------------------------------------------------------


def test_batches_are_bounded_and_reading_stops_at_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "many.jsonl"
    path.write_bytes(_gsm8k_lines(5000, {4001: "not json"}))
    size = BlockSize(bytes=8192)
    heights = [
        b.height
        for b in iter_record_batches(path, rows=64, limit=1000, size=size, mapping=GSM8K_MAP)
    ]
    assert heights == [64] * 15 + [40]  # the bad line after the limit is never read
    with pytest.raises(RecordError, match="line 4001: invalid JSON"):
        list(iter_record_batches(path, rows=64, size=size, mapping=GSM8K_MAP))
    none = list(iter_record_batches(path, rows=64, limit=0, size=size, mapping=GSM8K_MAP))
    assert [b.height for b in none] == [0]
    assert none[0].columns == list(read_records(GSM8K_PATH, mapping=GSM8K_MAP).columns)


def test_a_column_that_appears_late_is_schema_drift(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [{"question": f"q{i}"} for i in range(200)]
    rows[150]["lang"] = "en"
    path = write_jsonl(tmp_path / "late.jsonl", rows)
    with pytest.raises(SchemaDrift, match=r"line 151: field 'lang': this column first appears"):
        list(
            iter_record_batches(
                path, rows=10, size=BlockSize(bytes=512), mapping={"prompt": "question"}
            )
        )
    assert read_records(path, mapping={"prompt": "question"})["lang"].null_count() == 199


def test_types_that_widen_late_are_schema_drift_and_nulls_are_not(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [{"question": f"q{i}", "n": None, "x": 1.5} for i in range(200)]
    for i in range(100, 200):
        rows[i]["n"], rows[i]["x"] = i, i
    path = write_jsonl(tmp_path / "wide.jsonl", rows)
    size = BlockSize(bytes=512)
    with pytest.raises(SchemaDrift, match=r"field 'n': has type Int64 from here on, but Null"):
        list(iter_record_batches(path, rows=10, size=size, mapping={"prompt": "question"}))
    rows = [
        {"question": f"q{i}", "n": i if i < 100 else None, "x": 1.5 if i < 100 else i}
        for i in range(200)
    ]
    path = write_jsonl(tmp_path / "narrow.jsonl", rows)
    streamed = pl.concat(
        iter_record_batches(path, rows=10, size=size, mapping={"prompt": "question"})
    )
    assert streamed.equals(read_records(path, mapping={"prompt": "question"}))


def test_prompt_mode_mapping_round_trip(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", prompt_rows())
    frame = read_records(path, mapping=PROMPT_MAP)
    for row, raw in zip(frame.iter_rows(named=True), prompt_rows(), strict=True):
        assert row["id"] == record_id(row["messages"], row["reference"])
        assert row["messages"][0]["role"] == ("system" if raw["sys"] else "user")


def test_read_records_reads_blocks_and_whole_only_when_it_must(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In blocks, read_records gives the one-block result; after SchemaDrift or an error it
    reads the input as one block: the whole input's schema, the whole-input error order."""
    monkeypatch.setattr(stream, "DEFAULT_BLOCK", BlockSize(bytes=512, rows=10))
    path = write_jsonl(tmp_path / "p.jsonl", prompt_rows())  # a late column, widening types
    assert describe(read_records(path, mapping=PROMPT_MAP)) == FROZEN["cases"]["prompts-jsonl"]
    path = tmp_path / "two.jsonl"
    path.write_bytes(_gsm8k_lines(200, {5: '{"question": null}', 150: "not json"}))
    with pytest.raises(RecordError, match=r"two\.jsonl: line 150: invalid JSON"):
        read_records(path, mapping={"prompt": "question"})  # parse errors first, as before
    with pytest.raises(RecordError, match=r"two\.jsonl: line 5: field 'prompt'"):
        list(iter_record_batches(path, rows=10, mapping={"prompt": "question"}))  # block order


@pytest.mark.parametrize("late_key", [False, True])
def test_any_key_reads_by_column(tmp_path: Path, late_key: bool) -> None:
    """Keys that are no identifiers (decoded against the keys seen first), and a key first
    seen after those lines (decoded as plain objects), keep their values and order."""
    rows: list[dict[str, Any]] = [
        {"q": f"q{i}", "1x": i, "k0": "x" if i % 2 else None, "a b": [i], "é": {"n": i}}
        for i in range(1500)
    ]
    if late_key:
        rows[1200]["later"] = "here"
    path = write_jsonl(tmp_path / "keys.jsonl", rows)
    frame = read_records(path, mapping={"prompt": "q"})
    extras = ["1x", "k0", "a b", "é"] + (["later"] if late_key else [])
    assert frame.columns[8:] == extras
    expected = [{k: r.get(k) for k in extras} for r in rows]
    assert frame.select(extras).to_dicts() == expected
