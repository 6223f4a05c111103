"""A fork server for job workers: torch, transformers and PEFT imported once, a fresh process forked per job.

Importing the training stack takes 5-15 s of CPU; a queue of short jobs on a small machine would spend most of its
time there. The dispatcher starts one fork server (`python -m advisor.jobs.forkserver`), which imports everything
(advisor.jobs.worker.prewarm: imports only, no computation, no threads of our own, no database connection) and
then, for each job order on its stdin, forks a child that runs `advisor.jobs.worker.run` exactly as a freshly
started worker would: its own session, its output in the job's worker.log, its own database connections, the
parent-death signal and watchdog (its parent being the fork server, which itself dies with the API process).

The exact estimator's simulations use the same server, without a database (`advisor.memory.simulate`): an order
with `simulate` (the request), `result` (where the child writes the answer), `env` and `cwd` (the caller's) runs one
simulation in the forked child instead of a job; one with `fit` computes a fast-estimator fit into the fit cache
(`advisor.estimator.coefficients.fit_in_parallel`).

Protocol, one JSON object per line:

    dispatcher → server   {"job_id": "...", "log": "/path/worker.log"}  (+ simulate and result, or fit; env, cwd)
    server → dispatcher   {"ready": true, "pid": N, "usable": b}  once, after the imports (usable false: an import
                                                                initialized CUDA, which a forked child cannot use;
                                                                the dispatcher then starts fresh workers)
                          {"job_id": "...", "pid": N}            the child running a job
                          {"pid": N, "exit": code}               a child ended (code < 0: killed by signal -code)

The server reaps its children. EOF on stdin ends it; running children then get SIGTERM (their parent-death
signal), checkpoint and record `interrupted`, as they would if the API died. ADVISOR_WARM_WORKER=0 turns the fork
server off (a fresh `python -m advisor.jobs.worker` per job).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

UNKNOWN_EXIT = 255  # a child whose exit status nobody could collect (its fork server died first)


# --------------------------------------------------------------------------- the server process
def _send(message: dict) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})


def _child(order: dict, db_url: str | None) -> None:
    """In the forked child: become a worker for one job, or run one simulation or fit; never returns."""
    code = 1
    try:
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        fd = os.open(order["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        if "simulate" in order or "fit" in order:
            from advisor.jobs.worker import _set_parent_death_signal
            from advisor.settings import get_settings

            _set_parent_death_signal(signal.SIGKILL)  # nothing to save: the caller went away with the server
            os.environ.clear()
            os.environ.update(order["env"])  # the caller's, now: the server kept its own from when it started
            os.chdir(order["cwd"])
            get_settings.cache_clear()
            if "simulate" in order:
                from advisor.memory.simulate import write_child_result

                write_child_result(order["simulate"], order["result"])
            else:
                from advisor.estimator.coefficients import fit_from_payload

                fit_from_payload(order["fit"])
            code = 0
            return
        from advisor.jobs.store import JobStore
        from advisor.jobs.worker import run

        status = run(order["job_id"], JobStore(db_url), parent_pid=os.getppid())
        code = 0 if status in ("succeeded", "cancelled", "interrupted") else 1
    except BaseException:  # noqa: BLE001 - whatever happens, the child must not return into the server's loop
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(db_url: str | None, parent_pid: int | None) -> int:
    from advisor.jobs.worker import _set_parent_death_signal, prewarm

    if parent_pid:
        _set_parent_death_signal(signal.SIGKILL)  # nothing of ours to save: die with the dispatcher's process
        if os.getppid() != parent_pid:
            return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() without initializing CUDA
    prewarm()
    import torch

    if torch.cuda.is_initialized():  # an import initialized CUDA: a forked child could not use the GPU
        _send({"ready": True, "pid": os.getpid(), "usable": False,
               "why": "CUDA was initialized while importing the training stack; forked workers could not use it"})
        return 0
    _send({"ready": True, "pid": os.getpid(), "usable": True})
    pending = b""
    while True:
        _reap()
        readable, _, _ = select.select([0], [], [], 0.5)
        if not readable:
            continue
        data = os.read(0, 65536)
        if not data:
            return 0
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if not line.strip():
                continue
            order = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(order, db_url)
            _send({"job_id": order["job_id"], "pid": pid})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m advisor.jobs.forkserver", description=__doc__.split("\n")[0])
    parser.add_argument("--db", help="SQLAlchemy URL of the jobs database.")
    parser.add_argument("--parent-pid", type=int, default=None, help="Exit when this process goes away.")
    args = parser.parse_args(argv)
    return serve(args.db, args.parent_pid)


# --------------------------------------------------------------------------- the dispatcher's side
class ForkedWorker:
    """A job's process forked by the server, with the subprocess.Popen methods the dispatcher uses."""

    def __init__(self, pid: int, server: ForkServer):
        self.pid, self.server = pid, server
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            code = self.server.exits.get(self.pid)
            if code is not None:
                self.returncode = code
            elif not self.server.alive() and not pid_exists(self.pid):
                self.returncode = self.server.exits.get(self.pid, UNKNOWN_EXIT)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            time.sleep(0.1)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def pid_exists(pid: int) -> bool:
    """A process with this pid exists (ours or not; a zombie counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ForkServer:
    """Starts `python -m advisor.jobs.forkserver` (its imports run in the background) and hands it jobs."""

    def __init__(self, db_url: str | None, log_path: Path, env: dict[str, str] | None = None):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        db = ["--db", db_url] if db_url else []
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "advisor.jobs.forkserver", *db, "--parent-pid", str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True)
        self.exits: dict[int, int] = {}
        self.ready = threading.Event()
        self.usable = True  # until the server says otherwise (CUDA initialized by an import: fresh workers instead)
        self.why_unusable: str | None = None
        self._replies: dict[str, int] = {}
        self._cond = threading.Condition()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="forkserver-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            with self._cond:
                if msg.get("ready"):
                    self.usable = bool(msg.get("usable", True))
                    self.why_unusable = msg.get("why")
                    self.ready.set()
                elif "exit" in msg:
                    self.exits[int(msg["pid"])] = int(msg["exit"])
                elif "job_id" in msg:
                    self._replies[msg["job_id"]] = int(msg["pid"])
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, job_id: str, log_path: Path, timeout: float = 300, **order) -> ForkedWorker | None:
        """Fork a worker for `job_id` (waits for the imports if they are still running); None if the server is gone.
        `order` adds to what the child is told (a simulation's or a fit's fields)."""
        with self._lock:
            if not self.ready.wait(timeout) or not self.usable or not self.alive():
                return None
            try:
                self.proc.stdin.write((json.dumps({"job_id": job_id, "log": str(log_path), **order}) + "\n").encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                return None
            deadline = time.monotonic() + timeout
            with self._cond:
                while job_id not in self._replies and self.alive() and time.monotonic() < deadline:
                    self._cond.wait(0.5)
            if job_id not in self._replies:
                # never two workers for one job: a server that did not answer must not fork it later
                self.proc.kill()
                self.proc.wait()
                self._reader.join(timeout=5)  # a reply already in the pipe is still read
            with self._cond:
                pid = self._replies.pop(job_id, None)
            return None if pid is None else ForkedWorker(pid, self)

    def close(self, timeout: float = 10) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    sys.exit(main())
