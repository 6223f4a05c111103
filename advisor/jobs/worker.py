"""The worker: one process per job attempt, so a crash or an out-of-memory never takes the API down.

    python -m advisor.jobs.worker JOB_ID --db URL --parent-pid PID
    (or forked by advisor/jobs/forkserver.py, which has the training stack imported already)

It reads the job's plan from the database, runs `advisor.train.run_training` on it and writes every trainer event
(start, step, eval, checkpoint, oom_retry, log) to the job's history, with the job's progress fields, in the same
transaction. The status the worker leaves is the job's outcome:

    succeeded    the trainer finished (metrics, measured peak memory and throughput next to the prediction)
    cancelled    a user asked (the trainer saved a checkpoint first; the job can be resumed)
    interrupted  the server went away or shut down (checkpoint saved; resumable), see below
    failed       the plan was refused (TrainingRefused: the numbers), bad input, or an error (its traceback)

The worker never outlives its server: Linux delivers SIGTERM when the parent dies (PR_SET_PDEATHSIG) and a
watchdog thread also polls the parent's pid (other systems, or a parent that died before the prctl). On SIGTERM
the trainer is asked to stop at its next step (it saves a checkpoint); if it has not returned after
ADVISOR_WORKER_STOP_GRACE_S seconds (default 30) the worker records `interrupted` and exits hard.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

from advisor.jobs.store import JobStore
from advisor.settings import Settings

def stop_grace_s() -> float:
    return Settings().worker_stop_grace_s  # read when needed: a worker forked from a warm server sees today's value
CANCEL_POLL_S = 0.5


class StopFlag:
    """Why the trainer should stop: None (keep going), "cancel" (a user asked) or "shutdown" (server gone/stopping)."""

    def __init__(self, store: JobStore, job_id: str):
        self.store, self.job_id = store, job_id
        self.reason: str | None = None
        self._last_poll = 0.0
        self._lock = threading.Lock()

    def set(self, reason: str) -> None:
        with self._lock:
            if self.reason != "cancel":  # a cancel is never downgraded to an interruption
                self.reason = reason

    def __call__(self) -> bool:  # should_stop(), polled by the trainer every step
        t = time.monotonic()
        if self.reason != "cancel" and t - self._last_poll >= CANCEL_POLL_S:
            self._last_poll = t
            try:
                if self.store.cancel_requested(self.job_id):
                    self.set("cancel")
            except Exception:  # a busy database must not stop training; the next poll tries again
                pass
        return self.reason is not None


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
    except OSError:
        return False


def _metrics_from_trainer(metrics: dict[str, Any]) -> dict[str, Any]:
    out = dict(metrics)
    if "peak_memory_gib" in out:
        out["peak_vram_gib"] = out.pop("peak_memory_gib")
    return out


class EventSink:
    """on_event(): trainer events → job_events rows + the job's progress fields, one transaction each."""

    def __init__(self, store: JobStore, job_id: str):
        self.store, self.job_id = store, job_id

    def __call__(self, ev: dict[str, Any]) -> None:
        ev = dict(ev)
        kind = str(ev.pop("type", "log"))

        def apply(job):
            if kind == "start":
                job.total_steps = ev.get("total_steps")
                job.train_info = ev
                job.device = ev.get("device")
                if ev.get("predicted") is not None:
                    job.predicted = ev["predicted"]
                if ev.get("resumed_from"):
                    job.step = _checkpoint_step(ev["resumed_from"], job.step)
            elif kind == "step":
                job.step = int(ev.get("step") or 0)
                job.total_steps = ev.get("total_steps") or job.total_steps
                job.epoch = ev.get("epoch")
                job.eta_s = ev.get("eta_s")
                m = dict(job.metrics or {})
                m.update({k: ev[k] for k in ("loss", "learning_rate", "tokens_per_s") if ev.get(k) is not None})
                if ev.get("peak_memory_gib") is not None:
                    m["peak_vram_gib"] = ev["peak_memory_gib"]
                job.metrics = m
            elif kind == "eval":
                m = dict(job.metrics or {})
                m.update({k: ev[k] for k in ("eval_loss", "perplexity") if ev.get(k) is not None})
                job.metrics = m
            elif kind == "checkpoint":
                job.last_checkpoint = ev.get("path")
            elif kind == "oom_retry":
                job.oom_retries = [*(job.oom_retries or []), {**ev, "time": time.time()}]
            return kind, ev

        self.store.update(self.job_id, apply)


