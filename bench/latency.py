"""Latency of the fast estimator in-process: 1,000 mixed requests over ~50 distinct configurations.

The configurations are a fixed (seeded) sample of catalog models × methods × (micro-batch, sequence length,
gradient checkpointing) × hardware (H100, A100-80GB, L40S, RTX 4090; 1, 4 or 8 GPUs), limited to valid
combinations. A warm-up pass calls every configuration once (this fits its coefficients, or loads them from the
cache, and computes the static terms); then 1,000 requests drawn from the configurations in a shuffled order are
timed one by one (wall time, and this thread's CPU time, which is what the call costs when the host is shared).
Each timed call is what an API handler does: validate the request dict
(`EstimateRequest.model_validate`) and call `fast_estimate` (plan, closed form, largest micro-batch search,
per-strategy peaks for multi-GPU, time and cost).

The baseline is the naive rule "weights × 4" on the same requests: validate, resolve the model, params × 2 × 4 bytes,
compare with the GPU's memory. The parameter count is cached per model, as it would be in a service.

Run: `HF_HUB_OFFLINE=1 .venv/bin/python -m bench.latency [--requests 1000] [--configs 50] [--out PATH]`.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

from bench.accuracy import REPO, cache_dir, environment, loadavg, percentile, write_json

DEFAULT_OUT = "bench/results/latency.json"
GIB = 2**30
MODELS = ["openai-community/gpt2", "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B",
          "google/gemma-2b", "microsoft/phi-2", "meta-llama/Llama-2-7b-hf", "mistralai/Mistral-7B-v0.1",
          "meta-llama/Meta-Llama-3-8B", "meta-llama/Llama-2-13b-hf", "google/flan-t5-base", "Qwen/Qwen2.5-14B"]
METHODS = ["full", "lora", "qlora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "adapter", "longlora",
           "galore", "molora"]
POINTS = [(1, 512, False), (4, 1024, True), (2, 2048, False), (8, 256, True), (16, 512, True)]
HARDWARE = [("h100", 1), ("a100-80gb", 1), ("l40s", 1), ("rtx-4090", 1), ("h100", 4), ("a100-80gb", 8)]


def payload(model: str, method: str, b: int, s: int, gc: bool, gpu: str, count: int) -> dict:
    return {"model": model, "hardware": {"gpu": gpu, "count": count}, "method": method,
            "config": {"training": {"per_device_train_batch_size": b, "max_seq_length": s,
                                    "gradient_checkpointing": gc}}}


def sample_configs(n: int, seed: int) -> list[dict]:
    from advisor.estimator.plan import build_plan
    from advisor.estimator.static import static_terms
    from advisor.schemas import EstimateRequest

    rng = random.Random(seed)
    space = list(itertools.product(MODELS, METHODS, POINTS, HARDWARE))
    rng.shuffle(space)
    out, seen_pairs = [], set()
    # first pass: prefer new (model, method) pairs so the sample is mixed
    for prefer_new in (True, False):
        for model, method, (b, s, gc), (gpu, count) in space:
            if len(out) >= n:
                break
            if prefer_new and (model, method) in seen_pairs:
                continue
            if method == "prefix_tuning" and gc:
                continue
            p = payload(model, method, b, s, gc, gpu, count)
            if p in out:
                continue
            try:
                plan = build_plan(EstimateRequest.model_validate(p))
                # methods that do not apply to an architecture fail only when applied (meta device, cheap)
                static_terms(plan.model, plan.config)
            except Exception:  # noqa: BLE001 - invalid combination (e.g. sequence beyond the model's positions)
                continue
            out.append(p)
            seen_pairs.add((model, method))
    return out


@functools.lru_cache(maxsize=256)
def _params(model_ref: str) -> int:
    from advisor.catalog.models import resolve_model

    return resolve_model(model_ref).num_params()


def naive_estimate(data: dict) -> dict:
    """The rule of thumb "weights × 4" as a service would answer it."""
    from advisor.hardware import resolve_hardware
    from advisor.schemas import EstimateRequest

    req = EstimateRequest.model_validate(data)
    peak = _params(req.model) * 2 * 4
    hw = resolve_hardware(req.hardware)
    mem = hw.memory_gib * GIB if hw.memory_gib is not None else None
    return {"peak_vram_gib": round(peak / GIB, 3), "fits": None if mem is None else peak <= mem}


def fast_call(data: dict) -> dict:
    from advisor.estimator.fast import fast_estimate
    from advisor.schemas import EstimateRequest

    return fast_estimate(EstimateRequest.model_validate(data))


def timed(fn, items: list[dict]) -> tuple[list[float], list[float]]:
    """Wall and CPU (this thread) milliseconds per call. On a shared host the CPU time shows the work itself."""
    wall, cpu = [], []
    for it in items:
        c = time.thread_time()
        t = time.perf_counter()
        fn(it)
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.thread_time() - c) * 1000)
    return wall, cpu


def stats(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": percentile(ms, 0.5), "p90_ms": percentile(ms, 0.9), "p99_ms": percentile(ms, 0.99),
            "mean_ms": statistics.fmean(ms), "max_ms": max(ms), "min_ms": min(ms),
            "throughput_per_s": 1000 / statistics.fmean(ms)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--configs", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cold", action="store_true", help="warm up against an empty private cache (fits everything)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import tempfile

    env = environment()
    private = tempfile.mkdtemp(prefix="advisor-bench-latency-") if args.cold else None
    with cache_dir(private):
        configs = sample_configs(args.configs, args.seed)
        print(f"{len(configs)} distinct configurations; warm-up ...", flush=True)
        t0 = time.perf_counter()
        warm = []
        for p in configs:
            t = time.perf_counter()
            fast_call(p)
            warm.append(time.perf_counter() - t)
        warm_total = time.perf_counter() - t0
        for p in configs:
            naive_estimate(p)
        print(f"warm-up {warm_total:.1f} s (per config median {statistics.median(warm):.2f} s, max {max(warm):.2f} s)",
              flush=True)
        rng = random.Random(args.seed + 1)
        stream = [configs[i % len(configs)] for i in range(args.requests)]
        rng.shuffle(stream)
        fast_ms, fast_cpu = timed(fast_call, stream)
        naive_ms, naive_cpu = timed(naive_estimate, stream)
        multi = [m for m, p in zip(fast_ms, stream) if p["hardware"]["count"] > 1]
        single = [m for m, p in zip(fast_ms, stream) if p["hardware"]["count"] == 1]
    result = {
        "benchmark": "latency", **env, "requests": len(stream), "distinct_configs": len(configs),
        "cache": "private empty dir (cold warm-up)" if args.cold else "data root cache",
        "warmup": {"seconds_total": warm_total, "per_config_median_s": statistics.median(warm),
                   "per_config_max_s": max(warm)},
        "fast": stats(fast_ms), "fast_single_gpu": stats(single) if single else None,
        "fast_multi_gpu": stats(multi) if multi else None, "naive": stats(naive_ms),
        "fast_cpu": stats(fast_cpu), "naive_cpu": stats(naive_cpu),
        "configs": configs, "loadavg_end": loadavg(),
    }
    out_path = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    write_json(out_path, result)
    print(f"\n{'':22}{'n':>6}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'max ms':>10}")
    for name, key in (("fast (all)", "fast"), ("fast (1 GPU)", "fast_single_gpu"), ("fast (multi-GPU)", "fast_multi_gpu"),
                      ("naive weights x 4", "naive"), ("fast, CPU time", "fast_cpu"),
                      ("naive, CPU time", "naive_cpu")):
        s = result[key]
        if s:
            print(f"{name:22}{s['n']:>6}{s['p50_ms']:>10.3f}{s['p90_ms']:>10.3f}{s['p99_ms']:>10.3f}"
                  f"{s['mean_ms']:>10.3f}{s['max_ms']:>10.3f}")
    print(f"\nwrote {out_path}")
    if private:
        import shutil

        shutil.rmtree(private, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
