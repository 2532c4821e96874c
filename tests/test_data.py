"""Loading Alpaca rows from local files: every format, column mapping, the content hash, and errors that
name the file, the row and the column."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from training.data import AlpacaRow, DataError, load_dataset_rows

RECORDS = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
    {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
    {"instruction": "翻译成英文。", "input": "你好，世界", "output": "Hello, world."},
]
ROWS = [AlpacaRow(**r) for r in RECORDS]


def write(path, records, *, lines: bool = False) -> str:
    """Write `records` in the format the file's extension names (`lines=True`: JSON Lines whatever it is)."""
    suffix = path.suffix
    if lines or suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(records, ensure_ascii=False), "utf-8")
    elif suffix == ".csv":
        pd.DataFrame(records).to_csv(path, index=False)
    elif suffix == ".parquet":
        pd.DataFrame(records).to_parquet(path, index=False)
    else:
        raise AssertionError(f"no writer for {path}")
    return str(path)


def load_error(source: str, columns: dict[str, str] | None = None) -> str:
    with pytest.raises(DataError) as info:
        load_dataset_rows(source, columns)
    return str(info.value)


# --- formats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["d.json", "d.jsonl", "d.csv", "d.parquet"])
def test_each_local_format_loads_the_same_rows(tmp_path, filename):
    source = write(tmp_path / filename, RECORDS)
    dataset = load_dataset_rows(source)
    assert dataset.rows == ROWS
    assert dataset.source == source
    assert dataset.sha256 == load_dataset_rows(write(tmp_path / "ref.jsonl", RECORDS)).sha256


def test_json_file_holding_json_lines(tmp_path):
    """Many "alpaca.json" files are really JSON Lines."""
    assert load_dataset_rows(write(tmp_path / "alpaca.json", RECORDS, lines=True)).rows == ROWS


def test_json_object_with_data_list(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": RECORDS}), "utf-8")
    assert load_dataset_rows(str(path)).rows == ROWS


def test_missing_input_column_means_empty_input(tmp_path):
    records = [{"instruction": "Say hi.", "output": "Hi."}]
    assert load_dataset_rows(write(tmp_path / "d.jsonl", records)).rows == [AlpacaRow("Say hi.", "", "Hi.")]


def test_null_input_means_empty_input(tmp_path):
    records = [{"instruction": "Say hi.", "input": None, "output": "Hi."}]
    assert load_dataset_rows(write(tmp_path / "d.jsonl", records)).rows[0].input == ""


def test_csv_empty_input_stays_empty_string_and_digits_stay_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,output\nSay hi.,,Hi.\nCount.,,0042\n", "utf-8")
    assert load_dataset_rows(str(path)).rows == [AlpacaRow("Say hi.", "", "Hi."), AlpacaRow("Count.", "", "0042")]


def test_jsonl_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(RECORDS[0]) + "\n\n   \n" + json.dumps(RECORDS[1]) + "\n", "utf-8")
    assert load_dataset_rows(str(path)).rows == ROWS[:2]


# --- column mapping --------------------------------------------------------------------------------

RENAMED = [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in RECORDS]
MAPPING = {"instruction": "question", "input": "context", "output": "answer"}


@pytest.mark.parametrize("filename", ["d.jsonl", "d.csv", "d.parquet"])
def test_column_mapping(tmp_path, filename):
    source = write(tmp_path / filename, RENAMED)
    assert load_dataset_rows(source, MAPPING).rows == ROWS


def test_partial_column_mapping(tmp_path):
    records = [{"instruction": r["instruction"], "input": r["input"], "answer": r["output"]} for r in RECORDS]
    assert load_dataset_rows(write(tmp_path / "d.jsonl", records), {"output": "answer"}).rows == ROWS


def test_mapped_column_that_is_missing(tmp_path):
    source = write(tmp_path / "d.jsonl", RECORDS)
    message = load_error(source, {"output": "answer"})
    assert "d.jsonl" in message and "row 1" in message and "'answer'" in message and "output" in message


def test_mapped_input_column_that_is_missing_is_an_error_not_an_empty_input(tmp_path):
    source = write(tmp_path / "d.jsonl", RECORDS)
    message = load_error(source, {"input": "contxt"})
    assert "d.jsonl" in message and "row 1" in message and "'contxt'" in message


# --- content hash ----------------------------------------------------------------------------------


def test_content_hash_is_stable(tmp_path):
    first = load_dataset_rows(write(tmp_path / "a.jsonl", RECORDS)).sha256
    again = load_dataset_rows(write(tmp_path / "b.jsonl", RECORDS)).sha256
    assert first == again
    assert len(first) == 64 and int(first, 16) >= 0


