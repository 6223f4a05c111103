"""The recommender: scenario → rules → configs → estimate → rank (see service.py)."""

from advisor.recommend.service import recommend

__all__ = ["recommend"]
