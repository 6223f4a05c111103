"""POST /v1/recommend: the Recommendation of CONTRACT.md for a Scenario.

Answers are deterministic for a given scenario, catalog and calibration profile, so the encoded answer for a
scenario that names only catalog entries (no local model directory, no dataset file, no "auto" hardware) is kept
in a small LRU (`X-Advisor-Cache: hit|miss`); anything read from disk is recomputed every time. A miss runs in the
thread pool: a first request for a new architecture fits the estimator (seconds) without blocking the event loop.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from fastapi import APIRouter, Body
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

router = APIRouter(prefix="/v1", tags=["recommend"])

EXAMPLE = {
    "model": "meta-llama/Llama-2-7b-hf",
    "hardware": {"gpu": "RTX 4090", "count": 1},
    "dataset": {"num_examples": 2000, "avg_tokens": 512, "max_tokens": 1024},
    "task": "domain_adaptation",
    "priority": "balanced",
    "context": {"prompting_tried": True},
}
CACHE_SIZE = 1024
_CACHE: OrderedDict[str, bytes] = OrderedDict()
_LOCK = threading.Lock()


def _cache_key(body: Any) -> str | None:
    """A key for scenarios whose answer depends only on the catalogs and the profile; None otherwise."""
    if not isinstance(body, dict):
        return None
    from advisor.catalog.models import find_model
    from advisor.estimator.profile import load_profile

    model = body.get("model")
    dataset = body.get("dataset") or {}
    hardware = body.get("hardware") or {}
    if not isinstance(model, str) or find_model(model.strip()) is None:
        return None
    if not isinstance(dataset, dict) or dataset.get("path") or not isinstance(hardware, dict):
        return None
    if str(hardware.get("gpu", "")).strip().lower() == "auto":
        return None
    try:
        profile = load_profile("cuda").id
        return profile + "|" + json.dumps(body, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return None


def _compute(body: Any) -> bytes:
    from advisor.recommend import recommend

    return json.dumps(recommend(body, allow_any_path=False), default=str).encode()


@router.post("/recommend", response_model=None)
async def recommend_route(body: Any = Body(..., examples=[EXAMPLE])) -> Response:
    """Decision, method, complete config, estimate (memory breakdown, time, cost), reasons with their sources,
    alternatives, rejected methods with the numbers, and the seeds' disagreements that touched the result."""
    key = _cache_key(body)
    if key is not None:
        with _LOCK:
            hit = _CACHE.get(key)
            if hit is not None:
                _CACHE.move_to_end(key)
        if hit is not None:
            return Response(hit, media_type="application/json", headers={"X-Advisor-Cache": "hit"})
    content = await run_in_threadpool(_compute, body)
    if key is not None:
        with _LOCK:
            _CACHE[key] = content
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
    return Response(content, media_type="application/json", headers={"X-Advisor-Cache": "miss"})
