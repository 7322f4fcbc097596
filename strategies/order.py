"""The canonical order of items, which makes selection over shards equal selection over the whole pool.

Items are ordered by (rank within their group, score descending, tie-break), where the rank within a group
is the item's position in its group sorted by (score descending, tie-break), and the tie-break is a hash of
(seed, round, id). With one group this is plain score order. With several (clusters), it is round-robin:
every group's best, then every group's second best, ... (the best of those first).

Why shard-then-merge is exact: adding items to a set can only add to the number of items ahead of a given
item (its rank in its group can only grow, and so can every other group's count of items ahead of it). So an
item with n items ahead of it within its own shard, or within a partial merge, has at least n ahead of it in
the whole pool and can never be in the top n: keeping each shard's top n, and the running merge's top n,
loses nothing.
"""

from __future__ import annotations

import numpy as np

from strategies.base import Candidates, QueryContext

_MASK = (1 << 64) - 1
_FNV_PRIME = np.uint64(0x100000001B3)


def _mix(x: int) -> int:
    """splitmix64 finaliser on a Python int: spreads (seed, round) over all 64 bits."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _mix_array(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised: FNV alone leaves ids that share a prefix with close hashes."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def tiebreak(ids: np.ndarray, ctx: QueryContext) -> np.ndarray:
    """A uint64 per id, a pure function of (ctx.seed, ctx.round, str(id)): a seeded random order of ids.

    Vectorised FNV-1a over the ids' code points (2-3x faster than hashlib per id on 1M ids), masked by each
    id's length so the result does not depend on the width of the array the id sits in.
    """
    text = np.asarray(ids).astype(str)
    if len(text) == 0:
        return np.zeros(0, dtype=np.uint64)
    points = text.view(np.uint32).reshape(len(text), text.dtype.itemsize // 4)
    lengths = np.char.str_len(text)
    h = np.full(len(text), _mix(_mix(ctx.seed & _MASK) ^ (ctx.round & _MASK)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(points.shape[1]):
            h = np.where(lengths > j, (h ^ points[:, j].astype(np.uint64)) * _FNV_PRIME, h)
    return _mix_array(h)


def order(scores: np.ndarray, groups: np.ndarray | None, ties: np.ndarray) -> np.ndarray:
    """Indices of the items in canonical order (see the module docstring)."""
    neg = -np.asarray(scores, dtype=np.float64)
    if groups is None:
        return np.lexsort((ties, neg))
    groups = np.asarray(groups, dtype=np.int64)
    within = np.lexsort((ties, neg, groups))
    g = groups[within]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    rank = np.empty(len(g), dtype=np.int64)
    rank[within] = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    return np.lexsort((ties, neg, rank))


def top(ids: np.ndarray, scores: np.ndarray, n: int, ctx: QueryContext, groups: np.ndarray | None = None) -> Candidates:
    """A shard's best min(n, len(ids)) in canonical order: what `QueryStrategy.candidates` should return."""
    scores = np.asarray(scores, dtype=np.float64)
    keep = order(scores, groups, tiebreak(ids, ctx))[: max(n, 0)]
    return Candidates(np.asarray(ids)[keep], scores[keep], None if groups is None else np.asarray(groups)[keep])
