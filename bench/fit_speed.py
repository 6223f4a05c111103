"""Cold-start cost of the fast estimator: one coefficient fit, and a whole recommendation, with the fit protocol of
FIT_VERSION 12 against the one before it, in the same run.

A fit simulates two slices of the architecture (2 and 3 blocks). Before FIT_VERSION 12 each slice was simulated
afresh at every micro-batch it needs (1 and 2; and 4 with gradient checkpointing), two steps each. Since, each slice
is built once: two steps at micro-batch 1, then one step at each larger micro-batch with the optimizer state in
place (`simulate_in_process(later_sizes=...)`). The baseline here is the earlier protocol run by the same code
(`simulate_in_process` once per micro-batch), so the ratio isolates the protocol; the live-bytes counter's own
speed-up (no pytree copy per op) is in both columns.

1. Fits: for each case, both protocols' simulations on a cold start; the phases' bytes must be equal (checked), and
   the wall time of each is printed with the ratio.
1b. Fused loss (`--only-fused` runs just this): a fit with `cross_entropy: fused_linear` simulating every chunk of
   Liger's loop (`losses.SIMULATE_EVERY_CHUNK`, the baseline) and only its first two and last (the default); the
   phases' bytes must be equal.
2. Recommendation: `recommend()` of the 7B-on-a-4090 scenario with an empty cache, once with each protocol
   (separate cache directories), wall time and ratio; the answers must be equal.

Run: `HF_HUB_OFFLINE=1 .venv/bin/python -m bench.fit_speed [--skip-recommend] [--only-fused]`.
Writes bench/results/fit_speed.json (versions, host, load average).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench.accuracy import REPO, environment, loadavg, write_json

DEFAULT_OUT = "bench/results/fit_speed.json"
FUSED_OUT = "bench/results/fit_speed_fused.json"
CASES = [  # (model, method, gradient checkpointing, sequence length)
    ("meta-llama/Llama-2-7b-hf", "lora", False, 1024),
    ("meta-llama/Llama-2-7b-hf", "lora", True, 1024),
    ("meta-llama/Llama-2-7b-hf", "full", False, 1024),
    ("meta-llama/Llama-2-7b-hf", "qlora", True, 1024),
    ("meta-llama/Llama-2-7b-hf", "adalora", True, 1024),
    ("Qwen/Qwen2.5-0.5B", "galore", False, 512),
    ("google-t5/t5-small", "lora", True, 512),
]
SCENARIO = {"model": "meta-llama/Llama-2-7b-hf", "hardware": {"gpu": "RTX 4090"},
            "dataset": {"num_examples": 2000, "avg_tokens": 512, "max_tokens": 1024}, "task": "domain_adaptation"}


def separate_runs(resolved, cfg, seq_len: int, target: str) -> dict:
    """The protocol before FIT_VERSION 12: a fresh simulation per slice and micro-batch."""
    from advisor.estimator.coefficients import slice_depths
    from advisor.estimator.static import sliced_config
    from advisor.memory.simulate import simulate_in_process

    runs = {}
    depths = slice_depths(resolved, cfg)
    for layers in (1, 2):
        sliced = copy.copy(resolved)
        sliced.config = sliced_config(resolved.config, depths[layers - 1])
        for batch in (1, 2, 4) if cfg.training.gradient_checkpointing else (1, 2):
            runs[(layers, batch)] = simulate_in_process(sliced, cfg, batch, seq_len, target=target)["phases"]
    return runs


def one_model_per_slice(resolved, cfg, seq_len: int, target: str) -> dict:
    """FIT_VERSION 12's protocol: what `coefficients._fit` runs."""
    from advisor.estimator.coefficients import _slice_runs

    return _slice_runs(resolved, cfg, seq_len, target)


def _bytes(runs: dict) -> dict:
    return {k: {p: v["breakdown_bytes"] for p, v in phases.items()} for k, phases in runs.items()}


def bench_fits() -> list[dict]:
    from advisor.catalog.models import resolve_model
    from advisor.estimator.coefficients import _simulation_config
    from advisor.methods import get_method

    rows = []
    for model, method, gc, seq in CASES:
        rm = resolve_model(model)
        cfg = _simulation_config(get_method(method).resolve_config(
            {"training": {"gradient_checkpointing": gc, "max_seq_length": seq}}))
        one_model_per_slice(rm, cfg, 64, "cuda")  # imports and first-call caches outside the timings
        t0 = time.perf_counter()
        old = separate_runs(rm, cfg, seq, "cuda")
        t1 = time.perf_counter()
        new = one_model_per_slice(rm, cfg, seq, "cuda")
        t2 = time.perf_counter()
        row = {"model": model, "method": method, "checkpointing": gc, "seq_len": seq,
               "separate_s": round(t1 - t0, 2), "one_model_s": round(t2 - t1, 2),
               "ratio": round((t2 - t1) / (t1 - t0), 3), "equal_bytes": _bytes(old) == _bytes(new)}
        rows.append(row)
        print(f"{model:28s} {method:8s} gc={str(gc):5s} {seq:5d}: separate {row['separate_s']:6.2f} s, one model "
              f"{row['one_model_s']:6.2f} s, ratio {row['ratio']:.2f}, bytes equal: {row['equal_bytes']}", flush=True)
    return rows


