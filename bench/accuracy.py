"""Accuracy of the fast estimator against the exact simulation, over catalog models × methods × a grid.

For every case (model, method, micro-batch b, sequence length s, gradient checkpointing gc):

- **exact**: `advisor.estimator.exact.exact_estimate` (fake-tensor simulation of 2 training steps of the real
  model and method, in a subprocess, cached on disk under the data root's cache, `./var/cache` by default);
- **fast**: `advisor.estimator.fast.fast_estimate`. Its first call for a case fits the coefficients (four 2/3-layer
  slice simulations, plus the static terms the first time a (model, method) pair is seen); the benchmark makes
  that first call against an empty, private cache directory, so the first-call time is the cold cost on every
  run (`--warm-fast` reuses the data root's cache instead). The cached-call time is the median of 5 more calls
  in the same process (request validation, plan, closed form, largest-micro-batch search, time and cost);
- **naive baseline**: the rule of thumb "weights × 4" = total parameters × 2 bytes × 4, whatever the method.

Both estimators add the same CUDA overhead (`profiles/calibration/cuda-default.json`: 0.5 GiB + 5 %) since the
hardware is a GPU (H100); the errors are relative to the exact peak including it. The naive rule is compared with
the same exact peak.

    signed error % = (estimate − exact) / exact × 100

Run: `HF_HUB_OFFLINE=1 .venv/bin/python -m bench.accuracy [--quick | --medium | --options | --large] [--jobs N] [--out PATH]`.
Exact simulations run first (`--jobs` at once, default 2), then the fast estimator alone, so its timings are not
disturbed by this benchmark's own subprocesses (they are by anything else the machine runs: the JSON records the
load average). Results are written after every case, so a long run can be polled.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = "bench/results/accuracy.json"
GIB = 2**30

MODELS = [
    ("meta-llama/Llama-3.2-1B", "Llama-3.2-1B"),
    ("Qwen/Qwen2.5-0.5B", "Qwen2.5-0.5B"),
    ("meta-llama/Llama-2-7b-hf", "Llama-2-7B"),
    ("mistralai/Mistral-7B-v0.1", "Mistral-7B"),
    ("google/gemma-2b", "gemma-2b"),
    ("microsoft/phi-2", "phi-2"),
    ("openai-community/gpt2", "gpt2"),
    ("google/flan-t5-base", "flan-t5-base"),
]
LARGE_MODELS = [
    ("meta-llama/Llama-2-13b-hf", "Llama-2-13B"),
    ("meta-llama/Meta-Llama-3-8B", "Llama-3-8B"),
    ("Qwen/Qwen2.5-14B", "Qwen2.5-14B"),
    ("meta-llama/Llama-2-70b-hf", "Llama-2-70B"),
]
METHODS = ("full", "lora", "qlora", "adalora", "ia3", "bitfit", "prompt_tuning", "prefix_tuning", "adapter",
           "longlora", "galore", "molora")
GRID = ((1, 512, False), (4, 1024, True), (2, 2048, False), (8, 256, True))

# --medium (what fits in ~20-30 min of a shared 2-core machine): every method on three small models at two grid
# points (no checkpointing at 512 tokens; checkpointing, batch 4 at 1024), plus Llama-2-7B at the second point
MEDIUM_MODELS = [("Qwen/Qwen2.5-0.5B", "Qwen2.5-0.5B"), ("meta-llama/Llama-3.2-1B", "Llama-3.2-1B"),
                 ("openai-community/gpt2", "gpt2")]
MEDIUM_GRID = ((1, 512, False), (4, 1024, True))
MEDIUM_EXTRA = [(("meta-llama/Llama-2-7b-hf", "Llama-2-7B"), ((4, 1024, True),))]

QUICK_MODELS = [("openai-community/gpt2", "gpt2"), ("Qwen/Qwen2.5-0.5B", "Qwen2.5-0.5B"),
                ("meta-llama/Llama-3.2-1B", "Llama-3.2-1B")]
QUICK_METHODS = ("full", "lora", "qlora", "prompt_tuning")
QUICK_GRID = ((1, 512, False), (4, 1024, True))

# --families: one small model of each architecture family the catalog holds beyond MODELS (the fast model's terms are
# derived per architecture from simulations of the model itself: a family it was never checked on is checked here)
FAMILY_MODELS = [
    ("Qwen/Qwen3-0.6B", "Qwen3-0.6B"),                  # qwen3: per-head q/k norms
    ("Qwen/Qwen2-0.5B", "Qwen2-0.5B"),                  # qwen2: attention biases, tied embeddings
    ("google/gemma-3-1b-pt", "gemma-3-1b"),             # gemma3_text: sliding/global layers, q/k norms, 262k vocab
    ("google/gemma-2-2b", "gemma-2-2b"),                # gemma2: logit soft-capping, pre/post norms
    ("HuggingFaceTB/SmolLM2-135M", "SmolLM2-135M"),     # llama, small and deep
    ("facebook/opt-125m", "opt-125m"),                  # opt: learned positions, ReLU MLP, biases
    ("EleutherAI/pythia-160m", "pythia-160m"),          # gpt_neox: parallel residual, fused qkv
    ("bigscience/bloom-560m", "bloom-560m"),            # bloom: ALiBi, 250k vocab
    ("google-t5/t5-small", "t5-small"),                 # t5: encoder-decoder, tied head
    ("google/mt5-base", "mt5-base"),                    # mt5: gated-gelu, 250k vocab, untied head
    ("allenai/OLMo-2-1124-7B", "OLMo-2-7B"),            # olmo2: post-norms, q/k norms
    ("EleutherAI/gpt-j-6b", "gpt-j-6b"),                # gptj: parallel attention + MLP, partial rotary
]
FAMILY_GRID = ((1, 512, False), (4, 1024, True))

# --options: the training options beside the methods (loss implementation, bitsandbytes and paged optimizers, the
# optimizer step in backward, activation offloading) on the quick models; 3 × 700 rounds the fused loss's chunk up to a power of two
_IN_BACKWARD = {"optimizer_in_backward": True, "gradient_accumulation_steps": 1, "max_grad_norm": 0}
OPTIONS = (
    ("chunked CE", {"cross_entropy": "chunked"}, ("full", "lora", "qlora")),
    ("fused CE", {"cross_entropy": "fused_linear"}, ("full", "lora", "qlora")),
    ("adamw_8bit", {"optim": "adamw_8bit"}, ("full",)),
    ("paged_adamw_8bit", {"optim": "paged_adamw_8bit"}, ("full",)),
    ("in backward", _IN_BACKWARD, ("full", "lora")),
    ("in backward, paged_adamw_32bit", {**_IN_BACKWARD, "optim": "paged_adamw_32bit"}, ("full",)),
    ("galore_adamw_8bit", {"optim": "galore_adamw_8bit"}, ("galore",)),
    ("galore_adamw_8bit in backward", {**_IN_BACKWARD, "optim": "galore_adamw_8bit"}, ("galore",)),
    ("activation offloading", {"activation_offloading": True}, ("full", "lora", "qlora")),
    # LoRA's variants and the 8-bit base: the fourth element is the rest of the config (PEFT knobs, quantization)
    ("DoRA", {}, ("lora", "qlora"), {"peft": {"use_dora": True}}),
    ("modules_to_save embed+head", {}, ("lora", "qlora"), {"peft": {"modules_to_save": ["embed_tokens", "lm_head"]}}),
    ("8-bit base", {}, ("qlora",), {"quantization": {"load_in_8bit": True}}),
    ("GPTQ 4-bit base", {}, ("qlora",), {"quantization": {"quant_method": "gptq", "bits": 4, "group_size": 128}}),
)
OPTIONS_GRID = ((1, 512, False), (4, 1024, True), (3, 700, True))

# --peft-types: method "peft" (any other PEFT type, from its adapter_config.json) with the configs of PEFT's MetaMathQA
# experiments, on the two Llama-style quick models (GPT-2's Conv1D layers are refused by most of these types)
_QV = ["q_proj", "v_proj"]
PEFT_TYPE_CASES = (
    ("LoHa r32", {"peft_type": "LOHA", "r": 32, "alpha": 64, "target_modules": _QV}),
    ("LoKr r32 factor 4", {"peft_type": "LOKR", "r": 32, "alpha": 64, "decompose_factor": 4, "target_modules": _QV}),
    ("VeRA r256", {"peft_type": "VERA", "r": 256}),
    ("OFT r32", {"peft_type": "OFT", "r": 32, "oft_block_size": 0, "target_modules": _QV}),
    ("FourierFT n1000", {"peft_type": "FOURIERFT", "n_frequency": 1000, "scaling": 300, "target_modules": _QV}),
    ("LN tuning", {"peft_type": "LN_TUNING"}),
    ("P-tuning 20", {"peft_type": "P_TUNING", "num_virtual_tokens": 20, "encoder_reparameterization_type": "MLP"}),
    ("MiSS r64", {"peft_type": "MISS", "r": 64}),
)
PEFT_TYPE_MODELS = [("Qwen/Qwen2.5-0.5B", "Qwen2.5-0.5B"), ("meta-llama/Llama-3.2-1B", "Llama-3.2-1B")]


# --------------------------------------------------------------------------- shared helpers (anchors, latency)
def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict[str, Any]:
    """Library versions, host, date and git state (commit, whether advisor/ has uncommitted edits)."""
    import peft
    import torch
    import transformers

    cpu = mem_kib = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    git: dict[str, Any] = {}
    for key, args in (("commit", ["rev-parse", "HEAD"]), ("dirty", ["status", "--porcelain", "--", "advisor", "profiles"])):
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
            git[key] = out if key == "commit" else (out.splitlines() if out else [])
        except (OSError, subprocess.SubprocessError):
            git[key] = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "host": {"cpu_model": cpu, "nproc": nproc, "cpu_count": os.cpu_count(),
                 "mem_total_gib": round(mem_kib / 2**20, 1) if mem_kib else None,
                 "platform": platform.platform(), "machine": platform.machine()},
        "git": git,
        "loadavg_start": loadavg(),
    }


@contextlib.contextmanager
def cache_dir(path: Path | str | None):
    """Point the advisor's cache (ADVISOR_CACHE_DIR) at `path` for the duration (None: leave as is)."""
    from advisor.settings import get_settings

    if path is None:
        yield
        return
    old = os.environ.get("ADVISOR_CACHE_DIR")
    os.environ["ADVISOR_CACHE_DIR"] = str(path)
    get_settings.cache_clear()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ADVISOR_CACHE_DIR", None)
        else:
            os.environ["ADVISOR_CACHE_DIR"] = old
        get_settings.cache_clear()


