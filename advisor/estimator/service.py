"""One entry point for estimates, shared by the API and the CLI."""

from __future__ import annotations

from advisor.estimator.fast import resolve_strategy
from advisor.schemas import EstimateRequest


def run_estimate(req: EstimateRequest, strategy: str | None = None) -> dict:
    strategy = resolve_strategy(strategy, req.hardware.count)
    if req.exact:
        from advisor.estimator.exact import exact_estimate

        return exact_estimate(req, strategy=strategy)
    from advisor.estimator.fast import fast_estimate

    return fast_estimate(req, strategy=strategy)
