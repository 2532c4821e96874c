"""Load Alpaca-style rows from a hub dataset or a local file, and validate them with errors a person can act on.

Every error names the source, and where it applies the row (1-based, as a person counts) and column.
"""

from __future__ import annotations

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
    records = _read_records(source)
    rows = [_to_row(rec, i, source, columns or {}) for i, rec in enumerate(records, start=1)]
    if not rows:
        raise DataError(f"{source}: no rows")
    return Dataset(source=source, rows=rows, sha256=_content_hash(rows))


def _read_records(source: str) -> list[dict]:
    path = Path(source)
    if path.suffix.lower() in LOCAL_FORMATS or path.exists():
        return _read_local(path)
    return _read_hub(source)


def _read_local(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise DataError(f"{path}: unsupported format {suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")
    try:
        return {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}[suffix](path)
    except DataError:
        raise
    except Exception as exc:  # parsers raise many types; the user needs the file and the reason
        raise DataError(f"{path}: cannot parse as {suffix[1:]}: {exc}") from exc


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError:
        return _read_jsonl(path)  # many "alpaca.json" files are really JSON Lines
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects")
    return data


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for lineno, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno} is not valid JSON: {exc.msg}") from exc
    return records


def _read_csv(path: Path) -> list[dict]:
    import pandas as pd

    # keep_default_na=False: an empty Alpaca input is "", not NaN.
    return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict(orient="records")


def _read_parquet(path: Path) -> list[dict]:
    import pandas as pd

    return pd.read_parquet(path).to_dict(orient="records")


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
                raise DataError(f"{source}: row {index} has no column {column!r} (for {field}); columns: {sorted(record)}")
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
