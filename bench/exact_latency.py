"""Wall time of exact estimates in one process: simulations forked from the warm server against a fresh interpreter
per simulation (ADVISOR_WARM_SIMULATOR=false, the behaviour before), in the same run.

Each mode runs the same requests, in order, in a fresh Python process of its own (`--child MODE`) with an empty
cache, so the first request of the warm mode also pays for starting the server (its imports run once), as the first
exact estimate of an API server or a CLI call does. Every request is a different sequence length, so none is read
from the simulation cache. The peaks must be equal (checked): the mode changes where the simulation runs, not what
it computes.

Run: `HF_HUB_OFFLINE=1 .venv/bin/python -m bench.exact_latency [--requests 4] [--out PATH]`.
Writes bench/results/exact_latency.json (versions, host, load average).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.accuracy import REPO, environment, loadavg, write_json

DEFAULT_OUT = "bench/results/exact_latency.json"
MODEL, METHOD, GPU = "Qwen/Qwen2.5-0.5B", "lora", "RTX 4090"


def _child(requests: int) -> None:
    from advisor.estimator.exact import exact_estimate
    from advisor.schemas import EstimateRequest

    rows = []
    for i in range(requests):
        seq = 64 * (i + 1)
        req = EstimateRequest.model_validate({"model": MODEL, "method": METHOD, "hardware": {"gpu": GPU},
                                              "config": {"training": {"max_seq_length": seq,
                                                                      "per_device_train_batch_size": 1}}})
        t0 = time.perf_counter()
        est = exact_estimate(req)
        rows.append({"seq_len": seq, "seconds": round(time.perf_counter() - t0, 2), "peak_bytes": est["peak_bytes"]})
    print(json.dumps(rows))


def run_mode(warm: bool, requests: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "ADVISOR_DATA_ROOT": root, "ADVISOR_WARM_SIMULATOR": "true" if warm else "false",
               "HF_HUB_OFFLINE": "1"}
        env.pop("ADVISOR_CACHE_DIR", None)
        out = subprocess.run([sys.executable, "-m", "bench.exact_latency", "--child", str(requests)], cwd=REPO,
                             env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        _child(args.child)
        return 0
    load_before = loadavg()
    fresh = run_mode(False, args.requests)
    warm = run_mode(True, args.requests)
    equal = [f["peak_bytes"] == w["peak_bytes"] for f, w in zip(fresh, warm)]
    print(f"{MODEL} {METHOD} on {GPU}, micro-batch 1: exact estimates in one process")
    print(f"{'seq':>5} {'fresh interpreter s':>20} {'warm server s':>14} {'ratio':>6}  peak equal")
    for f, w, same in zip(fresh, warm, equal):
        print(f"{f['seq_len']:5d} {f['seconds']:20.2f} {w['seconds']:14.2f} {w['seconds'] / f['seconds']:6.2f}  {same}")
    later = [w["seconds"] / f["seconds"] for f, w in zip(fresh[1:], warm[1:])]
    summary = {"first_ratio": round(warm[0]["seconds"] / fresh[0]["seconds"], 3),
               "later_median_ratio": round(statistics.median(later), 3) if later else None,
               "peaks_equal": all(equal)}
    print(f"first request (starts the server) ratio {summary['first_ratio']:.2f}; later requests median ratio "
          f"{summary['later_median_ratio']}; peaks equal: {summary['peaks_equal']}")
    write_json(REPO / args.out, {"environment": environment(), "loadavg_before": load_before,
                                 "loadavg_after": loadavg(), "model": MODEL, "method": METHOD, "gpu": GPU,
                                 "fresh": fresh, "warm": warm, **summary})
    return 0 if all(equal) else 1


if __name__ == "__main__":
    sys.exit(main())
