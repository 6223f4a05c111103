"""`advisor calibrate --from-jobs`: refit this device's profile with what finished training jobs measured.

Every succeeded job in the jobs database (advisor/jobs) recorded its measured throughput and peak memory next to
the estimate. Each becomes one row of the fit (arch ``job:<id>``), beside the profile's own probe rows:

    time     step_seconds = tokens_per_step / measured tokens/s, flops_per_step = FLOPs/token × tokens_per_step
             (a "step" here is one micro-batch of micro_batch × max_seq_length tokens; the fit relates seconds to
             FLOPs, so the choice only matters for the per-step constant t0)
    memory   on CUDA, max_memory_reserved + CUDA context when the trainer recorded them (the probes' target); the
             tensor bytes the fast estimator predicts for the job's config are the x of the fit. On CPU the trainer
             counts live tensor bytes over its first steps (the probes' instrument) and records their shape
             (micro-batch × longest padded row): the memory row is predicted at that shape. Jobs that recorded only
             the process's peak RSS (older runs) inform the time terms only.

The profile is refitted with the same code as `advisor calibrate --refit` (advisor/calibration/run.py), so the
job rows are kept in its probe table and a later refit sees them. The report gives, for every job, the error of
the profile before (its stored terms) and after (the new fit): relative error = measured / predicted − 1.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any

from advisor.errors import AdvisorInputError


def _device_kind(measured: dict) -> str:
    return "cuda" if str(measured.get("device", "")).startswith("cuda") else "cpu"


def _gradient_checkpointing(job) -> bool:
    try:
        plan = json.loads((Path(job.output_dir) / "plan.json").read_text())
        if "gradient_checkpointing" in plan:
            return bool(plan["gradient_checkpointing"])
    except (OSError, ValueError):
        pass
    return bool(((job.spec or {}).get("config") or {}).get("training", {}).get("gradient_checkpointing"))


def job_rows(kind: str, methods: list[str] | None = None, store=None) -> tuple[list[dict], list[dict]]:
    """(rows for the fit, skipped jobs with why) from the succeeded jobs of this device kind."""
    from advisor.calibration.probes import predict
    from advisor.jobs.store import JobStore

    store = store or JobStore()
    rows, skipped = [], []
    for job in store.list(status="succeeded", limit=100_000):
        measured = job.measured or {}
        why = None
        if methods and job.method not in methods:
            continue
        if not measured.get("tokens_per_s"):
            why = "no measured throughput"
        elif _device_kind(measured) != kind:
            why = f"ran on {measured.get('device')}, this profile is {kind}"
        elif int(measured.get("world_size") or 1) != 1:
            why = "multi-process run (the fit's terms are per device)"
        if why:
            skipped.append({"job": job.id, "method": job.method, "why": why})
            continue
        config = {k: v for k, v in ((job.spec or {}).get("config") or {}).items() if k != "method"}
        training = dict(config.get("training") or {})
        micro = int(measured.get("micro_batch") or training.get("per_device_train_batch_size") or 1)
        seq = int(training.get("max_seq_length") or 512)
        gc = _gradient_checkpointing(job)
        training.update(per_device_train_batch_size=micro, gradient_checkpointing=gc)
        config["training"] = training
        try:
            pred = predict(Path(str(job.spec["model"])), job.method, config)
        except Exception as err:  # the model is gone, or the estimator cannot describe it
            skipped.append({"job": job.id, "method": job.method, "why": f"no prediction: {type(err).__name__}: {err}"})
            continue
        tokens_per_step = micro * seq
        row: dict[str, Any] = {
            "method": job.method, "arch": f"job:{job.id}", "batch": micro, "seq": seq, "gc": gc, "heldout": False,
            "tokens_per_step": tokens_per_step, "predicted_tensor_bytes": pred["predicted_tensor_bytes"],
            "predicted_phase": pred.get("predicted_phase"), "flops_per_token": pred["flops_per_token"],
            "flops_per_step": pred.get("flops_per_step") or pred["flops_per_token"] * tokens_per_step,
            "step_seconds": tokens_per_step / float(measured["tokens_per_s"]),
            "measured_device_bytes": None, "measured_peak_bytes": measured.get("peak_memory_bytes"),
            "loss": (job.metrics or {}).get("loss"), "error": None,
        }
        reserved, context = measured.get("cuda_max_reserved_bytes"), measured.get("cuda_context_bytes")
        if kind == "cuda" and reserved is not None and context is not None:
            row.update(measured_device_bytes=int(reserved) + int(context), cuda_max_reserved_bytes=int(reserved),
                       cuda_context_bytes=int(context))
        shape = measured.get("tensor_peak") or {}
        if kind == "cpu" and measured.get("peak_memory_kind") == "tensor_live_bytes" and shape.get("seq_len"):
            at = dict(training, per_device_train_batch_size=int(shape["micro_batch"]),
                      max_seq_length=int(shape["seq_len"]))
            try:
                pred_at = predict(Path(str(job.spec["model"])), job.method, {**config, "training": at})
                row.update(measured_device_bytes=int(measured["peak_memory_bytes"]),
                           predicted_tensor_bytes=pred_at["predicted_tensor_bytes"],
                           predicted_phase=pred_at.get("predicted_phase"), memory_batch=int(shape["micro_batch"]),
                           memory_seq=int(shape["seq_len"]))
            except Exception as err:
                row["memory_skipped"] = f"no prediction at the measured shape: {type(err).__name__}: {err}"
        rows.append(row)
    return rows, skipped


def profile_terms(profile: dict, dev: dict) -> tuple[dict, dict]:
    """(memory terms, per-method time terms) a profile applies, in the shape of advisor.calibration.fit."""
    o = profile.get("overhead") or {}
    mem = {"allocator_fraction": float(o.get("allocator_fraction", 0.0)), "context_bytes": float(o.get("context_bytes", 0))}
    t = profile.get("throughput") or {}
    t0 = t.get("step_overhead_s") or {}
    times: dict[str, dict] = {}
    if profile.get("device", {}).get("kind") == "cpu":
        for m, rate in (t.get("achieved_flops") or {}).items():
            times[m] = {"rate": float(rate), "t0": float(t0.get(m, 0.0))}
    else:
        peak = dev.get("peak_tflops")
        if peak:
            mfu, factors = t.get("mfu_measured") or {}, t.get("method_speed_factor") or {}
            from advisor.methods import METHOD_IDS

            for m in METHOD_IDS:
                rate = peak * 1e12 * float(mfu.get(m, t.get("default_mfu", 0.4))) * float(factors.get(m, 1.0))
                times[m] = {"rate": rate, "t0": float(t0.get(m, 0.0))}
    return mem, times


def _errors(rows: list[dict], mem: dict, times: dict) -> dict[str, dict]:
    import pandas as pd

    from advisor.calibration import fit as fitting

    ev = fitting.evaluate(pd.DataFrame(rows), mem, times)
    out = {}
    for r in ev.to_dict(orient="records"):
        clean = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)  # noqa: E731
        out[r["arch"]] = {"memory_error": clean(r.get("memory_error")), "time_error": clean(r.get("time_error")),
                          "predicted_step_seconds": clean(r.get("predicted_step_seconds"))}
    return out


def _median_abs(values: list[float | None]) -> float | None:
    vals = sorted(abs(v) for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return round(vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2, 6)


def calibrate_from_jobs(methods: list[str] | None = None, base: str | Path | None = None,
                        out: str | Path | None = None, device: str | None = None) -> dict[str, Any]:
    """Refit the device's profile (`base`, default the one estimates use for this device) with the jobs' rows."""
    from advisor.calibration import run
    from advisor.estimator.profile import load_profile

    dev = run.local_device(device)
    kind = dev["kind"]
    source = Path(base) if base else load_profile(kind).path
    old: dict = {}
    if source is not None:
        try:
            old = json.loads(Path(source).read_text())
        except (OSError, ValueError) as err:
            raise AdvisorInputError("--refit", f"cannot read the profile {source}: {err}") from None
    if old.get("calibration", {}).get("device_probe"):
        dev = {**dev, **old["calibration"]["device_probe"]}
    rows, skipped = job_rows(kind, methods)
    if not rows:
        why = "; ".join(f"{s['job']} ({s['method']}): {s['why']}" for s in skipped[:5])
        raise AdvisorInputError("--from-jobs", f"no succeeded job with measurements on this {kind} device to fit"
                                + (f" (skipped: {why})" if why else " (run `advisor train` first)"))
    before = _errors(rows, *profile_terms(old, dev))
    info = {"from_jobs": [r["arch"].removeprefix("job:") for r in rows], "date": _dt.date.today().isoformat()}
    has_table = bool(old.get("calibration", {}).get("probe_table"))
    if has_table:
        result = run.refit(source, out=out, extra_rows=rows, info=info)
    else:  # a shipped profile without measurements: a new profile of this device from the jobs alone
        from advisor.calibration.probes import grid_name, load_grid

        grid = load_grid()
        out_path = Path(out) if out else run.default_out(dev)
        result = run._finish(dev, grid, grid_name(kind, False), sorted({r["method"] for r in rows}), rows, [], 0, 0.0,
                             out_path, refit={**info, "from": str(source) if source else None})
    after = _errors(rows, *profile_terms(result["profile"], dev))
    table = []
    for r in rows:
        b, a = before.get(r["arch"], {}), after.get(r["arch"], {})
        table.append({"job": r["arch"].removeprefix("job:"), "method": r["method"], "batch": r["batch"],
                      "seq": r["seq"], "measured_step_seconds": round(r["step_seconds"], 6),
                      "time_error_before": b.get("time_error"), "time_error_after": a.get("time_error"),
                      "memory_error_before": b.get("memory_error"), "memory_error_after": a.get("memory_error")})
    summary = {
        "jobs": len(rows),
        "memory_rows": sum(1 for r in rows if r["measured_device_bytes"] is not None),
        "time_abs_error_median_before": _median_abs([t["time_error_before"] for t in table]),
        "time_abs_error_median_after": _median_abs([t["time_error_after"] for t in table]),
        "memory_abs_error_median_before": _median_abs([t["memory_error_before"] for t in table]),
        "memory_abs_error_median_after": _median_abs([t["memory_error_after"] for t in table]),
    }
    notes = []
    rss_only = sum(1 for r in rows if kind == "cpu" and r["measured_device_bytes"] is None)
    if rss_only:
        notes.append(f"{rss_only} CPU job(s) recorded only the process's peak RSS (Python runtime and libraries "
                     "included), not the tensor peak the probes measure: they refit the time terms only")
    if summary["memory_rows"] and kind == "cpu":
        notes.append("CPU memory rows: live tensor bytes of each job's first steps, predicted at those steps' shape")
    return {**result, "base_profile": str(source) if source else None, "jobs": table, "jobs_summary": summary,
            "skipped_jobs": skipped, "notes": notes}
