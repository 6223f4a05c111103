"""Benchmark of the exact memory simulator against PyTorch's own MemTracker.

    python -m bench.simulation [--quick] [--out bench/results/simulation.json]

For each configuration (model x method x sequence length, batch 1, no gradient checkpointing) this runs

* **the simulator**: the child process the advisor itself runs, ``python -m advisor.memory.simulate``, fed
  the request payload on stdin (no cache involved). It builds the real architecture and method on the meta
  device, turns the tensors into fake CPU tensors and runs two training steps under ``LiveBytes``.
* **the baseline** ("plain PyTorch MemTracker run"): the same model built the same way
  (``load_base_model(on_meta=True)`` -> ``prepare`` -> ``_to_fake`` under ``FakeTensorMode`` -> ``make_optimizer``
  -> ``make_batch(fake=True)`` -> ``train_step`` x2), measured with
  ``torch.distributed._tools.mem_tracker.MemTracker`` instead of ``LiveBytes``. It runs as a child process of
  this module (``--memtracker-child``) with a timeout. MemTracker registers gradient hooks on every parameter
  and fails on frozen (PEFT) parameters ("cannot register a hook on a tensor that doesn't require gradient");
  for this benchmark only, ``register_hook`` / ``register_post_accumulate_grad_hook`` return a dummy handle on
  tensors that do not require grad (frozen parameters never receive a gradient, so nothing is lost).

Each child's wall time and peak RSS come from ``os.wait4`` on that child (``ru_maxrss``, KiB on Linux), so the
numbers include interpreter start-up and imports, exactly what a caller of ``advisor.memory.simulate.simulate``
pays. A warm-up child imports torch/transformers/peft first so the page cache is warm for every measured child.

The MemTracker baseline is slow, so it runs only where it fits: the Llama-2-7B configurations (in ``--quick``,
only Llama-2-7B LoRA at 512).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = "bench/results/simulation.json"

MODELS = [
    ("meta-llama/Llama-2-7b-hf", "Llama-2-7B"),
    ("meta-llama/Meta-Llama-3-8B", "Llama-3-8B"),
    ("meta-llama/Llama-2-70b-hf", "Llama-2-70B"),
]
METHODS = ("lora", "full")
SEQS = (512, 2048)
BATCH = 1
STEPS = 2
TOTAL_STEPS = 100
MEMTRACKER_MODELS = {"meta-llama/Llama-2-7b-hf"}


# --------------------------------------------------------------------------- plan
def plan(quick: bool, memtracker_all: bool = False) -> list[dict[str, Any]]:
    rows = []
    for model_id, name in MODELS:
        for method in METHODS:
            for seq in SEQS:
                if quick and (model_id != MODELS[0][0] or seq != 512):
                    continue
                baseline = (memtracker_all or model_id in MEMTRACKER_MODELS) and (
                    not quick or memtracker_all or (method == "lora" and seq == 512))
                rows.append({"model_id": model_id, "model": name, "method": method, "seq": seq, "batch": BATCH,
                             "memtracker": baseline})
    return rows


def build_payload(model_id: str, method: str, seq: int) -> dict:
    """The exact request `advisor.memory.simulate.simulate` sends to its child."""
    from advisor.catalog.models import resolve_model
    from advisor.memory.simulate import _request_payload
    from advisor.methods import get_method

    resolved = resolve_model(model_id)
    cfg = get_method(method).resolve_config({"training": {"per_device_train_batch_size": BATCH,
                                                          "max_seq_length": seq,
                                                          "gradient_checkpointing": False}})
    return _request_payload(resolved, cfg, BATCH, seq, STEPS, TOTAL_STEPS)


# --------------------------------------------------------------------------- child processes
def _child_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def run_child(cmd: list[str], stdin_text: str, timeout_s: float) -> dict[str, Any]:
    """Run one child to completion; wall time and peak RSS of that child alone (os.wait4)."""
    load_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        fin, fout, ferr = (Path(tmp) / n for n in ("stdin.json", "stdout.txt", "stderr.txt"))
        fin.write_text(stdin_text)
        timed_out = False
        with fin.open("rb") as i, fout.open("wb") as o, ferr.open("wb") as e:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdin=i, stdout=o, stderr=e, cwd=REPO, env=_child_env())
            try:
                while True:
                    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        break
                    if time.perf_counter() - start > timeout_s:
                        timed_out = True
                        proc.kill()
                        pid, status, usage = os.wait4(proc.pid, 0)
                        break
                    time.sleep(0.01)
            except BaseException:
                if proc.returncode is None:
                    proc.kill()
                    os.wait4(proc.pid, 0)
                    proc.returncode = -9
                raise
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
        stdout, stderr = fout.read_text(errors="replace"), ferr.read_text(errors="replace")
    result = None
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if lines:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            result = None
    error = None
    if timed_out:
        error = f"timeout after {timeout_s:.0f} s"
    elif proc.returncode != 0 or result is None:
        error = f"exit {proc.returncode}: " + " | ".join(stderr.strip().splitlines()[-5:])
    elif "error" in result:
        error = result["error"]
    return {"wall_s": wall, "max_rss_kib": usage.ru_maxrss, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "cpu_s": usage.ru_utime + usage.ru_stime, "loadavg_before": load_before, "loadavg_after": _loadavg(),
            "returncode": proc.returncode, "timed_out": timed_out, "error": error, "result": result}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_simulator(payload: dict, timeout_s: float) -> dict[str, Any]:
    return run_child([sys.executable, "-m", "advisor.memory.simulate"], json.dumps(payload), timeout_s)


def run_memtracker(payload: dict, timeout_s: float) -> dict[str, Any]:
    return run_child([sys.executable, "-m", "bench.simulation", "--memtracker-child"], json.dumps(payload), timeout_s)


def warm_up() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers, peft, advisor.engine, advisor.memory.simulate"],
                   cwd=REPO, env=_child_env(), capture_output=True, check=False)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- MemTracker baseline (child side)
class _NoHandle:
    def remove(self) -> None:
        pass


@contextlib.contextmanager
def allow_hooks_on_frozen():
    """Benchmark-only patch: grad hooks on tensors without requires_grad become no-ops instead of raising."""
    import torch

    orig_hook = torch.Tensor.register_hook
    orig_post = torch.Tensor.register_post_accumulate_grad_hook

    def register_hook(self, hook):
        if not self.requires_grad:
            return _NoHandle()
        return orig_hook(self, hook)

    def register_post_accumulate_grad_hook(self, hook):
        if not self.requires_grad:
            return _NoHandle()
        return orig_post(self, hook)

    torch.Tensor.register_hook = register_hook
    torch.Tensor.register_post_accumulate_grad_hook = register_post_accumulate_grad_hook
    try:
        yield
    finally:
        torch.Tensor.register_hook = orig_hook
        torch.Tensor.register_post_accumulate_grad_hook = orig_post


def memtracker_in_process(payload: dict) -> dict[str, Any]:
    """Build exactly as `advisor.memory.simulate.simulate_in_process` does; measure with MemTracker."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from advisor.catalog.models import resolve_model
    from advisor.config import MethodConfig
    from advisor.engine import load_base_model, make_batch, make_optimizer, prepare, train_step
    from advisor.memory.simulate import _to_fake, _vocab_size

    m = payload["model"]
    resolved = resolve_model(m["config"])
    resolved.id, resolved.kind = m["id"], m["kind"]
    cfg = MethodConfig.model_validate(payload["config"])

    t0 = time.perf_counter()
    model = load_base_model(resolved, cfg, on_meta=True)
    prepared = prepare(model, resolved, cfg, on_meta=True, total_steps=payload["total_steps"])
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    steps = []
    with fake_mode:
        _to_fake(prepared)
        optimizer = make_optimizer(prepared, cfg.training)
        batch = make_batch(resolved.kind, payload["batch_size"], payload["seq_len"], _vocab_size(resolved.config),
                           fake=True)
        mt = MemTracker()
        with allow_hooks_on_frozen():
            mt.track_external(prepared.model, optimizer, batch)
            with mt:
                for step in range(payload["steps"]):
                    if step:
                        mt.reset_mod_stats()  # MemTracker refuses a second root forward otherwise
                    s0 = time.perf_counter()
                    train_step(prepared, optimizer, batch, cfg.training, step)
                    peak_so_far = sum(d.get("Total", 0) for d in mt.get_tracker_snapshot("peak").values())
                    steps.append({"seconds": time.perf_counter() - s0, "peak_bytes_so_far": peak_so_far})
        snap = mt.get_tracker_snapshot("peak")
    breakdown = {}
    for dev_snap in snap.values():
        for k, v in dev_snap.items():
            key = k.value if hasattr(k, "value") else str(k)
            breakdown[key] = breakdown.get(key, 0) + int(v)
    peak = breakdown.pop("Total", 0)
    return {"peak_bytes": peak, "peak_gib": peak / 2**30, "breakdown_bytes": breakdown,
            "devices": [str(d) for d in snap], "steps": steps, "seconds": time.perf_counter() - t0,
            "torch": torch.__version__}


