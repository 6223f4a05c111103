"""`calibrate()`: probe every method on this machine, fit the estimator's device terms, write a versioned profile.

    profile = calibrate(methods=["lora", "full"], quick=True)["profile_path"]

Device: CUDA when present (the `cuda` / `cuda_quick` grids), else CPU (`full` / `quick`). The profile goes to
`profiles/calibration/<kind>-<device slug>.json` unless `out` is given, in the format of
`advisor/estimator/profile.py` (a CUDA profile keeps the structure of `cuda-default.json`), with the raw probe
table and the held-out table inside, so every coefficient can be traced to the runs that produced it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from advisor.calibration import fit as fitting
from advisor.calibration.fit import fit_launch_floor, launch_floor_evaluation
from advisor.calibration.probes import (
    GRID_PATH,
    grid_name,
    holdout_description,
    load_grid,
    plan_probes,
    prefit,
    probe_key,
    run_probe,
    write_models,
)
from advisor.errors import AdvisorInputError

CALIBRATION_VERSION = 1
Progress = Callable[[int, int, str], None]

TABLE_COLUMNS = (
    "method", "arch", "batch", "seq", "gc", "heldout", "tokens_per_step",
    "measured_peak_bytes", "measured_device_bytes", "cuda_max_reserved_bytes", "cuda_max_allocated_bytes",
    "cuda_context_bytes", "predicted_tensor_bytes", "predicted_param_bytes", "svd_matrix_bytes",
    "predicted_device_bytes", "memory_error", "predicted_phase", "replay_reserved_bytes",
    "measured_phase", "step_seconds", "step_seconds_min", "warmup_seconds", "counted_step_seconds",
    "predicted_step_seconds", "time_error", "flops_per_token",
    "flops_per_step", "trainable_params", "total_params", "loss", "measure_seconds", "predict_seconds", "wall_seconds",
    "error",
)
HELDOUT_COLUMNS = (
    "method", "arch", "batch", "seq", "gc", "predicted_device_bytes", "measured_device_bytes", "memory_error",
    "predicted_step_seconds", "step_seconds", "time_error",
)


# --------------------------------------------------------------------------- inputs
def parse_methods(methods: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Method ids (comma-separated string or list) in registry order; None → all twelve."""
    from advisor.methods import METHOD_IDS

    if methods is None:
        return list(METHOD_IDS)
    items = [m.strip().lower() for m in (methods.split(",") if isinstance(methods, str) else methods)]
    items = [m for m in items if m]
    if not items:
        raise AdvisorInputError("methods", "no method given", allowed=METHOD_IDS)
    unknown = [m for m in items if m not in METHOD_IDS]
    if unknown:
        raise AdvisorInputError("methods", f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}",
                                allowed=METHOD_IDS)
    return [m for m in METHOD_IDS if m in items]


