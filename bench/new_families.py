"""Fast estimate vs exact simulation on one catalog model of each architecture type added 2026-11-23 (GLM as
ChatGLM3, StarCoder2, GPT-BigCode, MPT, Granite, OLMo, OLMoE, Falcon-RW with ALiBi, Cohere as Aya 23; DeepSeek-V2-Lite,
CodeGen and InternLM2 as Llama when time allows): LoRA b2 × 256 with checkpointing, full fine-tuning without, on an
H100 target. Tensor bytes (the breakdown without the device overhead) are compared.

    HF_HUB_OFFLINE=1 python -m bench.new_families            # ~1-2 min per model on 2 cores, cold caches
"""

from __future__ import annotations

import statistics
import sys
import time

MODELS = ["THUDM/chatglm3-6b", "bigcode/starcoder2-3b", "bigcode/starcoder", "mosaicml/mpt-7b",
          "ibm-granite/granite-3.0-2b-base", "allenai/OLMo-1B-hf", "allenai/OLMoE-1B-7B-0924", "tiiuae/falcon-rw-1b",
          "CohereForAI/aya-23-8B", "deepseek-ai/DeepSeek-V2-Lite", "Salesforce/codegen-16B-mono",
          "internlm/internlm2-1_8b"]


def _estimate(model: str, method: str, exact: bool, gc: bool) -> dict:
    from advisor.estimator.service import run_estimate
    from advisor.schemas import EstimateRequest

    return run_estimate(EstimateRequest.model_validate({
        "model": model, "hardware": {"gpu": "h100-80gb"}, "method": method, "exact": exact,
        "config": {"training": {"per_device_train_batch_size": 2, "max_seq_length": 256,
                                "gradient_checkpointing": gc}}}))


def main(argv: list[str] | None = None) -> int:
    models = (argv if argv is not None else sys.argv[1:]) or MODELS
    errors = []
    for model in models:
        for method, gc in (("lora", True), ("full", False)):
            start = time.perf_counter()
            fast, exact = (_estimate(model, method, e, gc) for e in (False, True))
            tf, te = (sum(v for k, v in r["breakdown_gib"].items() if k != "overhead") for r in (fast, exact))
            errors.append(100 * (tf / te - 1))
            print(f"{model:36s} {method:5s} gc={gc!s:5s} fast {tf:8.3f} exact {te:8.3f} GiB {errors[-1]:+.2f}% "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"{len(errors)} cases: median |error| {statistics.median(abs(e) for e in errors):.2f}%, "
          f"worst {max(errors, key=abs):+.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
