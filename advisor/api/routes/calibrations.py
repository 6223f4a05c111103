"""POST/GET /v1/calibrations: run `advisor calibrate` on the server's own device, in the background.

    POST /v1/calibrations        {"methods": ["lora", "full"], "quick": true}  → 202 {"id", "status": "queued"}
    GET  /v1/calibrations/{id}   status (queued | running | succeeded | failed), progress, profile path and the
                                 held-out summary when done, the error text when failed
    GET  /v1/calibrations        every calibration since the server started (newest first)

One calibration at a time (probes measure time and memory; two at once would measure each other): a POST while
one is queued or running answers 409. The registry is in memory; the profile itself is a file
(`profiles/calibration/<kind>-<device>.json`) that estimates use as soon as it is written.
"""

from __future__ import annotations

import secrets
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Body, Header, HTTPException
from pydantic import BaseModel, ConfigDict, Field

router = APIRouter(prefix="/v1", tags=["calibration"])


class CalibrationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    methods: list[str] | str | None = Field(None, description="Method ids (list or comma-separated); default all 12.")
    quick: bool = Field(False, description="The small grid (one architecture, three points per method).")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU only: torch threads for the probes.")


@dataclass
class CalibrationJob:
    id: str
    methods: list[str]
    quick: bool
    threads: int | None = None
    status: str = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    done: int = 0
    total: int | None = None
    current: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None

    def to_public(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "status": self.status, "methods": self.methods, "quick": self.quick, "threads": self.threads,
            "created_at": _iso(self.created_at), "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "progress": {"done": self.done, "total": self.total, "current": self.current},
            "profile_path": None, "heldout_summary": None, "error": self.error,
        }
        if self.result is not None:
            profile = self.result["profile"]
            out.update(profile_path=self.result["profile_path"], profile_id=profile["id"], grid=self.result["grid"],
                       wall_seconds=self.result["wall_seconds"], device=profile["device"],
                       heldout_summary=self.result["summary"].get("heldout"), overhead=profile["overhead"],
                       band=profile["band"], failures=profile["calibration"]["failures"], status_line=profile["status"])
        return out


_JOBS: dict[str, CalibrationJob] = {}
_LOCK = threading.Lock()


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _check_token(authorization: str | None) -> None:
    from advisor.settings import get_settings

    token = get_settings().api_token
    if token and authorization != f"Bearer {token}":
        raise HTTPException(status_code=401, detail="this endpoint needs 'Authorization: Bearer <ADVISOR_API_TOKEN>'")


def _run(job: CalibrationJob) -> None:
    from advisor.calibration.run import calibrate

    def progress(done: int, total: int, label: str) -> None:
        job.done, job.total, job.current = done, total, label

    job.status, job.started_at = "running", time.time()
    try:
        job.result = calibrate(methods=job.methods, quick=job.quick, progress=progress, threads=job.threads)
        job.status = "succeeded"
    except Exception as err:  # the job reports it; the server goes on
        job.error = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=4)[-2000:]}"
        job.status = "failed"
    finally:
        job.finished_at = time.time()
        job.current = None


@router.post("/calibrations", status_code=202)
def start_calibration(
    body: CalibrationRequest | None = Body(None, examples=[{"methods": ["lora", "qlora"], "quick": True}]),
    authorization: str | None = Header(None),
) -> dict:
    """Queue a calibration of this server's device (CUDA if present, else CPU); poll GET /v1/calibrations/{id}."""
    from advisor.calibration.run import parse_methods

    _check_token(authorization)
    body = body or CalibrationRequest()
    methods = parse_methods(body.methods)  # AdvisorInputError → 422 (the app's handler)
    with _LOCK:
        busy = next((j for j in _JOBS.values() if j.status in ("queued", "running")), None)
        if busy is not None:
            raise HTTPException(status_code=409, detail=f"calibration {busy.id} is {busy.status}; one runs at a time")
        job = CalibrationJob(id=secrets.token_hex(6), methods=methods, quick=body.quick, threads=body.threads)
        _JOBS[job.id] = job
        threading.Thread(target=_run, args=(job,), name=f"calibration-{job.id}", daemon=True).start()
    return {"id": job.id, "status": "queued", "methods": methods, "quick": job.quick,
            "url": f"/v1/calibrations/{job.id}"}


@router.get("/calibrations/{calibration_id}")
def get_calibration(calibration_id: str) -> dict:
    job = _JOBS.get(calibration_id)
    if job is None:
        raise HTTPException(status_code=404, detail=f"no calibration {calibration_id!r}")
    return job.to_public()


@router.get("/calibrations")
def list_calibrations() -> list[dict]:
    return [j.to_public() for j in sorted(_JOBS.values(), key=lambda j: j.created_at, reverse=True)]
