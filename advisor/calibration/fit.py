"""Fit a device's estimator terms from probe rows (pandas / numpy least squares).

Memory.  measured ≈ (1 + allocator_fraction) · predicted_tensor_bytes + context_bytes
+ svd_workspace_factor · svd_matrix_bytes, where `measured` is the counter's peak on CPU (exact: expect 0 / 0) and
max_memory_reserved + context on CUDA, and svd_matrix_bytes is a GaLore probe's largest decomposed matrix (fp32; the
CUDA solver's workspace and copies are invisible to tensor accounting, see advisor.estimator.static). Least squares
on relative residuals (each probe weighs the same whatever its size), with every term constrained to be ≥ 0: an
overhead is memory the tensor accounting does not see, it cannot be negative; an estimator that over-predicts
shows up in the band instead of being hidden in a negative overhead.

Time.  step_seconds ≈ flops_per_step / rate + t0, per method, least squares on relative residuals; rate is the
method's achieved FLOP/s (what the estimator divides by) and t0 the per-step fixed cost (Python, kernel launches,
optimizer bookkeeping) that tiny probes have and large models amortise. A negative intercept refits through the
origin; fewer than two distinct sizes or a non-positive slope falls back to the median of flops/seconds.

Band.  From the held-out probes' relative memory errors e = measured / predicted − 1 (predicted with the fitted
overhead): low = min(0, p05), high = max(0, p95), so `[peak·(1+low), peak·(1+high)]` covers 90% of held-out probes;
the same per method (`band_by_method`) for methods with at least MIN_BAND_PROBES held-out probes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


MEMORY_COLUMNS = ("measured_device_bytes", "predicted_tensor_bytes")
MIN_BAND_PROBES = 5  # held-out probes a method needs for a band of its own
TIME_COLUMNS = ("step_seconds", "flops_per_step")


def ok_rows(df: pd.DataFrame, need: tuple[str, ...] = MEMORY_COLUMNS + TIME_COLUMNS) -> pd.DataFrame:
    if df.empty:
        return df
    mask = df["error"].isna() if "error" in df else pd.Series(True, index=df.index)
    for col in need:
        if col not in df:
            return df.iloc[0:0]
        mask &= df[col].notna()
    return df[mask]


def has_memory(df: pd.DataFrame) -> pd.Series:
    """Rows with a memory measurement (a training job on CPU has none comparable to the tensor bytes: the
    process's RSS includes the Python runtime; such a row still informs the time fit)."""
    if df.empty or "measured_device_bytes" not in df:
        return pd.Series(False, index=df.index)
    return df["measured_device_bytes"].notna()


# --------------------------------------------------------------------------- memory
def fit_memory(train: pd.DataFrame) -> dict[str, Any]:
    """(allocator_fraction, context_bytes, svd_workspace_factor) ≥ 0 minimising Σ((y − (1+a)x − c − f·s)/y)², with s
    the GaLore probes' largest decomposed matrix (fp32 bytes; 0 for every other method, and then f is not fitted).

    Non-negative least squares by active sets: every subset of the terms is solved unconstrained, the feasible
    solution (all terms ≥ 0) with the smallest residual wins -- exact for three terms."""
    import itertools

    x = train["predicted_tensor_bytes"].to_numpy(float)
    y = train["measured_device_bytes"].to_numpy(float)
    svd = (train["svd_matrix_bytes"].fillna(0).to_numpy(float) if "svd_matrix_bytes" in train
           else np.zeros_like(x))
    if len(x) == 0:
        return {"allocator_fraction": 0.0, "context_bytes": 0, "svd_workspace_factor": 0.0, "n": 0,
                "how": "no probe succeeded: 0 / 0"}
    w = 1.0 / y
    z = (y - x) * w  # overhead, relative to the measurement
    names = ["allocator_fraction", "context_bytes"] + (["svd_workspace_factor"] if svd.any() else [])
    columns = {"allocator_fraction": x * w, "context_bytes": w, "svd_workspace_factor": svd * w}

    def solve(subset):
        if not subset:
            return {}, float(np.sum(z ** 2))
        a = np.column_stack([columns[n] for n in subset])
        coef, *_ = np.linalg.lstsq(a, z, rcond=None)
        return dict(zip(subset, map(float, coef))), float(np.sum((z - a @ coef) ** 2))

    best, best_sse, best_subset = {}, float(np.sum(z ** 2)), ()
    for k in range(1, len(names) + 1):
        for subset in itertools.combinations(names, k):
            if len(x) < len(subset) + 1:
                continue
            coef, sse = solve(subset)
            if all(v >= 0 for v in coef.values()) and sse < best_sse - 1e-15:
                best, best_sse, best_subset = coef, sse, subset
    if not best_subset:
        how = "least squares constrained to ≥ 0 is minimised at 0 (no overhead beyond the tensor bytes)"
    elif len(best_subset) == len(names):
        how = "least squares"
    else:
        held = [n for n in names if n not in best_subset]
        how = f"least squares with {', '.join(held)} held at 0 (constrained ≥ 0)"
    unconstrained = None
    if len(x) > len(names) and np.ptp(x) > 0:
        coef, _ = solve(tuple(names))
        unconstrained = coef
    return {"allocator_fraction": round(best.get("allocator_fraction", 0.0), 6),
            "context_bytes": int(round(best.get("context_bytes", 0.0))),
            "svd_workspace_factor": round(best.get("svd_workspace_factor", 0.0), 4),
            "n": int(len(x)), "how": how, "unconstrained": unconstrained}


def predict_memory(df: pd.DataFrame, mem: dict) -> pd.Series:
    svd = df["svd_matrix_bytes"].fillna(0) if "svd_matrix_bytes" in df else 0.0
    return ((1 + mem["allocator_fraction"]) * df["predicted_tensor_bytes"] + mem["context_bytes"]
            + mem.get("svd_workspace_factor", 0.0) * svd)


# --------------------------------------------------------------------------- time
def fit_time_one(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """step_seconds ≈ x / rate + t0 for one method (x = FLOPs per step)."""
    n = len(x)
    if n == 0:
        return {"rate": None, "t0": 0.0, "n": 0, "how": "no successful training probe"}
    w = 1.0 / y
    if n >= 2 and np.ptp(x) > 0:
        (m, t0), *_ = np.linalg.lstsq(np.column_stack([x * w, w]), y * w, rcond=None)
        if m > 0 and t0 >= 0:
            return {"rate": float(1 / m), "t0": float(t0), "n": n, "how": "least squares: slope and intercept"}
        m0 = float(np.sum(x * w * w * y) / np.sum((x * w) ** 2))  # through the origin: min Σ((y − m x)/y)²
        if m0 > 0 and m > 0:
            return {"rate": 1 / m0, "t0": 0.0, "n": n, "how": "least squares through the origin (intercept < 0)"}
        reason = "non-positive slope (step time did not grow with FLOPs: noise dominates)"
    else:
        reason = "one probe size only" if n < 2 else "all probes have the same FLOPs"
    rate = float(np.median(x / y))
    return {"rate": rate, "t0": 0.0, "n": n, "how": f"median of FLOPs/step ÷ step seconds ({reason})"}


def fit_time(train: pd.DataFrame) -> dict[str, dict]:
    out = {}
    for method, g in train.groupby("method", sort=False):
        out[method] = fit_time_one(g["flops_per_step"].to_numpy(float), g["step_seconds"].to_numpy(float))
    return out


def predict_time(df: pd.DataFrame, times: dict[str, dict]) -> pd.Series:
    def one(r):
        t = times.get(r["method"]) or {}
        if not t.get("rate"):
            return math.nan
        return r["flops_per_step"] / t["rate"] + t.get("t0", 0.0)

    return df.apply(one, axis=1) if len(df) else pd.Series(dtype=float)


# --------------------------------------------------------------------------- evaluation
def evaluate(df: pd.DataFrame, mem: dict, times: dict[str, dict]) -> pd.DataFrame:
    """Predicted vs measured for every successful probe (with the fitted terms)."""
    out = df.copy()
    if out.empty:
        return out
    out["predicted_device_bytes"] = predict_memory(out, mem).round().astype("int64")
    out["memory_error"] = out["measured_device_bytes"] / out["predicted_device_bytes"] - 1
    out["predicted_step_seconds"] = predict_time(out, times)
    out["time_error"] = out["step_seconds"] / out["predicted_step_seconds"] - 1
    return out


def band(errors: pd.Series, source_set: str) -> dict[str, Any]:
    e = errors.dropna().to_numpy(float)
    if len(e) == 0:
        return {"low": -0.02, "high": 0.02, "source": "no probe to measure errors on: default ±2%"}
    p05, p95 = np.percentile(e, [5, 95])
    low, high = min(0.0, float(p05)), max(0.0, float(p95))
    return {"low": round(low, 5), "high": round(high, 5),
            "source": (f"{source_set}: relative memory errors (measured/predicted − 1) of {len(e)} probes, "
                       f"low = min(0, p05 = {p05:+.4%}), high = max(0, p95 = {p95:+.4%}); "
                       f"worst {e.min():+.4%} / {e.max():+.4%}")}


def summarise(ev: pd.DataFrame) -> dict[str, Any]:
    if ev.empty:
        return {"n": 0}
    me, te = ev["memory_error"].abs(), ev["time_error"].abs()
    per_method = {}
    for method, g in ev.groupby("method", sort=False):
        per_method[method] = {"n": int(len(g)),
                              "memory_abs_error_median": _r(g["memory_error"].abs().median()),
                              "memory_abs_error_max": _r(g["memory_error"].abs().max()),
                              "time_abs_error_median": _r(g["time_error"].abs().median()),
                              "time_abs_error_max": _r(g["time_error"].abs().max())}
    return {
        "n": int(len(ev)),
        "memory_abs_error_median": _r(me.median()),
        "memory_abs_error_p95": _r(me.quantile(0.95)),
        "memory_abs_error_max": _r(me.max()),
        "memory_error_min": _r(ev["memory_error"].min()),
        "memory_error_max": _r(ev["memory_error"].max()),
        "time_abs_error_median": _r(te.median()),
        "time_abs_error_p90": _r(te.quantile(0.9)),
        "time_abs_error_max": _r(te.max()),
        "per_method": per_method,
    }


def _r(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)


def fit_all(rows: list[dict]) -> dict[str, Any]:
    """Fit on the training split, evaluate on the held-out split; everything the profile and the table need."""
    df = pd.DataFrame(rows)
    good = ok_rows(df, ("predicted_tensor_bytes",) + TIME_COLUMNS)  # probes have all four; a job may lack memory
    train = good[~good["heldout"].astype(bool)] if not good.empty else good
    held = good[good["heldout"].astype(bool)] if not good.empty else good
    mem = fit_memory(train[has_memory(train)])
    times = fit_time(train) if not train.empty else {}
    ev_train, ev_held = evaluate(train, mem, times), evaluate(held, mem, times)
    by_method = {}
    if not ev_held.empty:
        b = band(ev_held["memory_error"], "held-out probes")
        # a method's own band when it has enough held-out probes: GaLore's SVD workspace fragments the allocator
        # (+15% on the H100's held-out architecture) where LoRA stays within 3%; one device band would widen every
        # method's or hide GaLore's
        for method, g in ev_held.groupby("method", sort=False):
            if g["memory_error"].notna().sum() >= MIN_BAND_PROBES:
                by_method[method] = band(g["memory_error"], f"held-out probes of {method}")
    else:
        b = band(ev_train["memory_error"] if not ev_train.empty else pd.Series(dtype=float),
                 "training probes (no held-out probe succeeded: in-sample errors)")
    return {"memory": mem, "time": times, "band": b, "band_by_method": by_method, "train": ev_train, "heldout": ev_held,
            "summary": {"train": summarise(ev_train), "heldout": summarise(ev_held),
                        "failed": int(len(df) - len(good))}}


# --------------------------------------------------------------------------- allocator replay (CUDA)
# Methods whose CUDA kernels allocate memory the counter cannot see, so a replay of the tensor trace misses it:
# BitFit's and IA³'s vector gradients are CUDA reductions with global staging buffers (allocated exceeds the
# counter by 20-100 MB on the H100 probes, growing with tokens), GaLore's SVD runs in cuSOLVER with its own
# workspace (~3.6x the decomposed matrix). Their estimates keep the fitted overhead.
REPLAY_EXCLUDED = ("bitfit", "ia3", "galore")
WORKSPACE_BLOCK = 32 * 1024 * 1024  # cuBLAS / cuBLASLt workspace on Hopper (torch's default size), one each


def replay_inputs(df: pd.DataFrame) -> dict[str, Any] | None:
    """What a replay needs from the device, measured on its probes (None without CUDA probes):

    - `workspace_bytes`: blocks the libraries allocate through the caching allocator and hold: allocated minus the
      counter's peak, median over probes of methods without hidden allocations, in 32 MiB blocks (cuBLAS and
      cuBLASLt keep one each on an H100: 66 MiB measured, of which 2 MiB are the 512-byte rounding of tensors);
    - `context_bytes`: the device memory outside the allocator in a process that ran one configuration (the
      smallest seen: the probing process loads more kernels and libraries as it goes, up to +12%; the Llama-2-7B
      runs of bench/gpu_realsize.py, one configuration per process, measured the same 766.8 MiB on the H100)."""
    need = ("cuda_max_allocated_bytes", "cuda_context_bytes", "measured_peak_bytes", "method")
    if df.empty or any(c not in df for c in need):
        return None
    ok = df[(~df["method"].isin(REPLAY_EXCLUDED)) & df["cuda_max_allocated_bytes"].notna()
            & (df["error"].isna() if "error" in df else True)]
    if ok.empty:
        return None
    extra = float((ok["cuda_max_allocated_bytes"] - ok["measured_peak_bytes"]).median())
    blocks = max(0, round(extra / WORKSPACE_BLOCK))
    return {"workspace_bytes": [WORKSPACE_BLOCK] * blocks, "context_bytes": int(ok["cuda_context_bytes"].min()),
            "allocated_over_counter_median_bytes": int(extra), "n": int(len(ok))}


def replay_evaluation(df: pd.DataFrame) -> dict[str, Any] | None:
    """Errors of the replayed reserve against max_memory_reserved (e = measured / replayed − 1) on the probes of
    methods without hidden allocations: summary for the training and held-out splits, and the band of exact
    estimates (from the held-out probes, as for the fast estimator's)."""
    if df.empty or "replay_reserved_bytes" not in df or "cuda_max_reserved_bytes" not in df:
        return None
    ok = df[df["replay_reserved_bytes"].notna() & df["cuda_max_reserved_bytes"].notna()
            & ~df["method"].isin(REPLAY_EXCLUDED)]
    if ok.empty:
        return None
    err = ok["cuda_max_reserved_bytes"] / ok["replay_reserved_bytes"] - 1
    out: dict[str, Any] = {"excluded_methods": list(REPLAY_EXCLUDED)}
    for name, mask in (("train", ~ok["heldout"].astype(bool)), ("heldout", ok["heldout"].astype(bool))):
        e = err[mask]
        if e.empty:
            continue
        out[name] = {"n": int(len(e)), "reserved_abs_error_median": _r(e.abs().median()),
                     "reserved_abs_error_p95": _r(e.abs().quantile(0.95)), "reserved_error_min": _r(e.min()),
                     "reserved_error_max": _r(e.max()), "under_by_more_than_5pct": int((e > 0.05).sum()),
                     "per_method": {m: {"n": int(len(g)), "reserved_abs_error_median": _r(g.abs().median()),
                                        "reserved_error_min": _r(g.min()), "reserved_error_max": _r(g.max())}
                                    for m, g in e.groupby(ok.loc[e.index, "method"], sort=False)}}
    held = err[ok["heldout"].astype(bool)]
    out["band"] = band(held if len(held) else err, "held-out probes (allocator replay)" if len(held)
                       else "training probes (allocator replay; no held-out probe)")
    return out


# --------------------------------------------------------------------------- launch floor (CUDA)
def arch_blocks(spec: dict) -> int | None:
    """Transformer blocks of a probe grid architecture (an encoder-decoder's two stacks together)."""
    if spec.get("family") == "t5" or "num_decoder_layers" in spec:
        enc = spec.get("num_layers")
        return None if enc is None else int(enc) + int(spec.get("num_decoder_layers", enc))
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if spec.get(key):
            return int(spec[key])
    return None


def fit_launch_floor(rows: list[dict], archs: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Seconds per block below which a training step cannot go on this device: per method and checkpointing, the
    median over the training probes of step seconds ÷ (blocks + 1), the +1 for the embedding, head, loss and
    optimizer step. Eager PyTorch launches every kernel from Python, one block after another; a small step waits
    for those launches, not for the GPU (the H100 grid's 4-block probes took 13-70 ms whatever their FLOPs)."""
    per: dict[tuple[str, bool], list[float]] = {}
    for r in rows:
        blocks = arch_blocks(archs.get(r.get("arch"), {})) if r.get("arch") in archs else None
        if r.get("error") or r.get("heldout") or not r.get("step_seconds") or not blocks:
            continue
        per.setdefault((r["method"], bool(r["gc"])), []).append(float(r["step_seconds"]) / (blocks + 1))
    out: dict[str, dict[str, float]] = {}
    for (method, gc), values in per.items():
        out.setdefault(method, {})["gc" if gc else "no_gc"] = round(float(np.median(values)), 6)
    return out


def launch_floor_evaluation(rows: list[dict], archs: dict[str, dict], floor: dict, peak_tflops: float,
                            mfu: dict[str, float], default_mfu: float) -> dict[str, Any]:
    """The estimator's step time on the held-out probes: FLOPs ÷ (peak × MFU), alone and floored."""
    from advisor.estimator.profile import floor_seconds

    flops_only, floored = [], []
    for r in rows:
        blocks = arch_blocks(archs.get(r.get("arch"), {})) if r.get("arch") in archs else None
        if r.get("error") or not r.get("heldout") or not r.get("step_seconds") or not r.get("flops_per_step"):
            continue
        compute = float(r["flops_per_step"]) / (peak_tflops * 1e12 * float(mfu.get(r["method"], default_mfu)))
        lowest = floor_seconds(floor, r["method"], bool(r["gc"]), blocks or 0)
        flops_only.append(float(r["step_seconds"]) / compute - 1)
        floored.append(float(r["step_seconds"]) / max(compute, lowest or 0.0) - 1)

    def stats(errors: list[float]) -> dict[str, float | None]:
        if not errors:
            return {"median_abs": None, "p90_abs": None, "median": None}
        a = np.abs(errors)
        return {"median_abs": _r(np.median(a)), "p90_abs": _r(np.percentile(a, 90)), "median": _r(np.median(errors))}

    return {"n": len(floored), "error": "measured / predicted − 1", "flops_only": stats(flops_only),
            "with_floor": stats(floored)}
