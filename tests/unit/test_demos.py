import numpy as np

from freeal_stream.demos import (
    balanced_retrieve,
    group_queries,
    k_medoids,
    retrieve_for_groups,
    select_demo_pool,
    small_loss_per_class,
)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_small_loss_per_class_takes_smallest_share_of_each_class():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, -1])
    losses = np.array([0.4, 0.1, 0.3, 0.2, 0.9, 0.5, 0.7, 0.6, np.nan])
    got = small_loss_per_class(labels, losses, 0.5)
    assert sorted(got[0].tolist()) == [1, 3] and sorted(got[1].tolist()) == [5, 7]


def test_k_medoids_finds_one_point_per_cluster():
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(3, 16)))
    pts = unit(np.repeat(centres, 30, axis=0) + 0.05 * rng.normal(size=(90, 16)))
    med = k_medoids(pts, 3, seed=1)
    assert len(med) == 3 and sorted(m // 30 for m in med) == [0, 1, 2]
    assert k_medoids(pts[:2], 5).tolist() == [0, 1]


def test_select_demo_pool_is_class_balanced_and_from_clean():
    rng = np.random.default_rng(0)
    emb = unit(rng.normal(size=(100, 8)))
    labels = np.repeat([0, 1], 50)
    losses = rng.random(100)
    pool, clean = select_demo_pool(labels, losses, emb, ratio=0.2, k=4)
    assert len(clean) == 20 and set(pool) <= set(clean)
    assert sorted(np.bincount(labels[pool]).tolist()) == [4, 4]


def test_balanced_retrieve_interleaves_classes_most_similar_last():
    demo = unit(np.array([[1, 0], [0.9, 0.1], [0.5, 0.5], [0, 1], [0.1, 0.9], [0.6, 0.4]], float))
    labels = np.array([0, 0, 0, 1, 1, 1])
    order = balanced_retrieve(unit(np.array([[1.0, 0.0]]))[0], demo, labels, m=4, n_classes=2)
    assert labels[order].tolist() == [0, 1, 0, 1]
    assert order[-2] == 0 and order[-1] == 5  # nearest of each class closest to the query


def test_group_queries_covers_every_query_once_and_groups_neighbours():
    rng = np.random.default_rng(0)
    demo = unit(rng.normal(size=(4, 8)))
    queries = unit(np.repeat(demo, 5, axis=0) + 0.01 * rng.normal(size=(20, 8)))
    groups = group_queries(queries, demo, 5)
    flat = np.concatenate(groups)
    assert sorted(flat.tolist()) == list(range(20))
    assert all(len({q // 5 for q in g}) == 1 for g in groups)
    demos = retrieve_for_groups(queries, groups, demo, np.array([0, 1, 0, 1]), 2, 2)
    assert len(demos) == 4 and all(len(d) == 2 for d in demos)
    assert [len(g) for g in group_queries(queries, demo, 1)] == [1] * 20


def test_no_demos_means_zero_shot_singletons():
    queries = unit(np.random.default_rng(0).normal(size=(3, 4)))
    groups = group_queries(queries, queries[:0], 8)
    assert [g.tolist() for g in groups] == [[0], [1], [2]]
    assert all(len(d) == 0 for d in retrieve_for_groups(queries, groups, queries[:0], np.array([], int), 8, 2))
