"""Diversity sampling: cover the embedding space, so a batch is not many copies of one kind of text."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from strategies.base import Candidates, QueryContext, QueryStrategy, Shard
from strategies.clusters import fit_centroids, nearest
from strategies.order import top


class DiversityStrategy(QueryStrategy):
    """k-means over the pool's embeddings (streamed, in `fit`), then round-robin over clusters: the item nearest
    each centroid, then the second nearest, and so on. With n much larger than `n_clusters` the picks crowd
    each centroid; raise `n_clusters` for finer coverage (k-means cost grows with it).

    Without embeddings (before the first SLM) it is the seeded random pick of `random`.
    """

    name = "diversity"
    needs = frozenset({"embeddings"})

    def __init__(self, n_clusters: int = 32, batch_rows: int = 4096):
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        if batch_rows < n_clusters:
            raise ValueError(f"batch_rows must be >= n_clusters ({n_clusters}), got {batch_rows}")
        self.n_clusters, self.batch_rows = n_clusters, batch_rows
        self._centroids: np.ndarray | None = None

    def fit(self, shards: Iterable[Shard], ctx: QueryContext) -> None:
        seed = int(np.random.SeedSequence([ctx.seed, ctx.round]).generate_state(1)[0])
        self._centroids = fit_centroids(
            (s.embeddings for s in shards if s.embeddings is not None), self.n_clusters, self.batch_rows, seed
        )

    def candidates(self, shard: Shard, n: int, ctx: QueryContext) -> Candidates:
        if shard.embeddings is None or self._centroids is None:
            return top(shard.ids, self.within(shard, None), n, ctx)
        cluster, dist2 = nearest(self._centroids, shard.embeddings)
        return top(shard.ids, self.within(shard, dist2), n, ctx, groups=cluster)

    def within(self, shard: Shard, dist2: np.ndarray | None) -> np.ndarray:
        """Who goes first inside a cluster: here the most central (None = no clusters: all tie)."""
        return np.zeros(len(shard)) if dist2 is None else -dist2.astype(np.float64)
