"""Real-size check on a GPU: a catalog model's real shapes (random weights) trained with LoRA and QLoRA, measured
against the estimate, with the model loader's and the caching allocator's shares separated.

    python -m bench.gpu_realsize measure --out realsize.json [--model llama-2-7b] [--points lora:1:512:gc,...]
    python -m bench.gpu_realsize report realsize.json [--profile profiles/calibration/cuda-h100-80gb-hbm3.json]
    python -m bench.gpu_realsize mfu realsize.json [--write PROFILE]   # achieved MFU per method at real size

`measure` needs CUDA. It writes the model once (random bf16 weights built on the GPU, saved with safetensors, so the
QLoRA runs go through transformers' real 4-bit loader), then runs each point in a fresh process (what one training
run holds, nothing cached from the previous point): load → method → optimizer → 3 training steps under the
live-bytes counter. Per point it records

* `load_peak_reserved` / `after_load_reserved` / `after_load_allocated`: the allocator during and after loading,
* `train_max_reserved` / `train_max_allocated`: `max_memory_reserved/allocated()` over the steps (peak statistics
  reset after loading, without `empty_cache()`: the loader's cached blocks stay, as in a real run),
* `whole_max_reserved`: the larger of the two reserved peaks, what a whole-run `max_memory_reserved()` reports,
* `counter_peak`: the live-bytes counter's peak over the steps (tensor bytes, as the estimator predicts them),
* `context`: device memory in use beyond the allocator's reserve (CUDA context, cuBLAS workspaces).

Points given as `method:batch:seq:gc|nogc[:expandable][:chunked|fused_linear][:offload][:compile]`; `expandable`
runs that point with `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` (the allocator's slack without fragmentation); `chunked` /
`fused_linear` set `config.training.cross_entropy`; `offload` sets `config.training.activation_offloading`; `compile`
sets `config.training.torch_compile` (inductor on the GPU).

`report` (any machine) adds the fast estimator's prediction for each point (the same catalog model, the profile's
overhead terms) and prints measured vs predicted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
DEFAULT_POINTS = ("lora:1:512:gc,lora:4:1024:gc,lora:8:512:gc,lora:2:512:nogc,"
                  "qlora:1:512:gc,qlora:4:1024:gc,qlora:1:2048:gc,qlora:8:512:gc,qlora:2:512:nogc,"
                  "qlora:2:1024:nogc,qlora:4:1024:gc:expandable")


POINT_FLAGS = ("expandable", "chunked", "fused_linear", "offload", "compile")


def parse_points(text: str) -> list[dict]:
    out = []
    for item in [t for t in text.split(",") if t.strip()]:
        parts = item.strip().split(":")
        if len(parts) < 4 or parts[3] not in ("gc", "nogc") or any(f not in POINT_FLAGS for f in parts[4:]):
            raise SystemExit(f"--points: {item!r} is not "
                             "method:batch:seq:gc|nogc[:expandable][:chunked|fused_linear][:offload][:compile]")
        loss = [f for f in parts[4:] if f in ("chunked", "fused_linear")]
        out.append({"method": parts[0], "batch": int(parts[1]), "seq": int(parts[2]), "gc": parts[3] == "gc",
                    "expandable": "expandable" in parts[4:], **({"cross_entropy": loss[-1]} if loss else {}),
                    **({"activation_offloading": True} if "offload" in parts[4:] else {}),
                    **({"torch_compile": True} if "compile" in parts[4:] else {})})
    return out


def point_config(point: dict) -> dict:
    training = {"bf16": True, "torch_dtype": "bfloat16", "per_device_train_batch_size": point["batch"],
                "max_seq_length": point["seq"], "gradient_checkpointing": point["gc"],
                "cross_entropy": point.get("cross_entropy", "standard"),
                "activation_offloading": bool(point.get("activation_offloading")),
                "torch_compile": bool(point.get("torch_compile"))}
    # Llama has no bias terms: BitFit adds them (PEFT's BEFT)
    return {"training": training, **({"peft": {"bias_source": "add"}} if point.get("method") == "bitfit" else {})}


# --------------------------------------------------------------------------- measure (CUDA)
def write_model(model: str, directory: Path) -> Path:
    """The catalog model's architecture with random bf16 weights (initialised on the GPU), saved for from_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    from advisor.catalog.models import resolve_model

    if (directory / "config.json").exists():
        return directory
    resolved = resolve_model(model)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        net = AutoModelForCausalLM.from_config(resolved.config, dtype=torch.bfloat16)
    net.save_pretrained(directory)
    del net
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return directory