def request(model: Any, method: str, b: int, s: int, gc: bool, peft: dict | None = None, gpu: str = "h100",
            count: int = 1, training: dict | None = None, quantization: dict | None = None):
    from advisor.schemas import EstimateRequest

    return EstimateRequest.model_validate({
        "model": model, "hardware": {"gpu": gpu, "count": count}, "method": method,
        "config": {"peft": peft or {}, "training": {"per_device_train_batch_size": b, "max_seq_length": s,
                                                     "gradient_checkpointing": gc, **(training or {})},
                   **({"quantization": quantization} if quantization else {})},
    })


def naive_bytes(total_params: int) -> int:
    """The rule of thumb: weights (bf16, 2 bytes/param) × 4."""
    return int(total_params * 2 * 4)


def pct(est: float, ref: float) -> float:
    return (est - ref) / ref * 100.0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


# --------------------------------------------------------------------------- plan
def plan(quick: bool, large: bool, medium: bool = False, options: bool = False, peft_types: bool = False,
         families: bool = False) -> list[dict]:
    if families:
        return [{"model": m, "label": label, "method": meth, "b": b, "s": s, "gc": gc}
                for m, label in FAMILY_MODELS for meth in QUICK_METHODS for (b, s, gc) in FAMILY_GRID]
    if peft_types:
        return [{"model": m, "label": f"{label} [{tag}]", "method": "peft", "b": b, "s": s, "gc": gc, "peft": peft}
                for m, label in PEFT_TYPE_MODELS for tag, peft in PEFT_TYPE_CASES for (b, s, gc) in OPTIONS_GRID]
    if options:
        return [{"model": m, "label": f"{label} [{tag}]", "method": meth, "b": b, "s": s, "gc": gc,
                 "training": training, **(extra[0] if extra else {})}
                for m, label in QUICK_MODELS for tag, training, methods, *extra in OPTIONS for meth in methods
                for (b, s, gc) in OPTIONS_GRID]
    if medium:
        cases = [{"model": m, "label": label, "method": meth, "b": b, "s": s, "gc": gc}
                 for m, label in MEDIUM_MODELS for meth in METHODS for (b, s, gc) in MEDIUM_GRID]
        cases += [{"model": m, "label": label, "method": meth, "b": b, "s": s, "gc": gc}
                  for (m, label), grid in MEDIUM_EXTRA for meth in METHODS for (b, s, gc) in grid]
        return cases
    models = QUICK_MODELS if quick else MODELS + (LARGE_MODELS if large else [])
    methods = QUICK_METHODS if quick else METHODS
    grid = QUICK_GRID if quick else GRID
    return [{"model": m, "label": label, "method": meth, "b": b, "s": s, "gc": gc}
            for m, label in models for meth in methods for (b, s, gc) in grid]