def run(job_id: str, store: JobStore, parent_pid: int | None = None) -> str:
    """Run one attempt of a job already claimed as `running`; returns the status it ends in."""
    job = store.get(job_id)
    if job is None:
        raise SystemExit(f"no job {job_id!r} in {store.url}")
    stop = StopFlag(store, job_id)
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def on_term(_signum, _frame):  # no database work in a signal handler: the poll (or the end) tells cancel apart
        stop.set("shutdown")
        threading.Thread(target=_deadline, daemon=True).start()

    def _deadline():
        grace = stop_grace_s()
        if done.wait(grace):
            return
        _finish_once(store, job_id, outcome, "interrupted",
                     {"reason": f"the trainer did not stop within {grace:g} s of being asked; killed"})
        os._exit(3)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if parent_pid:
        _set_parent_death_signal(signal.SIGTERM)

        def watchdog():
            while not done.is_set():
                if os.getppid() != parent_pid:
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                done.wait(1.0)

        threading.Thread(target=watchdog, daemon=True, name="parent-watchdog").start()
    store.set_worker(job_id, os.getpid())

    status, payload, fields = _train(job, store, stop)
    done.set()
    _finish_once(store, job_id, outcome, status, payload, **fields)
    return outcome.get("status", status)


_FINISH_LOCK = threading.Lock()


def _finish_once(store: JobStore, job_id: str, outcome: dict, status: str, payload: dict, **fields) -> None:
    with _FINISH_LOCK:
        if outcome:
            return
        outcome["status"] = status
        store.transition(job_id, status, ("running",), payload, worker_pid=None, **fields)


def _train(job, store: JobStore, stop: StopFlag) -> tuple[str, dict, dict]:
    """(status, status event payload, job fields) of one attempt."""
    sink = EventSink(store, job.id)
    try:
        from advisor.train import run_training

        resume = "latest" if job.attempts > 1 else None
        if int(job.spec.get("num_processes") or 1) > 1:
            result = _run_launched(job, sink, stop, resume)
        else:
            result = run_training(dict(job.spec), output_dir=job.output_dir, on_event=sink, should_stop=stop,
                                  resume=resume)
    except Exception as err:  # every failure becomes the job's error; the API is another process
        kind = type(err).__name__
        names = {c.__name__ for c in type(err).__mro__}
        if "TrainingRefused" in names:
            details = getattr(err, "details", None)
            return "failed", {"error": str(err), "refused": True, "details": details}, {"error": f"refused: {err}"}
        if "AdvisorInputError" in names:
            return "failed", {"error": str(err), "field": getattr(err, "field", None)}, {"error": str(err)}
        tb = traceback.format_exc(limit=8)
        sys.stderr.write(tb)
        return "failed", {"error": f"{kind}: {err}", "traceback": tb[-4000:]}, {"error": f"{kind}: {err}"}
    latest = store.get(job.id)
    fields: dict[str, Any] = {"result": _jsonable(result), "step": int(result.get("step") or latest.step or 0)}
    if result.get("total_steps"):
        fields["total_steps"] = int(result["total_steps"])
    if result.get("status") == "succeeded":
        fields["metrics"] = {**(latest.metrics or {}), **_metrics_from_trainer(result.get("metrics") or {})}
        fields["measured"] = result.get("measured")
        if result.get("predicted") is not None:
            fields["predicted"] = result["predicted"]
        fields["eta_s"] = 0.0
        return "succeeded", {"metrics": fields["metrics"], "measured": fields["measured"]}, fields
    if stop.reason == "cancel" or store.cancel_requested(job.id):
        return "cancelled", {"step": fields["step"], "reason": "cancelled by request"}, fields
    return "interrupted", {"step": fields["step"], "reason": "the server stopped"}, fields


