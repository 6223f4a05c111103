"""The jobs service as users run it: a real uvicorn server on 127.0.0.1 (a subprocess, `advisor serve`), a real
SQLite file in a temporary data root, tiny local models trained a few steps in worker processes.

One server is shared by the module (started once, restarted by the SIGKILL test); the tests run in file order but
each makes the jobs it needs. The whole file takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import AdvisorServer, record_concurrently

from advisor.methods import METHOD_IDS

ADVISOR = [sys.executable, "-m", "advisor.cli"]
TOKEN = "jobs-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TERMINAL = {"succeeded", "failed", "cancelled", "interrupted"}
UPLOAD_LIMIT_MB = 0.25
TRAINING = {"max_seq_length": 64, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "bf16": False,
            "gradient_checkpointing": False, "save_steps": 1000, "eval_steps": 1000}
REPO_PROFILES = Path(__file__).resolve().parents[1] / "profiles"


class Server(AdvisorServer):
    """The jobs test server: a token, a small upload limit, and no OOM injection unless a test starts it so."""

    def __init__(self, root: Path):
        super().__init__(root, {"ADVISOR_API_TOKEN": TOKEN, "ADVISOR_MAX_UPLOAD_MB": str(UPLOAD_LIMIT_MB)},
                         drop_env=("ADVISOR_INJECT_OOM_AT_STEP",))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    from advisor.demo import write_datasets, write_tiny_model

    root = tmp_path_factory.mktemp("jobs") / "var"
    root.mkdir()
    write_tiny_model(root / "models" / "llama", "llama", tokenizer)
    write_tiny_model(root / "models" / "gpt2", "gpt2", tokenizer)
    write_datasets(root / "data", n=40)
    srv = Server(root)
    srv.start()
    yield srv
    srv.stop()


# --------------------------------------------------------------------------- helpers
def body_for(server: Server, method: str, *, max_steps: int = 2, dataset: str = "data/alpaca.jsonl",
             estimate: bool = False, **training) -> dict:
    arch = "gpt2" if method == "bitfit" else "llama"  # BitFit trains existing biases (Llama has none)
    return {"model": str(server.root / "models" / arch), "method": method,
            "config": {"training": {**TRAINING, **training}}, "dataset": {"path": dataset},
            "max_steps": max_steps, "estimate": estimate}


def submit(server: Server, body: dict) -> dict:
    r = httpx.post(f"{server.url}/v1/jobs", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and len(job["id"]) >= 22
    return job


def get_job(server: Server, job_id: str) -> dict:
    r = httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def read_events(server: Server, job_id: str, last_event_id: int | None = None, until=None,
                timeout: float = 600) -> list[tuple[int, str, dict]]:
    """(id, event, data) from the SSE stream, parsed from the wire, until it ends (or `until(event)` is true)."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    out: list[tuple[int, str, dict]] = []
    deadline = time.time() + timeout
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job_id}/events", headers=headers,
                      timeout=httpx.Timeout(30, read=timeout)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in r.iter_lines():
            if line == "":
                if "data" in fields:
                    ev = (int(fields["id"]), fields.get("event", "message"), json.loads(fields["data"]))
                    out.append(ev)
                    if until is not None and until(ev):
                        break
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
            assert time.time() < deadline, f"no end of stream for {job_id} after {timeout} s"
    return out