def only_large(cases: list[dict]) -> list[dict]:
    names = {m for m, _ in LARGE_MODELS}
    return [c for c in cases if c["model"] in names]


def prepare_case(case: dict) -> tuple[Any, dict | None, str | None]:
    """(request, peft used, skip reason). BitFit tries the model's own biases, then PEFT-added ones."""
    from advisor.errors import AdvisorInputError
    from advisor.estimator.plan import build_plan
    from advisor.estimator.static import static_terms

    if case["method"] == "prefix_tuning" and case["gc"]:
        return None, None, "prefix_tuning does not support gradient checkpointing"
    options = [{"bias_source": "existing"}, {"bias_source": "add"}] if case["method"] == "bitfit" else [{}]
    last = None
    for peft in options:
        peft = {**peft, **case.get("peft", {})}
        req = request(case["model"], case["method"], case["b"], case["s"], case["gc"], peft,
                      training=case.get("training"), quantization=case.get("quantization"))
        try:
            p = build_plan(req)
            # a method that does not apply to this architecture (no bias terms, no known target modules) fails
            # only when it is applied: apply it on the meta device (the static terms do that, cheaply)
            static_terms(p.model, p.config)
            return req, peft, None
        except AdvisorInputError as err:
            last = f"{err.field}: {err}" if hasattr(err, "field") else str(err)
        except Exception as err:  # noqa: BLE001 - reported as a skip with its reason
            last = f"{type(err).__name__}: {err}"
    return None, None, last


