"""POST /v1/estimate: memory (and, with a calibration profile, time and cost) for a model, method and GPU."""

from typing import Any

from fastapi import APIRouter, Body
from fastapi.concurrency import run_in_threadpool

from advisor.estimator.exact import exact_estimate
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
    req = parse(EstimateRequest, body)
    if req.exact:
        return await run_in_threadpool(exact_estimate, req)
    from advisor.estimator.fast import fast_estimate

    return await run_in_threadpool(fast_estimate, req)
