"""Shared fixtures: tiny real models saved to disk (random weights, locally trained tokenizer), offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs one xdist worker per CPU: a torch thread pool per CPU in each of them (and in the servers, jobs and
# CLIs they start) would oversubscribe the machine, and OpenMP's spinning threads make that slow
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_fit_cache(tmp_path_factory):
    """One directory of fitted memory models for the whole run, both xdist workers and every process they start
    (servers, CLIs, the notebook's kernel): a fit is named by a hash of all it depends on, so the first test that
    needs one computes it and the others read it, as users sharing ADVISOR_FIT_CACHE_DIR do. Writes are atomic."""
    import os

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "shared-fits"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(autouse=True)
def _isolated_data_root(tmp_path, monkeypatch, shared_fit_cache):
    """Each test gets its own data root (and so its own cache and SQLite file); fitted memory models are shared."""
    from advisor.settings import get_settings

    monkeypatch.setenv("ADVISOR_DATA_ROOT", str(tmp_path / "var"))
    monkeypatch.setenv("ADVISOR_FIT_CACHE_DIR", str(shared_fit_cache))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def tokenizer():
    from advisor.demo import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer):
    """{'llama': path, 'gpt2': path, 't5': path} — tiny models with weights and tokenizer on disk."""
    from advisor.demo import write_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_model(root / arch, arch, tokenizer) for arch in ("llama", "gpt2", "t5")}


# ------------------------------------------------------------------------------------------- job store
def record_concurrently(url: str, writers: list[tuple[str, int]]) -> None:
    """One thread per (job id, n): each opens its own JobStore on `url` (other connections) and records n events."""
    import threading

    from advisor.jobs.store import JobStore

    def write(job_id: str, n: int) -> None:
        other = JobStore(url)
        for i in range(n):
            other.record(job_id, "log", {"i": i})

    threads = [threading.Thread(target=write, args=w) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ------------------------------------------------------------------------------------------- real server
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AdvisorServer:
    """`advisor serve` (a real uvicorn) on a free port of 127.0.0.1 with its own data root; the log goes to a file
    beside the root. `base_env` is applied on every start, `start(**env)` adds to it; `kill()` is SIGKILL."""

    def __init__(self, root, base_env: dict[str, str] | None = None, drop_env: tuple[str, ...] = ()):
        from pathlib import Path

        self.root = Path(root)
        self.base_env = dict(base_env or {})
        self.drop_env = drop_env
        self.env_extra: dict[str, str] = {}
        self.proc = None
        self.log = self.root.parent / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120, **env_extra: str) -> AdvisorServer:
        import subprocess
        import sys
        import time

        import httpx

        self.env_extra = env_extra
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in self.drop_env}
        env.update(ADVISOR_DATA_ROOT=str(self.root), HF_HUB_OFFLINE="1", **self.base_env, **env_extra)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "advisor.cli", "serve", "--port", str(self.port), "--log-level", "warning"],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.3)
        self.proc.kill()
        pytest.fail(f"server did not start: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------------------------------------ exports
def single_gpu_recommendation(model_dir, method: str, training: dict, peft: dict | None = None) -> dict:
    """A minimal recommendation (one A100) for `method` with `training` (and `peft`) on the method's defaults: what
    the exporters read."""
    from advisor.methods import get_method

    cfg = get_method(method).resolve_config({"training": training, "peft": peft or {}})
    return {"decision": "fine_tune", "method": method, "config": cfg.model_dump(mode="json"),
            "estimate": {"peak_vram_gib": 9.8, "fits": True, "seq_len": cfg.training.max_seq_length,
                         "strategy": "single",
                         "hardware": {"name": "NVIDIA A100 80GB", "count": 1, "usable_memory_gib": 79.2}},
            "reasons": [], "alternatives": [], "rejected": [], "notes": [], "model": str(model_dir),
            "config_sources": {}, "scenario": {"model": str(model_dir),
                                               "hardware": {"gpu": "NVIDIA A100 80GB", "count": 1},
                                               "dataset": {"num_examples": 2000}}}


def two_step_lora_job(model_dir, data_path, training: dict, peft: dict | None = None) -> dict:
    """A normalized two-step LoRA job on the tiny model and an alpaca file, with `training` over small CPU settings:
    what the tests of one training option run twice, with and without it."""
    from advisor.train import normalize_job

    return normalize_job({
        "model": str(model_dir), "method": "lora", "max_steps": 2,
        "dataset": {"path": str(data_path), "format": "auto"},
        "config": {"peft": peft or {},
                   "training": {"bf16": False, "learning_rate": 1e-3, "per_device_train_batch_size": 4,
                                "gradient_accumulation_steps": 1, "max_seq_length": 64, "warmup_ratio": 0.0,
                                **training}}})
