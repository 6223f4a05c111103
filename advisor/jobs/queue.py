"""The dispatcher: a FIFO queue over the job table, one job per device at a time, each in its own worker process.

It runs as one long-lived thread in the API process (started and stopped by the jobs router's lifespan):

    every half second, or when woken by a submit / resume / cancel:
        reap       a worker that exited while its job is still `running` (crash, OOM kill) → `failed`, with the
                   tail of its log
        dispatch   while a device is free: claim the oldest queued job (atomic) and start its worker

Devices: each CUDA GPU is one slot (the worker sees only its own through CUDA_VISIBLE_DEVICES); without CUDA the
machine is one slot. A job needing `count` devices waits at the head of the queue until that many are free
(strict FIFO: nothing overtakes it).

Startup recovery: a job left `running` whose worker is gone (the server was killed) becomes `interrupted`; with
ADVISOR_AUTO_RESUME=true every interrupted job is queued again and resumes from its newest checkpoint.

The thread that starts workers lives as long as the process, which matters: Linux delivers the parent-death
signal (PR_SET_PDEATHSIG, set by the worker) when the *thread* that forked it exits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from advisor.jobs.db import Job
from advisor.jobs.forkserver import UNKNOWN_EXIT, ForkedWorker, ForkServer, pid_exists
from advisor.jobs.store import JobStore
from advisor.settings import Settings

STOP_GRACE_S = 20.0


@dataclass
class Running:
    job_id: str
    proc: subprocess.Popen | ForkedWorker
    devices: list[str]
    log_path: Path
    started: float = field(default_factory=time.time)


def worker_log_path(job: Job) -> Path:
    from advisor.jobs.service import data_root

    path = data_root() / "jobs" / job.id / "worker.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def spawn_worker(job: Job, store: JobStore, *, devices: list[str] | None = None, parent_pid: int | None = None,
                 log_path: Path | None = None, capture: bool = False) -> subprocess.Popen:
    """Start `python -m advisor.jobs.worker` for a job already claimed as running."""
    from advisor.jobs.service import data_root

    env = {**os.environ, "ADVISOR_DB_URL": store.url, "ADVISOR_DATA_ROOT": str(data_root()),
           "TOKENIZERS_PARALLELISM": "false"}
    if devices and devices != ["cpu"]:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    # options first and `--` before the id: an id may begin with "-" (ids made before new_job_id avoided it)
    cmd = [sys.executable, "-m", "advisor.jobs.worker", "--db", store.url,
           "--parent-pid", str(parent_pid or os.getpid()), "--", job.id]
    log_path = log_path or worker_log_path(job)
    with open(log_path, "ab") as log:
        log.write(f"\n=== attempt {job.attempts} {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
        log.flush()
        # a new session: a Ctrl-C in the server's terminal does not hit the worker (the server stops it instead)
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    store.set_worker(job.id, proc.pid)
    return proc


def log_tail(path: Path, chars: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def exit_reason(returncode: int) -> str:
    if returncode == UNKNOWN_EXIT:
        return "the worker process ended without an exit status (its fork server had stopped)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (the kernel's out-of-memory killer sends SIGKILL)" if -returncode == signal.SIGKILL else ""
        return f"the worker process was killed by {name}{hint}"
    return f"the worker process exited with code {returncode}"


def fail_if_still_running(store: JobStore, job_id: str, returncode: int, log_path: Path) -> bool:
    """A worker that ended without recording an outcome: the job fails with the reason and its log's tail."""
    job = store.get(job_id)
    if job is None or job.status != "running":
        return False
    reason = exit_reason(returncode)
    tail = log_tail(log_path)
    changed, _ = store.transition(job_id, "failed", ("running",), {"error": reason, "log_tail": tail},
                                  error=f"{reason} before recording an outcome" + (f"; log:\n{tail}" if tail else ""),
                                  worker_pid=None)
    return changed


