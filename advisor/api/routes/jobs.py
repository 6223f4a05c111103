"""Training jobs: submit, watch (Server-Sent Events with replay), cancel, resume.

    POST /v1/jobs                  CONTRACT body (or {"recommendation": ..., "model": ..., "dataset": ...}) → 202
    GET  /v1/jobs                  newest first (?status=running&limit=50)
    GET  /v1/jobs/{id}             status, step/total_steps, metrics, predicted vs measured, ETA, output_dir, error
    GET  /v1/jobs/{id}/events      text/event-stream; `id:` is the event's number; a reconnect with the
                                   `Last-Event-ID` header (or ?last_event_id=N) replays what came after N;
                                   the stream ends once the job is succeeded | failed | cancelled | interrupted
    POST /v1/jobs/{id}/cancel      queued → cancelled; running → the worker checkpoints and ends cancelled
    POST /v1/jobs/{id}/resume      interrupted | cancelled | failed → queued; continues from the newest checkpoint

Unknown ids answer 404, a change the status does not allow 409. With ADVISOR_API_TOKEN set, the POSTs need
`Authorization: Bearer <token>`. The router's lifespan runs the dispatcher (advisor/jobs/queue.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, FastAPI, Header, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from advisor.api.deps import TokenDep
from advisor.jobs import service
from advisor.jobs.db import STATUSES
from advisor.jobs.store import JobStore

SSE_POLL_S = 0.25
SSE_PING_S = 15.0

_SHUTTING_DOWN = threading.Event()
_STATE: dict[str, Any] = {"dispatcher": None}


def _chain_shutdown_signal(sig: int) -> None:
    """Let open event streams end when uvicorn is asked to stop (it waits for open responses before shutdown)."""
    previous = signal.getsignal(sig)

    def handler(signum, frame):
        _SHUTTING_DOWN.set()
        if callable(previous):
            previous(signum, frame)

    signal.signal(sig, handler)


@contextlib.asynccontextmanager
async def lifespan(_app: FastAPI):
    from advisor.jobs.queue import Dispatcher
    from advisor.settings import get_settings

    _SHUTTING_DOWN.clear()
    settings = get_settings()
    store = await run_in_threadpool(JobStore)
    dispatcher = Dispatcher(store, auto_resume=settings.auto_resume)
    await run_in_threadpool(dispatcher.start)
    _STATE["dispatcher"] = dispatcher
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            _chain_shutdown_signal(sig)
    try:
        yield
    finally:
        _SHUTTING_DOWN.set()
        _STATE["dispatcher"] = None
        await run_in_threadpool(dispatcher.stop)


router = APIRouter(prefix="/v1", tags=["jobs"], lifespan=lifespan)

EXAMPLE = {"model": "path/or/hub-id", "method": "lora",
           "config": {"peft": {"r": 8}, "training": {"max_steps": 20, "max_seq_length": 256}},
           "dataset": {"path": "datasets/train.jsonl", "format": "auto"}, "output_dir": None}


def _wake() -> None:
    dispatcher = _STATE.get("dispatcher")
    if dispatcher is not None:
        dispatcher.wake()


def _store() -> JobStore:
    return JobStore()


def _not_found(job_id: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"no job {job_id!r}")


async def _call(fn, *args):
    try:
        return await run_in_threadpool(fn, *args)
    except service.JobNotFound as err:
        raise _not_found(str(err.args[0])) from None
    except service.JobStateError as err:
        raise HTTPException(status_code=409, detail=str(err)) from None


@router.post("/jobs", status_code=202)
async def create_job(_auth: TokenDep, body: Any = Body(..., examples=[EXAMPLE])) -> dict:
    """Queue a training job; follow it at `/v1/jobs/{id}/events`."""
    store = _store()
    job = await run_in_threadpool(service.submit, body, store)
    _wake()
    return service.describe(job, store)


@router.get("/jobs")
async def list_jobs(status: Annotated[str | None, Query(description="Only jobs in this status.")] = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict]:
    if status is not None and status not in STATUSES:
        from advisor.errors import AdvisorInputError

        raise AdvisorInputError("status", f"unknown status {status!r}", allowed=STATUSES)
    store = _store()
    jobs = await run_in_threadpool(store.list, status, limit)
    return [service.describe(j) for j in jobs]


@router.get("/jobs/{job_id}")
async def get_job(job_id: str) -> dict:
    store = _store()
    job = await _call(service.get, job_id, store)
    return await run_in_threadpool(service.describe, job, store)


@router.post("/jobs/{job_id}/cancel", status_code=202)
async def cancel_job(job_id: str, _auth: TokenDep) -> dict:
    store = _store()
    job = await _call(service.cancel, job_id, store)
    _wake()
    return service.describe(job, store)


@router.post("/jobs/{job_id}/resume", status_code=202)
async def resume_job(job_id: str, _auth: TokenDep) -> dict:
    store = _store()
    job = await _call(service.resume, job_id, store)
    _wake()
    return service.describe(job, store)


def _sse(seq: int, kind: str, payload: dict) -> str:
    data = json.dumps({"type": kind, **payload}, default=str, separators=(",", ":"))
    return f"id: {seq}\nevent: {kind}\ndata: {data}\n\n"


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}})
async def job_events(job_id: str,
                     last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
                     after: Annotated[int | None, Query(alias="last_event_id", ge=0,
                                                        description="Replay events after this id.")] = None):
    store = _store()
    head = await run_in_threadpool(store.last_event_id, job_id)
    if head is None:
        raise _not_found(job_id)
    start = after or 0
    if last_event_id is not None:
        try:
            start = max(start, int(last_event_id.strip()))
        except ValueError:
            return JSONResponse(status_code=422, content={"detail": "Last-Event-ID: expected an event number",
                                                          "field": "Last-Event-ID", "allowed": None})

    async def stream():
        cursor = start
        yield "retry: 1000\n\n"
        last_sent = time.monotonic()
        while True:
            events = await run_in_threadpool(store.events_after, job_id, cursor, 500)
            for ev in events:
                cursor = ev.seq
                yield _sse(ev.seq, ev.type, ev.payload or {})
            if events:
                last_sent = time.monotonic()
                continue
            now_head = await run_in_threadpool(store.last_event_id, job_id)
            if now_head is None:
                return
            last_id, status = now_head
            if service.is_terminal(status) and last_id <= cursor:
                return
            if _SHUTTING_DOWN.is_set():
                return  # the client reconnects with Last-Event-ID to the next server
            if time.monotonic() - last_sent > SSE_PING_S:
                yield ": ping\n\n"
                last_sent = time.monotonic()
            await asyncio.sleep(SSE_POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