def wait_for(predicate, timeout: float = 120, interval: float = 0.3, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def explain(server: Server, job: dict) -> str:
    log = server.root / "jobs" / job["id"] / "worker.log"
    return f"{job.get('status')}: {job.get('error')}\n{log.read_text()[-3000:] if log.exists() else ''}"


# --------------------------------------------------------------------------- records (no server)
def test_job_ids_never_read_as_options_and_the_worker_takes_one_that_does(tmp_path):
    """A URL-safe id can begin with "-": the worker's argv then lacked its job id and the job failed (seen once in a
    full run, 1 id in 64). New ids start with a letter or digit; the worker is also given `--` before the id."""
    from advisor.jobs.service import new_job_id, readable_token
    from advisor.jobs.store import JobStore

    ids = [new_job_id() for _ in range(2000)] + [readable_token(12) for _ in range(2000)]
    assert all(i[0].isalnum() for i in ids) and len(set(ids)) == len(ids)
    from advisor.jobs.queue import spawn_worker

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    job = store.create("-dFJRP6Pra8Wp8EqUG1hBg", {}, {"method": "lora"}, str(tmp_path / "out"))
    _, job = store.claim(job.id, "server", allowed_from=("queued",))
    log = tmp_path / "worker.log"
    proc = spawn_worker(job, store, log_path=log)
    proc.wait(timeout=120)
    text = log.read_text()
    assert "required: job_id" not in text and "unrecognized arguments" not in text, text[-2000:]
    assert store.get(job.id).status == "failed"  # it ran: an empty spec fails inside the job, with its error recorded
    assert store.get(job.id).error


def test_event_ids_are_monotonic_per_job_under_concurrent_writers(tmp_path):
    from advisor.jobs.store import JobStore

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create("job-a", {}, {"method": "lora", "model": "m"}, str(tmp_path / "a"))
    store.create("job-b", {}, {"method": "lora", "model": "m"}, str(tmp_path / "b"))

    record_concurrently(store.url, [("job-a", 40), ("job-a", 40), ("job-b", 40)])
    a = [e.seq for e in store.events_after("job-a")]
    b = [e.seq for e in store.events_after("job-b")]
    assert a == list(range(1, 82)) and b == list(range(1, 42))  # +1: the "queued" status event
    assert [e.seq for e in store.events_after("job-a", 79)] == [80, 81]


def test_a_worker_still_inside_execve_counts_as_alive():
    """Right after Popen returns, the child may not have its argv yet (/proc/<pid>/cmdline reads empty: the kernel
    closes the spawner's close-on-exec pipe before it records the new command line). Measured here: 40 of 300
    spawns idle, 244 of 300 under load. Such a worker must not be judged a reused pid."""
    from advisor.jobs.queue import pid_alive

    judged_dead = 0
    busy = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(os.cpu_count() or 2)]  # widens it
    try:
        for _ in range(150):
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "advisor.jobs.worker", "j1"])
            try:
                judged_dead += not pid_alive(proc.pid, "j1")
            finally:
                proc.kill()
                proc.wait()
    finally:
        for b in busy:
            b.kill()
            b.wait()
    assert judged_dead == 0
    # and a settled process that is not this job's worker is still told apart
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.time() + 10
        while not Path(f"/proc/{other.pid}/cmdline").read_bytes() and time.time() < deadline:
            time.sleep(0.01)
        assert not pid_alive(other.pid, "j1")
    finally:
        other.kill()
        other.wait()


def test_startup_recovery_marks_jobs_with_dead_workers_interrupted(tmp_path):
    from advisor.jobs.queue import recover
    from advisor.jobs.store import JobStore

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    for job_id in ("dead", "alive"):
        store.create(job_id, {}, {"method": "lora", "model": "m"}, str(tmp_path / job_id))
        assert store.claim(job_id, "server", ("queued",))[0]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store.set_worker("dead", gone.pid)
    # a live process whose command line names the module and the job, as a worker's does
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "advisor.jobs.worker", "alive"])
    try:
        store.set_worker("alive", live.pid)
        assert recover(store) == ["dead"]
        assert store.get("dead").status == "interrupted" and store.get("alive").status == "running"
        last = store.events_after("dead")[-1]
        assert last.type == "status" and last.payload["status"] == "interrupted"
    finally:
        live.kill()
        live.wait()

    from advisor.jobs.queue import Dispatcher

    # ADVISOR_AUTO_RESUME=true: the startup recovery queues every interrupted job again (FIFO, oldest first)
    assert sorted(Dispatcher(store, devices=["cpu"], auto_resume=True).recover()) == ["alive", "dead"]
    assert store.get("alive").status == store.get("dead").status == "queued"
    assert store.events_after("alive")[-1].payload == {"status": "queued", "resumed_from_status": "interrupted",
                                                       "from_step": 0, "checkpoint": None}
    assert Dispatcher(store, devices=["cpu"]).recover() == []  # without the setting nothing is queued