# --------------------------------------------------------------------------- run
def run_exact(req) -> dict:
    from advisor.estimator.exact import exact_estimate

    t0 = time.perf_counter()
    try:
        est = exact_estimate(req, allocator="fitted")  # the fast estimator's overhead: compares the closed form
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {err}", "wall_s": time.perf_counter() - t0}
    return {"est": est, "wall_s": time.perf_counter() - t0}


def run_fast(req, repeats: int = 5) -> dict:
    from advisor.estimator.fast import fast_estimate

    t0 = time.perf_counter()
    try:
        est = fast_estimate(req)
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {err}", "first_s": time.perf_counter() - t0}
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fast_estimate(req)
        times.append(time.perf_counter() - t)
    return {"est": est, "first_s": first, "cached_ms": statistics.median(times) * 1000}


def record(case: dict, peft: dict | None, exact: dict, fast: dict) -> dict:
    row = {k: case[k] for k in ("model", "label", "method", "b", "s", "gc")}
    row["peft"] = peft
    if "error" in exact or "error" in fast:
        row["error"] = exact.get("error") or fast.get("error")
        row["error_in"] = "exact" if "error" in exact else "fast"
        return row
    e, f = exact["est"], fast["est"]
    naive = naive_bytes(e["total_params"])
    row.update({
        "exact_gib": e["peak_bytes"] / GIB,
        "fast_gib": f["peak_bytes"] / GIB,
        "naive_gib": naive / GIB,
        "error_pct": pct(f["peak_bytes"], e["peak_bytes"]),
        "naive_error_pct": pct(naive, e["peak_bytes"]),
        "fast_phase": f.get("peak_phase"),
        "exact_phase": e.get("peak_phase"),
        "fast_breakdown_gib": f.get("breakdown_gib"),
        "exact_breakdown_gib": e.get("breakdown_gib"),
        "total_params": e["total_params"],
        "trainable_params": e["trainable_params"],
        "fast_first_s": fast["first_s"],
        "fast_cached_ms": fast["cached_ms"],
        "exact_wall_s": exact["wall_s"],
        "exact_sim_s": e.get("simulation_seconds"),
        "exact_cached": e.get("provenance", {}).get("cached"),
        "fast_peak_bytes": f["peak_bytes"],
        "exact_peak_bytes": e["peak_bytes"],
    })
    return row


