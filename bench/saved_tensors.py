"""What a real training step saves for backward on this device, by shape and dtype: the diagnostic that found where
CUDA and CPU kernels differ (dropout masks, attention dropout), which `advisor.memory.simattn.CudaSemantics` encodes.

    python -m bench.saved_tensors --archs llama7b_2l,gpt2_m \
        --points llama7b_2l:lora:2:512:nogc,gpt2_m:full:2:512:nogc --out saved_cuda.json   # on the GPU
    python -m bench.saved_tensors ... --out saved_cpu.json                                  # the same here (CPU)
    python -m bench.saved_tensors --compare saved_cuda.json saved_cpu.json

Architectures are calibration/grid.yaml's; a point is `arch:method:batch:seq:gc|nogc`. Per point: the counter's peak
and breakdown over 2 steps (`measure_real`) and, without checkpointing, every distinct storage autograd saves in one
forward pass (a `saved_tensors_hooks` pack hook), grouped by (shape, dtype, contiguous, bytes).
Result of 2026-11-22 (H100 vs this machine's CPU): bench/results/cuda_vs_cpu_saved.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path


def saved_tensors(resolved, cfg, batch: int, seq: int, device: str) -> dict:
    import torch

    from advisor.engine import load_base_model, make_batch, prepare
    from advisor.memory.simulate import _vocab_size

    torch.manual_seed(0)
    model = load_base_model(resolved, cfg, on_meta=False, device=device)
    prepared = prepare(model, resolved, cfg, on_meta=False, total_steps=100)
    data = {k: v.to(device) for k, v in make_batch(resolved.kind, batch, seq, _vocab_size(resolved.config)).items()}
    seen: set = set()
    groups: collections.Counter = collections.Counter()

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            groups[(str(tuple(t.shape)), str(t.dtype), t.is_contiguous(), key[1])] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = prepared.model(**data)
    del out
    total = sum(k[3] * n for k, n in groups.items())
    rows = sorted(([*k, n] for k, n in groups.items()), key=lambda r: -r[3] * r[4])
    return {"total_saved_bytes": total, "rows": rows[:60]}


def measure(args) -> None:
    import torch

    from advisor.calibration.probes import Probe, load_grid, probe_config, write_models
    from advisor.catalog.models import resolve_model
    from advisor.memory.simulate import measure_real
    from advisor.methods import get_method

    device = "cuda" if torch.cuda.is_available() else "cpu"
    grid = load_grid()
    dirs = write_models(grid, args.archs.split(","), Path(tempfile.mkdtemp()))
    out = []
    for spec in args.points.split(","):
        arch, method, b, s, gc = spec.split(":")
        probe = Probe(method, arch, int(b), int(s), gc == "gc", 0)
        resolved = resolve_model(str(dirs[arch]))
        cfg = get_method(method).resolve_config(probe_config(grid, probe))
        r = measure_real(resolved, cfg, int(b), int(s), steps=2)
        out.append({"spec": spec, "dev": device, "peak": r["peak_bytes"], "phase": r["peak_phase"],
                    "breakdown": r["breakdown_bytes"], "cuda": r.get("cuda"),
                    "saved": saved_tensors(resolved, cfg, int(b), int(s), device) if gc == "nogc" else None})
        print(spec, r["peak_bytes"], r["peak_phase"], flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))


def compare(a_path: str, b_path: str) -> dict:
    a = {r["spec"]: r for r in json.loads(Path(a_path).read_text())}
    b = {r["spec"]: r for r in json.loads(Path(b_path).read_text())}
    report = {}
    for spec in [s for s in a if s in b]:
        ra, rb = a[spec], b[spec]
        entry = {a_dev(ra): ra["peak"], a_dev(rb): rb["peak"], "difference_bytes": rb["peak"] - ra["peak"]}
        if ra.get("saved") and rb.get("saved"):
            ga = {tuple(r[:4]): r[4] for r in ra["saved"]["rows"]}
            gb = {tuple(r[:4]): r[4] for r in rb["saved"]["rows"]}
            entry["saved_differences"] = [
                {"shape": k[0], "dtype": k[1], "contiguous": k[2], "bytes": k[3], a_dev(ra): ga.get(k, 0),
                 a_dev(rb): gb.get(k, 0)}
                for k in sorted(set(ga) | set(gb), key=lambda k: -k[3]) if ga.get(k, 0) != gb.get(k, 0)]
        report[spec] = entry
    return report


def a_dev(r: dict) -> str:
    return f"{r['dev']}_peak_bytes" if "dev" in r else "peak_bytes"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default="llama7b_2l,gpt2_m")
    ap.add_argument("--points", default="llama7b_2l:lora:2:512:nogc,llama7b_2l:qlora:2:512:nogc,"
                                        "llama7b_2l:full:2:512:nogc,gpt2_m:full:2:512:nogc,gpt2_m:lora:2:512:gc")
    ap.add_argument("--out")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = ap.parse_args(argv)
    if args.compare:
        print(json.dumps(compare(*args.compare), indent=1))
    elif args.out:
        measure(args)
    else:
        ap.error("--out FILE (measure) or --compare A B")


if __name__ == "__main__":
    main()
