"""Load Alpaca-style rows from a hub dataset or a local file, and validate them with errors a person can act on.

Every error names the source, and where it applies the row (1-based, as a person counts) and column.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from training.config import ALPACA_COLUMNS

LOCAL_FORMATS = (".json", ".jsonl", ".csv", ".parquet")


class DataError(ValueError):
    """Training data that cannot be used as given."""


@dataclass(frozen=True)
class AlpacaRow:
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Dataset:
    source: str
    rows: list[AlpacaRow]
    sha256: str


def load_dataset_rows(source: str, columns: dict[str, str] | None = None) -> Dataset:
    """Rows from `source` with columns renamed per `columns` (alpaca name → source column name)."""
    records = _read_records(source, columns or {})
    rows = [_to_row(rec, i, source, columns or {}) for i, rec in enumerate(records, start=1)]
    if not rows:
        raise DataError(f"{source}: no rows")
    return Dataset(source=source, rows=rows, sha256=_content_hash(rows))


def _read_records(source: str, columns: dict[str, str]) -> list[dict]:
    path = Path(source)
    if path.suffix.lower() in LOCAL_FORMATS or path.exists():
        return _read_local(path, columns)
    return _read_hub(source)


def _read_local(path: Path, columns: dict[str, str]) -> list[dict]:
    if path.is_dir():  # e.g. a save_to_disk dataset or a cloned hub repo: it exists, so "no such file" misleads
        raise DataError(f"{path}: is a directory; give a data file ({', '.join(LOCAL_FORMATS)}) or a hub dataset name")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise DataError(f"{path}: unsupported format {suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")
    try:
        if suffix == ".json":
            return _read_json(path, columns)
        return {".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}[suffix](path)
    except DataError:
        raise
    except Exception as exc:  # parsers raise many types; the user needs the file and the reason
        raise DataError(f"{path}: cannot parse as {suffix[1:]}: {exc}") from exc


def _read_text(path: Path) -> str:
    # utf-8-sig: Windows tools (Notepad, PowerShell, Excel) start UTF-8 files with a BOM, which json rejects.
    return path.read_text("utf-8-sig")


def _read_json(path: Path, columns: dict[str, str]) -> list[dict]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("["):  # a real (broken) array: JSON Lines would blame line 1, the "["
            raise DataError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
        return _read_jsonl(path)  # many "alpaca.json" files are really JSON Lines
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    elif isinstance(data, dict) and _looks_like_a_row(data, columns):
        data = [data]  # one JSON Lines record parses as one object, not an array
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects")
    return data


def _looks_like_a_row(record: dict, columns: dict[str, str]) -> bool:
    # Only the required columns count: an object such as {"rows": [...]} must stay an error, not one bad row.
    return any(columns.get(field, field) in record for field in ("instruction", "output"))


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno} is not valid JSON: {exc.msg}") from exc
    return records


def _read_csv(path: Path) -> list[dict]:
    """One pass with the csv module: every value stays the text written ("" for an empty input, "007" as
    is). A row with more fields than the header is refused: pandas would silently make its first field
    the index and shift every value one column left (or drop the extra one, with only a warning)."""
    limit = csv.field_size_limit(2**31 - 1)  # no limit on a field's size, as pandas had none
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            lines = (fields for fields in csv.reader(file) if fields)  # blank lines skipped
            header = next(lines, [])
            return [_csv_record(path, header, fields, index) for index, fields in enumerate(lines, start=1)]
    finally:
        csv.field_size_limit(limit)


def _csv_record(path: Path, header: list[str], fields: list[str], index: int) -> dict:
    if len(fields) > len(header):
        raise DataError(
            f"{path}: row {index} has {len(fields)} fields but the header has {len(header)} "
            f"({', '.join(header)}); quote values that contain a comma"
        )
    return dict(zip(header, fields + [""] * (len(header) - len(fields))))  # missing trailing fields: empty


def _read_parquet(path: Path) -> list[dict]:
    import pandas as pd

    frame = pd.read_parquet(path)
    # Parquet nulls arrive as NaN / pd.NA; make them None so they mean what a JSON null means (an empty input,
    # a missing instruction). astype(object) first so real numbers stay numbers and are still refused as such.
    return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")


def _read_hub(name: str) -> list[dict]:
    import datasets

    try:
        return list(datasets.load_dataset(name, split="train"))
    except Exception as exc:  # offline, unknown name, gated: all reach the user as one clear line
        raise DataError(
            f"{name}: not a local file and could not be loaded from the hub ({type(exc).__name__}: {exc})"
        ) from exc


def _to_row(record: object, index: int, source: str, columns: dict[str, str]) -> AlpacaRow:
    if not isinstance(record, dict):
        raise DataError(f"{source}: row {index} is not an object")
    values = {}
    for field in ALPACA_COLUMNS:
        column = columns.get(field, field)
        # An absent input column means "no inputs", unless the user named the column: then it is a typo.
        value = record.get(column, "" if field == "input" and field not in columns else None)
        if value is None:
            if column not in record:
                raise DataError(
                    f"{source}: row {index} has no column {column!r} (for {field}); columns: {sorted(record)}"
                )
            value = "" if field == "input" else None
        if not isinstance(value, str):
            raise DataError(f"{source}: row {index}, column {column!r}: expected text, got {type(value).__name__}")
        values[field] = value
    for field in ("instruction", "output"):
        if not values[field].strip():
            raise DataError(f"{source}: row {index}, column {columns.get(field, field)!r}: {field} is empty")
    return AlpacaRow(**values)


def _content_hash(rows: list[AlpacaRow]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row.instruction, row.input, row.output], ensure_ascii=False).encode())
    return digest.hexdigest()
