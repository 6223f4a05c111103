"""A cold recommendation with the candidates' fits in parallel processes (ADVISOR_FIT_WORKERS=N) against one after
another in process (ADVISOR_FIT_WORKERS=1, the baseline), in the same run.

Each mode answers the 7B-on-a-24-GB-card scenario (Llama-2-7B, RTX 4090, 2,000 examples of up to 1,024 tokens: about
20 fits, each method with and without gradient checkpointing) in a fresh Python process of its own with empty
caches, so both pay the same imports; the parallel mode also starts the warm fork server its fits are forked from.
The answers must be equal (method, config, estimate, ranking): the mode changes where the fits run, not what they
compute. The machine's CPU count is printed with the result.

Run: `HF_HUB_OFFLINE=1 .venv/bin/python -m bench.parallel_fits [--workers N]`.
Writes bench/results/parallel_fits.json (versions, host, load average).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.accuracy import REPO, environment, loadavg, write_json

DEFAULT_OUT = "bench/results/parallel_fits.json"
SCENARIO = {"model": "meta-llama/Llama-2-7b-hf", "hardware": {"gpu": "RTX 4090"},
            "dataset": {"num_examples": 2000, "avg_tokens": 512, "max_tokens": 1024}, "task": "domain_adaptation"}
COMPARED = ("method", "config", "estimate", "ranking", "alternatives", "rejected")


def _child() -> None:
    from advisor.recommend import recommend

    t0 = time.perf_counter()
    answer = recommend(SCENARIO)
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "answer": {k: answer.get(k) for k in COMPARED}}))


def run_mode(workers: int) -> dict:
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "ADVISOR_DATA_ROOT": root, "ADVISOR_FIT_WORKERS": str(workers), "HF_HUB_OFFLINE": "1"}
        for name in ("ADVISOR_CACHE_DIR", "ADVISOR_FIT_CACHE_DIR"):
            env.pop(name, None)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "bench.parallel_fits", "--child"], cwd=REPO, env=env,
                             capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        fits = len(list(Path(root, "cache", "coefficients").glob("*.json")))
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return {"workers": workers, "recommend_s": data["seconds"], "process_s": round(wall, 2), "fits": fits,
            "answer": data["answer"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=max(2, min(4, os.cpu_count() or 2)))
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child()
        return 0
    load_before = loadavg()
    one = run_mode(1)
    many = run_mode(args.workers)
    equal = one["answer"] == many["answer"]
    ratio = many["recommend_s"] / one["recommend_s"]
    print(f"cold recommendation, {SCENARIO['model']} on {SCENARIO['hardware']['gpu']} ({os.cpu_count()} CPUs)")
    for row in (one, many):
        print(f"  fit workers {row['workers']}: recommend() {row['recommend_s']:7.1f} s, "
              f"process {row['process_s']:7.1f} s, {row['fits']} fits")
    print(f"ratio {ratio:.2f} (parallel / one at a time); answers equal: {equal}")
    write_json(REPO / args.out, {"environment": environment(), "loadavg_before": load_before,
                                 "loadavg_after": loadavg(), "scenario": SCENARIO, "one": one, "parallel": many,
                                 "ratio": round(ratio, 3), "answers_equal": equal})
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
