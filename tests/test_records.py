"""Readers, validation and trainer-format writers of gristmill.records, on real data slices."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gristmill import records
from gristmill.records import (
    POLARS_CORE,
    RecordError,
    infer_format,
    make_record,
    read_records,
    record_id,
    records_frame,
    to_chat_preference,
    to_preference,
    to_prompt_completion,
    to_sft,
    validate_frame,
    write_format,
    write_table,
)

DATA = Path(__file__).parent / "data"
ALPACA = DATA / "alpaca_farm_eval_20.json"
GSM8K = DATA / "gsm8k_train_20.jsonl"
ALPACA_MAP = {"prompt": "instruction", "input": "input", "response": "output"}
GSM8K_MAP = {"prompt": "question", "reference": "answer"}
MESSAGE_FEATURE = datasets.List(
    {"role": datasets.Value("string"), "content": datasets.Value("string")}
)


def alpaca_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(ALPACA.read_text(encoding="utf-8"))
    return rows


def gsm8k_rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load_parquet(path: Path, tmp_path: Path) -> datasets.Dataset:
    ds = datasets.load_dataset(
        "parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert isinstance(ds, datasets.Dataset)
    return ds


# ------------------------------------------------------------------------------------------
# Readers on real data
# ------------------------------------------------------------------------------------------


def test_alpaca_json_with_alpaca_mapping() -> None:
    rows = alpaca_rows()
    df = read_records(ALPACA, mapping=ALPACA_MAP)

    assert df.height == len(rows) == 20
    assert df.columns[: len(POLARS_CORE)] == list(POLARS_CORE)
    assert {k: df.schema[k] for k in POLARS_CORE} == POLARS_CORE
    # unmapped columns are kept, consumed ones are not
    assert df.columns[len(POLARS_CORE) :] == ["generator", "dataset", "datasplit"]
    assert df["dataset"].to_list() == [r["dataset"] for r in rows]
    assert set(df["source"]) == {"alpaca_farm_eval_20"}
    with_input = 0
    for rec, raw in zip(df.iter_rows(named=True), rows, strict=True):
        expected = raw["instruction"]
        if raw["input"]:
            expected += "\n\n" + raw["input"]
            with_input += 1
        assert rec["prompt"] == expected
        assert rec["response"] == raw["output"]
        assert rec["messages"] == [
            {"role": "user", "content": expected},
            {"role": "assistant", "content": raw["output"]},
        ]
        assert rec["id"] == record_id(rec["messages"], None)
    assert with_input == 6
    validate_frame(df, "alpaca")


def test_gsm8k_jsonl_with_reference_and_source_argument() -> None:
    rows = gsm8k_rows()
    df = read_records(GSM8K, mapping=GSM8K_MAP, source="gsm8k")
    assert df.height == 20
    assert df.columns == list(POLARS_CORE)
    assert df["prompt"].to_list() == [r["question"] for r in rows]
    assert df["reference"].to_list() == [r["answer"] for r in rows]
    assert df["response"].null_count() == 20
    assert set(df["source"]) == {"gsm8k"}
    assert df["messages"][0].to_list() == [{"role": "user", "content": rows[0]["question"]}]
    validate_frame(df, "gsm8k")


def test_source_from_a_mapped_column() -> None:
    df = read_records(ALPACA, mapping={**ALPACA_MAP, "source": "dataset"})
    assert df["source"].to_list() == [r["dataset"] for r in alpaca_rows()]
    assert "dataset" not in df.columns


def test_same_records_from_every_format(tmp_path: Path) -> None:
    base = read_records(GSM8K, mapping=GSM8K_MAP, source="gsm8k")

    gz = tmp_path / "gsm8k.jsonl.gz"
    gz.write_bytes(gzip.compress(GSM8K.read_bytes()))
    as_json = tmp_path / "gsm8k.json"
    as_json.write_text(json.dumps(gsm8k_rows()), encoding="utf-8")
    json_lines_in_json = tmp_path / "lines.json"  # many `.json` files are really JSON lines
    json_lines_in_json.write_bytes(GSM8K.read_bytes())
    parquet = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.Table.from_pylist(gsm8k_rows()), parquet)
    hf_dir = tmp_path / "gsm8k_hf"
    hf = datasets.load_dataset(
        "json", data_files=str(GSM8K), split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    hf.save_to_disk(str(hf_dir))

    assert infer_format(gz) == "jsonl"
    assert infer_format(as_json) == "json"
    assert infer_format(parquet) == "parquet"
    assert infer_format(hf_dir) == "hf"
    for path in (gz, as_json, json_lines_in_json, parquet, hf_dir):
        got = read_records(path, mapping=GSM8K_MAP, source="gsm8k")
        assert got.equals(base), path
    # the default source is the name without format suffixes
    assert read_records(gz, mapping=GSM8K_MAP)["source"][0] == "gsm8k"
    assert read_records(hf_dir, mapping=GSM8K_MAP)["source"][0] == "gsm8k_hf"


def test_hf_dataset_dict_split(tmp_path: Path) -> None:
    cache = str(tmp_path / "hf-cache")
    dd = datasets.load_dataset(
        "json", data_files={"train": str(GSM8K), "test": str(GSM8K)}, cache_dir=cache
    )
    dd["test"] = dd["test"].select(range(5))
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read_records(tmp_path / "dd", mapping=GSM8K_MAP).height == 20
    assert read_records(tmp_path / "dd", mapping=GSM8K_MAP, split="test").height == 5
    with pytest.raises(
        RecordError, match=r"dd: no split 'validation'; the dataset has \['train', 'test'\]"
    ):
        read_records(tmp_path / "dd", mapping=GSM8K_MAP, split="validation")


def test_dataset_folder_of_parquet_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished gristmill dataset folder (data/train-*.parquet) reads back as `hf`."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    df = read_records(ALPACA, mapping={**ALPACA_MAP, "source": "dataset"})
    write_table(df.head(12), tmp_path / "ds" / "data" / "train-00000-of-00002.parquet")
    write_table(df.tail(8), tmp_path / "ds" / "data" / "train-00001-of-00002.parquet")
    assert read_records(tmp_path / "ds").equals(df)
    with pytest.raises(IsADirectoryError, match="read folders with format='hf'"):
        read_records(tmp_path / "ds", format="parquet")
    with pytest.raises(FileNotFoundError, match=r"nothing\.jsonl: no such file"):
        read_records(tmp_path / "nothing.jsonl")


def test_parquet_extras_keep_their_types(tmp_path: Path) -> None:
    rows = [
        {"q": "2+2?", "a": 4, "score": 0.5, "tags": ["x", "y"], "meta": {"k": 1}},
        {"q": "3+3?", "a": 6, "score": None, "tags": [], "meta": {"k": 2}},
    ]
    path = tmp_path / "nums.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    df = read_records(path, mapping={"prompt": "q", "reference": "a"})
    assert df["reference"].to_list() == ["4", "6"]  # numeric answers become text
    assert df.schema["score"] == pl.Float64
    assert df.schema["tags"] == pl.List(pl.String)
    assert df["meta"].to_list() == [{"k": 1}, {"k": 2}]
    # the same from JSON lines
    jdf = read_records(
        write_jsonl(tmp_path / "nums.jsonl", rows), mapping={"prompt": "q", "reference": "a"}
    )
    assert jdf.equals(df.with_columns(source=pl.lit("nums")))


def test_messages_input_and_default_mapping(tmp_path: Path) -> None:
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    path = write_jsonl(
        tmp_path / "chats.jsonl",
        [{"messages": conv, "reference": "4", "model": "m", "lang": "en", "id": "orig-1"}],
    )
    df = read_records(path)
    rec = df.row(0, named=True)
    assert rec["messages"] == conv
    assert (rec["prompt"], rec["response"], rec["reference"], rec["model"]) == (
        "2+2?",
        "4",
        "4",
        "m",
    )
    assert rec["id"] == record_id(conv, "4")  # a file's own `id` column is replaced
    assert rec["lang"] == "en"
    # prompt/response columns by their own names, system included
    path2 = write_jsonl(
        tmp_path / "pr.jsonl", [{"prompt": "2+2?", "response": "4", "system": "Be brief."}]
    )
    rec2 = read_records(path2).row(0, named=True)
    assert rec2["messages"] == [conv[0], conv[3], conv[4]]


def test_records_round_trip_through_write_table(tmp_path: Path) -> None:
    df = read_records(ALPACA, mapping={**ALPACA_MAP, "source": "dataset"}).with_columns(
        parent_id=pl.lit("p0"), model=pl.lit("gpt-3.5-turbo-0301")
    )
    for name in ("out.parquet", "out.jsonl"):
        path = write_table(df, tmp_path / name)
        back = read_records(path)
        assert back.equals(df), name  # ids, per-row source, lineage and extras survive
        validate_frame(back, name)


def test_infer_format_rejects_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.csv: cannot tell the format.*format="):
        infer_format(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        read_records(GSM8K, format="csv", mapping=GSM8K_MAP)


# ------------------------------------------------------------------------------------------
# Bad input: every error names the file, the row and the field
# ------------------------------------------------------------------------------------------


def test_malformed_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    lines = GSM8K.read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2][:-1]  # drop the closing brace of line 3
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(RecordError, match=r"bad\.jsonl: line 3: invalid JSON at column \d+") as err:
        read_records(path, mapping=GSM8K_MAP)
    assert str(path) in str(err.value)
    assert err.value.line == 3


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(RecordError, match=r"list\.jsonl: line 3: expected a JSON object, got list"):
        read_records(path, mapping=GSM8K_MAP)


def test_malformed_json_array(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n {"question": "q"},\n {"question": }\n]\n', encoding="utf-8")
    with pytest.raises(RecordError, match=r"bad\.json: line 3: invalid JSON at column 15"):
        read_records(path, mapping=GSM8K_MAP)


def test_json_array_rows_are_named_by_index(tmp_path: Path) -> None:
    rows: list[Any] = alpaca_rows()[:3]
    rows[2] = {**rows[2], "instruction": 7}
    path = tmp_path / "three.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(
        RecordError,
        match=r"three\.json: row 2 \(0-based\): field 'prompt' \(column 'instruction'\): "
        r"expected a string, got int 7",
    ):
        read_records(path, mapping=ALPACA_MAP)
    path.write_text(json.dumps([rows[0], "oops"]), encoding="utf-8")
    with pytest.raises(RecordError, match=r"row 1 \(0-based\): expected a JSON object, got str"):
        read_records(path, mapping=ALPACA_MAP)


def test_mapped_column_missing_everywhere(tmp_path: Path) -> None:
    with pytest.raises(
        RecordError,
        match=r"gsm8k_train_20\.jsonl: line 1: field 'prompt' \(column 'instruction'\): "
        r"column 'instruction' not found; the input has columns \['question', 'answer'\]",
    ):
        read_records(GSM8K, mapping={"prompt": "instruction"})
    parquet = tmp_path / "g.parquet"
    pq.write_table(pa.Table.from_pylist(gsm8k_rows()), parquet)
    with pytest.raises(
        RecordError, match=r"g\.parquet: row 0 \(0-based\): field 'reference' \(column 'gold'\)"
    ):
        read_records(parquet, mapping={"prompt": "question", "reference": "gold"})


def test_mapped_column_missing_from_one_line(tmp_path: Path) -> None:
    rows = gsm8k_rows()
    del rows[4]["answer"]
    path = write_jsonl(tmp_path / "holes.jsonl", rows)
    with pytest.raises(
        RecordError,
        match=r"holes\.jsonl: line 5: field 'reference' \(column 'answer'\): "
        r"column 'answer' is missing from this row",
    ):
        read_records(path, mapping=GSM8K_MAP)


@pytest.mark.parametrize(
    ("value", "field", "problem"),
    [
        ({"question": 12, "answer": "a"}, "prompt", "expected a string, got int 12"),
        ({"question": ["a", "b"], "answer": "a"}, "prompt", "expected a string, got list"),
        ({"question": None, "answer": "a"}, "prompt", "is null, expected a string"),
        ({"question": "  ", "answer": "a"}, "prompt", "is empty"),
        ({"question": "q", "answer": ["a"]}, "reference", "expected a string, got list"),
        ({"question": "q", "answer": "a", "out": 3}, "response", "expected a string, got int 3"),
    ],
)
def test_wrong_types_of_prompt_fields(
    tmp_path: Path, value: dict[str, Any], field: str, problem: str
) -> None:
    good = {"question": "q0", "answer": "a0", "out": "r0"}
    path = write_jsonl(tmp_path / "types.jsonl", [good, good, {**good, **value}])
    with pytest.raises(RecordError) as err:
        read_records(path, mapping={**GSM8K_MAP, "response": "out"})
    msg = str(err.value)
    assert msg.startswith(f"{path}: line 3: field {field!r}")
    assert problem in msg
    assert (err.value.line, err.value.field) == (3, field)


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("hello", "expected a list of {role, content} messages, got str 'hello'"),
        (None, "is null"),
        ([], "is an empty conversation"),
        (["hello"], "message 0: expected a {role, content} object, got str"),
        ([{"role": "user"}], "message 0: has no 'content'"),
        (
            [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}],
            "message 1: role 'bot' is not one of",
        ),
        ([{"role": "user", "content": 5}], "message 0: content must be a string, got int 5"),
        ([{"role": "user", "content": "q", "name": "x"}], "message 0: has key(s) ['name']"),
        (
            [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
            "the conversation has no user turn",
        ),
        ([{"role": "user", "content": " "}], "the last user turn is empty"),
    ],
)
def test_bad_messages(tmp_path: Path, messages: Any, problem: str) -> None:
    good = {"messages": [{"role": "user", "content": "q"}]}
    path = write_jsonl(tmp_path / "msgs.jsonl", [good, {"messages": messages}])
    with pytest.raises(RecordError) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}: line 2: field 'messages': ")
    assert problem in str(err.value)


def test_messages_from_parquet_with_null_extra_struct_fields(tmp_path: Path) -> None:
    conv = [
        {"role": "user", "content": "q", "name": None},
        {"role": "assistant", "content": "a", "name": None},
    ]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": conv}]), path)
    assert read_records(path)["response"].to_list() == ["a"]
    conv[1]["name"] = "bob"
    pq.write_table(pa.Table.from_pylist([{"messages": conv[:1]}, {"messages": conv}]), path)
    with pytest.raises(
        RecordError, match=r"m\.parquet: row 1 \(0-based\): field 'messages': message 1: has key"
    ):
        read_records(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n  \n\n"),
        ("empty.json", b"[]"),
        ("ws.json", b"  \n"),
    ],
)
def test_empty_inputs(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RecordError, match=rf"{name}: no records \(the input is empty\)"):
        read_records(path, mapping=GSM8K_MAP)


def test_empty_parquet(tmp_path: Path) -> None:
    path = tmp_path / "none.parquet"
    pq.write_table(pa.table({"question": pa.array([], pa.string())}), path)
    with pytest.raises(RecordError, match=r"none\.parquet: no records"):
        read_records(path, mapping=GSM8K_MAP)


def test_non_utf8_bytes(tmp_path: Path) -> None:
    first = b'{"question": "q", "answer": "a"}\n'
    second = b'{"question": "caf\xe9", "answer": "a"}\n'
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(first + second)
    offset_in_line = second.index(b"\xe9")
    with pytest.raises(RecordError) as err:
        read_records(path, mapping=GSM8K_MAP)
    msg = str(err.value)
    assert msg.startswith(f"{path}: line 2: invalid UTF-8")
    assert (
        f"at byte {offset_in_line} of the line "
        f"(byte offset {len(first) + offset_in_line} of the file)" in msg
    )
    # the same in a JSON array names the line too
    arr = tmp_path / "latin1.json"
    raw = b'[\n{"question": "q"},\n{"question": "caf\xe9"}\n]'
    arr.write_bytes(raw)
    bad_at = raw.index(b"\xe9")
    with pytest.raises(
        RecordError, match=rf"latin1\.json: line 3: invalid UTF-8 .* at byte offset {bad_at}$"
    ):
        read_records(arr, mapping=GSM8K_MAP)


def test_mixed_types_in_an_extra_column(tmp_path: Path) -> None:
    rows = [{"question": "q", "n": 1}, {"question": "q", "n": 2.5}, {"question": "q", "n": "three"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(
        RecordError, match=r"mixed\.jsonl: line 3: field 'n': value str 'three' does not fit"
    ):
        read_records(path, mapping={"prompt": "question"})


def test_bad_mappings(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match=r"mapping has unknown field\(s\) \['answer'\]"):
        read_records(GSM8K, mapping={"prompt": "question", "answer": "answer"})
    with pytest.raises(RecordError, match="map either 'messages' or 'prompt'"):
        read_records(GSM8K, mapping={"messages": "question", "prompt": "question"})
    with pytest.raises(RecordError, match="give either source= or a mapped 'source' column"):
        read_records(ALPACA, mapping={**ALPACA_MAP, "source": "dataset"}, source="x")
    with pytest.raises(
        RecordError, match=r"no conversation: map 'messages' or 'prompt'.*\['question', 'answer'\]"
    ):
        read_records(GSM8K)


def test_one_bad_row_fails_the_whole_read(tmp_path: Path) -> None:
    rows: list[Any] = gsm8k_rows()
    rows[-1]["question"] = None
    path = write_jsonl(tmp_path / "last.jsonl", rows)
    with pytest.raises(
        RecordError, match=r"line 20: field 'prompt' \(column 'question'\): is null"
    ):
        read_records(path, mapping=GSM8K_MAP)


def test_record_error_pickles() -> None:
    err = RecordError("f.jsonl", "is null", line=3, field="prompt", column="question")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, RecordError)
    assert str(back) == str(err) == "f.jsonl: line 3: field 'prompt' (column 'question'): is null"
    assert (back.line, back.row, back.field, back.column) == (3, None, "prompt", "question")


# ------------------------------------------------------------------------------------------
# validate_frame
# ------------------------------------------------------------------------------------------


def _frame() -> pl.DataFrame:
    return read_records(ALPACA, mapping=ALPACA_MAP).head(4)


def test_validate_frame_errors() -> None:
    df = _frame()
    with pytest.raises(RecordError, match=r"stage: field 'reference': missing core column"):
        validate_frame(df.drop("reference"), "stage")
    with pytest.raises(RecordError, match=r"field 'response': has type Null, expected String"):
        validate_frame(df.with_columns(response=pl.lit(None)), "stage")
    with pytest.raises(RecordError, match=r"field 'score__len': has type Int64, expected Float64"):
        validate_frame(df.with_columns(score__len=pl.lit(1, pl.Int64)), "stage")
    validate_frame(
        df.with_columns(score__len=pl.lit(1.0), drop_reason=pl.lit(None, pl.String)), "stage"
    )
    prompts = df["prompt"].to_list()
    prompts[2] = None
    with pytest.raises(RecordError, match=r"stage: row 2 \(0-based\): field 'prompt': is null"):
        validate_frame(df.with_columns(prompt=pl.Series(prompts)), "stage")


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([{"role": "bot", "content": "x"}], "message 0: role 'bot' is not one of"),
        ([{"role": "user", "content": None}], "message 0: content must be a string, got null"),
        ([{"role": "assistant", "content": "x"}], "the conversation has no user turn"),
        ([], "is an empty conversation"),
    ],
)
def test_validate_frame_bad_conversation(messages: list[dict[str, Any]], problem: str) -> None:
    df = _frame()
    convs = df["messages"].to_list()
    convs[1] = messages
    bad = df.with_columns(messages=pl.Series(convs, dtype=POLARS_CORE["messages"]))
    with pytest.raises(RecordError) as err:
        validate_frame(bad, "02_magpie part 3")
    assert str(err.value).startswith("02_magpie part 3: row 1 (0-based): field 'messages': ")
    assert problem in str(err.value)


# ------------------------------------------------------------------------------------------
# record_id
# ------------------------------------------------------------------------------------------


def test_record_id_is_stable_and_content_defined() -> None:
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    # Pinned: ids key checkpoints and dedup across runs, so the scheme must not drift.
    assert record_id(conv, "4") == "0721b22c2777c507ea83"
    assert record_id(conv, "4") == record_id(
        [{"content": "2+2?", "role": "user", "x": 1}, conv[1]], "4"
    )
    assert record_id(conv, "4") != record_id(conv, None)
    assert record_id(conv, None) != record_id(conv[:1], None)
    assert record_id(conv, None) != record_id(
        [conv[0], {"role": "assistant", "content": "5"}], None
    )
    a = make_record(conv, source="a", model="m1")
    b = make_record(conv, source="b", model="m2")
    assert a["id"] == b["id"]  # source and lineage are not content


def test_ids_repeat_across_reads_and_differ_across_rows() -> None:
    first = read_records(GSM8K, mapping=GSM8K_MAP)
    again = read_records(GSM8K, mapping=GSM8K_MAP, source="other")
    assert first["id"].to_list() == again["id"].to_list()
    assert first["id"].n_unique() == first.height
    no_ref = read_records(GSM8K, mapping={"prompt": "question"})
    assert set(no_ref["id"]).isdisjoint(first["id"])


# ------------------------------------------------------------------------------------------
# Trainer formats and writers
# ------------------------------------------------------------------------------------------


def test_sft_parquet_loads_in_datasets(tmp_path: Path) -> None:
    df = read_records(ALPACA, mapping=ALPACA_MAP)
    sft = to_sft(df)
    assert sft.columns == ["id", "messages"]
    path = write_format(df, tmp_path / "sft" / "train.parquet", "messages")
    assert path == tmp_path / "sft" / "train.parquet"
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.parquet"]  # no temp left
    ds = load_parquet(path, tmp_path)
    assert ds.features == datasets.Features(
        {"id": datasets.Value("string"), "messages": MESSAGE_FEATURE}
    )
    assert ds.num_rows == 20
    assert ds[7]["messages"] == df["messages"][7].to_list()
    assert ds["id"] == df["id"].to_list()


def test_prompt_completion(tmp_path: Path) -> None:
    conv = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    df = pl.concat(
        [
            read_records(ALPACA, mapping=ALPACA_MAP),
            records_frame([make_record(conv, source="chat")]),
        ],
        how="diagonal",
    )
    pc = to_prompt_completion(df)
    assert pc.columns == ["id", "prompt", "completion"]
    assert pc.row(20, named=True) == {
        "id": df["id"][20],
        "prompt": conv[:4],
        "completion": conv[4:],
    }
    path = write_format(df, tmp_path / "pc.parquet", "prompt_completion")
    ds = load_parquet(path, tmp_path)
    assert ds.features == datasets.Features(
        {"id": datasets.Value("string"), "prompt": MESSAGE_FEATURE, "completion": MESSAGE_FEATURE}
    )
    first = df.row(0, named=True)
    assert ds[0]["prompt"] == [{"role": "user", "content": first["prompt"]}]
    assert ds[0]["completion"] == [{"role": "assistant", "content": first["response"]}]


def test_preference_from_records_with_chosen_and_rejected(tmp_path: Path) -> None:
    df = read_records(GSM8K, mapping=GSM8K_MAP).with_columns(
        chosen=pl.col("reference"), rejected=pl.lit("I don't know.")
    )
    path = write_format(df, tmp_path / "dpo.jsonl", "preference")
    pref = pl.read_ndjson(path)
    assert pref.columns == ["id", "prompt", "chosen", "rejected"]
    loaded = datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    row = loaded[3]
    assert row["prompt"] == [{"role": "user", "content": df["prompt"][3]}]
    assert row["chosen"] == [{"role": "assistant", "content": df["reference"][3]}]
    assert row["rejected"] == [{"role": "assistant", "content": "I don't know."}]

    # records that already hold a response: the final assistant turn leaves the prompt
    answered = read_records(ALPACA, mapping=ALPACA_MAP).with_columns(
        chosen=pl.col("response"), rejected=pl.lit("no")
    )
    parquet = write_format(answered, tmp_path / "dpo.parquet", "preference")
    ds = load_parquet(parquet, tmp_path)
    assert ds.features == datasets.Features(
        {
            "id": datasets.Value("string"),
            "prompt": MESSAGE_FEATURE,
            "chosen": MESSAGE_FEATURE,
            "rejected": MESSAGE_FEATURE,
        }
    )
    assert ds[0]["prompt"] == [{"role": "user", "content": answered["prompt"][0]}]

    # a `prompt` column that is already a message list is used as is
    hand = pl.DataFrame(
        {"prompt": [[{"role": "user", "content": "q"}]], "chosen": ["a"], "rejected": ["b"]},
        schema_overrides={"prompt": POLARS_CORE["messages"]},
    )
    assert to_preference(hand).columns == ["prompt", "chosen", "rejected"]


def test_chat_preference_rows_for_axolotl_and_llama_factory(tmp_path: Path) -> None:
    """Messages ending in a user turn plus `chosen`/`rejected` as single assistant messages:
    the rows Axolotl's `chat_template.default` DPO loader and LLaMA-Factory's sharegpt
    `ranking` converter (tags role/content) read."""
    system = {"role": "system", "content": "Be brief."}
    df = read_records(GSM8K, mapping=GSM8K_MAP)
    df = df.with_columns(
        messages=pl.Series(
            [[system, {"role": "user", "content": p}] for p in df["prompt"]],
            dtype=POLARS_CORE["messages"],
        ),
        chosen=pl.col("reference"),
        rejected=pl.lit("I don't know."),
    )
    parquet = write_format(df, tmp_path / "dpo.parquet", "chat_preference")
    ds = load_parquet(parquet, tmp_path)
    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    assert ds.features == datasets.Features(
        {
            "id": datasets.Value("string"),
            "messages": MESSAGE_FEATURE,
            "chosen": message,
            "rejected": message,
        }
    )
    row = ds[2]
    assert row["id"] == df["id"][2]
    assert row["messages"] == [system, {"role": "user", "content": df["prompt"][2]}]
    assert row["chosen"] == {"role": "assistant", "content": df["reference"][2]}
    assert row["rejected"] == {"role": "assistant", "content": "I don't know."}
    # LLaMA-Factory's ranking rows: after an optional system turn, an odd number of turns
    for r in ds:
        turns = [m for m in r["messages"] if m["role"] != "system"]
        assert len(turns) % 2 == 1 and turns[-1]["role"] == "user"
    # the checks of `to_preference` apply
    with pytest.raises(RecordError, match=r"to_preference input: field 'chosen'"):
        to_chat_preference(df.drop("chosen"))


def test_preference_errors(tmp_path: Path) -> None:
    df = read_records(GSM8K, mapping=GSM8K_MAP)
    out = tmp_path / "dpo.parquet"
    with pytest.raises(RecordError, match=r"to_preference input: field 'chosen': missing column"):
        write_format(df, out, "preference")
    rejected = [None if i == 5 else "x" for i in range(df.height)]
    with pytest.raises(
        RecordError, match=r"to_preference input: row 5 \(0-based\): field 'rejected': is null"
    ):
        write_format(
            df.with_columns(chosen=pl.lit("a"), rejected=pl.Series(rejected)), out, "preference"
        )
    with pytest.raises(RecordError, match=r"field 'chosen': has type Int32, expected String"):
        to_preference(df.with_columns(chosen=pl.lit(1), rejected=pl.lit("b")))
    hand = pl.DataFrame(
        {
            "prompt": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]],
            "chosen": ["a"],
            "rejected": ["b"],
        },
        schema_overrides={"prompt": POLARS_CORE["messages"]},
    )
    with pytest.raises(
        RecordError, match=r"row 0 \(0-based\): field 'prompt': the prompt does not end"
    ):
        to_preference(hand)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_sft_needs_an_assistant_turn_and_writes_nothing_on_error(tmp_path: Path) -> None:
    df = read_records(GSM8K, mapping=GSM8K_MAP)  # prompts only
    out = tmp_path / "sft.parquet"
    for fmt in ("messages", "prompt_completion"):
        with pytest.raises(
            RecordError,
            match=r"row 0 \(0-based\): field 'messages': .*does not end with an assistant",
        ):
            write_format(df, out, fmt)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown trainer format 'alpaca'"):
        write_format(df, out, "alpaca")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"writes \.parquet or \.jsonl, not '\.csv'"):
        write_table(df, tmp_path / "x.csv")
    assert list(tmp_path.iterdir()) == []


def test_write_table_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    df = read_records(GSM8K, mapping=GSM8K_MAP)
    target = write_table(df.head(3), tmp_path / "part-00000.parquet")
    before = target.read_bytes()

    def crash(table: pa.Table, where: Any, **kwargs: Any) -> None:
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(records.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        write_table(df, target)
    with pytest.raises(OSError, match="disk full"):
        write_table(df, tmp_path / "new.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.parquet"]
    assert target.read_bytes() == before
    assert pl.read_parquet(target).height == 3
