"""Streamed k-means over the pool's embeddings, for the strategies that spread a batch across clusters."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from sklearn.cluster import MiniBatchKMeans


def _batches(arrays: Iterable[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """The rows of `arrays`, in order, re-cut into batches of exactly `rows` (the last may be shorter)."""
    rest: np.ndarray | None = None
    for a in arrays:
        joined = a if rest is None else np.concatenate([rest, a])
        full = len(joined) // rows * rows
        for start in range(0, full, rows):
            yield joined[start : start + rows]
        rest = joined[full:]
    if rest is not None and len(rest):
        yield rest


def fit_centroids(embeddings: Iterable[np.ndarray], n_clusters: int, batch_rows: int, seed: int) -> np.ndarray | None:
    """(k, d) centroids by MiniBatchKMeans.partial_fit, k = min(n_clusters, pool rows); None for an empty pool.

    Batches are re-cut to `batch_rows` whatever the shard sizes, so the centroids (and so the selection) do
    not depend on how the pool is sharded; memory is one batch plus k centroids.
    """
    km: MiniBatchKMeans | None = None
    for batch in _batches(embeddings, batch_rows):
        if km is None:  # a first batch shorter than batch_rows is the whole pool: k cannot exceed it
            km = MiniBatchKMeans(
                n_clusters=min(n_clusters, len(batch)), batch_size=batch_rows, n_init=1, random_state=seed
            )
        km.partial_fit(batch)
    return None if km is None else km.cluster_centers_


def nearest(centroids: np.ndarray, embeddings: np.ndarray, block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centroid and its squared distance to it, `block` rows at a time (bounded memory).

    Computed in float64 and rounded to float32: BLAS sums in an order that depends on the matrix shape, and
    a last-bit difference between a 1-row and a 60,000-row shard must not reorder items.
    """
    c = np.asarray(centroids, dtype=np.float64)
    c2 = (c * c).sum(1)
    label = np.empty(len(embeddings), dtype=np.int64)
    dist2 = np.empty(len(embeddings), dtype=np.float32)
    for start in range(0, len(embeddings), block):
        x = np.asarray(embeddings[start : start + block], dtype=np.float64)
        d2 = (x * x).sum(1)[:, None] - 2.0 * (x @ c.T) + c2[None, :]
        at = d2.argmin(1)
        label[start : start + block] = at
        dist2[start : start + block] = np.maximum(d2[np.arange(len(x)), at], 0.0)
    return label, dist2
