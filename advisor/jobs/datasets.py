"""Uploaded training data: format check and storage under data_root/datasets/ with an unguessable name.

Accepted files: JSON Lines (.jsonl), JSON (.json: a list of objects), CSV (.csv) and Parquet (.parquet), whose rows
are in one of the formats the trainer reads (advisor.train.data):

    alpaca      instruction, output (input optional)
    chat        messages: a list of {role, content} with an assistant turn
    completion  prompt, completion
    text        text

Every row is checked with the trainer's own rules, reading JSON Lines, CSV and Parquet as a stream (an upload may
be large); the first problem is reported with its line or row number, so a user knows what to fix.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from advisor.errors import AdvisorInputError

FORMAT_CHOICES = ("auto", "alpaca", "chat", "completion", "text")


def datasets_dir() -> Path:
    from advisor.jobs.service import data_root

    path = data_root() / "datasets"
    path.mkdir(parents=True, exist_ok=True)
    return path


def suffixes() -> dict[str, str]:
    from advisor.train.data import SUFFIXES

    return SUFFIXES


def extension_of(filename: str | None) -> str:
    suffix = Path(filename or "").suffix.lower()
    if suffix not in suffixes():
        raise AdvisorInputError("file", f"cannot tell the file type of {filename!r} from its name",
                                allowed=[f"*{e}" for e in sorted(suffixes())])
    return suffix


def _check_row(where: str, data: Any, declared: str | None) -> str:
    """The row's format (the trainer's own rules: advisor.train.data), as an error on field `file`."""
    from advisor.train import data as train_data

    if not isinstance(data, dict):
        raise AdvisorInputError("file", f"{where}: expected an object, got {type(data).__name__}")
    row = train_data.Row(where, data)
    try:
        fmt = declared or train_data.detect_format(row, "upload")
        train_data.validate_row(row, fmt, "upload")
    except AdvisorInputError as err:
        text = err.message.removeprefix(f"{err.field}: ")
        if err.allowed:
            text = text.split("; allowed: ")[0]
        raise AdvisorInputError("file", text, allowed=err.allowed) from None
    return fmt


def _rows(path: Path, ext: str) -> Iterator[tuple[str, Any]]:
    kind = suffixes()[ext]
    if kind == "jsonl":
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    yield f"line {n}", json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise AdvisorInputError("file", f"line {n} is not valid JSON ({err})") from None
    elif kind == "json":
        try:
            data = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AdvisorInputError("file", f"not valid JSON ({err})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise AdvisorInputError("file", "a .json dataset must be a list of objects (or {\"data\": [...]})")
        for i, row in enumerate(data):
            yield f"item {i}", row
    elif kind == "csv":
        import pandas as pd

        try:
            offset = 0
            for chunk in pd.read_csv(path, chunksize=10_000, dtype=str, keep_default_na=False):
                for i, row in enumerate(chunk.to_dict(orient="records")):
                    yield f"line {offset + i + 2}", row  # the header is line 1
                offset += len(chunk)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise AdvisorInputError("file", f"not a readable CSV file ({err})") from None
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
            offset = 0
            for batch in parquet.iter_batches(batch_size=10_000):
                for i, row in enumerate(batch.to_pylist()):
                    yield f"row {offset + i + 1}", row
                offset += batch.num_rows
        except (pa.ArrowException, OSError) as err:
            raise AdvisorInputError("file", f"not a readable Parquet file ({err})") from None


def check_file(path: Path, ext: str, declared: str = "auto") -> dict[str, Any]:
    """{"format", "rows"} of a dataset file; AdvisorInputError (field `file` or `format`) says what is wrong.
    Every row is checked with the trainer's rules (the first row decides the format unless one is declared)."""
    if declared not in FORMAT_CHOICES:
        raise AdvisorInputError("format", f"unknown format {declared!r}", allowed=FORMAT_CHOICES)
    fmt = None if declared == "auto" else declared
    count = 0
    for where, row in _rows(path, ext):
        fmt = _check_row(where, row, fmt)
        count += 1
    if count == 0:
        raise AdvisorInputError("file", "the file holds no rows")
    return {"format": fmt, "rows": count}


def store_upload(tmp_path: Path, filename: str | None, declared: str = "auto"):
    """Check an uploaded file (already on disk under the datasets dir) and record it; the temp file is consumed."""
    from advisor.jobs.db import DatasetRecord
    from advisor.jobs.service import data_root
    from advisor.jobs.store import JobStore

    try:
        ext = extension_of(filename)
        info = check_file(tmp_path, ext, declared)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    from advisor.jobs.service import readable_token

    dataset_id = readable_token(12)
    final = datasets_dir() / f"{dataset_id}{ext}"
    tmp_path.replace(final)
    digest = hashlib.sha256()
    with open(final, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    record = DatasetRecord(id=dataset_id, filename=Path(filename or "").name[:255], format=info["format"],
                           path=str(final.relative_to(data_root())), rows=info["rows"],
                           size_bytes=final.stat().st_size, sha256=digest.hexdigest(), created_at=time.time())
    return JobStore().add_dataset(record)


def describe(record) -> dict[str, Any]:
    from advisor.jobs.service import _iso, data_root

    return {"id": record.id, "filename": record.filename, "path": record.path,
            "absolute_path": str(data_root() / record.path), "format": record.format, "rows": record.rows,
            "size_bytes": record.size_bytes, "sha256": record.sha256, "created_at": _iso(record.created_at)}