# --------------------------------------------------------------------------- security and bad input
def test_auth_token_and_paths_outside_the_data_root(server, tmp_path):
    base = server.url
    body = body_for(server, "lora")
    assert httpx.post(f"{base}/v1/jobs", json=body).status_code == 401
    assert httpx.post(f"{base}/v1/jobs", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{base}/v1/jobs", json=body, headers={"Authorization": TOKEN}).status_code == 401
    assert httpx.post(f"{base}/v1/jobs/anything/cancel").status_code == 401
    assert httpx.post(f"{base}/v1/jobs/anything/resume").status_code == 401
    assert httpx.post(f"{base}/v1/datasets", files={"file": ("a.jsonl", b'{"text": "x"}\n')}).status_code == 401
    assert httpx.get(f"{base}/v1/jobs").status_code == 200  # reading is open; starting, stopping, uploading is not

    outside = tmp_path / "outside.jsonl"
    shutil.copy(server.root / "data" / "alpaca.jsonl", outside)
    (server.root / "data" / "escape.jsonl").symlink_to(outside)
    for path in ("../outside.jsonl", str(outside), "data/escape.jsonl", "data/../../outside.jsonl"):
        r = httpx.post(f"{base}/v1/jobs", json={**body, "dataset": {"path": path}}, headers=AUTH, timeout=60)
        assert r.status_code == 422 and r.json()["field"] == "dataset.path", (path, r.text)
        assert "outside the data root" in r.json()["detail"]
    for out in (str(tmp_path / "out"), "../elsewhere"):
        r = httpx.post(f"{base}/v1/jobs", json={**body, "output_dir": out}, headers=AUTH, timeout=60)
        assert r.status_code == 422 and r.json()["field"] == "output_dir", r.text
    r = httpx.post(f"{base}/v1/jobs", json={**body, "method": "superlora"}, headers=AUTH, timeout=60)
    assert r.status_code == 422 and r.json()["field"] == "method" and "lora" in r.json()["allowed"]
    r = httpx.post(f"{base}/v1/jobs", json={**body, "dataset": {"path": "data/missing.jsonl"}}, headers=AUTH)
    assert r.status_code == 422 and r.json()["field"] == "dataset.path"
    assert httpx.get(f"{base}/v1/jobs", params={"status": "paused"}).status_code == 422
    assert httpx.get(f"{base}/v1/jobs/no-such-job").status_code == 404
    assert httpx.get(f"{base}/v1/jobs/no-such-job/events").status_code == 404
    assert httpx.post(f"{base}/v1/jobs/no-such-job/cancel", headers=AUTH).status_code == 404
    assert httpx.post(f"{base}/v1/jobs/no-such-job/resume", headers=AUTH).status_code == 404


def test_dataset_upload_limits_and_format_errors(server, tmp_path):
    import pandas as pd

    url = f"{server.url}/v1/datasets"
    datasets_dir = server.root / "datasets"
    good = (server.root / "data" / "alpaca.jsonl").read_bytes()
    r = httpx.post(url, files={"file": ("my data.jsonl", good)}, headers=AUTH)
    assert r.status_code == 201, r.text
    rec = r.json()
    assert rec["format"] == "alpaca" and rec["rows"] == 40 and rec["size_bytes"] == len(good)
    stored = server.root / rec["path"]
    assert stored.parent == datasets_dir and stored.read_bytes() == good
    assert "my data" not in stored.name and len(stored.stem) >= 16  # an unguessable name, not the user's
    assert rec["id"] in [d["id"] for d in httpx.get(url).json()]
    before = sorted(p.name for p in datasets_dir.iterdir())

    row = json.dumps({"text": "x" * 200}).encode() + b"\n"
    big = row * (int(UPLOAD_LIMIT_MB * 2**20) // len(row) + 50)
    r = httpx.post(url, files={"file": ("big.jsonl", big)}, headers=AUTH, timeout=60)
    assert r.status_code == 413 and r.json()["field"] == "file" and "upload limit" in r.json()["detail"], r.text
    assert sorted(p.name for p in datasets_dir.iterdir()) == before  # nothing kept, no partial file

    bad = [
        (("a.jsonl", b'{"text": "ok"}\nnot json\n'), {}, "line 2"),
        (("a.jsonl", b'{"question": "q", "answer": "a"}\n'), {}, "cannot tell the format"),
        (("a.csv", b'messages\n"[{""role"": ""user"", ""content"": ""hi""}]"\n'), {}, "assistant"),
        (("a.txt", b'{"text": "x"}\n'), {}, "file type"),
        (("a.jsonl", good), {"format": "chat"}, "messages"),
        (("a.jsonl", b""), {}, "no rows"),
    ]
    for file, data, needle in bad:
        r = httpx.post(url, files={"file": file}, data=data, headers=AUTH)
        assert r.status_code == 422 and r.json()["field"] == "file" and needle in r.json()["detail"], (file[0], r.text)
    r = httpx.post(url, data={"format": "auto"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["field"] == "file"
    assert sorted(p.name for p in datasets_dir.iterdir()) == before

    parquet = tmp_path / "c.parquet"
    pd.DataFrame({"prompt": ["a", "b", "c"], "completion": [" x", " y", " z"]}).to_parquet(parquet)
    r = httpx.post(url, files={"file": ("c.parquet", parquet.read_bytes())}, headers=AUTH)
    assert r.status_code == 201 and r.json()["format"] == "completion" and r.json()["rows"] == 3, r.text


# --------------------------------------------------------------------------- training
def test_every_method_trains_through_the_queue(server):
    from advisor.train import load_trained

    upload = httpx.post(f"{server.url}/v1/datasets", headers=AUTH,
                        files={"file": ("chat.jsonl", (server.root / "data" / "chat.jsonl").read_bytes())}).json()
    jobs = {}
    for method in METHOD_IDS:
        dataset = upload["path"] if method == "lora" else "data/alpaca.jsonl"
        # the fit check (an estimate: predicted vs measured) for LoRA; the others skip it to keep the test short
        jobs[method] = submit(server, body_for(server, method, dataset=dataset, estimate=method == "lora"))
    waiting = get_job(server, jobs["molora"]["id"])
    assert waiting["status"] == "queued" and waiting["queue_position"] >= 2

    most_running = 0

    def all_done():
        nonlocal most_running
        running = httpx.get(f"{server.url}/v1/jobs", params={"status": "running"}).json()
        most_running = max(most_running, len(running))
        rows = {j["id"]: j for j in httpx.get(f"{server.url}/v1/jobs", params={"limit": 1000}).json()}
        return all(rows[j["id"]]["status"] in TERMINAL for j in jobs.values())

    wait_for(all_done, timeout=900, interval=0.5, what="the 12 jobs")
    assert most_running == 1  # one job per device at a time

    started = []
    for method, submitted in jobs.items():
        job = get_job(server, submitted["id"])
        assert job["status"] == "succeeded", f"{method}: {explain(server, job)}"
        events = read_events(server, job["id"])  # a terminal job's stream replays its history and ends
        assert [e[0] for e in events] == list(range(1, len(events) + 1))
        kinds = [(e[1], e[2].get("status")) for e in events]
        assert kinds[0] == ("status", "queued") and kinds[1] == ("status", "running")
        assert kinds[-1] == ("status", "succeeded")
        start = next(e[2] for e in events if e[1] == "start")
        assert start["total_steps"] == 2 and start["method"] == method
        assert [e[2]["step"] for e in events if e[1] == "step"] == [1, 2]
        assert job["step"] == job["total_steps"] == 2
        for key in ("loss", "eval_loss", "tokens_per_s", "peak_vram_gib"):
            assert job["metrics"][key] is not None, (method, key)
        assert job["measured"]["tokens_per_s"] > 0 and job["measured"]["peak_memory_bytes"] > 0
        assert Path(job["output_dir"]) == server.root / "jobs" / job["id"]
        started.append(job["started_at"])

        model, tok = load_trained(job["output_dir"])
        prompt = tok("What is LoRA?", return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[-1] > prompt["input_ids"].shape[-1], method
    assert started == sorted(started)  # first in, first out

    lora = get_job(server, jobs["lora"]["id"])
    assert lora["dataset"]["path"] == str(server.root / upload["path"])
    assert lora["predicted"]["peak_vram_gib"] > 0
    cmp_ = lora["predicted_vs_measured"]
    assert cmp_["peak_memory"]["relative_error"] == pytest.approx(
        cmp_["peak_memory"]["measured_gib"] / cmp_["peak_memory"]["predicted_gib"] - 1, rel=1e-3)
    assert cmp_["tokens_per_s"]["measured"] == lora["measured"]["tokens_per_s"]


def test_cancel_a_running_and_a_queued_job(server):
    long = submit(server, body_for(server, "lora", max_steps=400))
    behind = submit(server, body_for(server, "ia3"))
    seen = read_events(server, long["id"], until=lambda e: e[1] == "step", timeout=300)
    assert seen[-1][1] == "step"

    r = httpx.post(f"{server.url}/v1/jobs/{behind['id']}/cancel", headers=AUTH)
    assert r.status_code == 202 and r.json()["status"] == "cancelled"  # still queued: cancelled at once
    assert httpx.post(f"{server.url}/v1/jobs/{long['id']}/resume", headers=AUTH).status_code == 409
    r = httpx.post(f"{server.url}/v1/jobs/{long['id']}/cancel", headers=AUTH)
    assert r.status_code == 202 and r.json()["cancel_requested"]

    events = read_events(server, long["id"], last_event_id=seen[-1][0], timeout=300)
    assert events[0][0] == seen[-1][0] + 1
    kinds = [e[1] for e in events]
    assert "cancel_requested" in kinds and events[-1][2]["status"] == "cancelled"
    assert kinds.index("checkpoint") > kinds.index("cancel_requested")  # the trainer saved before stopping
    job = get_job(server, long["id"])
    assert job["status"] == "cancelled" and 1 <= job["step"] < 400
    assert Path(job["last_checkpoint"]).is_dir() and job["last_checkpoint"].endswith(f"checkpoint-{job['step']}")
    assert httpx.post(f"{server.url}/v1/jobs/{long['id']}/cancel", headers=AUTH).status_code == 409
    queued = get_job(server, behind["id"])
    assert queued["status"] == "cancelled" and queued["started_at"] is None
    assert [e[2].get("status") for e in read_events(server, behind["id"])] == ["queued", "cancelled"]


def test_cancel_a_two_process_job_then_resume_it(server):
    """num_processes 2 goes through `accelerate launch` (gloo on CPU); a cancel reaches every rank through the
    launch's stop file, rank 0 checkpoints, and resume finishes the run from that checkpoint."""
    job = submit(server, {**body_for(server, "lora", max_steps=60), "num_processes": 2})
    seen = read_events(server, job["id"], until=lambda e: e[1] == "step" and e[2].get("step", 0) >= 2, timeout=400)
    r = httpx.post(f"{server.url}/v1/jobs/{job['id']}/cancel", headers=AUTH)
    assert r.status_code == 202 and r.json()["cancel_requested"]
    events = read_events(server, job["id"], last_event_id=seen[-1][0], timeout=300)
    kinds = [e[1] for e in events]
    assert events[-1][2]["status"] == "cancelled", explain(server, get_job(server, job["id"]))
    assert "checkpoint" in kinds and kinds.index("checkpoint") > kinds.index("cancel_requested")
    done = get_job(server, job["id"])
    assert done["status"] == "cancelled" and 2 <= done["step"] < 60
    assert done["last_checkpoint"].endswith(f"checkpoint-{done['step']}"), done
    stop_file = server.root / "jobs" / job["id"] / "launch" / "events" / "STOP"
    assert stop_file.exists()  # how the request reached the ranks (not a SIGTERM)

    # resume: the stop file is cleared, training continues from the checkpoint's step on both ranks
    r = httpx.post(f"{server.url}/v1/jobs/{job['id']}/resume", headers=AUTH)
    assert r.status_code == 202, r.text
    tail = read_events(server, job["id"], last_event_id=events[-1][0], timeout=400)
    final = get_job(server, job["id"])
    assert final["status"] == "succeeded", explain(server, final)
    steps = [e[2]["step"] for e in tail if e[1] == "step"]
    assert steps and steps[0] == done["step"] + 1 and final["step"] == 60


def test_sigkill_server_mid_job_then_resume_from_checkpoint(server):
    # 40 steps: with 8, a fast machine finished the job between its first checkpoint and the kill (seen once)
    job = submit(server, body_for(server, "lora", max_steps=40, save_steps=2))
    first = read_events(server, job["id"], until=lambda e: e[1] == "checkpoint", timeout=300)
    pid = get_job(server, job["id"])["worker_pid"]
    assert pid and pid_alive(pid)

    server.kill()  # SIGKILL: no shutdown code runs in the server
    wait_for(lambda: not pid_alive(pid), timeout=60, what="the worker to stop after its server died")

    server.start(ADVISOR_INJECT_OOM_AT_STEP="1")  # (for the OOM test below; resumed steps are all > 1)
    stopped = get_job(server, job["id"])
    assert stopped["status"] == "interrupted", explain(server, stopped)
    checkpoint_step = stopped["step"]
    assert checkpoint_step >= first[-1][2]["step"] >= 2
    assert Path(stopped["last_checkpoint"]).name == f"checkpoint-{checkpoint_step}"
    history = read_events(server, job["id"])
    assert history[: len(first)] == first and history[-1][2]["status"] == "interrupted"
    assert [e[0] for e in history] == list(range(1, len(history) + 1))

    r = httpx.post(f"{server.url}/v1/jobs/{job['id']}/resume", headers=AUTH)
    assert r.status_code == 202 and r.json()["status"] == "queued"
    rest = read_events(server, job["id"], last_event_id=history[-1][0], timeout=300)
    assert rest[0][0] == history[-1][0] + 1  # the numbering continues
    assert rest[-1][2]["status"] == "succeeded", explain(server, get_job(server, job["id"]))
    start = next(e[2] for e in rest if e[1] == "start")
    assert start["resumed_from"] == checkpoint_step
    steps = [e[2]["step"] for e in rest if e[1] == "step"]
    assert steps == list(range(checkpoint_step + 1, 41))

    everything = read_events(server, job["id"])
    assert everything == history + rest  # the earlier history is intact
    done = get_job(server, job["id"])
    assert done["step"] == 40 and done["attempts"] == 2 and done["status"] == "succeeded"


def test_injected_out_of_memory_is_retried_and_recorded(server):
    if server.env_extra.get("ADVISOR_INJECT_OOM_AT_STEP") != "1":
        server.stop()
        server.start(ADVISOR_INJECT_OOM_AT_STEP="1")
    job = submit(server, body_for(server, "lora", max_steps=3, per_device_train_batch_size=4))
    events = read_events(server, job["id"], timeout=300)
    retries = [e[2] for e in events if e[1] == "oom_retry"]
    assert len(retries) == 1
    assert retries[0]["previous_micro_batch"] == 4 and retries[0]["micro_batch"] == 2
    assert retries[0]["grad_accum"] == 2
    done = get_job(server, job["id"])
    assert done["status"] == "succeeded", explain(server, done)
    assert len(done["oom_retries"]) == 1 and done["oom_retries"][0]["micro_batch"] == 2
    assert done["measured"]["micro_batch"] == 2 and done["step"] == 3


# --------------------------------------------------------------------------- the command line
def _cli(server: Server, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("ADVISOR_INJECT_OOM_AT_STEP", "ADVISOR_API_TOKEN")}
    full.update({"ADVISOR_DATA_ROOT": str(server.root), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    full.update(env)
    return subprocess.run([*ADVISOR, *args], capture_output=True, text=True, timeout=600, env=full)


def test_cli_train_locally_and_on_the_server(server, tmp_path, monkeypatch):
    recommendation = {
        "decision": "fine_tune", "method": "ia3",
        "config": {"method": "ia3", "training": dict(TRAINING)},
        "estimate": None, "reasons": [{"rule": "test", "says": "IA3 for a test", "source": "tests/test_jobs.py"}],
    }
    plan = tmp_path / "recommendation.json"
    plan.write_text(json.dumps(recommendation))
    mine = tmp_path / "mine.jsonl"  # outside the data root: the CLI copies it in
    shutil.copy(server.root / "data" / "completion.jsonl", mine)
    llama = str(server.root / "models" / "llama")

    run = _cli(server, "train", str(plan), "--model", llama, "--dataset", str(mine), "--max-steps", "2", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    local = json.loads(run.stdout)
    assert local["status"] == "succeeded" and local["runner"] == "cli" and local["method"] == "ia3"
    assert "copied" in run.stderr and Path(local["dataset"]["path"]).parent == server.root / "datasets"
    assert get_job(server, local["id"])["status"] == "succeeded"  # the same database the API serves

    # the small commands in-process (the same Typer app `advisor` runs), on the same database
    from typer.testing import CliRunner

    from advisor.cli import app
    from advisor.settings import get_settings

    monkeypatch.setenv("ADVISOR_DATA_ROOT", str(server.root))
    monkeypatch.delenv("ADVISOR_API_TOKEN", raising=False)
    get_settings.cache_clear()
    runner = CliRunner()
    listed = json.loads(runner.invoke(app, ["jobs", "list", "--json"]).stdout)
    assert local["id"] in [j["id"] for j in listed]
    shown = json.loads(runner.invoke(app, ["jobs", "show", local["id"], "--json"]).stdout)
    assert shown["step"] == 2 and shown["metrics"]["loss"] is not None
    refused = runner.invoke(app, ["jobs", "cancel", local["id"]])
    assert refused.exit_code == 1 and "succeeded" in refused.stderr
    assert runner.invoke(app, ["jobs", "show", "no-such-job"]).exit_code == 1
    on_server = json.loads(runner.invoke(app, ["jobs", "show", local["id"], "--server", server.url, "--json"]).stdout)
    assert on_server["id"] == local["id"]
    no_token = runner.invoke(app, ["train", str(plan), "--model", llama, "--dataset", str(mine), "--server",
                                   server.url])
    assert no_token.exit_code == 1 and "401" in no_token.stderr

    remote = _cli(server, "train", str(plan), "--model", llama, "--dataset", str(mine), "--max-steps", "2",
                  "--server", server.url, "--token", TOKEN)
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert "uploaded" in remote.stderr and "succeeded" in remote.stdout
    job_id = remote.stderr.split("job ", 1)[1].split()[0]
    on_server = get_job(server, job_id)
    assert on_server["status"] == "succeeded" and on_server["runner"] == "server"


def test_calibrate_from_jobs_refits_the_profile(server, tmp_path):
    from advisor.jobs.store import JobStore

    store = JobStore(f"sqlite:///{server.root / 'advisor.db'}")
    if not [j for j in store.list(status="succeeded") if j.method in ("lora", "ia3") and j.measured]:
        job = submit(server, body_for(server, "lora", estimate=True))
        assert read_events(server, job["id"])[-1][2]["status"] == "succeeded"
    profiles = tmp_path / "profiles"  # refits write profiles: a scratch copy, never the repository's
    profiles.mkdir()
    for name in ("gpus.yaml", "models"):
        os.symlink(REPO_PROFILES / name, profiles / name)
    shutil.copytree(REPO_PROFILES / "calibration", profiles / "calibration")
    out = tmp_path / "refitted.json"
    run = _cli(server, "calibrate", "--from-jobs", "--methods", "lora,ia3", "--out", str(out), "--json",
               ADVISOR_PROFILES_DIR=str(profiles))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    used = {r["job"] for r in result["jobs"]}
    expected = {j.id for j in store.list(status="succeeded") if j.method in ("lora", "ia3")
                and int((j.measured or {}).get("world_size") or 1) == 1}  # per-device terms: one process
    multi = {s["job"] for s in result["skipped_jobs"] if "multi-process" in s["why"]}
    assert multi == {j.id for j in store.list(status="succeeded") if j.method in ("lora", "ia3")} - expected
    assert used == expected and used
    summary = result["jobs_summary"]
    assert summary["time_abs_error_median_before"] is not None and summary["time_abs_error_median_after"] is not None
    assert summary["time_abs_error_median_after"] <= summary["time_abs_error_median_before"]
    # CPU jobs count live tensor bytes over their first steps: each is a memory row, predicted at the shape it had
    assert summary["memory_rows"] == len(used) and summary["memory_abs_error_median_after"] is not None
    assert summary["memory_abs_error_median_after"] < 0.05, result["jobs"]
    profile = json.loads(out.read_text())
    job_rows = [r for r in profile["calibration"]["probe_table"] if str(r["arch"]).startswith("job:")]
    assert {r["arch"].removeprefix("job:") for r in job_rows} == used
    assert profile["calibration"]["refit"]["from_jobs"] and profile["throughput"]["achieved_flops"]["lora"] > 0

    from advisor.estimator.profile import read_profile

    assert read_profile(out).device_kind == "cpu"


def test_calibrate_from_jobs_without_jobs_names_the_option(tmp_path, monkeypatch):
    from advisor.calibration.from_jobs import calibrate_from_jobs
    from advisor.errors import AdvisorInputError

    monkeypatch.setenv("ADVISOR_DB_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    from advisor.settings import get_settings

    get_settings.cache_clear()
    with pytest.raises(AdvisorInputError) as err:
        calibrate_from_jobs(out=tmp_path / "never.json")
    assert err.value.field == "--from-jobs" and "advisor train" in err.value.message
    assert not (tmp_path / "never.json").exists()
