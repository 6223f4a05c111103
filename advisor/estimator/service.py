"""One entry point for estimates, shared by the API and the CLI."""

from __future__ import annotations

from advisor.errors import AdvisorInputError
from advisor.estimator.fast import STRATEGIES, STRATEGY_ALIASES
from advisor.schemas import EstimateRequest


def run_estimate(req: EstimateRequest, strategy: str | None = None) -> dict:
    if strategy is not None:
        strategy = STRATEGY_ALIASES.get(strategy, strategy)
        if strategy not in STRATEGIES:
            raise AdvisorInputError("strategy", f"unknown strategy {strategy!r}",
                                    allowed=[*STRATEGIES, *STRATEGY_ALIASES])
    if req.exact:
        from advisor.estimator.exact import exact_estimate

        return exact_estimate(req)
    from advisor.estimator.fast import fast_estimate

    return fast_estimate(req, strategy=strategy)
