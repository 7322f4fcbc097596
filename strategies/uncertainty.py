"""Uncertainty sampling: ask the LLM about the texts the SLM is least sure of (the paper's suggested upgrade)."""

from __future__ import annotations

import numpy as np

from strategies.base import Candidates, QueryContext, QueryStrategy, Shard
from strategies.measures import MEASURES, Measure, uncertainty
from strategies.order import top


def check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {list(MEASURES)}, got {measure!r}")


class UncertaintyStrategy(QueryStrategy):
    """Top-n by `measure` of the SLM's probabilities. Before the first SLM (no probs) every item scores 0, so
    the pick is the seeded random one of `random`."""

    name = "uncertainty"
    needs = frozenset({"probs"})

    def __init__(self, measure: Measure = "entropy"):
        check_measure(measure)
        self.measure = measure

    def candidates(self, shard: Shard, n: int, ctx: QueryContext) -> Candidates:
        scores = np.zeros(len(shard)) if shard.probs is None else uncertainty(shard.probs, self.measure)
        return top(shard.ids, scores, n, ctx)


class RouteStrategy(UncertaintyStrategy):
    """Send the LLM the texts where the SLM is least likely right: least confidence on the probabilities the loop
    hands strategies, which are calibrated from round 2 on (docs/METHOD.md section 7). The texts the SLM gets right
    cost nothing to keep, so the LLM's labels go where the SLM's would be wrong. Random in round 1."""

    name = "route"

    def __init__(self) -> None:
        super().__init__("least_confidence")
