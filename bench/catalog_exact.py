"""`advisor estimate --exact` for every catalog model (LoRA, micro-batch 1 × 512, checkpointing off): it must answer
with a breakdown for all of them. Prints wall time per model; writes bench/results/catalog_exact.json.

    python -m bench.catalog_exact [--method lora] [--seq 512]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from advisor.catalog.models import load_models
from advisor.estimator.exact import exact_estimate
from advisor.schemas import EstimateRequest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="lora")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--out", default="bench/results/catalog_exact.json")
    args = ap.parse_args()
    rows = []
    for entry in load_models():
        req = EstimateRequest.model_validate({
            "model": entry.id, "hardware": {"gpu": "h100-sxm"}, "method": args.method, "exact": True,
            "config": {"training": {"per_device_train_batch_size": 1, "max_seq_length": args.seq}}})
        start = time.perf_counter()
        try:
            est = exact_estimate(req, use_cache=False)
            row = {"model": entry.id, "peak_gib": est["peak_vram_gib"], "breakdown_gib": est["breakdown_gib"],
                   "seconds": round(time.perf_counter() - start, 1)}
        except Exception as err:  # noqa: BLE001 - reported per model
            row = {"model": entry.id, "error": f"{type(err).__name__}: {err}", "seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print(json.dumps(row)[:200], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    ok = sum("error" not in r for r in rows)
    print(f"{ok}/{len(rows)} catalog models answered; slowest {max(r['seconds'] for r in rows)} s")


if __name__ == "__main__":
    main()
