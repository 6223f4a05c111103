"""Training data uploads.

    POST /v1/datasets   multipart/form-data: `file` (.jsonl, .json, .csv, .parquet), optional `format`
                        (auto | alpaca | chat | completion | text) → 201 {"id", "path", "format", "rows", ...}
    GET  /v1/datasets   what has been uploaded, newest first

The body is parsed as it arrives and the file part written straight to disk under data_root/datasets/; past
ADVISOR_MAX_UPLOAD_MB (default 512 MiB) the upload answers 413 and nothing is kept. Every row is then checked
(422 naming the line and the problem). The stored name is random; jobs use the returned `path` (relative to the
data root) as `dataset.path`. With ADVISOR_API_TOKEN set, uploading needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from advisor.api.deps import TokenDep
from advisor.errors import AdvisorInputError
from advisor.jobs import datasets

router = APIRouter(prefix="/v1", tags=["datasets"])

DRAIN_CAP = 16 * 2**20  # past the limit, read (and drop) this much more so the client gets the 413 cleanly
FIELD_CAP = 4096


class _Upload:
    """python-multipart callbacks: the `file` part to a temporary file, small text fields to memory."""

    def __init__(self, directory: Path, limit: int):
        self.directory, self.limit = directory, limit
        self.headers: dict[bytes, bytes] = {}
        self._field, self._value = b"", b""
        self.part_name: str | None = None
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self._buffer = bytearray()
        self.file = None
        self.tmp_path: Path | None = None
        self.file_bytes = 0
        self.too_large = False
        self.saw_file = False

    def on_part_begin(self):
        self.headers, self.part_name, self._buffer = {}, None, bytearray()

    def on_header_field(self, data, start, end):
        self._field += data[start:end]

    def on_header_value(self, data, start, end):
        self._value += data[start:end]

    def on_header_end(self):
        self.headers[self._field.strip().lower()] = self._value.strip()
        self._field, self._value = b"", b""

    def on_headers_finished(self):
        from python_multipart.multipart import parse_options_header

        _, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.part_name = params.get(b"name", b"").decode(errors="replace")
        if self.part_name == "file" and not self.saw_file:
            self.saw_file = True
            raw = params.get(b"filename")
            self.filename = raw.decode(errors="replace") if raw is not None else None
            self.tmp_path = self.directory / f".incoming-{secrets.token_hex(8)}"
            self.file = open(self.tmp_path, "wb")  # noqa: SIM115 (closed in on_part_end / close)

    def on_part_data(self, data, start, end):
        n = end - start
        if self.file is not None and self.part_name == "file":
            self.file_bytes += n
            if self.file_bytes > self.limit:
                self.too_large = True
                self.close()
                return
            self.file.write(data[start:end])
        elif self.part_name and self.part_name != "file" and len(self._buffer) < FIELD_CAP:
            self._buffer += data[start:end]

    def on_part_end(self):
        if self.part_name == "file":
            self.close()
        elif self.part_name:
            self.fields[self.part_name] = bytes(self._buffer[:FIELD_CAP]).decode(errors="replace").strip()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def discard(self):
        self.close()
        if self.tmp_path is not None:
            self.tmp_path.unlink(missing_ok=True)


def _limit_mb() -> float:
    from advisor.settings import get_settings

    return get_settings().max_upload_mb


@router.post("/datasets", status_code=201)
async def upload_dataset(request: Request, _auth: TokenDep) -> dict:
    """Upload training data (multipart field `file`; optional field `format`)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise AdvisorInputError("file", "send the data as multipart/form-data with the file in a field named `file`")
    limit_mb = _limit_mb()
    limit = int(limit_mb * 2**20)
    upload = _Upload(await run_in_threadpool(datasets.datasets_dir), limit)
    callbacks = {name: getattr(upload, name) for name in (
        "on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value", "on_header_end",
        "on_headers_finished")}
    parser = MultipartParser(boundary, callbacks)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if upload.too_large:
                if received > limit + DRAIN_CAP:
                    break
                continue
            parser.write(chunk)
        if not upload.too_large:
            parser.finalize()
    except AdvisorInputError:
        upload.discard()
        raise
    except Exception as err:  # a malformed multipart body
        upload.discard()
        raise AdvisorInputError("file", f"the multipart body could not be parsed ({type(err).__name__}: {err})") from None
    finally:
        upload.close()
    if upload.too_large:
        upload.discard()
        return JSONResponse(status_code=413, content={
            "detail": f"file: larger than the upload limit of {limit_mb:g} MiB (ADVISOR_MAX_UPLOAD_MB)",
            "field": "file", "allowed": None})
    if not upload.saw_file or upload.tmp_path is None:
        raise AdvisorInputError("file", "required: a multipart field named `file` holding the dataset")
    declared = (upload.fields.get("format") or "auto").lower()
    record = await run_in_threadpool(datasets.store_upload, upload.tmp_path, upload.filename, declared)
    return datasets.describe(record)


@router.get("/datasets")
async def list_datasets() -> list[dict]:
    from advisor.jobs.store import JobStore

    records = await run_in_threadpool(lambda: JobStore().datasets())
    return [datasets.describe(r) for r in records]
