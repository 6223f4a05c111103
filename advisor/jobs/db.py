"""Job, event and dataset records (SQLAlchemy 2): SQLite by default, any SQLAlchemy URL (PostgreSQL) instead.

    jobs        one row per training job: its request, the normalized plan, status, progress, metrics,
                predicted vs measured, output directory, worker pid, times
    job_events  the job's history: (job_id, seq) with seq 1, 2, 3, ... per job (the SSE `id:`), type, JSON payload
    datasets    uploads accepted by POST /v1/datasets (file under data_root/datasets/, detected format, rows)

The SQL is portable: JSON columns, floats for times (Unix seconds), no SQLite-only statements. Event numbers come
from a per-job counter (`jobs.last_event_id`) incremented in the same write transaction that inserts the event,
so two writers (the API marking a job cancelled, the worker reporting a step) never reuse a number.

SQLite specifics, applied only to SQLite URLs: WAL journal (the API reads while a worker writes) with
synchronous=NORMAL (a killed process loses nothing committed; only a power cut can lose the last commits), a 30 s busy
timeout, and write transactions opened with BEGIN IMMEDIATE (a deferred transaction that reads and then writes
fails at once with "database is locked" when another process wrote in between; IMMEDIATE waits instead).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TERMINAL = ("succeeded", "failed", "cancelled", "interrupted")
STATUSES = ("queued", "running", *TERMINAL)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    method: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(Text)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)  # the body as posted
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # normalize_job(body): what the worker runs
    output_dir: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    queued_at: Mapped[float | None] = mapped_column(Float)  # last time it entered the queue (FIFO order)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[float | None] = mapped_column(Float)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float)
    eta_s: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    predicted: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    measured: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    train_info: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the trainer's `start` event (last attempt)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # run_training's return value
    oom_retries: Mapped[list[Any]] = mapped_column(JSON, default=list)
    last_checkpoint: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    runner: Mapped[str | None] = mapped_column(String(16))  # "server" (queue) or "cli" (foreground)
    worker_pid: Mapped[int | None] = mapped_column(Integer)
    worker_host: Mapped[str | None] = mapped_column(String(255))
    device: Mapped[str | None] = mapped_column(String(64))
    last_event_id: Mapped[int] = mapped_column(Integer, default=0)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq", unique=True),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class DatasetRecord(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    filename: Mapped[str] = mapped_column(Text)  # as uploaded (display only; never used as a path)
    path: Mapped[str] = mapped_column(Text)  # relative to the data root
    format: Mapped[str] = mapped_column(String(16))
    rows: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float, index=True)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


@functools.lru_cache(maxsize=8)
def engines(url: str) -> tuple[Engine, Engine]:
    """(read engine, write engine) for `url`, tables created. For SQLite the write engine opens its transactions
    with BEGIN IMMEDIATE; elsewhere both are the same engine."""
    if not is_sqlite(url):
        engine = create_engine(url, pool_pre_ping=True)
        Base.metadata.create_all(engine)
        return engine, engine
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)

    def sqlite_engine(immediate: bool) -> Engine:
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across process crashes, one fsync per checkpoint
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    write = sqlite_engine(True)
    Base.metadata.create_all(write)
    return sqlite_engine(False), write
