"""What the API and the CLI do with jobs: submit, cancel, resume, describe. No HTTP here (routes translate).

    job = submit({"model": "...", "method": "lora", "dataset": {"path": "datasets/x.jsonl"}})   # queued
    cancel(job["id"]); resume(job["id"]); describe(store.get(job_id), store)

Paths from a request never leave the data root: the dataset (advisor.train.data.resolve_data_path) and the
output directory (default data_root/jobs/<id>/). Job ids are 22 URL-safe characters from `secrets`.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from pathlib import Path
from typing import Any

from advisor.errors import AdvisorInputError
from advisor.jobs.db import TERMINAL, Job
from advisor.jobs.store import JobStore

GIB = 2**30
RESUMABLE = ("interrupted", "cancelled", "failed")


class JobNotFound(KeyError):
    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.message = f"no job {job_id!r}"


class JobStateError(ValueError):
    """A change the job's status does not allow (HTTP 409)."""


def new_job_id() -> str:
    return readable_token(16)


def readable_token(nbytes: int) -> str:
    """A URL-safe random id that starts with a letter or digit: one starting with "-" reads as an option to every
    command line that takes it (`advisor jobs show -dFJ...`, the worker's own argv: seen as a failed job)."""
    while True:
        token = secrets.token_urlsafe(nbytes)
        if token[0].isalnum():
            return token


def data_root() -> Path:
    from advisor.settings import get_settings

    root = get_settings().data_root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def inside_data_root(path: str | Path, field: str) -> Path:
    """`path` (relative paths are relative to the data root) resolved, symlinks followed; refused outside the root."""
    root = data_root()
    raw = str(path)
    if not raw.strip() or "\x00" in raw:
        raise AdvisorInputError(field, "expected a path under the data root")
    candidate = Path(raw).expanduser()
    if not candidate.is_absolute():
        candidate = root / candidate
    resolved = candidate.resolve()
    if resolved != root and not resolved.is_relative_to(root):
        raise AdvisorInputError(field, f"{raw!r} is outside the data root ({root}); name a path under it")
    return resolved


def _read_plan(body: Any) -> dict:
    if not isinstance(body, dict):
        raise AdvisorInputError("body", f"expected a JSON object, got {type(body).__name__}")
    return body


def contain_dataset(body: dict) -> dict:
    """The body with `dataset.path` resolved under the data root (relative to it), or AdvisorInputError
    "dataset.path" for anything escaping it (``..``, an absolute path elsewhere, a symlink pointing outside)."""
    from advisor.train.data import resolve_data_path

    ds = body.get("dataset")
    path = ds if isinstance(ds, str) else ds.get("path") if isinstance(ds, dict) else None
    if isinstance(path, str) and path.strip():
        real = str(resolve_data_path(path))
        body = {**body, "dataset": {**(ds if isinstance(ds, dict) else {}), "path": real}}
    return body


def prepare(body: Any, job_id: str) -> tuple[dict, str]:
    """(normalized plan, output directory) for a request body; AdvisorInputError names the field."""
    from advisor.train import normalize_job

    body = contain_dataset(json.loads(json.dumps(_read_plan(body))))
    requested = body.get("output_dir")
    if requested is not None and not (isinstance(requested, str) and requested.strip()):
        raise AdvisorInputError("output_dir", "expected a directory path under the data root, or null")
    out = inside_data_root(requested, "output_dir") if requested else data_root() / "jobs" / job_id
    if requested and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AdvisorInputError("output_dir", f"{requested!r} already exists and is not an empty directory; "
                                              "name a new one (a job resumes only its own checkpoints)")
    spec = dict(normalize_job({**body, "output_dir": str(out)}))
    spec["output_dir"] = str(out)
    return spec, str(out)


def submit(body: Any, store: JobStore | None = None, *, runner: str = "server", status: str = "queued") -> Job:
    """Validate and record a job (`queued` for the dispatcher; the CLI records it `running` and runs it itself)."""
    store = store or JobStore()
    job_id = new_job_id()
    spec, output_dir = prepare(body, job_id)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    if status == "running":
        store.create(job_id, _jsonable(body), _jsonable(spec), output_dir, status="queued", runner=runner)
        changed, job = store.claim(job_id, runner, allowed_from=("queued",))
        return job
    return store.create(job_id, _jsonable(body), _jsonable(spec), output_dir, status=status, runner=runner)


def get(job_id: str, store: JobStore) -> Job:
    job = store.get(job_id)
    if job is None:
        raise JobNotFound(job_id)
    return job


def cancel(job_id: str, store: JobStore) -> Job:
    """Queued → cancelled at once; running → the worker is told (it checkpoints, then ends `cancelled`)."""
    def change(job: Job):
        if job.status == "queued":
            job.status = "cancelled"
            job.finished_at = time.time()
            return "status", {"status": "cancelled", "reason": "cancelled while queued"}
        if job.status == "running":
            if job.cancel_requested:
                return None
            job.cancel_requested = True
            return "cancel_requested", {"step": job.step}
        raise JobStateError(f"job {job_id} is {job.status}; only a queued or running job can be cancelled")

    try:
        store.update(job_id, change)
    except KeyError:
        raise JobNotFound(job_id) from None
    return get(job_id, store)


