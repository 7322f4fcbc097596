"""Human labels inside a round, on a real store: never a target of the LLM (either schedule), clean by fiat in
the stored scores and in the SLM's training split."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from freeal_stream.config import FreeALConfig, SLMConfig, parse_job
from freeal_stream.records import Annotation, HumanLabel
from freeal_stream.rounds.arrays import RowArray
from freeal_stream.rounds.planning import choose_targets, llm_label_array, training_labels
from freeal_stream.rounds.training import _store_scores
from freeal_stream.slm.trainer import TrainingData, fit_slm
from freeal_stream.store import Store
from strategies.registry import load_strategy

N = 40
HUMAN = ["i3", "i4", "i32", "i33"]  # two the LLM labelled, two it never saw
LLM_LABELLED = 30


def context(tmp_path, schedule="budgeted"):
    store = Store(tmp_path / "s.duckdb")
    ids = [f"i{k}" for k in range(N)]
    store.add_items(ids, [f"text {k}" for k in range(N)], [None] * N, [None] * N, [f"h{k}" for k in range(N)])
    store.add_annotations(1, [Annotation(f"i{k}", f"q{k}", k % 2, 0.9, ()) for k in range(LLM_LABELLED)])
    store.add_human_labels("review.csv", [HumanLabel(i, 1) for i in HUMAN], "llm")
    job = parse_job(
        {
            "name": "j",
            "data": {"path": "x.csv"},
            "seed": 0,
            "task": {"description": "d", "classes": {"a": ["a"], "b": ["b"]}},
            "freeal": {"schedule": schedule, "query_fraction": 1.0, "tau": 0.5},
        }
    )
    return SimpleNamespace(store=store, job=job, pool=SimpleNamespace(size=N), n_classes=2)


def test_a_human_label_is_never_sent_to_the_llm(tmp_path):
    ctx = context(tmp_path)
    targets = choose_targets(ctx, 2, SimpleNamespace(logits=None, emb=None), load_strategy("random", {}))
    assert sorted(targets) == [k for k in range(LLM_LABELLED, N) if f"i{k}" not in HUMAN]  # all unannotated but 2
    ctx.store.close()
    ctx = context(tmp_path / "full", "full")  # the full schedule's first round asks about every text
    targets = choose_targets(ctx, 1, SimpleNamespace(trained=False), load_strategy("random", {}))
    assert sorted(targets) == [k for k in range(LLM_LABELLED, N) if f"i{k}" not in HUMAN]
    ctx.store.close()


def test_human_labels_replace_the_llms_for_training_and_are_stored_as_clean(tmp_path):
    ctx = context(tmp_path)
    labels, human = training_labels(ctx)
    assert list(np.flatnonzero(human)) == [3, 4, 32, 33] and labels[4] == 1 != 4 % 2  # the human's label wins
    assert (labels[:LLM_LABELLED] >= 0).all() and labels[32] == labels[33] == 1 and labels[34] == -1
    # among the rows labelled 1 the SLM agrees with those at k = 1 mod 4 and is sure of class 0 elsewhere: those
    # (human rows included) have a high loss, so the GMM calls them noisy; the human ones stay clean anyway
    sure = np.where((np.arange(N) % 4 == 1)[:, None], [-4.0, 4.0], [4.0, -4.0]).astype(np.float32)
    logits = RowArray.create(tmp_path / "logits.f32", 2)
    logits.write(0, sure + np.random.default_rng(0).normal(0, 0.1, sure.shape).astype(np.float32))
    logits.commit(N)
    _store_scores(ctx, 1, labels, human, llm_label_array(ctx), logits)
    clean = dict(ctx.store.con.execute("SELECT item_id, clean FROM slm_scores WHERE round = 1").fetchall())
    ctx.store.close()
    assert all(clean[i] for i in HUMAN)
    assert clean["i1"] and clean["i5"] and not clean["i7"] and not clean["i11"]  # the LLM's labels: as the GMM says


def test_trusted_rows_stay_in_the_slms_clean_split(tmp_path):
    """Two separable classes, 8 rows labelled against their cluster: the GMM drops them unless trusted."""
    rng = np.random.default_rng(0)
    y = np.arange(60) % 2
    emb = rng.normal(0, 0.3, (60, 384)).astype(np.float32)
    emb[:, 0] += np.where(y == 1, 3.0, -3.0)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    wrong = np.arange(8)
    labels = y.copy()
    labels[wrong] = 1 - labels[wrong]
    cfg = SLMConfig(mode="head", epochs=5, batch_size=16, head_hidden=32)
    freeal = FreeALConfig(warmup_epochs=2, rampup_epochs=1)
    steps: list[tuple[int, int, int]] = []
    plain = fit_slm(TrainingData(labels, emb=emb), 2, cfg, freeal, seed=0)
    trusted = np.zeros(60, bool)
    trusted[wrong] = True
    kept = fit_slm(
        TrainingData(labels, emb=emb, trusted=trusted),
        2,
        cfg,
        freeal,
        seed=0,
        on_step=lambda e, s, n: steps.append((e, s, n)),
    )
    after_warmup = [(p["n_clean"], k["n_clean"]) for p, k in zip(plain.history[2:], kept.history[2:])]
    assert all(k >= p + 6 for p, k in after_warmup), after_warmup  # the GMM drops >= 6 of the 8; trust keeps them
    assert steps[0] == (1, 1, steps[0][2]) and steps[-1][0] == 5 and steps[-1][1] == steps[-1][2]


def test_the_estimate_counts_a_human_label_as_right(tmp_path):
    """The round's gold-free estimate of the export's accuracy is the mean over the pool of the label of record's
    probability of being right, as the export carries it: 1 for a human label, whatever the models think (here
    the SLM is sure of the other class on three of the four)."""
    import json

    from freeal_stream.rounds.quality import OutOfFold

    ctx = context(tmp_path)
    labels, human = training_labels(ctx)
    sure = np.where((np.arange(N) % 4 == 1)[:, None], [-4.0, 4.0], [4.0, -4.0]).astype(np.float32)
    logits = RowArray.create(tmp_path / "logits.f32", 2)
    logits.write(0, sure + np.random.default_rng(0).normal(0, 0.5, sure.shape).astype(np.float32))
    logits.commit(N)
    has = np.flatnonzero(labels >= 0)
    oof = OutOfFold(has, sure[has] + np.random.default_rng(1).normal(0, 0.5, (len(has), 2)).astype(np.float32))
    _store_scores(ctx, 1, labels, human, llm_label_array(ctx), logits, oof)
    estimate = json.loads(ctx.store.get_meta("quality/round-1"))["estimate"]
    rows = {r[1]: r for r in ctx.store.labels_rows(ctx.job.freeal.label_of_record)}
    ctx.store.close()
    assert all(rows[i][5] == "human" and rows[i][10] == 1.0 for i in HUMAN)
    assert None not in [r[10] for r in rows.values()]
    assert estimate["accuracy"] == round(float(np.mean([r[10] for r in rows.values()])), 4)
    assert estimate["low"] <= estimate["accuracy"] <= estimate["high"]