# --------------------------------------------------------------------------- summary
def summarize(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error_pct" in r]
    by_method: dict[str, dict] = {}
    for meth in dict.fromkeys(r["method"] for r in ok):
        rs = [r for r in ok if r["method"] == meth]
        by_method[meth] = _stats(rs)
    out = {"by_method": by_method, "overall": _stats(ok)}
    worst = sorted(ok, key=lambda r: -abs(r["error_pct"]))[:15]
    out["worst"] = [_worst_detail(r) for r in worst]
    timing = [r for r in ok]
    if timing:
        out["timing"] = {
            "fast_first_s_median": statistics.median(r["fast_first_s"] for r in timing),
            "fast_first_s_max": max(r["fast_first_s"] for r in timing),
            "fast_cached_ms_median": statistics.median(r["fast_cached_ms"] for r in timing),
            "fast_cached_ms_max": max(r["fast_cached_ms"] for r in timing),
            "exact_sim_s_median": statistics.median(r["exact_sim_s"] or 0 for r in timing),
            "exact_sim_s_max": max(r["exact_sim_s"] or 0 for r in timing),
        }
    out["errors"] = [{k: r[k] for k in ("label", "method", "b", "s", "gc", "error_in", "error")}
                     for r in rows if "error" in r]
    return out


def _stats(rs: list[dict]) -> dict:
    if not rs:
        return {"n": 0}
    errs = [abs(r["error_pct"]) for r in rs]
    naive = [abs(r["naive_error_pct"]) for r in rs]
    w = max(rs, key=lambda r: abs(r["error_pct"]))
    wn = max(rs, key=lambda r: abs(r["naive_error_pct"]))
    return {
        "n": len(rs),
        "median_abs_pct": statistics.median(errs),
        "p95_abs_pct": percentile(errs, 0.95),
        "worst_pct": w["error_pct"],
        "worst_case": f"{w['label']} b{w['b']} s{w['s']} gc={'T' if w['gc'] else 'F'}",
        "within_2pct": sum(e <= 2 for e in errs),
        "within_5pct": sum(e <= 5 for e in errs),
        "naive_median_abs_pct": statistics.median(naive),
        "naive_p95_abs_pct": percentile(naive, 0.95),
        "naive_worst_pct": wn["naive_error_pct"],
    }


def _worst_detail(r: dict) -> dict:
    fb, eb = r.get("fast_breakdown_gib") or {}, r.get("exact_breakdown_gib") or {}
    diff = {k: round(fb.get(k, 0) - eb.get(k, 0), 3) for k in dict.fromkeys([*fb, *eb])
            if abs(fb.get(k, 0) - eb.get(k, 0)) >= 0.001}
    return {
        "case": f"{r['label']} {r['method']} b{r['b']} s{r['s']} gc={'T' if r['gc'] else 'F'}",
        "fast_gib": round(r["fast_gib"], 3), "exact_gib": round(r["exact_gib"], 3),
        "error_pct": round(r["error_pct"], 2), "fast_phase": r["fast_phase"], "exact_phase": r["exact_phase"],
        "fast_minus_exact_gib": diff,
    }


def _f(v, fmt: str) -> str:
    return "—" if v is None else fmt.format(v)


def format_summary(summary: dict, markdown: bool = False) -> str:
    head = ["method", "n", "median |err| %", "p95 |err| %", "worst err %", "≤2%", "≤5%",
            "naive median |err| %", "naive worst err %"]
    lines = []
    entries = list(summary["by_method"].items()) + [("OVERALL", summary["overall"])]
    for name, st in entries:
        if not st.get("n"):
            continue
        lines.append([name, str(st["n"]), _f(st["median_abs_pct"], "{:.2f}"), _f(st["p95_abs_pct"], "{:.2f}"),
                      _f(st["worst_pct"], "{:+.2f}"), f"{st['within_2pct']}/{st['n']}", f"{st['within_5pct']}/{st['n']}",
                      _f(st["naive_median_abs_pct"], "{:.1f}"), _f(st["naive_worst_pct"], "{:+.1f}")])
    return _table(head, lines, markdown)


def format_worst(summary: dict, markdown: bool = False, n: int = 10) -> str:
    head = ["case", "fast GiB", "exact GiB", "err %", "fast phase", "exact phase", "fast − exact by category (GiB)"]
    lines = []
    for w in summary["worst"][:n]:
        diff = ", ".join(f"{k} {v:+.2f}" for k, v in w["fast_minus_exact_gib"].items())
        lines.append([w["case"], f"{w['fast_gib']:.2f}", f"{w['exact_gib']:.2f}", f"{w['error_pct']:+.2f}",
                      str(w["fast_phase"]), str(w["exact_phase"]), diff])
    return _table(head, lines, markdown)


def _table(head: list[str], lines: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 models × 4 methods × 2 grid points")
    ap.add_argument("--medium", action="store_true",
                    help="every method: 3 small models × 2 grid points + Llama-2-7B × 1 point (~20-30 min here)")
    ap.add_argument("--options", action="store_true",
                    help="the training options (chunked/fused CE, 8-bit and paged optimizers, the step in backward, "
                         "activation offloading, DoRA, modules_to_save, an 8-bit base) on the quick models")
    ap.add_argument("--peft-types", action="store_true",
                    help="method 'peft' (LoHa, LoKr, VeRA, OFT, FourierFT, LN tuning, P-tuning, MiSS) on two models; "
                         "writes bench/results/accuracy_peft.json unless --out")
    ap.add_argument("--families", action="store_true",
                    help="one small model of each further architecture family (Qwen3, Gemma 2/3, OPT, GPT-NeoX, BLOOM, "
                         "T5/mT5, OLMo 2, GPT-J, ...) × full/LoRA/QLoRA/prompt tuning × 2 points; writes "
                         "bench/results/accuracy_families.json unless --out")
    ap.add_argument("--large", action="store_true", help="add Llama-2-13B, Llama-3-8B, Qwen2.5-14B, Llama-2-70B")
    ap.add_argument("--large-only", action="store_true", help="only the --large models (to extend an earlier run)")
    ap.add_argument("--merge", default=None, help="merge the rows of this earlier result JSON (same schema)")
    ap.add_argument("--only", default=None, help="only the cases whose label contains this text (e.g. an --options "
                                                 "tag; with --merge, to add cases to an earlier result)")
    ap.add_argument("--jobs", type=int, default=2, help="exact simulations run at once (default 2)")
    ap.add_argument("--warm-fast", action="store_true", help="fast estimator reuses the data root's cache")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from advisor.settings import get_settings

    if args.peft_types and args.out == DEFAULT_OUT:
        args.out = "bench/results/accuracy_peft.json"
    if args.families and args.out == DEFAULT_OUT:
        args.out = "bench/results/accuracy_families.json"
    out_path = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    cases = plan(args.quick, args.large or args.large_only, medium=args.medium, options=args.options,
                 peft_types=args.peft_types, families=args.families)
    if args.large_only:
        cases = only_large(cases)
    if args.only:
        cases = [c for c in cases if args.only in c["label"]]
    env = environment()
    exact_cache = get_settings().cache_dir
    meta = {"benchmark": "accuracy", **env, "exact_cache": str(exact_cache), "jobs": args.jobs,
            "fast_cache": "data root (warm)" if args.warm_fast else "private empty dir (cold first call)",
            "grid": [list(g) for g in (FAMILY_GRID if args.families else OPTIONS_GRID if args.options or args.peft_types
                                       else QUICK_GRID if args.quick
                                       else MEDIUM_GRID if args.medium else GRID)],
            "selection": "families" if args.families else "peft_types" if args.peft_types else "options" if args.options else "quick" if args.quick else "medium" if args.medium else "full",
            "hardware": "h100 (CUDA profile overhead on both sides)", "naive_rule": "total_params × 2 bytes × 4"}
    t_start = time.perf_counter()

    # 1. requests (skips: method not applicable / invalid point), in this process
    prepared = []
    skipped = []
    with tempfile.TemporaryDirectory(prefix="advisor-bench-probe-") as probe_dir, cache_dir(probe_dir):
        for case in cases:
            req, peft, reason = prepare_case(case)
            if req is None:
                skipped.append({**{k: case[k] for k in ("label", "method", "b", "s", "gc")}, "reason": reason})
            else:
                prepared.append((case, req, peft))
    print(f"{len(prepared)} cases, {len(skipped)} skipped; exact simulations ({args.jobs} at once, cache "
          f"{exact_cache}) ...", flush=True)

    # 2. exact, in parallel subprocesses (cached)
    exact_results: dict[int, dict] = {}
    t_exact = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_exact, req): i for i, (_, req, _) in enumerate(prepared)}
        for n, fut in enumerate(cf.as_completed(futures), 1):
            i = futures[fut]
            exact_results[i] = fut.result()
            case = prepared[i][0]
            res = exact_results[i]
            status = res.get("error", "")[:120] or f"{res['est']['peak_vram_gib']:.3f} GiB"
            print(f"  exact [{n}/{len(prepared)}] {case['label']} {case['method']} b{case['b']} s{case['s']} "
                  f"gc={case['gc']}: {status} ({res['wall_s']:.1f} s)", flush=True)
    exact_total = time.perf_counter() - t_exact

    # 3. fast, alone, against a cold private cache (unless --warm-fast)
    rows = []
    previous = []
    if args.merge:
        earlier = json.loads(Path(args.merge).read_text())
        previous = earlier.get("rows", [])
        labels = {(x["label"], x["method"], x["b"], x["s"], x["gc"]) for x in skipped}
        skipped += [x for x in earlier.get("skipped", []) if (x["label"], x["method"], x["b"], x["s"], x["gc"])
                    not in labels]
    t_fast = time.perf_counter()
    fast_dir = None if args.warm_fast else tempfile.mkdtemp(prefix="advisor-bench-fast-")
    with cache_dir(fast_dir):
        for n, (i, (case, req, peft)) in enumerate(enumerate(prepared), 1):
            fast = run_fast(req)
            row = record(case, peft, exact_results[i], fast)
            rows.append(row)
            if "error" in row:
                print(f"  fast [{n}/{len(prepared)}] {case['label']} {case['method']}: ERROR {row['error'][:160]}",
                      flush=True)
            else:
                print(f"  fast [{n}/{len(prepared)}] {case['label']} {case['method']} b{case['b']} s{case['s']} "
                      f"gc={case['gc']}: fast {row['fast_gib']:.3f} exact {row['exact_gib']:.3f} "
                      f"err {row['error_pct']:+.2f}% ({row['fast_first_s']:.2f} s first, "
                      f"{row['fast_cached_ms']:.2f} ms cached)", flush=True)
            all_rows = _merge(previous, rows)
            write_json(out_path, {**meta, "rows": all_rows, "skipped": skipped, "partial": True,
                                  "summary": summarize(all_rows)})
    fast_total = time.perf_counter() - t_fast
    if fast_dir:
        import shutil

        shutil.rmtree(fast_dir, ignore_errors=True)

    all_rows = _merge(previous, rows)
    summary = summarize(all_rows)
    meta.update({"seconds_total": time.perf_counter() - t_start, "seconds_exact_phase": exact_total,
                 "seconds_fast_phase": fast_total, "loadavg_end": loadavg()})
    write_json(out_path, {**meta, "rows": all_rows, "skipped": skipped, "partial": False, "summary": summary})
    print()
    print(format_summary(summary, args.markdown))
    print()
    print("Worst cases:")
    print(format_worst(summary, args.markdown))
    if summary.get("timing"):
        t = summary["timing"]
        print(f"\nfast first call median {t['fast_first_s_median']:.2f} s (max {t['fast_first_s_max']:.2f}); "
              f"cached median {t['fast_cached_ms_median']:.2f} ms (max {t['fast_cached_ms_max']:.2f}); "
              f"exact simulation median {t['exact_sim_s_median']:.1f} s (max {t['exact_sim_s_max']:.1f})")
    if summary["errors"]:
        print(f"\n{len(summary['errors'])} cases failed:")
        for e in summary["errors"]:
            print(f"  {e['label']} {e['method']} b{e['b']} s{e['s']} gc={e['gc']} ({e['error_in']}): {e['error'][:200]}")
    print(f"\n{len(skipped)} skipped (not applicable); wrote {out_path} in {meta['seconds_total']:.0f} s")
    return 0


def _merge(previous: list[dict], rows: list[dict]) -> list[dict]:
    key = lambda r: (r["label"], r["model"], r["method"], r["b"], r["s"], r["gc"])  # noqa: E731
    new = {key(r) for r in rows}
    return [r for r in previous if key(r) not in new] + rows


if __name__ == "__main__":
    sys.exit(main())