def resume(job_id: str, store: JobStore) -> Job:
    """interrupted | cancelled | failed → queued again; the trainer continues from the newest checkpoint."""
    def change(job: Job):
        if job.status not in RESUMABLE:
            raise JobStateError(f"job {job_id} is {job.status}; only an {', '.join(RESUMABLE[:-1])} or "
                                f"{RESUMABLE[-1]} job can be resumed")
        previous = job.status
        job.status = "queued"
        job.queued_at = time.time()
        job.finished_at = None
        job.cancel_requested = False
        job.error = None
        return "status", {"status": "queued", "resumed_from_status": previous, "from_step": job.step,
                          "checkpoint": job.last_checkpoint}

    try:
        store.update(job_id, change)
    except KeyError:
        raise JobNotFound(job_id) from None
    return get(job_id, store)


# --------------------------------------------------------------------------- describing a job
def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def predicted_bytes(predicted: dict | None) -> float | None:
    if not predicted:
        return None
    if _num(predicted.get("peak_bytes")):
        return float(predicted["peak_bytes"])
    gib = _num(predicted.get("peak_vram_gib"))
    return gib * GIB if gib else None


def comparison(predicted: dict | None, measured: dict | None) -> dict[str, Any] | None:
    """Predicted vs measured peak memory and throughput; relative_error = measured / predicted − 1."""
    if not predicted or not measured:
        return None
    out: dict[str, Any] = {}
    p_mem, m_mem = predicted_bytes(predicted), _num(measured.get("peak_memory_bytes"))
    at_shape = measured.get("predicted_at_measured_shape") or {}
    if _num(at_shape.get("peak_bytes")):
        # the counted steps' own shape: the plan's prediction is for its longest example, which they may not reach
        p_mem = float(at_shape["peak_bytes"])
    if p_mem and m_mem:
        # 9 decimals: CPU tensor peaks of small models are a few MiB, and the ratio below must be reproducible
        out["peak_memory"] = {"predicted_gib": round(p_mem / GIB, 9), "measured_gib": round(m_mem / GIB, 9),
                              "relative_error": round(m_mem / p_mem - 1, 6),
                              "measured_kind": measured.get("peak_memory_kind")}
        if at_shape.get("seq_len"):
            out["peak_memory"]["shape"] = {"micro_batch": at_shape.get("micro_batch"), "seq_len": at_shape["seq_len"]}
        if measured.get("peak_memory_kind") == "tensor_live_bytes":
            out["peak_memory"]["note"] = ("measured: live tensor bytes over the first optimizer steps (the CPU "
                                          "calibration's instrument), predicted at those steps' shape; the "
                                          f"process's peak RSS was {(_num(measured.get('process_max_rss_bytes')) or 0) / GIB:.3f} GiB")
        if measured.get("peak_memory_kind") == "process_max_rss":
            out["peak_memory"]["note"] = ("measured: the process's peak RSS (Python runtime and libraries included); "
                                          "the estimate counts the training tensors only")
    p_tps, m_tps = _num(predicted.get("tokens_per_s")), _num(measured.get("tokens_per_s"))
    if m_tps:
        out["tokens_per_s"] = {"predicted": p_tps, "measured": round(m_tps, 3),
                               "relative_error": round(m_tps / p_tps - 1, 6) if p_tps else None}
    return out or None


def describe(job: Job, store: JobStore | None = None) -> dict[str, Any]:
    """The public view of a job (GET /v1/jobs/{id}, `advisor jobs show`)."""
    metrics = {"loss": None, "eval_loss": None, "tokens_per_s": None, "peak_vram_gib": None,
               **(job.metrics or {})}
    eta_s = job.eta_s if job.status == "running" else (0.0 if job.status == "succeeded" else None)
    info = job.train_info or {}
    spec = job.spec or {}
    dataset = spec.get("dataset") if isinstance(spec.get("dataset"), dict) else None
    out = {
        "id": job.id,
        "status": job.status,
        "method": job.method,
        "model": job.model,
        "dataset": dataset,
        "step": job.step or 0,
        "total_steps": job.total_steps,
        "progress": round(job.step / job.total_steps, 4) if job.total_steps else None,
        "epoch": job.epoch,
        "metrics": metrics,
        "predicted": job.predicted,
        "measured": job.measured,
        "predicted_vs_measured": comparison(job.predicted, job.measured),
        "eta_s": eta_s,
        "eta": _iso(job.updated_at + eta_s) if eta_s is not None and job.updated_at else None,
        "output_dir": job.output_dir,
        "last_checkpoint": job.last_checkpoint,
        "error": job.error,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "oom_retries": job.oom_retries or [],
        "attempts": job.attempts or 0,
        "cancel_requested": bool(job.cancel_requested),
        "device": job.device,
        "micro_batch": info.get("micro_batch"),
        "grad_accum": info.get("grad_accum"),
        "adjusted": info.get("adjusted"),
        "resumed_from": info.get("resumed_from"),
        "truncated": info.get("truncated"),
        "runner": job.runner,
        "worker_pid": job.worker_pid if job.status == "running" else None,
        "last_event_id": job.last_event_id,
        "events_url": f"/v1/jobs/{job.id}/events",
    }
    if store is not None and job.status == "queued":
        out["queue_position"] = store.queue_position(job)
    return out


def is_terminal(status: str) -> bool:
    return status in TERMINAL


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