def measure_one(model_dir: str, point: dict) -> dict:
    """One point in this (fresh) process."""
    import torch

    from advisor.catalog.models import resolve_model
    from advisor.calibration.probes import timed_steps
    from advisor.engine import load_base_model, make_batch, make_optimizer, prepare
    from advisor.memory.counter import cuda_memory_stats
    from advisor.memory.simulate import _bnb_kernels, _measure, _quant_state_tensors, _vocab_size
    from advisor.methods import get_method

    resolved = resolve_model(model_dir)
    cfg = get_method(point["method"]).resolve_config(point_config(point))
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()  # CPU only to smoke-test this script: every allocator figure is then 0
    dev = "cuda" if cuda else "cpu"
    zero = lambda *a: 0  # noqa: E731
    max_reserved, max_allocated = (torch.cuda.max_memory_reserved, torch.cuda.max_memory_allocated) if cuda else (
        zero, zero)
    reserved, allocated = (torch.cuda.memory_reserved, torch.cuda.memory_allocated) if cuda else (zero, zero)
    if cuda:
        torch.cuda.init()
    t0 = time.perf_counter()
    model = load_base_model(resolved, cfg, on_meta=False, device=dev)
    if cuda:
        torch.cuda.synchronize()
    load = {"load_seconds": time.perf_counter() - t0, "load_peak_reserved": max_reserved(),
            "load_peak_allocated": max_allocated(), "after_load_reserved": reserved(),
            "after_load_allocated": allocated()}
    prepared = prepare(model, resolved, cfg, on_meta=False, total_steps=100)
    optimizer = make_optimizer(prepared, cfg.training)
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch = {k: v.to(dev) for k, v in make_batch(resolved.kind, point["batch"], point["seq"],
                                                  _vocab_size(resolved.config), generator=gen).items()}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # the counter also records this real step's allocations: their replay (advisor.memory.allocator, the H100
    # profile's two 32 MiB workspaces) beside max_memory_reserved tests the allocator model on the real trace
    result = _measure(prepared, optimizer, batch, cfg.training, 3,
                      register_extra=lambda c: c.register(_quant_state_tensors(prepared.model), "weights"),
                      see_inside=_bnb_kernels(dev) if cfg.quantization is not None else None,
                      allocator_workspaces=[32 * 2**20, 32 * 2**20])
    stats = cuda_memory_stats() if cuda else {"max_reserved_bytes": 0, "max_allocated_bytes": 0, "context_bytes": 0}
    # step time without the counter's dispatch hook (after the memory figures are read)
    plain = timed_steps(prepared, optimizer, batch, cfg.training, range(3, 3 + point.get("timed_steps", 4)), cuda)
    trainable, total = prepared.param_counts()
    return {**point, **load, "train_max_reserved": stats["max_reserved_bytes"],
            "train_max_allocated": stats["max_allocated_bytes"],
            "whole_max_reserved": max(stats["max_reserved_bytes"], load["load_peak_reserved"]),
            "counter_peak": int(result["peak_bytes"]), "counter_phase": result.get("peak_phase"),
            "real_trace_replay": result.get("allocator"),
            "context": stats["context_bytes"], "step_seconds": [s["seconds"] for s in result["steps"]],
            "plain_step_seconds": plain,
            "loss": result["steps"][-1]["loss"], "trainable_params": trainable, "total_params": total,
            "torch": torch.__version__, "device": torch.cuda.get_device_name(0) if cuda else "cpu"}


