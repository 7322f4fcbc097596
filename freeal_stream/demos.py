"""The SLM's feedback to the LLM: small-loss selection, k-medoids, class-balanced retrieval.

Also where queries are grouped so that a group shares one demo block: servers reuse an identical prompt
prefix, so a group sent back to back pays for its demos once.
"""

from __future__ import annotations

import numpy as np

# Above this many candidates per class, k-medoids runs on the smallest-loss subset of this size:
# the distance matrix is n^2 floats, and the medoids of the cleanest part are what the method wants.
MAX_MEDOID_CANDIDATES = 4000


def small_loss_per_class(labels: np.ndarray, losses: np.ndarray, ratio: float) -> dict[int, np.ndarray]:
    """For each class j, indices of the `ratio` share of rows labelled j with the smallest loss."""
    out: dict[int, np.ndarray] = {}
    for j in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero((labels == j) & ~np.isnan(losses))
        keep = max(1, int(round(len(idx) * ratio))) if len(idx) else 0
        out[int(j)] = idx[np.argsort(losses[idx], kind="stable")[:keep]]
    return out


def k_medoids(emb: np.ndarray, k: int, seed: int = 0, max_iter: int = 50) -> np.ndarray:
    """True k-medoids (medoids are data points) on cosine distance: k-medoids++ init, then alternate.

    Returns indices into `emb`, sorted. `emb` rows are L2-normalised.
    """
    n = len(emb)
    if k >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    dist = np.clip(1.0 - emb @ emb.T, 0.0, 2.0)
    medoids = [int(rng.integers(n))]
    closest = dist[medoids[0]].copy()
    for _ in range(1, k):
        p = closest**2
        total = p.sum()
        nxt = int(rng.choice(n, p=p / total)) if total > 0 else int(rng.choice(np.setdiff1d(np.arange(n), medoids)))
        medoids.append(nxt)
        closest = np.minimum(closest, dist[nxt])
    medoids_arr = np.array(medoids)
    for _ in range(max_iter):
        assign = dist[:, medoids_arr].argmin(1)
        new = medoids_arr.copy()
        for c in range(k):
            members = np.flatnonzero(assign == c)
            if len(members):
                new[c] = members[dist[np.ix_(members, members)].sum(1).argmin()]
        if np.array_equal(np.sort(new), np.sort(medoids_arr)):
            break
        medoids_arr = new
    return np.sort(np.unique(medoids_arr))


def select_demo_pool(
    labels: np.ndarray, losses: np.ndarray, emb: np.ndarray, ratio: float, k: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The demo pool: per class, k medoids of its R% smallest-loss rows. Returns (pool indices, clean indices)."""
    pool, clean = [], []
    for j, idx in small_loss_per_class(labels, losses, ratio).items():
        clean.append(idx)
        cand = idx[:MAX_MEDOID_CANDIDATES]
        pool.append(cand[k_medoids(emb[cand], k, seed=seed + j)])
    if not pool:
        return np.array([], dtype=int), np.array([], dtype=int)
    return np.concatenate(pool), np.concatenate(clean)


def balanced_retrieve(
    query: np.ndarray, demo_emb: np.ndarray, demo_labels: np.ndarray, m: int, n_classes: int
) -> np.ndarray:
    """Indices of m demos for one query: the nearest m // C of each class, classes interleaved.

    Interleaving (round-robin by class, least similar first) keeps a block of one class from sitting
    just before the query, which biases the answer; the most similar demos end nearest the query.
    """
    if m == 0 or len(demo_emb) == 0:
        return np.array([], dtype=int)  # zero-shot
    per_class = max(1, m // n_classes)
    sims = demo_emb @ query
    ranked: list[list[int]] = []
    for j in range(n_classes):
        idx = np.flatnonzero(demo_labels == j)
        ranked.append(list(idx[np.argsort(-sims[idx], kind="stable")[:per_class]]))
    order: list[int] = []
    for depth in reversed(range(per_class)):
        for j in range(n_classes):
            if depth < len(ranked[j]):
                order.append(int(ranked[j][depth]))
    return np.array(order, dtype=int)


def group_queries(query_emb: np.ndarray, demo_emb: np.ndarray, group_size: int) -> list[np.ndarray]:
    """Split queries into groups of similar texts that will share one demo block.

    Queries are ordered by their nearest demo, so neighbours in the order are near the same demos; a
    group of `group_size` consecutive queries then loses little by sharing the group's retrieval.
    """
    n = len(query_emb)
    if n == 0:
        return []
    if group_size <= 1 or len(demo_emb) == 0:
        return [np.array([i]) for i in range(n)]
    sims = query_emb @ demo_emb.T
    nearest = sims.argmax(1)
    order = np.lexsort((-sims[np.arange(n), nearest], nearest))
    return [order[i : i + group_size] for i in range(0, n, group_size)]


def retrieve_for_groups(
    query_emb: np.ndarray,
    groups: list[np.ndarray],
    demo_emb: np.ndarray,
    demo_labels: np.ndarray,
    m: int,
    n_classes: int,
) -> list[np.ndarray]:
    """One demo list per group, retrieved for the group's mean direction."""
    out = []
    for g in groups:
        centre = query_emb[g].mean(0)
        centre = centre / (np.linalg.norm(centre) or 1.0)
        out.append(balanced_retrieve(centre, demo_emb, demo_labels, m, n_classes))
    return out