def _memtracker_child_main() -> None:
    warnings.filterwarnings("ignore")
    payload = json.loads(sys.stdin.read())
    try:
        result = memtracker_in_process(payload)
    except Exception as err:  # reported as data
        result = {"error": f"{type(err).__name__}: {err}"}
    print(json.dumps(result, default=str), flush=True)


# --------------------------------------------------------------------------- environment
def environment() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    git = {}
    for key, args in (("commit", ["rev-parse", "HEAD"]), ("dirty", ["status", "--porcelain", "--", "advisor"])):
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
            git[key] = out if key == "commit" else bool(out)
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
    }


# --------------------------------------------------------------------------- report
COLUMNS = [
    ("model", "model", "{}"),
    ("method", "method", "{}"),
    ("seq", "seq", "{}"),
    ("sim_peak_gib", "sim peak GiB", "{:.2f}"),
    ("sim_wall_s", "sim wall s", "{:.1f}"),
    ("sim_rss_mib", "sim RSS MiB", "{:.0f}"),
    ("mt_peak_gib", "memtracker peak GiB", "{:.2f}"),
    ("mt_wall_s", "memtracker wall s", "{:.1f}"),
    ("mt_rss_mib", "memtracker RSS MiB", "{:.0f}"),
    ("speed_ratio", "speed ratio", "{:.3f}"),
    ("rss_ratio", "RSS ratio", "{:.2f}"),
    ("peak_diff_pct", "peak diff %", "{:.4f}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        if key.startswith("mt_") or key in ("speed_ratio", "rss_ratio", "peak_diff_pct"):
            return row.get("mt_status") or "-"
        return row.get("sim_status") or "-"
    return fmt.format(v)


def format_table(rows: list[dict], markdown: bool = False) -> str:
    header = [h for _, h, _ in COLUMNS]
    body = [[_cell(r, k, f) for k, _, f in COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]

    def fmt_line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt_line(header), fmt_line(["-" * w for w in widths])] + [fmt_line(b) for b in body])


def summarize(row: dict) -> dict:
    sim, mt = row.get("simulator"), row.get("memtracker_run")
    out = {k: row[k] for k in ("model", "method", "seq")}
    if sim and not sim["error"]:
        out.update(sim_peak_gib=sim["result"]["peak_bytes"] / 2**30, sim_wall_s=sim["wall_s"],
                   sim_rss_mib=sim["max_rss_kib"] / 1024, sim_cpu_s=sim["cpu_s"],
                   sim_in_child_s=sim["result"].get("seconds"), sim_peak_bytes=sim["result"]["peak_bytes"])
    elif sim:
        out["sim_status"] = "timeout" if sim["timed_out"] else "error"
    if mt is None:
        out["mt_status"] = "-"
    elif mt["error"]:
        out["mt_status"] = "timeout" if mt["timed_out"] else "error"
    else:
        out.update(mt_peak_gib=mt["result"]["peak_bytes"] / 2**30, mt_wall_s=mt["wall_s"],
                   mt_rss_mib=mt["max_rss_kib"] / 1024, mt_cpu_s=mt["cpu_s"], mt_in_child_s=mt["result"].get("seconds"),
                   mt_peak_bytes=mt["result"]["peak_bytes"])
        if "sim_wall_s" in out:
            mt_peak = mt["result"]["peak_bytes"]
            out.update(speed_ratio=out["sim_wall_s"] / out["mt_wall_s"],
                       cpu_ratio=out["sim_cpu_s"] / out["mt_cpu_s"] if out["mt_cpu_s"] else None,
                       rss_ratio=out["sim_rss_mib"] / out["mt_rss_mib"],
                       peak_diff_bytes=sim["result"]["peak_bytes"] - mt_peak,
                       peak_diff_pct=100 * abs(sim["result"]["peak_bytes"] - mt_peak) / mt_peak if mt_peak else None)
    return out


def _slim_sim(result: dict | None) -> dict | None:
    if not result or "error" in result:
        return result
    keep = ("peak_bytes", "peak_gib", "peak_phase", "breakdown_bytes", "trainable_params", "total_params", "seconds",
            "mode", "device", "end_bytes")
    out = {k: result.get(k) for k in keep}
    out["steps"] = [{k: s.get(k) for k in ("peak_bytes", "peak_phase", "seconds")} for s in result.get("steps", [])]
    return out


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.simulation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only Llama-2-7B lora/full at seq 512 (MemTracker: lora 512)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"JSON results path (default {DEFAULT_OUT})")
    ap.add_argument("--no-memtracker", action="store_true", help="skip the MemTracker baseline")
    ap.add_argument("--memtracker-all", action="store_true",
                    help="run the MemTracker baseline on every configuration, not only Llama-2-7B")
    ap.add_argument("--memtracker-timeout", type=float, default=300.0, help="seconds per MemTracker run (default 300)")
    ap.add_argument("--sim-timeout", type=float, default=900.0, help="seconds per simulator run (default 900)")
    ap.add_argument("--memtracker-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memtracker_child:
        _memtracker_child_main()
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    env = environment()
    print(f"# bench.simulation  {env['date']}  torch {env['versions']['torch']}  transformers "
          f"{env['versions']['transformers']}  peft {env['versions']['peft']}", flush=True)
    print(f"# host: {env['host']['cpu_model']}  nproc={env['host']['nproc']}  mem={env['host']['mem_total_gib']} GiB",
          flush=True)
    warm = warm_up()
    print(f"# warm-up import child: {warm:.1f} s", flush=True)

    rows = plan(args.quick, args.memtracker_all)
    records, summaries = [], []
    t_start = time.perf_counter()
    load_start = _loadavg()
    for row in rows:
        label = f"{row['model']} {row['method']} seq={row['seq']}"
        payload = build_payload(row["model_id"], row["method"], row["seq"])
        print(f"[sim] {label} ...", end=" ", flush=True)
        sim = run_simulator(payload, args.sim_timeout)
        if sim["error"]:
            print(f"FAILED ({sim['error'][:200]})", flush=True)
        else:
            print(f"peak {sim['result']['peak_bytes'] / 2**30:.2f} GiB, wall {sim['wall_s']:.1f} s, "
                  f"RSS {sim['max_rss_kib'] / 1024:.0f} MiB", flush=True)
        sim["result"] = _slim_sim(sim["result"])
        mt = None
        if row["memtracker"] and not args.no_memtracker:
            print(f"[memtracker] {label} ...", end=" ", flush=True)
            mt = run_memtracker(payload, args.memtracker_timeout)
            if mt["error"]:
                print(f"FAILED ({mt['error'][:200]})", flush=True)
            else:
                print(f"peak {mt['result']['peak_bytes'] / 2**30:.2f} GiB, wall {mt['wall_s']:.1f} s, "
                      f"RSS {mt['max_rss_kib'] / 1024:.0f} MiB", flush=True)
        record = {**row, "simulator": sim, "memtracker_run": mt}
        summary = summarize(record)
        record["summary"] = summary
        records.append(record)
        summaries.append(summary)

    doc = {
        "benchmark": "simulation",
        "description": "advisor's fake-tensor memory simulator (child process `python -m advisor.memory.simulate`) "
                       "vs torch.distributed._tools.mem_tracker.MemTracker on the same fake-tensor model; "
                       "wall time and peak RSS per child process via os.wait4 (includes interpreter start-up and "
                       "imports). speed_ratio = sim wall / MemTracker wall; "
                       "cpu_ratio = the same with user+sys CPU seconds; "
                       "rss_ratio = sim RSS / MemTracker RSS; "
                       "peak_diff_pct = |sim peak - MemTracker peak| / MemTracker peak * 100.",
        "quick": args.quick,
        "settings": {"batch_size": BATCH, "steps": STEPS, "total_steps": TOTAL_STEPS, "gradient_checkpointing": False,
                     "memtracker_timeout_s": args.memtracker_timeout, "sim_timeout_s": args.sim_timeout,
                     "memtracker_models": "all" if args.memtracker_all else sorted(MEMTRACKER_MODELS),
                     "warm_up_s": warm},
        **env,
        "total_seconds": time.perf_counter() - t_start,
        "loadavg": {"start": load_start, "end": _loadavg()},
        "rows": summaries,
        "runs": records,
    }
    out = Path(args.out)
    if not out.is_absolute():
        out = Path.cwd() / out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")

    print()
    print(format_table(summaries))
    print()
    print("speed ratio = sim wall / MemTracker wall (lower is faster); RSS ratio = sim RSS / MemTracker RSS; "
          "peak diff % = |sim - MemTracker| / MemTracker")
    print(f"results: {out}")
    failed = [s for s in summaries if s.get("sim_status")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