# --------------------------------------------------------------------------- device
def _slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-") or "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_device(kind: str | None = None) -> dict[str, Any]:
    """kind, name, slug (the profile id's tail) and what the fit needs to know about this machine's device.

    `kind` forces "cpu" on a GPU machine (a CPU profile there); default: CUDA when available, else CPU."""
    import torch

    if kind not in (None, "cpu", "cuda"):
        raise AdvisorInputError("device", f"unknown device kind {kind!r}", allowed=["cpu", "cuda"])
    if kind == "cuda" and not torch.cuda.is_available():
        raise AdvisorInputError("device", "no CUDA device is available here", allowed=["cpu"])
    if kind != "cpu" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        from advisor.hardware import detect_local

        target = detect_local()
        gpu = target.gpu
        return {"kind": "cuda", "device": "cuda", "name": name, "slug": _slug(name.removeprefix("NVIDIA ")),
                "catalog_id": gpu.id if gpu else None,
                "peak_tflops": (gpu.bf16_tflops or gpu.fp16_tflops) if gpu else None,
                "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)}
    name, cores = cpu_name(), cpu_cores()
    return {"kind": "cpu", "device": "cpu", "name": f"{name} ({cores} cores)", "slug": f"{_slug(name)}-{cores}c",
            "cores": cores, "torch_threads": torch.get_num_threads()}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "galore-torch", "advisor"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    out["torch"] = torch.__version__
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def default_out(dev: dict) -> Path:
    from advisor.estimator.profile import calibration_dir

    return calibration_dir() / f"{dev['kind']}-{dev['slug']}.json"


# --------------------------------------------------------------------------- orchestration
@contextlib.contextmanager
def _quiet():
    """No per-probe progress bars or warnings from transformers / PEFT while probing."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def partial_path(out_path: Path) -> Path:
    """Where a calibration appends each finished probe's row while it runs (`<out>.rows.jsonl`, removed when the
    profile is written): an interrupted run keeps its measurements and `resume=True` goes on from them."""
    return out_path.with_name(out_path.name + ".rows.jsonl")


def _partial_header(dev: dict, section: str, steps: int, memory_steps: int) -> dict:
    return {"partial": CALIBRATION_VERSION, "device": dev["name"], "kind": dev["kind"], "grid": section,
            "steps": steps, "memory_steps": memory_steps}


def _read_partial(path: Path, header: dict) -> dict[str, dict]:
    """Rows of an interrupted calibration by probe key; an error naming what differs when it was another run's."""
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise AdvisorInputError("resume", f"{path} is not a calibration's partial rows ({err})") from None
    if not lines or not isinstance(lines[0], dict) or lines[0].get("partial") is None:
        raise AdvisorInputError("resume", f"{path} has no header line: not a calibration's partial rows")
    differs = {k: (lines[0].get(k), v) for k, v in header.items() if lines[0].get(k) != v}
    if differs:
        what = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differs.items())
        raise AdvisorInputError("resume", f"{path} belongs to another calibration ({what}); run without --resume to "
                                          "start again (its rows are then discarded)")
    return {probe_key(r): r for r in lines[1:]}