FUSED_CASES = [  # (model, method, gradient checkpointing, sequence length): vocabularies 152k on 896, 128k on 4096
    ("Qwen/Qwen2.5-0.5B", "lora", True, 1024),
    ("Qwen/Qwen2.5-0.5B", "full", False, 512),
    ("meta-llama/Llama-3.1-8B", "qlora", True, 2048),
]


def bench_fused_chunks() -> list[dict]:
    import advisor.losses as losses
    from advisor.catalog.models import resolve_model
    from advisor.estimator.coefficients import _simulation_config
    from advisor.methods import get_method

    rows = []
    for model, method, gc, seq in FUSED_CASES:
        rm = resolve_model(model)
        cfg = _simulation_config(get_method(method).resolve_config(
            {"training": {"gradient_checkpointing": gc, "max_seq_length": seq, "cross_entropy": "fused_linear"}}))
        one_model_per_slice(rm, cfg, 64, "cuda")  # imports and first-call caches outside the timings
        runs, seconds = {}, {}
        for every in (True, False):
            losses.SIMULATE_EVERY_CHUNK = every
            t0 = time.perf_counter()
            runs[every] = one_model_per_slice(rm, cfg, seq, "cuda")
            seconds[every] = time.perf_counter() - t0
        losses.SIMULATE_EVERY_CHUNK = False
        row = {"model": model, "method": method, "checkpointing": gc, "seq_len": seq,
               "every_chunk_s": round(seconds[True], 2), "three_chunks_s": round(seconds[False], 2),
               "ratio": round(seconds[False] / seconds[True], 3),
               "equal_bytes": _bytes(runs[True]) == _bytes(runs[False])}
        rows.append(row)
        print(f"fused loss {model:24s} {method:5s} gc={str(gc):5s} {seq:5d}: every chunk "
              f"{row['every_chunk_s']:6.2f} s, three {row['three_chunks_s']:6.2f} s, ratio {row['ratio']:.2f}, "
              f"bytes equal: {row['equal_bytes']}",
              flush=True)
    return rows


def bench_recommend() -> dict:
    import advisor.estimator.coefficients as coefficients
    import advisor.recommend.service as service
    from advisor.recommend import recommend
    from advisor.settings import get_settings

    original = coefficients._fit

    def fit_separately(resolved, cfg, seq_len, key, target="cpu"):
        start = time.perf_counter()
        runs = separate_runs(resolved, cfg, seq_len, target)
        return coefficients._coefficients_from_runs(runs, resolved, cfg, seq_len, key, start)

    out = {}
    answers = {}
    for name, fit in (("separate", fit_separately), ("one_model", original)):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["ADVISOR_CACHE_DIR"] = cache
            get_settings.cache_clear()
            coefficients.clear_memo()
            service._FITTED.clear()
            coefficients._fit = fit
            try:
                t0 = time.perf_counter()
                rec = recommend(SCENARIO)
                out[f"{name}_s"] = round(time.perf_counter() - t0, 1)
            finally:
                coefficients._fit = original
                os.environ.pop("ADVISOR_CACHE_DIR", None)
                get_settings.cache_clear()
            answers[name] = {k: rec[k] for k in ("method", "config", "estimate", "ranking", "rejected")}
            answers[name]["estimate"] = {k: v for k, v in rec["estimate"].items() if k != "elapsed_ms"}
        print(f"recommend (7B, RTX 4090, cold): {name} {out[f'{name}_s']} s", flush=True)
    out["ratio"] = round(out["one_model_s"] / out["separate_s"], 3)
    out["equal_answers"] = answers["separate"] == answers["one_model"]
    print(f"recommend ratio {out['ratio']:.2f}, answers equal: {out['equal_answers']}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-recommend", action="store_true")
    ap.add_argument("--only-fused", action="store_true", help="only the fused loss's chunks (1b)")
    ap.add_argument("--out", default=None, help=f"default {DEFAULT_OUT} ({FUSED_OUT} with --only-fused)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = {"environment": environment(), "loadavg_before": loadavg()}
    if not args.only_fused:
        result["fits"] = bench_fits()
    result["fused_loss"] = bench_fused_chunks()
    if not (args.skip_recommend or args.only_fused):
        result["recommend"] = bench_recommend()
    result["loadavg_after"] = loadavg()
    out = args.out or (FUSED_OUT if args.only_fused else DEFAULT_OUT)
    write_json(REPO / out if not Path(out).is_absolute() else Path(out), result)
    ok = (all(r["equal_bytes"] for r in result.get("fits", []) + result["fused_loss"])
          and result.get("recommend", {}).get("equal_answers", True))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
