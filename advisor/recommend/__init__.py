"""The recommender: scenario → rules → configs → estimate → rank (see service.py)."""


def __getattr__(name):  # the estimator (torch, transformers, peft) is imported when a recommendation is asked for
    if name == "recommend":
        from advisor.recommend.service import recommend

        return recommend
    raise AttributeError(name)


__all__ = ["recommend"]