def pid_alive(pid: int | None, job_id: str | None = None) -> bool:
    """Is `pid` a live process (and, where /proc tells, the worker of `job_id`)?"""
    if not pid or not pid_exists(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if job_id and cmdline.exists():
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return True
        # An empty command line is a process inside execve (the kernel swaps in the new memory map, and closes
        # the spawner's close-on-exec pipe, before it records the new argv): too early to call it someone else.
        forked = "advisor.jobs.forkserver" in text  # a forked worker keeps its fork server's command line
        if text.strip() and not forked and ("advisor.jobs.worker" not in text or job_id not in text):
            return False  # the pid was reused by another process
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                return False  # exited, not yet reaped by its (dead) parent
        except (OSError, IndexError):
            pass
    return True


def recover(store: JobStore) -> list[str]:
    """Jobs left `running` by a server that died (their worker is gone): `interrupted`. Returns their ids."""
    host = socket.gethostname()
    marked = []
    for job in store.running():
        if job.worker_host not in (None, host):
            continue  # another machine's worker (a shared PostgreSQL database): not ours to judge
        if pid_alive(job.worker_pid, job.id):
            continue
        changed, _ = store.transition(job.id, "interrupted", ("running",),
                                      {"reason": "the server stopped while the job ran; resume continues from the "
                                                 "newest checkpoint", "checkpoint": job.last_checkpoint},
                                      worker_pid=None)
        if changed:
            marked.append(job.id)
    return marked


def local_devices() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    return ["cpu"]


def devices_needed(job: Job, total: int) -> int:
    spec = job.spec or {}
    hardware = spec.get("hardware") if isinstance(spec.get("hardware"), dict) else {}
    count = spec.get("num_processes") or hardware.get("count") or 1
    try:
        count = int(count)
    except (TypeError, ValueError):
        count = 1
    return max(1, min(count, total))


class Dispatcher:
    def __init__(self, store: JobStore, devices: list[str] | None = None, poll_s: float = 0.5,
                 auto_resume: bool = False):
        self.store = store
        self.devices = devices or local_devices()
        self.poll_s = poll_s
        self.auto_resume = auto_resume
        self.running: dict[str, Running] = {}
        # a fork server with the training stack imported (single-device hosts: which GPU a process sees is fixed
        # before torch starts, so forking suits one device only)
        self.use_forkserver = len(self.devices) == 1 and Settings().warm_worker
        self.forkserver: ForkServer | None = None
        self.recovered: list[str] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="job-dispatcher", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.recover()
        if self.use_forkserver:
            self._forkserver()  # its imports run while the API starts
        self._thread.start()

    def recover(self) -> list[str]:
        """Startup: jobs whose worker is gone → interrupted; with auto_resume, every interrupted job → queued.
        Returns the ids queued again."""
        self.recovered = recover(self.store)
        return self._requeue_interrupted() if self.auto_resume else []

    def _requeue_interrupted(self) -> list[str]:
        from advisor.jobs import service

        requeued = []
        for job in self.store.list(status="interrupted", limit=10_000):
            try:
                service.resume(job.id, self.store)
                requeued.append(job.id)
            except service.JobStateError:
                pass  # resumed or cancelled meanwhile
        return requeued

    def wake(self) -> None:
        self._wake.set()

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop dispatching; ask every worker to stop (each checkpoints and records `interrupted`)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with self._lock:
            running = list(self.running.values())
        for r in running:
            if r.proc.poll() is None:
                try:
                    r.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + grace_s
        for r in running:
            try:
                r.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()
            job = self.store.get(r.job_id)
            if job is not None and job.status == "running":
                self.store.transition(r.job_id, "interrupted", ("running",), {"reason": "the server stopped"},
                                      worker_pid=None)
        if self.forkserver is not None:
            self.forkserver.close()
            self.forkserver = None

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        last_resume_check = time.monotonic()
        while not self._stop.is_set():
            try:
                self._reap()
                if self.auto_resume and time.monotonic() - last_resume_check > 5:
                    # a job interrupted after startup (a killed server's worker that was still saving, an
                    # `advisor train` whose terminal closed) is queued again too
                    last_resume_check = time.monotonic()
                    self._requeue_interrupted()
                if not self._stop.is_set():
                    self._dispatch()
            except Exception as err:  # a database hiccup must not end the dispatcher
                sys.stderr.write(f"job dispatcher: {type(err).__name__}: {err}\n")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _busy_devices(self) -> set[str]:
        busy = {d for r in self.running.values() for d in r.devices}
        # jobs this dispatcher did not start but that run on this machine (`advisor train` in a terminal, or a
        # worker of a killed server still saving its checkpoint) hold devices too: the first free ones
        host = socket.gethostname()
        for job in self.store.running():
            if job.id in self.running or job.worker_host not in (None, host) or not pid_alive(job.worker_pid, job.id):
                continue
            free = [d for d in self.devices if d not in busy]
            busy.update(free[:devices_needed(job, len(self.devices))])
        return busy

    def _reap(self) -> None:
        with self._lock:
            done = [r for r in self.running.values() if r.proc.poll() is not None]
            for r in done:
                del self.running[r.job_id]
        for r in done:
            fail_if_still_running(self.store, r.job_id, r.proc.returncode, r.log_path)

    def _dispatch(self) -> None:
        while True:
            free = [d for d in self.devices if d not in self._busy_devices()]
            if not free:
                return
            head = self._head()
            if head is None:
                return
            need = devices_needed(head, len(self.devices))
            if need > len(free):
                return  # FIFO: the head waits for its devices; nothing overtakes it
            changed, job = self.store.claim(head.id, "server", allowed_from=("queued",))
            if not changed:
                continue  # cancelled meanwhile, or another dispatcher took it
            devices = free[:need]
            log_path = worker_log_path(job)
            try:
                proc = self._fork(job, log_path) or spawn_worker(job, self.store, devices=devices, log_path=log_path)
            except OSError as err:
                self.store.transition(job.id, "failed", ("running",), {"error": f"cannot start a worker: {err}"},
                                      error=f"cannot start a worker: {err}")
                continue
            with self._lock:
                self.running[job.id] = Running(job.id, proc, devices, log_path)

    def _forkserver(self) -> ForkServer | None:
        if not self.use_forkserver:
            return None
        if self.forkserver is None or not self.forkserver.alive():
            from advisor.jobs.service import data_root

            env = {**os.environ, "ADVISOR_DB_URL": self.store.url, "ADVISOR_DATA_ROOT": str(data_root()),
                   "TOKENIZERS_PARALLELISM": "false"}
            try:
                self.forkserver = ForkServer(self.store.url, data_root() / "jobs" / "forkserver.log", env=env)
            except OSError:
                self.use_forkserver = False
                return None
        return self.forkserver

    def _fork(self, job: Job, log_path: Path):
        server = self._forkserver()
        if server is None:
            return None
        worker = server.start(job.id, log_path)
        if worker is None and server.ready.is_set() and not server.usable:
            sys.stderr.write(f"job dispatcher: no fork server ({server.why_unusable}); starting a process per job\n")
            self.use_forkserver = False
            server.close()
            self.forkserver = None
        if worker is not None:
            with open(log_path, "ab") as log:
                log.write(f"\n=== attempt {job.attempts} {time.strftime('%Y-%m-%d %H:%M:%S')} (forked) ===\n".encode())
        return worker

    def _head(self) -> Job | None:
        return self.store.next_queued()
