"""Uncertainty within diversity clusters: the most uncertain texts, spread over the embedding space."""

from __future__ import annotations

import numpy as np

from strategies.base import Shard
from strategies.diversity import DiversityStrategy
from strategies.measures import Measure, uncertainty
from strategies.uncertainty import check_measure


class HybridStrategy(DiversityStrategy):
    """Round-robin over k-means clusters of the embeddings, most uncertain first within each cluster, so a
    batch is not near-duplicates from the SLM's one weak spot.

    Falls back to the signal that exists: no probs -> `diversity`; no embeddings -> `uncertainty`; neither
    (before the first SLM) -> `random`.
    """

    name = "hybrid"
    needs = frozenset({"embeddings", "probs"})

    def __init__(self, measure: Measure = "entropy", n_clusters: int = 32, batch_rows: int = 4096):
        check_measure(measure)
        super().__init__(n_clusters, batch_rows)
        self.measure = measure

    def within(self, shard: Shard, dist2: np.ndarray | None) -> np.ndarray:
        if shard.probs is None:
            return super().within(shard, dist2)
        return uncertainty(shard.probs, self.measure)
