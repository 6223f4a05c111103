"""POST /v1/estimate: memory (and, with a calibration profile, time and cost) for a model, method and GPU."""

from typing import Any

from fastapi import APIRouter, Body
from fastapi.concurrency import run_in_threadpool

from advisor.estimator.service import run_estimate
from advisor.schemas import EstimateRequest, parse

router = APIRouter(prefix="/v1", tags=["estimate"])

EXAMPLE = {
    "model": "meta-llama/Llama-2-7b-hf",
    "hardware": {"gpu": "RTX 4090", "count": 1},
    "method": "qlora",
    "config": {"training": {"per_device_train_batch_size": 1, "max_seq_length": 512, "gradient_checkpointing": True}},
    "exact": True,
}


@router.post("/estimate")
async def estimate(body: dict[str, Any] = Body(..., examples=[EXAMPLE])) -> dict:
    """Peak memory with breakdown, fit, max micro-batch, tokens/s, hours and cost (`exact: true` simulates)."""
    strategy = body.pop("strategy", None) if isinstance(body, dict) else None
    req = parse(EstimateRequest, body)
    return await run_in_threadpool(run_estimate, req, strategy)


@router.post("/estimate/compare-gpus")
async def compare(body: dict[str, Any] = Body(..., examples=[EXAMPLE])) -> list[dict]:
    """Every catalog GPU × 1/2/4/8, ranked by cost for the job; those where it does not fit last."""
    from advisor.estimator.fast import compare_gpus

    body = {**body, "hardware": body.get("hardware") or {"gpu": "h100-sxm"}}
    req = parse(EstimateRequest, body)
    return await run_in_threadpool(compare_gpus, req)
