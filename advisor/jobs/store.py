"""Reading and changing job records. Every change of a job and the event that tells about it are one transaction.

    store = JobStore()                    # the URL from get_settings().database_url
    store.create(job_id, request, spec, output_dir)
    store.claim_next("server")            # the oldest queued job, now running (None when the queue is empty)
    store.record(job_id, "step", {...}, step=3, metrics={...})
    store.events_after(job_id, 17)        # what a reconnecting client missed
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from advisor.jobs.db import TERMINAL, DatasetRecord, Job, JobEvent, engines


def now() -> float:
    return time.time()


class JobStore:
    def __init__(self, url: str | None = None):
        if url is None:
            from advisor.settings import get_settings

            url = get_settings().database_url
        self.url = url
        self._read, self._write = engines(url)

    # ------------------------------------------------------------------ sessions
    def _reader(self) -> Session:
        return Session(self._read, expire_on_commit=False)

    def _mutate(self, job_id: str, fn: Callable[[Session, Job], Any]) -> Any:
        """Run fn(session, job) in one write transaction with the job row locked; KeyError when no such job."""
        with Session(self._write, expire_on_commit=False) as session, session.begin():
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise KeyError(job_id)
            return fn(session, job)

    @staticmethod
    def _event(session: Session, job: Job, type_: str, payload: dict[str, Any]) -> int:
        job.last_event_id = (job.last_event_id or 0) + 1
        t = now()
        job.updated_at = t
        session.add(JobEvent(job_id=job.id, seq=job.last_event_id, type=type_, payload=payload, created_at=t))
        return job.last_event_id

    # ------------------------------------------------------------------ jobs
    def create(self, job_id: str, request: dict, spec: dict, output_dir: str, *, status: str = "queued",
               runner: str = "server") -> Job:
        t = now()
        job = Job(id=job_id, status=status, method=spec.get("method"), model=_model_name(spec), request=request,
                  spec=spec, output_dir=output_dir, created_at=t, queued_at=t, updated_at=t, step=0, metrics={},
                  oom_retries=[], cancel_requested=False, attempts=0, runner=runner, last_event_id=0)
        with Session(self._write, expire_on_commit=False) as session, session.begin():
            session.add(job)
            session.flush()
            self._event(session, job, "status", {"status": status})
        return job

    def get(self, job_id: str) -> Job | None:
        with self._reader() as session:
            return session.get(Job, job_id)

    def list(self, status: str | None = None, limit: int = 100) -> list[Job]:
        stmt = select(Job).order_by(Job.created_at.desc()).limit(limit)
        if status:
            stmt = stmt.where(Job.status == status)
        with self._reader() as session:
            return list(session.scalars(stmt))

    def queue_position(self, job: Job) -> int | None:
        if job.status != "queued":
            return None
        with self._reader() as session:
            ahead = session.scalar(select(func.count()).select_from(Job).where(
                Job.status == "queued", Job.queued_at < job.queued_at))
        return int(ahead or 0) + 1

    def record(self, job_id: str, type_: str, payload: dict[str, Any], **fields: Any) -> int:
        """Append an event and set `fields` on the job; returns the event's number."""
        def change(session: Session, job: Job) -> int:
            for key, value in fields.items():
                setattr(job, key, value)
            return self._event(session, job, type_, payload)

        return self._mutate(job_id, change)

    def update(self, job_id: str, fn: Callable[[Job], tuple[str, dict] | None]) -> int | None:
        """fn(job) changes the job in place and returns (event type, payload) to record, or None."""
        def change(session: Session, job: Job) -> int | None:
            out = fn(job)
            job.updated_at = now()
            return self._event(session, job, *out) if out else None

        return self._mutate(job_id, change)

    def transition(self, job_id: str, to: str, allowed_from: Iterable[str], payload: dict | None = None,
                   **fields: Any) -> tuple[bool, Job]:
        """Move a job to status `to` if it is in `allowed_from` (with a `status` event); (changed, job)."""
        allowed = tuple(allowed_from)

        def change(session: Session, job: Job) -> tuple[bool, Job]:
            if job.status not in allowed:
                return False, job
            job.status = to
            for key, value in fields.items():
                setattr(job, key, value)
            if to in TERMINAL:
                job.finished_at = now()
            self._event(session, job, "status", {"status": to, **(payload or {})})
            return True, job

        return self._mutate(job_id, change)

    def next_queued(self) -> Job | None:
        """The head of the FIFO queue (the job that entered the queue first), or None."""
        with self._reader() as session:
            return session.scalars(select(Job).where(Job.status == "queued")
                                   .order_by(Job.queued_at, Job.created_at).limit(1)).first()

    def claim_next(self, runner: str = "server") -> Job | None:
        """The oldest queued job, moved to `running` (atomic: two dispatchers never claim the same job)."""
        while True:
            head = self.next_queued()
            if head is None:
                return None
            changed, job = self.claim(head.id, runner, allowed_from=("queued",))
            if changed:
                return job

    def claim(self, job_id: str, runner: str, allowed_from: Iterable[str]) -> tuple[bool, Job]:
        host = socket.gethostname()

        def fields(job: Job) -> dict:
            return {"runner": runner, "worker_host": host, "worker_pid": None, "cancel_requested": False,
                    "attempts": (job.attempts or 0) + 1, "started_at": job.started_at or now(), "finished_at": None,
                    "error": None}

        allowed = tuple(allowed_from)

        def change(session: Session, job: Job) -> tuple[bool, Job]:
            if job.status not in allowed:
                return False, job
            for key, value in fields(job).items():
                setattr(job, key, value)
            job.status = "running"
            self._event(session, job, "status", {"status": "running", "attempt": job.attempts, "runner": runner})
            return True, job

        return self._mutate(job_id, change)

    def set_worker(self, job_id: str, pid: int) -> None:
        with Session(self._write) as session, session.begin():
            session.execute(update(Job).where(Job.id == job_id).values(worker_pid=pid, updated_at=now()))

    def cancel_requested(self, job_id: str) -> bool:
        with self._reader() as session:
            return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    def running(self) -> list[Job]:
        with self._reader() as session:
            return list(session.scalars(select(Job).where(Job.status == "running")))

    # ------------------------------------------------------------------ events
    def events_after(self, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        stmt = (select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after)
                .order_by(JobEvent.seq).limit(limit))
        with self._reader() as session:
            return list(session.scalars(stmt))

    def last_event_id(self, job_id: str) -> tuple[int, str] | None:
        with self._reader() as session:
            row = session.execute(select(Job.last_event_id, Job.status).where(Job.id == job_id)).first()
        return None if row is None else (int(row[0] or 0), row[1])

    # ------------------------------------------------------------------ datasets
    def add_dataset(self, record: DatasetRecord) -> DatasetRecord:
        with Session(self._write, expire_on_commit=False) as session, session.begin():
            session.add(record)
        return record

    def datasets(self, limit: int = 500) -> list[DatasetRecord]:
        with self._reader() as session:
            return list(session.scalars(select(DatasetRecord).order_by(DatasetRecord.created_at.desc()).limit(limit)))


def _model_name(spec: dict) -> str | None:
    model = spec.get("model")
    if isinstance(model, str):
        return model
    if isinstance(model, dict):
        return str(model.get("name") or model.get("path") or model.get("id") or "") or None
    return None
