"""Uniform random selection: the paper's budgeted variant, and the baseline every strategy must beat."""
from __future__ import annotations

import numpy as np

from strategies.base import QueryContext


class RandomStrategy:
    def query(self, ids: np.ndarray, n: int, ctx: QueryContext) -> np.ndarray:
        rng = np.random.default_rng([ctx.seed, ctx.round])
        n = min(n, len(ids))
        return ids[np.sort(rng.choice(len(ids), size=n, replace=False))] if n else ids[:0]