class LaunchFailed(RuntimeError):
    pass


def _run_launched(job, sink: EventSink, stop: StopFlag, resume: str | None) -> dict:
    """num_processes > 1: `accelerate launch` (advisor.train.launch) with the strategy of the plan; rank 0's event
    file is followed into the job's history. A stop request creates the launch's stop file: every rank stops after
    its current step and rank 0 saves a checkpoint (status cancelled, resumable); a launch still running after the
    stop grace gets SIGTERM (torchrun forwards it; the entry module checkpoints on it too)."""
    import json
    import subprocess

    import torch

    from advisor.train.launch import launch_command, write_launch_files
    from advisor.train.runner import TrainingRefused

    n = int(job.spec["num_processes"])
    files = write_launch_files(dict(job.spec), job.output_dir, strategy=job.spec.get("strategy") or "ddp",
                               num_processes=n, cpu=not torch.cuda.is_available())
    if files.note:
        sink({"type": "note", "message": files.note})
    stop_file = files.events_dir / "STOP"
    stop_file.unlink(missing_ok=True)  # a resume must not see the previous cancel's request
    cmd = launch_command(files, n, resume=resume or "none", stop_file=stop_file)

    def die_with_worker():  # in the child, before exec: torchrun stops its ranks when it gets SIGTERM
        _set_parent_death_signal(signal.SIGTERM)

    proc = subprocess.Popen(cmd, stdout=sys.stdout, stderr=sys.stderr, preexec_fn=die_with_worker)
    events_path = files.events_dir / "events-rank0.jsonl"
    offset, buffer, result, error = 0, b"", None, None
    terminate_at = None  # once a stop is asked: when the launch gets SIGTERM if it has not stopped by itself
    while True:
        exited = proc.poll() is not None  # read after this check: everything written before the exit is seen
        if events_path.exists():
            with open(events_path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            offset += len(chunk)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                ev = json.loads(line)
                ev.pop("rank", None)
                if ev.get("type") == "result":
                    result = {k: v for k, v in ev.items() if k != "type"}
                elif ev.get("type") == "error":
                    error = ev
                else:
                    sink(ev)
        if exited:
            break
        if terminate_at is None and stop():
            terminate_at = time.monotonic() + stop_grace_s()
            stop_file.touch()
        elif terminate_at is not None and time.monotonic() > terminate_at and proc.poll() is None:
            proc.terminate()
            terminate_at = math.inf  # terminate once
        time.sleep(0.2)
    if result is not None:
        return result
    if error is not None and error.get("refused"):
        raise TrainingRefused(error["error"], error.get("details"))
    if terminate_at is not None:
        return {"status": "cancelled", "step": None}
    raise LaunchFailed((error or {}).get("error") or f"accelerate launch exited with code {proc.returncode}")


def _checkpoint_step(path: Any, default: int | None) -> int:
    import re

    if isinstance(path, int) and not isinstance(path, bool):
        return path
    found = re.search(r"checkpoint-(\d+)", str(path))
    return int(found.group(1)) if found else int(default or 0)


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def prewarm() -> None:
    """Import what a training run needs (torch, transformers, PEFT, the trainer): seconds a queued job need not wait."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import peft  # noqa: F401
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        import advisor.engine  # noqa: F401
        import advisor.memory.simulate  # noqa: F401  (the exact estimator's children fork from the same server)
        import advisor.methods  # noqa: F401
        import advisor.train.runner  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m advisor.jobs.worker", description=__doc__.split("\n")[0])
    parser.add_argument("job_id", help="The job to run (already claimed as running).")
    parser.add_argument("--db", help="SQLAlchemy URL of the jobs database (default: the settings').")
    parser.add_argument("--parent-pid", type=int, default=None, help="Stop when this process goes away.")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    status = run(args.job_id, JobStore(args.db), args.parent_pid)
    return 0 if status in ("succeeded", "cancelled", "interrupted") else 1


def _exit_now(code: int) -> None:
    """Everything is committed: skip the interpreter's teardown (seconds with torch loaded), so the device frees
    and the next queued job starts sooner."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