@pytest.mark.parametrize("field", ["instruction", "input", "output"])
def test_content_hash_changes_when_a_row_changes(tmp_path, field):
    changed = [dict(r) for r in RECORDS]
    changed[1][field] += " (edited)"
    original = load_dataset_rows(write(tmp_path / "a.jsonl", RECORDS)).sha256
    assert load_dataset_rows(write(tmp_path / "b.jsonl", changed)).sha256 != original


def test_content_hash_depends_on_row_order_and_field_boundaries(tmp_path):
    original = load_dataset_rows(write(tmp_path / "a.jsonl", RECORDS)).sha256
    assert load_dataset_rows(write(tmp_path / "b.jsonl", RECORDS[::-1])).sha256 != original
    shifted = [{"instruction": "ab", "input": "", "output": "c"}], [{"instruction": "a", "input": "b", "output": "c"}]
    hashes = {load_dataset_rows(write(tmp_path / f"s{i}.jsonl", rec)).sha256 for i, rec in enumerate(shifted)}
    assert len(hashes) == 2


# --- validation errors: each names the file, the row and the column --------------------------------


def bad_row(**changes) -> list[dict]:
    """RECORDS with row 2 (1-based) changed; a value of ... removes the key."""
    records = [dict(r) for r in RECORDS]
    for key, value in changes.items():
        if value is ...:
            del records[1][key]
        else:
            records[1][key] = value
    return records


@pytest.mark.parametrize(
    "records,expected",
    [
        (bad_row(output=...), ["row 2", "no column 'output'"]),
        (bad_row(instruction=...), ["row 2", "no column 'instruction'"]),
        (bad_row(output=42), ["row 2", "column 'output'", "expected text, got int"]),
        (bad_row(input=["a"]), ["row 2", "column 'input'", "expected text, got list"]),
        (bad_row(instruction=None), ["row 2", "column 'instruction'", "expected text"]),
        (bad_row(output=""), ["row 2", "column 'output'", "output is empty"]),
        (bad_row(output="  \n"), ["row 2", "column 'output'", "output is empty"]),
        (bad_row(instruction=""), ["row 2", "column 'instruction'", "instruction is empty"]),
        ([RECORDS[0], "just a string", RECORDS[1]], ["row 2", "is not an object"]),
    ],
    ids=[
        "missing output",
        "missing instruction",
        "int output",
        "list input",
        "null instruction",
        "empty output",
        "blank output",
        "empty instruction",
        "not an object",
    ],
)
@pytest.mark.parametrize("filename", ["my-data.json", "my-data.jsonl"])
def test_row_errors_name_file_row_and_column(tmp_path, filename, records, expected):
    source = write(tmp_path / filename, records)
    message = load_error(source)
    assert message.startswith(f"{source}: ")
    for part in expected:
        assert part in message


@pytest.mark.parametrize("filename", ["d.csv", "d.parquet"])
def test_tabular_row_errors_name_file_row_and_column(tmp_path, filename):
    source = write(tmp_path / filename, bad_row(output=""))
    message = load_error(source)
    assert message.startswith(f"{source}: ") and "row 2" in message and "column 'output'" in message


def test_parquet_non_string_column(tmp_path):
    source = write(tmp_path / "d.parquet", [dict(r, output=i) for i, r in enumerate(RECORDS)])
    message = load_error(source)
    assert "d.parquet" in message and "row 1" in message and "column 'output'" in message and "expected text" in message


def test_bad_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + '{"instruction": "x", oops}\n', "utf-8")
    message = load_error(str(path))
    assert message.startswith(f"{path}: ") and "line 3 is not valid JSON" in message


def test_json_that_is_not_an_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": RECORDS}), "utf-8")
    assert "expected a JSON array" in load_error(str(path))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text(json.dumps(RECORDS), "utf-8")
    message = load_error(str(path))
    assert str(path) in message and "unsupported format '.txt'" in message and ".jsonl" in message


@pytest.mark.parametrize("filename", ["d.json", "d.jsonl", "d.csv", "d.parquet"])
def test_missing_file(tmp_path, filename):
    path = tmp_path / filename
    assert load_error(str(path)) == f"{path}: no such file"


def test_unparseable_parquet_names_the_file(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not a parquet file")
    message = load_error(str(path))
    assert message.startswith(f"{path}: cannot parse as parquet")


@pytest.mark.parametrize("filename", ["empty.json", "empty.jsonl"])
def test_no_rows(tmp_path, filename):
    source = write(tmp_path / filename, [])
    assert load_error(source) == f"{source}: no rows"
