"""Latency of `recommend` in-process, and its HTTP throughput against a bare FastAPI endpoint, in the same run.

1. In-process: a fixed pool of contrasting scenarios (catalog models from 7B to 70B; RTX 4090, T4, A100, H100,
   several GPUs; tasks, priorities, budgets; fifty examples; no GPU; changing facts). A warm-up pass answers each
   once (it fits the estimator's coefficients for every method the rules leave standing, or loads them from the
   cache); then `--requests` calls drawn from the pool in a shuffled order are timed one by one (wall time and
   this thread's CPU time). Each call is the whole request: validate the scenario, evaluate the rules once, build
   and fit-check a config for every candidate method, rank, and write the answer. Goal: p50 ≤ 5 ms.
2. HTTP: `advisor serve` (uvicorn) and a bare FastAPI app (one POST endpoint that parses the same JSON body and
   returns a small object, served by the same uvicorn settings) are started side by side; one client sends the
   same stream of scenarios to each, sequentially over a kept-alive connection, and requests/s are compared.
   Answers for catalog-only scenarios are cached by the route (see advisor/api/routes/recommend.py), so after the
   first round the recommend endpoint serves encoded answers. Goal: ≥ 50% of the bare endpoint's requests/s.

Run: `HF_HUB_OFFLINE=1 .venv/bin/python -m bench.recommend [--requests 1000] [--http-requests 2000]`.
Writes bench/results/recommend.json (versions, host, load average).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

from bench.accuracy import REPO, environment, loadavg, percentile, write_json

DEFAULT_OUT = "bench/results/recommend.json"
D = {"num_examples": 2000, "avg_tokens": 512, "max_tokens": 1024}
SCENARIOS = [
    {"model": "meta-llama/Llama-2-7b-hf", "hardware": {"gpu": "RTX 4090"}, "dataset": D, "task": "domain_adaptation"},
    {"model": "meta-llama/Llama-2-13b-hf", "hardware": {"gpu": "RTX 4090"}, "dataset": D},
    {"model": "meta-llama/Llama-2-70b-hf", "hardware": {"gpu": "A100-80GB"}, "dataset": D},
    {"model": "meta-llama/Llama-2-7b-hf", "hardware": {"gpu": "T4"}, "dataset": D},
    {"model": "meta-llama/Llama-2-7b-hf", "hardware": {"gpu": "A100-80GB"}, "dataset": D, "task": "math"},
    {"model": "meta-llama/Llama-2-7b-hf", "hardware": {"gpu": "A100-80GB"}, "dataset": D, "priority": "cost"},
    {"model": "meta-llama/Llama-2-7b-hf", "hardware": {"gpu": "A100-80GB", "count": 4}, "dataset": D,
     "priority": "quality"},
    {"model": "meta-llama/Llama-2-7b-hf", "hardware": {"gpu": "A100-80GB"}, "dataset": {**D, "num_examples": 20000},
     "task": "multi_domain", "context": {"num_domains": 4}},
    {"model": "meta-llama/Llama-2-7b-hf", "hardware": {"gpu": "A100-80GB"}, "dataset": D, "budget": {"max_usd": 0.5}},
    {"model": "meta-llama/Llama-2-7b-hf", "hardware": {"gpu": "A100-80GB"}, "dataset": {"num_examples": 50}},
    {"model": "meta-llama/Llama-2-7b-hf", "hardware": {"gpu": "none"}, "dataset": D},
    {"model": "meta-llama/Llama-2-7b-hf", "hardware": {"gpu": "A100-80GB"}, "dataset": D,
     "context": {"knowledge_changes_often": True}},
]

BARE_APP = '''
from typing import Any
from fastapi import Body, FastAPI
app = FastAPI()
@app.post("/v1/echo")
def echo(body: Any = Body(...)) -> dict:
    return {"ok": True, "fields": len(body) if isinstance(body, dict) else 0}
@app.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}
'''


def _stats(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": percentile(ms, 0.5), "p90_ms": percentile(ms, 0.9),
            "p99_ms": percentile(ms, 0.99), "mean_ms": statistics.fmean(ms), "max_ms": max(ms)}


def in_process(requests: int, seed: int) -> dict:
    from advisor.recommend import recommend

    warm = []
    for sc in SCENARIOS:
        t = time.perf_counter()
        recommend(sc)
        warm.append(time.perf_counter() - t)
    rng = random.Random(seed)
    stream = [SCENARIOS[i % len(SCENARIOS)] for i in range(requests)]
    rng.shuffle(stream)
    wall, cpu = [], []
    for sc in stream:
        c, t = time.thread_time(), time.perf_counter()
        recommend(sc)
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.thread_time() - c) * 1000)
    per = {}
    for i, sc in enumerate(SCENARIOS):
        key = f"{i}: {sc['model'].split('/')[-1]} {sc['hardware']['gpu']}x{sc['hardware'].get('count', 1)}"
        ms = [w for w, s in zip(wall, stream) if s is sc]
        per[key] = round(statistics.median(ms), 3) if ms else None
    return {"warmup_s_total": sum(warm), "warmup_s_max": max(warm), "wall": _stats(wall), "cpu": _stats(cpu),
            "p50_by_scenario_ms": per}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict, base: str):
    import httpx

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{cmd} did not start: {proc.stderr.read().decode()[-2000:]}")


def _throughput(base: str, path: str, stream: list[dict]) -> float:
    import httpx

    with httpx.Client(base_url=base, timeout=600) as client:
        for sc in SCENARIOS:  # first round: cold answers, not timed
            client.post(path, json=sc)
        t = time.perf_counter()
        for sc in stream:
            r = client.post(path, json=sc)
            if r.status_code >= 500:
                raise RuntimeError(r.text)
        return len(stream) / (time.perf_counter() - t)


def over_http(requests: int, seed: int, tmp: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    (tmp / "bare_app.py").write_text(BARE_APP)
    uv = [sys.executable, "-m", "uvicorn", "--log-level", "warning", "--no-access-log"]
    p1, p2 = _port(), _port()
    advisor = _start(uv + ["--factory", "advisor.api.app:create_app", "--port", str(p1)], env, f"http://127.0.0.1:{p1}")
    bare = _start(uv + ["--app-dir", str(tmp), "bare_app:app", "--port", str(p2)], env, f"http://127.0.0.1:{p2}")
    try:
        rng = random.Random(seed)
        stream = [SCENARIOS[i % len(SCENARIOS)] for i in range(requests)]
        rng.shuffle(stream)
        bare_rps = _throughput(f"http://127.0.0.1:{p2}", "/v1/echo", stream)
        rec_rps = _throughput(f"http://127.0.0.1:{p1}", "/v1/recommend", stream)
        bare_rps_2 = _throughput(f"http://127.0.0.1:{p2}", "/v1/echo", stream)  # bracket: load may drift
    finally:
        for proc in (advisor, bare):
            proc.terminate()
            proc.wait(timeout=20)
    bare_mean = (bare_rps + bare_rps_2) / 2
    return {"requests": requests, "bare_rps": [bare_rps, bare_rps_2], "recommend_rps": rec_rps,
            "ratio": rec_rps / bare_mean}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--http-requests", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import logging
    import tempfile

    logging.disable(logging.WARNING)
    env = environment()
    print(f"in-process: {len(SCENARIOS)} scenarios, warm-up then {args.requests} timed requests ...", flush=True)
    local = in_process(args.requests, args.seed)
    print(f"  p50 {local['wall']['p50_ms']:.2f} ms (CPU {local['cpu']['p50_ms']:.2f} ms), p99 "
          f"{local['wall']['p99_ms']:.2f} ms; warm-up {local['warmup_s_total']:.1f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"HTTP: {args.http_requests} requests to uvicorn(advisor) and uvicorn(bare FastAPI) ...", flush=True)
        http = over_http(args.http_requests, args.seed, Path(tmp))
    print(f"  bare {http['bare_rps'][0]:.0f} / {http['bare_rps'][1]:.0f} req/s, recommend "
          f"{http['recommend_rps']:.0f} req/s: ratio {http['ratio']:.2f} (goal >= 0.5)")
    result = {"benchmark": "recommend", **env, "in_process": local, "http": http, "loadavg_end": loadavg(),
              "goals": {"p50_ms": 5.0, "http_ratio": 0.5},
              "met": {"p50_ms": local["wall"]["p50_ms"] <= 5.0, "http_ratio": http["ratio"] >= 0.5}}
    out = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