def calibrate(methods: str | list[str] | None = None, quick: bool = False, out: str | Path | None = None,
              progress: Progress | None = None, grid_path: str | Path | None = None,
              steps: int | None = None, device: str | None = None, threads: int | None = None,
              resume: bool = False) -> dict[str, Any]:
    """Run the probes, fit, write the profile. Returns the profile, its path and the held-out table.

    `progress(done, total, label)` is called before each probe and once at the end (done == total).
    `device` forces "cpu" or "cuda" (default: CUDA when available); `grid_path` and `steps` override the grid file;
    `threads` sets torch's CPU threads for the probes (default: the grid's `cpu_threads`, else torch's default).
    Each finished probe's row is appended to `partial_path(out)`; `resume=True` keeps the rows found there (same
    device, grid and steps) and runs only the probes they lack.
    """
    import torch

    start = time.perf_counter()
    chosen = parse_methods(methods)
    grid = load_grid(Path(grid_path) if grid_path else None)
    dev = local_device(device)
    section = grid_name(dev["kind"], quick)
    if section not in grid["grids"]:
        raise AdvisorInputError("grid", f"the probe grid has no `{section}` section", allowed=sorted(grid["grids"]))
    probes, skipped = plan_probes(grid, section, chosen)
    steps = int(steps or grid.get("steps", 4))
    out_path = Path(out) if out else default_out(dev)
    report = progress or (lambda done, total, label: None)
    memory_steps = int(grid.get("memory_steps", 2))
    threads = threads or grid.get("cpu_threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise AdvisorInputError("threads", f"expected a positive integer, got {threads!r}")
    saved_threads = torch.get_num_threads()
    rows: list[dict] = []
    partial = partial_path(out_path)
    header = _partial_header(dev, section, steps, memory_steps)
    done = _read_partial(partial, header) if resume else {}
    if not resume and partial.exists():  # a fresh start keeps the interrupted run's rows beside it, not over them
        partial.replace(partial.with_name(partial.name + ".prev"))
    earlier_wall = sum(float(r.get("wall_seconds") or 0) for r in done.values())
    partial.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("w") as fh:  # rewritten: the header, then the rows kept from the interrupted run
        fh.write(json.dumps(header) + "\n")
        for probe in probes:
            if probe.key in done:
                fh.write(json.dumps(done[probe.key], default=str) + "\n")
    try:
        if dev["kind"] == "cpu" and threads:
            torch.set_num_threads(threads)
            dev["torch_threads"] = threads
        with _quiet(), tempfile.TemporaryDirectory(prefix="advisor-calibrate-") as tmp:
            archs = sorted({p.arch for p in probes}, key=list(grid["archs"]).index)
            report(0, len(probes), f"writing {len(archs)} tiny models")
            model_dirs = write_models(grid, archs, Path(tmp))
            workers = _prefit_workers(grid, dev["kind"])
            todo = [p for p in probes if p.key not in done]
            if workers > 1:
                report(0, len(probes), f"fitting the estimator's coefficients in {workers} processes")
                prefit(grid, todo, model_dirs, workers, dev["kind"])
            for i, probe in enumerate(probes):
                if probe.key in done:
                    rows.append(done[probe.key])
                    continue
                report(i, len(probes), probe.key)
                row = run_probe(grid, probe, model_dirs[probe.arch], dev["device"], steps, memory_steps)
                rows.append(row)
                with partial.open("a") as fh:
                    fh.write(json.dumps(row, default=str) + "\n")
            if dev["kind"] == "cuda":  # simulated on the CPU: ~1 s per probe (the Llama-2-7B-shaped ones ~5 s)
                add_replays(rows, grid, model_dirs, report)
    finally:
        torch.set_num_threads(saved_threads)
    report(len(probes), len(probes), "fitting")
    wall = time.perf_counter() - start + earlier_wall
    result = _finish(dev, grid, section, chosen, rows, skipped, steps, wall, out_path)
    result["resumed_probes"] = len(done)
    partial.unlink(missing_ok=True)
    return result


def _prefit_workers(grid: dict, kind: str) -> int:
    value = grid.get("prefit_workers", "auto")
    if value in (None, "auto"):  # a GPU host's cores are idle while it probes; a CPU calibration's are not
        return min(4, cpu_cores()) if kind == "cuda" else 0
    return max(0, int(value))


def allocator_replay_section(rows: list[dict], dev: dict, today: str) -> dict | None:
    """The profile's `allocator_replay`: what exact CUDA estimates replay a simulated step with (advisor.memory.
    allocator) and how far the replay was from max_memory_reserved on these probes."""
    import pandas as pd

    df = pd.DataFrame(rows)
    inputs = fitting.replay_inputs(df)
    evaluation = fitting.replay_evaluation(df)
    if not inputs or not evaluation:
        return None
    band = evaluation.pop("band")
    return {**{k: inputs[k] for k in ("workspace_bytes", "context_bytes")},
            "band": {"low": band["low"], "high": band["high"],
                     "source": f"calibrated on {dev['name']} {today}: {band['source']}"},
            "evaluation": evaluation,
            "source": (f"measured on {dev['name']} {today}: workspaces = allocated − the counter's peak, median "
                       f"{inputs['allocated_over_counter_median_bytes'] / 2**20:.1f} MiB over {inputs['n']} probes, "
                       f"in {fitting.WORKSPACE_BLOCK // 2**20} MiB blocks (cuBLAS, cuBLASLt); context = the smallest "
                       "device memory outside the allocator seen (a process that ran one configuration); "
                       f"not replayed: {', '.join(fitting.REPLAY_EXCLUDED)} (allocations the counter cannot see)")}


def add_replays(rows: list[dict], grid: dict, model_dirs: dict[str, Path], report=None) -> int:
    """Each CUDA probe's replayed reserve (`replay_reserved_bytes`): its step simulated with CUDA semantics, the
    allocation trace replayed through the caching-allocator model with the device's workspaces. Returns how many."""
    import pandas as pd

    from advisor.calibration.probes import Probe, probe_config
    from advisor.catalog.models import resolve_model
    from advisor.memory.simulate import simulate_in_process
    from advisor.methods import get_method

    inputs = fitting.replay_inputs(pd.DataFrame(rows))
    if not inputs:
        return 0
    done = 0
    for i, r in enumerate(rows):
        if r.get("error") or r["method"] in fitting.REPLAY_EXCLUDED or r["arch"] not in model_dirs:
            continue
        if report:
            report(i, len(rows), f"allocator replay {probe_key(r)}")
        probe = Probe(r["method"], r["arch"], r["batch"], r["seq"], bool(r["gc"]), 0, bool(r["heldout"]))
        try:
            cfg = get_method(probe.method).resolve_config(probe_config(grid, probe))
            sim = simulate_in_process(resolve_model(str(model_dirs[r["arch"]])), cfg, probe.batch, probe.seq,
                                      target="cuda", allocator_workspaces=inputs["workspace_bytes"])
            r["replay_reserved_bytes"] = int(sim["allocator"]["reserved_peak_bytes"])
            done += 1
        except Exception as err:  # noqa: BLE001 - a probe without a replay is left out of its evaluation
            r["replay_reserved_bytes"] = None
            r.setdefault("replay_error", f"{type(err).__name__}: {err}")
    return done


def _finish(dev: dict, grid: dict, section: str, methods: list[str], rows: list[dict], skipped: list[dict],
            steps: int, wall: float, out_path: Path, refit: dict | None = None,
            measured_on: str | None = None) -> dict[str, Any]:
    fitted = fitting.fit_all(rows)
    profile = build_profile(dev, grid, section, methods, rows, skipped, fitted, steps, wall, out_path, measured_on)
    if refit:
        profile["calibration"]["refit"] = refit
    _write_json(out_path, profile)
    from advisor.estimator.profile import clear_cache, read_profile

    read_profile(out_path)  # what we wrote must load
    clear_cache()
    return {"profile_path": str(out_path), "profile": profile, "heldout": profile["calibration"]["heldout_table"],
            "summary": profile["calibration"]["summary"], "wall_seconds": round(wall, 1), "device": dev,
            "grid": section}


def _device_from_profile(profile: dict) -> dict:
    d = profile["device"]
    dev = {"kind": d["kind"], "device": d["kind"], "name": d["name"], "slug": profile["id"].split("-", 1)[1],
           **{k: d[k] for k in ("cores", "torch_threads", "catalog_id", "memory_gib") if k in d}}
    if d["kind"] == "cuda" and d.get("catalog_id"):
        from advisor.catalog.gpus import resolve_gpu

        gpu = resolve_gpu(d["catalog_id"])
        dev["peak_tflops"] = gpu.bf16_tflops or gpu.fp16_tflops
    return dev


def refit(source: str | Path, out: str | Path | None = None, repredict: bool = False,
          progress: Progress | None = None, extra_rows: list[dict] | None = None,
          info: dict | None = None) -> dict[str, Any]:
    """Fit again from a profile's raw probe table, without probing (same device, same measurements).

    `repredict=True` asks the current fast estimator again for every probe (after an estimator change), so the
    overhead, band and held-out errors describe the estimator as it is now; the measurements are unchanged.
    `extra_rows` (training jobs' measurements, arch ``job:<id>``, see advisor/calibration/from_jobs.py) join the
    fit, replacing earlier rows of the same jobs.
    """
    from advisor.calibration.probes import Probe, predict, probe_config

    source = Path(source)
    try:
        old = json.loads(source.read_text())
        cal = old["calibration"]
        rows = [dict(r) for r in cal["probe_table"]]
        dev = dict(cal.get("device_probe") or _device_from_profile(old))
        if extra_rows:
            replaced = {r["arch"] for r in extra_rows}
            rows = [r for r in rows if r.get("arch") not in replaced] + [dict(r) for r in extra_rows]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AdvisorInputError("refit", f"{source} is not a calibration profile with a probe table ({err})") from None
    grid = load_grid()
    report = progress or (lambda done, total, label: None)
    if repredict:
        with _quiet(), tempfile.TemporaryDirectory(prefix="advisor-refit-") as tmp:
            archs = sorted({r["arch"] for r in rows if r["arch"] in grid["archs"]}, key=list(grid["archs"]).index)
            model_dirs = write_models(grid, archs, Path(tmp))
            for i, r in enumerate(rows):
                report(i, len(rows), f"predicting {r['method']}/{r['arch']}/b{r['batch']}/s{r['seq']}")
                if r.get("error") or r["arch"] not in model_dirs:  # a training job's row keeps its prediction
                    continue
                probe = Probe(r["method"], r["arch"], r["batch"], r["seq"], bool(r["gc"]), 0, bool(r["heldout"]))
                try:
                    r.update(predict(model_dirs[r["arch"]], r["method"], probe_config(grid, probe), dev["kind"]))
                except Exception as err:  # recorded like a failed probe
                    r["error"] = f"re-prediction failed: {type(err).__name__}: {err}"
    if dev["kind"] == "cuda" and (repredict or not any(r.get("replay_reserved_bytes") for r in rows)):
        # the allocator replay of every probe (exact CUDA estimates' reserve), again after an estimator change
        with _quiet(), tempfile.TemporaryDirectory(prefix="advisor-replay-") as tmp:
            archs = sorted({r["arch"] for r in rows if r["arch"] in grid["archs"]}, key=list(grid["archs"]).index)
            add_replays(rows, grid, write_models(grid, archs, Path(tmp)), report)
    report(len(rows), len(rows), "fitting")
    info = {"date": _dt.date.today().isoformat(), "from": str(source), "repredicted": repredict,
            "estimator_versions": versions(), **(info or {})}
    # the profile's date (and its sources') is when the measurements were taken: a refit of the same probes keeps
    # it (its own date is under calibration.refit); training jobs' rows are new measurements, dated today
    return _finish(dev, grid, cal["grid"], cal["methods"], rows, cal.get("skipped", []), cal["steps_per_probe"],
                   cal["wall_seconds"], Path(out) if out else source, refit=info,
                   measured_on=None if extra_rows else old.get("date"))


# --------------------------------------------------------------------------- the profile
def _records(df, columns=TABLE_COLUMNS) -> list[dict]:
    if df is None or len(df) == 0:
        return []
    cols = [c for c in columns if c in df.columns]
    out = []
    for rec in df[cols].to_dict(orient="records"):
        clean = {}
        for k, v in rec.items():
            if hasattr(v, "item"):
                v = v.item()
            if isinstance(v, float):
                if math.isnan(v):
                    v = None
                elif k.endswith("_error"):
                    v = round(v, 6)
                elif k.endswith("_seconds"):
                    v = round(v, 5)
            clean[k] = v
        out.append(clean)
    return out


def _shipped_cuda_default() -> dict:
    from advisor.estimator.profile import calibration_dir

    try:
        return json.loads((calibration_dir() / "cuda-default.json").read_text())
    except (OSError, ValueError):
        return {}


def _previous(out_path: Path, profile_id: str) -> dict:
    """An earlier profile of this device at the same path: its rates for methods not probed this time carry over."""
    try:
        data = json.loads(out_path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("id") == profile_id else {}


def build_profile(dev: dict, grid: dict, section: str, methods: list[str], rows: list[dict], skipped: list[dict],
                  fitted: dict, steps: int, wall: float, out_path: Path, measured_on: str | None = None) -> dict:
    import pandas as pd

    kind = dev["kind"]
    profile_id = f"{kind}-{dev['slug']}"
    today = measured_on or _dt.date.today().isoformat()
    mem, times, band, summary = fitted["memory"], fitted["time"], fitted["band"], fitted["summary"]
    held_desc = holdout_description(grid, section)
    all_rows = pd.DataFrame(rows)
    evaluated = pd.concat([fitted["train"], fitted["heldout"]]).sort_index() if len(fitted["train"]) + len(
        fitted["heldout"]) else all_rows
    if len(all_rows):  # failed probes keep their rows (with the error) in the raw table
        failed = all_rows[all_rows["error"].notna()] if "error" in all_rows else all_rows.iloc[0:0]
        evaluated = pd.concat([evaluated, failed]).sort_index()
    failures = [{"probe": probe_key(r), "error": r["error"]} for r in rows if r.get("error")]
    target = "max_memory_reserved + CUDA context" if kind == "cuda" else "the live-bytes counter's peak (exact on CPU)"
    overhead = {
        "context_bytes": int(mem["context_bytes"]),
        "allocator_fraction": float(mem["allocator_fraction"]),
        "svd_workspace_factor": float(mem.get("svd_workspace_factor", 0.0)),
        "source": (f"calibrated on {dev['name']} {today}: {target} ≈ (1 + allocator_fraction) · fast-estimator "
                   f"tensor bytes + context_bytes + svd_workspace_factor · GaLore's largest decomposed matrix (fp32 "
                   f"bytes), {mem['how']} over {mem['n']} training probes (relative residuals, "
                   f"terms ≥ 0); held out: {held_desc}"),
    }
    band_out = {"low": band["low"], "high": band["high"],
                "source": f"calibrated on {dev['name']} {today}: {band['source']}"}
    previous = _previous(out_path, profile_id)
    prev_t = previous.get("throughput", {}) if previous else {}
    measured_rates = {m: t["rate"] for m, t in times.items() if t.get("rate")}
    fit_detail = {m: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in t.items()} for m, t in times.items()}
    carried = {}
    throughput: dict[str, Any] = {}
    if kind == "cpu":
        rates = {m: float(f"{r:.6g}") for m, r in measured_rates.items()}
        for m, r in (prev_t.get("achieved_flops") or {}).items():
            if m not in rates:
                rates[m] = r
                carried[m] = previous.get("date")
        throughput["achieved_flops"] = {m: rates[m] for m in _order(rates)}
        throughput["achieved_flops_source"] = (
            "per method: least-squares slope of step seconds vs training FLOPs per step (the intercept is the fixed "
            "per-step cost below); median flops/seconds where the fit is degenerate (see `fit`)"
            + (f"; carried from the previous calibration: {', '.join(f'{m} ({d})' for m, d in carried.items())}"
               if carried else ""))
    else:
        peak = dev.get("peak_tflops")
        default = _shipped_cuda_default().get("throughput", {})
        # a GPU runs the probes' small models faster than Python launches their kernels: such step times measure the
        # launch rate, not FLOP/s (the 2026-11-22 H100 grid: 13-43 ms steps, slopes giving "MFU" 0.01-1.06). Rates
        # count only from methods whose median training-probe step reaches the grid's `cuda_min_timed_step_s` and
        # whose MFU is physically possible (≤ 1); the others keep the default MFU and say why
        min_step = float(grid.get("cuda_min_timed_step_s", 0.0) or 0.0)
        table = pd.DataFrame(rows)
        launch_bound = {}
        mfu = {}
        for m, r in measured_rates.items():
            mine = table[(table["method"] == m) & ~table["heldout"].astype(bool)]["step_seconds"].dropna() \
                if "step_seconds" in table else pd.Series(dtype=float)
            median_step = float(mine.median()) if len(mine) else 0.0
            value = r / (peak * 1e12) if peak else None
            if median_step < min_step or (value is not None and value > 1):
                launch_bound[m] = {"median_step_s": round(median_step, 5), "slope_mfu": round(value, 4) if value else None}
            elif value is not None:
                mfu[m] = round(value, 5)
        for m, v in (prev_t.get("mfu_measured") or {}).items():
            if m not in mfu and m not in methods:  # methods probed this time are not replaced by an older figure
                mfu[m] = v
                carried[m] = previous.get("date")
        # real-size runs of the previous profile (bench/gpu_realsize.py mfu --write) outrank launch-bound probes
        realsize = {m: v for m, v in (prev_t.get("mfu_realsize") or {}).items()
                    if isinstance(v, dict) and v.get("mfu") and (m not in mfu or m in launch_bound)}
        for m, v in realsize.items():
            mfu[m] = v["mfu"]
            launch_bound.pop(m, None)
        throughput["mfu_measured"] = {m: mfu[m] for m in _order(mfu)}
        throughput["mfu_source"] = (
            (f"achieved FLOP/s (least-squares slope of step seconds vs training FLOPs per step) ÷ the catalog bf16 "
             f"peak of {dev.get('catalog_id')} ({peak} TFLOPS)") if peak else
            f"{dev['name']} is not in the GPU catalog (or has no bf16 figure): no MFU could be computed")
        if launch_bound:
            throughput["mfu_source"] += (
                f"; not from probes for {', '.join(_order(launch_bound))}: their median step is under "
                f"{min_step:g} s or the slope exceeds the peak (launch-bound on this GPU: see `launch_bound`), so "
                "they keep the default MFU unless a real-size run measures them (bench/gpu_realsize.py mfu)")
            throughput["launch_bound"] = {m: launch_bound[m] for m in _order(launch_bound)}
        if realsize:
            throughput["mfu_source"] += ("; " + ", ".join(realsize) + " from real-size runs, kept from the previous "
                                         "profile (`mfu_realsize`; bench/gpu_realsize.py mfu)")
            throughput["mfu_realsize"] = realsize
        throughput["achieved_flops"] = {m: float(f"{r:.6g}") for m, r in measured_rates.items()}
        throughput["default_mfu"] = default.get("default_mfu", 0.4)
        throughput["default_mfu_source"] = default.get("default_mfu_source", "unmeasured default")
        # a measured MFU already includes a method's slowdown (QLoRA dequantization): factors only for the rest
        factors = {m: f for m, f in (default.get("method_speed_factor") or {}).items() if m not in mfu}
        throughput["method_speed_factor"] = factors
        throughput["method_speed_factor_source"] = ("measured methods need no factor; "
                                                    + default.get("method_speed_factor_source", ""))
    throughput["step_overhead_s"] = {m: round(t.get("t0", 0.0), 6) for m, t in times.items() if t.get("rate")}
    throughput["fit"] = fit_detail
    if kind == "cuda":
        floor = fit_launch_floor(rows, grid["archs"])
        if floor:
            throughput["launch_floor_s_per_block"] = {m: floor[m] for m in _order(floor)}
            throughput["launch_floor_source"] = (
                f"calibrated on {dev['name']} {today}: per method and checkpointing, the median over the training "
                "probes of step seconds ÷ (blocks + 1). A step takes max(FLOPs ÷ achieved FLOP/s, this × (blocks + "
                "1)): eager PyTorch launches each kernel from Python, block after block, and a small step (a short "
                "sequence, micro-batch 1) waits for the launches, not the GPU. Measured with this host's CPU and "
                "the advisor's executor (transformers + PEFT); another host or framework launches at its own rate")
            if dev.get("peak_tflops"):
                throughput["launch_floor_heldout"] = launch_floor_evaluation(
                    rows, grid["archs"], floor, float(dev["peak_tflops"]), throughput.get("mfu_measured") or {},
                    float(throughput.get("default_mfu", 0.4)))
    if kind == "cpu":
        throughput["method_speed_factor"] = {}
        throughput["method_speed_factor_source"] = "every rate is measured per method: no factor applied"
    missing = [m for m in methods if m not in measured_rates]
    if kind == "cpu":
        status = (f"measured on {dev['name']} by `advisor calibrate` ({section} grid, {len(rows)} probes, "
                  f"{len(failures)} failed): memory overhead, error band and achieved FLOP/s of "
                  f"{len(measured_rates)} methods. A CPU profile: estimates for GPUs keep the overhead terms, band and "
                  "MFU of cuda-default.json (no GPU was available to measure them)")
    else:
        status = (f"measured on {dev['name']} by `advisor calibrate` ({section} grid, {len(rows)} probes, "
                  f"{len(failures)} failed): CUDA context and allocator overhead, error band and MFU of "
                  f"{len(measured_rates)} methods; multi-GPU efficiency stays the unmeasured default (one GPU)")
    if missing:
        status += f"; no rate for {', '.join(missing)} (see failures)"
    profile = {
        "format": 1,
        "id": profile_id,
        "device": {k: v for k, v in {"kind": kind, "name": dev["name"], "catalog_id": dev.get("catalog_id"),
                                     "memory_gib": dev.get("memory_gib"), "cores": dev.get("cores"),
                                     "torch_threads": dev.get("torch_threads")}.items() if v is not None},
        "date": today,
        "versions": versions(),
        "status": status,
        "overhead": overhead,
        "band": band_out,
        "band_by_method": {m: {"low": b["low"], "high": b["high"], "source": f"calibrated on {dev['name']} {today}: "
                               f"{b['source']}"} for m, b in (fitted.get("band_by_method") or {}).items()},
        "throughput": throughput,
    }
    if kind == "cuda":
        replay_section = allocator_replay_section(rows, dev, today)
        if replay_section:
            profile["allocator_replay"] = replay_section
        default = _shipped_cuda_default()
        profile["multi_gpu_efficiency"] = default.get("multi_gpu_efficiency", {})
        profile["multi_gpu_efficiency_source"] = default.get("multi_gpu_efficiency_source", "unmeasured defaults")
    else:
        profile["multi_gpu_efficiency"] = {}
        profile["multi_gpu_efficiency_source"] = "not applicable: a CPU profile describes one device"
    heldout = fitted["heldout"]
    profile["calibration"] = {
        "version": CALIBRATION_VERSION,
        "grid": section,
        "grid_file": _repo_relative(GRID_PATH) if GRID_PATH.exists() else None,
        "methods": methods,
        "device_probe": {k: v for k, v in dev.items()},
        "steps_per_probe": steps,
        "step_time": (f"a plain training run (no counter) of {steps} steps per probe: median of steps 2..{steps} "
                      "(step 1 is warm-up); memory: the live-bytes counter over a separate run of 2 steps"),
        "holdout": held_desc,
        "fit_split": {"train": int(len(fitted["train"])), "heldout": int(len(heldout)), "failed": len(failures)},
        "wall_seconds": round(wall, 1),
        "memory_fit": {k: mem[k] for k in ("n", "how", "unconstrained") if k in mem},
        "summary": summary,
        "failures": failures,
        "skipped": skipped,
        "heldout_table": _records(heldout, HELDOUT_COLUMNS),
        "probe_table": _records(evaluated),
    }
    return profile


def _repo_relative(path: Path) -> str:
    try:
        return str(path.relative_to(GRID_PATH.parents[1]))
    except ValueError:
        return str(path)


def _order(d: dict) -> list[str]:
    from advisor.methods import METHOD_IDS

    return [m for m in METHOD_IDS if m in d] + [m for m in d if m not in METHOD_IDS]


def dumps(data: dict) -> str:
    """Indented JSON with the probe tables one row per line (readable, and diffs show which probe changed)."""
    cal = data.get("calibration") or {}
    tables = {k: cal[k] for k in ("probe_table", "heldout_table", "skipped", "failures")
              if isinstance(cal.get(k), list)}
    shell = {**data, "calibration": {**cal, **{k: f"@@{k}@@" for k in tables}}} if tables else data
    text = json.dumps(shell, indent=1, default=str, ensure_ascii=False)
    for key, rows in tables.items():
        body = ",\n".join("   " + json.dumps(r, default=str, ensure_ascii=False) for r in rows)
        text = text.replace(f'"@@{key}@@"', f"[\n{body}\n  ]" if rows else "[]")
    return text + "\n"


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps(data))
    tmp.replace(path)
