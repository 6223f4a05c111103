"""The jobs service on PostgreSQL (ADVISOR_DB_URL=postgresql+psycopg://...): a throwaway cluster started for this
module (initdb + pg_ctl on a free 127.0.0.1 port, trust auth, removed afterwards), the same store and the same real
uvicorn server the SQLite tests use. Skips cleanly where PostgreSQL's server binaries or the psycopg driver
(`pip install -e .[postgres]`) are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest
from conftest import AdvisorServer, free_port, record_concurrently

TOKEN = "pg-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((str(v / name) for v in versions if (v / name).exists()), None)


def _as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: run its binaries as the `postgres` account when we are root."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no postgres account to run PostgreSQL as")
    return [runuser, "-u", "postgres", "--"]


@pytest.fixture(scope="module")
def pg_url():
    pytest.importorskip("psycopg", reason="the PostgreSQL driver (pip install -e .[postgres])")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    prefix = _as_postgres_user()
    # not under pytest's temporary tree: that is private to root, and the server runs as postgres
    base = Path(tempfile.mkdtemp(prefix="advisor-pg-"))
    data, sockets = base / "data", base / "sock"
    sockets.mkdir()
    if prefix:
        for path in (base, sockets):
            shutil.chown(path, "postgres")
    subprocess.run([*prefix, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=120)
    port = free_port()
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off"
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "pg.log"), "-w", "start"],
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_store_on_postgres_numbers_events_per_job_under_concurrent_writers(pg_url, tmp_path):
    from advisor.jobs.store import JobStore

    store = JobStore(pg_url)
    store.create("pg-a", {"b": 1}, {"method": "lora", "model": "m", "nested": {"x": [1, 2]}}, str(tmp_path / "a"))
    store.create("pg-b", {}, {"method": "ia3", "model": "m"}, str(tmp_path / "b"))

    record_concurrently(store.url, [("pg-a", 30), ("pg-a", 30), ("pg-b", 30)])
    assert [e.seq for e in store.events_after("pg-a")] == list(range(1, 62))  # +1: the "queued" status event
    assert [e.seq for e in store.events_after("pg-b")] == list(range(1, 32))
    assert [e.seq for e in store.events_after("pg-a", 59)] == [60, 61]
    assert store.get("pg-a").spec["nested"] == {"x": [1, 2]}  # JSON columns round-trip
    ok, _ = store.claim("pg-a", "server", ("queued",))
    assert ok and store.get("pg-a").status == "running"
    assert not store.claim("pg-a", "server", ("queued",))[0]  # a second claim loses


def test_server_trains_a_job_with_its_records_in_postgres(pg_url, tmp_path, tokenizer):
    from advisor.demo import write_datasets, write_tiny_model
    from advisor.jobs.store import JobStore

    root = tmp_path / "var"
    root.mkdir()
    write_tiny_model(root / "models" / "llama", "llama", tokenizer)
    write_datasets(root / "data", n=24)
    server = AdvisorServer(root, {"ADVISOR_API_TOKEN": TOKEN, "ADVISOR_DB_URL": pg_url},
                           drop_env=("ADVISOR_INJECT_OOM_AT_STEP",))
    server.start()
    try:
        body = {"model": str(root / "models" / "llama"), "method": "lora", "dataset": {"path": "data/alpaca.jsonl"},
                "config": {"training": {"max_seq_length": 64, "per_device_train_batch_size": 2, "bf16": False}},
                "max_steps": 3, "estimate": False}
        r = httpx.post(f"{server.url}/v1/jobs", json=body, headers=AUTH, timeout=120)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        with httpx.stream("GET", f"{server.url}/v1/jobs/{job_id}/events",
                          timeout=httpx.Timeout(30, read=600)) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("id:")]
        job = httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=30).json()
        assert job["status"] == "succeeded" and job["step"] == 3, job
        ids = [int(line.split(":", 1)[1]) for line in lines]
        assert ids == list(range(1, len(ids) + 1)) and len(ids) >= 5
        # the records are in PostgreSQL, not in a SQLite file under the data root
        assert not (root / "advisor.db").exists()
        stored = JobStore(pg_url).get(job_id)
        assert stored.status == "succeeded" and stored.measured["peak_memory_kind"] == "tensor_live_bytes"
        assert (Path(job["output_dir"]) / "adapter_model.safetensors").is_file()
    finally:
        server.stop()