def measure(args) -> None:
    points = parse_points(args.points)
    model_dir = Path(args.model_dir)
    t = time.perf_counter()
    # in a child process: a CUDA context left in this parent would count as every point's "context"
    # (mem_get_info sees the whole device; the first run of 2026-11-22 read 1.35 GiB where ~0.85 was the child's)
    subprocess.run([sys.executable, "-c", "import sys; from bench.gpu_realsize import write_model; from pathlib import "
                    "Path; write_model(sys.argv[1], Path(sys.argv[2]))", args.model, str(model_dir)], check=True)
    print(f"model written in {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    for point in points:
        env = dict(os.environ)
        if point["expandable"]:
            env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        code = ("import json,sys; from bench.gpu_realsize import measure_one; "
                "print('@@' + json.dumps(measure_one(sys.argv[1], json.loads(sys.argv[2]))))")
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, str(model_dir), json.dumps(point)], env=env,
                              capture_output=True, text=True, timeout=args.timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
        row = json.loads(lines[-1][2:]) if lines else {**point, "error": proc.stderr[-2000:]}
        row["model"] = args.model
        row["wall_seconds"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        Path(args.out).write_text(json.dumps(rows, indent=1))
        short = {k: (round(v / GIB, 3) if isinstance(v, int) and v > 2**24 else v) for k, v in row.items()
                 if k in ("method", "batch", "seq", "gc", "expandable", "cross_entropy", "activation_offloading", "torch_compile",
                          "after_load_reserved", "load_peak_reserved",
                          "train_max_reserved", "train_max_allocated", "counter_peak", "context", "wall_seconds",
                          "error")}
        print(json.dumps(short), flush=True)


# --------------------------------------------------------------------------- report (anywhere)
def compare(rows: list[dict], gpu: str = "h100-sxm", exact: bool = False) -> list[dict]:
    """Each measured point beside today's estimate (the profile estimates use, or ADVISOR_PROFILE); `exact`: the
    exact estimate (simulation + the allocator replay where the profile has one) instead of the fast one."""
    from advisor.estimator.service import run_estimate
    from advisor.schemas import EstimateRequest

    out = []
    for r in rows:
        name = f"{r['method']} b{r['batch']} s{r['seq']} {'gc' if r['gc'] else 'nogc'}" + \
               (" exp" if r.get("expandable") else "") + \
               (f" {r['cross_entropy']}" if r.get("cross_entropy", "standard") != "standard" else "") + \
               (" offload" if r.get("activation_offloading") else "") + (" compile" if r.get("torch_compile") else "")
        if r.get("error"):
            out.append({"point": name, "failed": r["error"][-300:], "error": None})
            continue
        est = run_estimate(EstimateRequest(model=r["model"], method=r["method"], hardware={"gpu": gpu},
                                           config=point_config(r), exact=exact))
        measured = r["whole_max_reserved"] + r["context"]
        predicted = est["peak_bytes"]
        out.append({"point": name, "measured_bytes": measured, "predicted_bytes": predicted,
                    "tensor_bytes": predicted - est["breakdown_gib"]["overhead"] * GIB, "counter_bytes": r["counter_peak"],
                    "error": measured / predicted - 1, "alloc_over_tensors": r["train_max_allocated"] / r["counter_peak"],
                    "reserved_over_alloc": r["whole_max_reserved"] / max(r["train_max_allocated"], 1),
                    "load_reserved": r["load_peak_reserved"], "profile": est["provenance"].get("profile"),
                    "expandable": bool(r.get("expandable")),
                    "replayed_reserved_bytes": (est.get("allocator") or {}).get("reserved_peak_bytes"),
                    "measured_reserved_bytes": r["whole_max_reserved"]})
    return out


def report(args) -> None:
    from advisor.estimator.profile import clear_cache

    rows = json.loads(Path(args.file).read_text())
    if args.profile:
        os.environ["ADVISOR_PROFILE"] = str(args.profile)
        clear_cache()
    print("measured = whole-run max_memory_reserved + context; tensors = the live-bytes counter's peak; "
          "predicted = the estimate's peak (its tensor bytes in brackets); error = measured / predicted − 1")
    print(f"{'point':30} {'measured':>9} {'tensors':>8} {'predicted':>17} {'error':>7} {'alloc/tens':>10} "
          f"{'resv/alloc':>10} {'load resv':>9}")
    results = compare(rows, args.gpu, exact=args.exact)
    for c in results:
        if c.get("failed"):
            print(f"{c['point']:30} failed: {c['failed']}")
            continue
        print(f"{c['point']:30} {c['measured_bytes'] / GIB:9.2f} {c['counter_bytes'] / GIB:8.2f} "
              f"{c['predicted_bytes'] / GIB:8.2f} ({c['tensor_bytes'] / GIB:6.2f}) {c['error']:+7.1%} "
              f"{c['alloc_over_tensors']:10.3f} {c['reserved_over_alloc']:10.3f} {c['load_reserved'] / GIB:9.2f}")
    if results:
        print(f"profile: {results[0].get('profile')}")
        errs = [c["error"] for c in results if not c.get("failed") and not c.get("expandable")]
        if errs:
            print(f"default allocator settings ({len(errs)} points): median |error| "
                  f"{statistics.median(abs(e) for e in errs):.2%}, worst under {max(errs):+.2%}, "
                  f"worst over {min(errs):+.2%}")
    if args.out:
        Path(args.out).write_text(json.dumps({"exact": args.exact, "gpu": args.gpu, "points": results}, indent=1))


def mfu(args) -> dict:
    """Achieved MFU per method from the real-size points with at least `--min-tokens` tokens per step (smaller steps
    are launch-bound on a fast GPU): training FLOPs per step (the estimator's count) ÷ the median plain step time
    (steps 2..) ÷ the catalog bf16 peak. `--write PROFILE` stores them as the profile's measured MFU."""
    from advisor.catalog.gpus import resolve_gpu
    from advisor.estimator.fast import memory_model, step_flops
    from advisor.estimator.plan import build_plan
    from advisor.estimator.profile import Profile
    from advisor.schemas import EstimateRequest

    rows = [r for r in json.loads(Path(args.file).read_text()) if not r.get("error") and r.get("plain_step_seconds")]
    gpu = resolve_gpu(args.gpu)
    peak = (gpu.bf16_tflops or gpu.fp16_tflops) * 1e12
    per: dict[str, list] = {}
    for r in rows:
        if r["batch"] * r["seq"] < args.min_tokens or r.get("expandable"):
            continue
        plan = build_plan(EstimateRequest(model=r["model"], method=r["method"], hardware={"gpu": args.gpu},
                                          config=point_config(r)))
        flops = step_flops(memory_model(plan, profile=Profile("mfu", "cuda", {})), r["batch"])
        seconds = statistics.median(r["plain_step_seconds"][1:])
        per.setdefault(r["method"], []).append({"point": f"b{r['batch']} s{r['seq']} {'gc' if r['gc'] else 'nogc'}",
                                                "flops": flops, "seconds": seconds, "mfu": flops / seconds / peak})
    out = {m: {"mfu": round(statistics.median(p["mfu"] for p in pts), 4), "points": pts} for m, pts in per.items()}
    for m, v in out.items():
        print(f"{m:8} MFU {v['mfu']:.3f}  " + ", ".join(f"{p['point']}: {p['seconds']:.3f} s, {p['mfu']:.3f}"
                                                        for p in v["points"]))
    if args.write:
        path = Path(args.write)
        profile = json.loads(path.read_text())
        t = profile["throughput"]
        model = rows[0]["model"] if rows else "?"
        for m, v in out.items():
            t["mfu_measured"][m] = v["mfu"]
            (t.get("method_speed_factor") or {}).pop(m, None)
            (t.get("launch_bound") or {}).pop(m, None)
        t["mfu_source"] += (f"; {', '.join(out)} from real-size runs instead (`python -m bench.gpu_realsize mfu "
                            f"{args.file}`: {model} shapes, points of ≥ {args.min_tokens} tokens per step, median "
                            "plain step time; " + "; ".join(f"{m} {v['mfu']}" for m, v in out.items()) + ")")
        t["mfu_realsize"] = out
        from advisor.calibration.run import dumps

        path.write_text(dumps(profile))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--model", default="llama-2-7b")
    m.add_argument("--model-dir", default="/tmp/advisor-realsize-model")
    m.add_argument("--points", default=DEFAULT_POINTS)
    m.add_argument("--out", required=True)
    m.add_argument("--timeout", type=int, default=300)
    r = sub.add_parser("report")
    r.add_argument("file")
    r.add_argument("--profile", default=None)
    r.add_argument("--gpu", default="h100-sxm")
    r.add_argument("--exact", action="store_true",
                   help="the exact estimate (simulation; with the profile's allocator replay) instead of the fast one")
    r.add_argument("--out", default=None, help="write the comparison as JSON")
    f = sub.add_parser("mfu")
    f.add_argument("file")
    f.add_argument("--gpu", default="h100-sxm")
    f.add_argument("--min-tokens", type=int, default=4096)
    f.add_argument("--write", default=None, help="a CUDA calibration profile to store the measured MFU in")
    args = ap.parse_args(argv)
    {"measure": measure, "report": report, "mfu": mfu}[args.cmd](args)


if __name__ == "__main__":
    main()
