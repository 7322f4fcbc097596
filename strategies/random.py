"""Uniform random selection: the paper's budgeted variant, and the baseline every strategy must beat."""

from __future__ import annotations

import numpy as np

from strategies.base import Candidates, QueryContext, QueryStrategy, Shard
from strategies.order import top


class RandomStrategy(QueryStrategy):
    """Every item scores 0, so the canonical tie-break, a hash of (seed, round, id), decides: a seeded uniform
    draw that is the same however the pool is sharded, and a new one each round."""

    name = "random"

    def candidates(self, shard: Shard, n: int, ctx: QueryContext) -> Candidates:
        return top(shard.ids, np.zeros(len(shard)), n, ctx)
