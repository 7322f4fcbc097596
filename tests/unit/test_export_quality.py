"""The latent-class calibration (freeal_stream.dawid_skene) and the per-item probabilities and estimate built on it
(freeal_stream.rounds.quality), on synthetic data whose truth is known."""

import itertools

import numpy as np
import pytest

from freeal_stream.dawid_skene import Calibration, fit_calibration
from freeal_stream.rounds.quality import (
    COVERAGE,
    ItemProbabilities,
    OutOfFold,
    Tally,
    interval,
    item_probabilities,
    slm_wins,
)


def synthetic(n: int, temperature: float, llm_acc: tuple[float, float], seed: int = 0):
    """SLM logits whose right temperature is `temperature`, true classes drawn from them, and LLM labels right
    with probability llm_acc[true class]."""
    rng = np.random.default_rng(seed)
    log_odds = rng.normal(0, 2.5, n)
    truth = (rng.random(n) < 1 / (1 + np.exp(-log_odds))).astype(int)
    logits = np.stack([np.zeros(n), log_odds * temperature], 1)
    llm = np.where(rng.random(n) < np.array(llm_acc)[truth], truth, 1 - truth)
    return logits, llm, truth


@pytest.mark.parametrize("temperature,llm_acc", [(2.0, (0.95, 0.85)), (0.5, (0.9, 0.97))])
def test_recovers_the_temperature_and_the_llm_accuracy_from_noisy_labels_alone(temperature, llm_acc):
    logits, llm, _ = synthetic(20000, temperature, llm_acc)
    cal = fit_calibration(logits, llm, 2)
    assert cal.temperature == pytest.approx(temperature, rel=0.1)
    assert cal.llm_accuracy == pytest.approx(list(llm_acc), abs=0.02)
    again = fit_calibration(logits, llm, 2, start=cal)  # a warm start (the bootstrap's) ends at the same fit
    assert again.temperature == pytest.approx(cal.temperature, rel=1e-3)


def test_agreement_is_not_correctness():
    """With the LLM 85% right, an SLM fitted to agree with its labels would think itself wrong on 15% of the
    confident items; the fit puts the blame where it lies, so the calibrated SLM is right as often as it says."""
    logits, llm, truth = synthetic(20000, 1.0, (0.85, 0.85), seed=1)
    cal = fit_calibration(logits, llm, 2)
    p = cal.probs(logits).max(1)
    right = logits.argmax(1) == truth
    confident = p > 0.95
    assert right[confident].mean() == pytest.approx(p[confident].mean(), abs=0.01)
    assert (llm[confident] == logits.argmax(1)[confident]).mean() < 0.88  # what agreement alone would say


def test_posterior_combines_both_models_and_too_few_labels_give_no_fit():
    cal = Calibration(1.0, ((0.9, 0.1), (0.2, 0.8)), 100)
    logits = np.array([[0.0, 0.0], [0.0, np.log(9.0)]])
    post = cal.posteriors(logits, np.array([0, -1]))
    assert post[0] == pytest.approx([0.9 / 1.1, 0.2 / 1.1])  # an unsure SLM: the LLM's label, weighed by M
    assert post[1] == pytest.approx([0.1, 0.9])  # no LLM label: the SLM's calibrated probabilities
    assert fit_calibration(logits, np.array([0, 1]), 2) is None
    assert Calibration.from_json(cal.to_json()) == cal


def test_auto_keeps_the_slm_label_only_where_it_is_more_likely_right():
    cal = Calibration(1.0, ((0.9, 0.1), (0.1, 0.9)), 100)
    logits = np.array([[0.0, 4.0], [0.0, 1.0], [0.0, 4.0]])  # the SLM says class 1, sure / unsure / sure
    llm = np.array([0, 0, -1])
    probs = item_probabilities(cal, logits, logits, llm)
    assert probs.p_right[0] > 0.5 > probs.llm_p_right[0]  # sure SLM (e^4 : 1) against a 90% LLM: the SLM
    assert probs.p_right[1] < 0.5 < probs.llm_p_right[1]  # unsure SLM (e : 1): the LLM
    assert np.isnan(probs.llm_p_right[2])
    clean = np.array([True, False, False])
    assert list(slm_wins("auto", probs, llm, clean)) == [True, False, True]
    assert list(slm_wins("llm", probs, llm, clean)) == [False, False, True]
    assert list(slm_wins("slm", probs, llm, clean)) == [False, True, True]


def test_a_judge_less_sure_than_the_round_s_slm_sets_its_probabilities_where_the_llm_gave_no_label():
    """Fine-tune mode: the temperature is fitted on fold SLMs' logits; applied to a surer SLM it would claim
    more than it knows, so rows without an LLM label are judged by the folds' mean (`OutOfFold.judge`), and
    where the two disagree the SLM's label is the less likely one."""
    oof = OutOfFold(np.array([1]), np.array([[0.0, 1.0]]), np.array([0, 2]), np.array([[0.0, 0.5], [1.0, 0.0]]))
    slm = np.array([[0.0, 6.0], [0.0, 6.0], [0.0, 6.0], [0.0, 6.0]])  # sure of class 1 everywhere
    judge = oof.judge(np.arange(4), slm)
    assert judge.tolist() == [[0.0, 0.5], [0.0, 6.0], [1.0, 0.0], [0.0, 6.0]]  # the folds' where given
    cal = Calibration(1.0, ((0.9, 0.1), (0.1, 0.9)), 100)
    llm = np.array([-1, 1, -1, -1])
    p = item_probabilities(cal, slm, slm, llm, judge).p_right
    assert p[0] == pytest.approx(1 / (1 + np.exp(-0.5))) and p[2] < 0.5  # the judge's probability of class 1
    assert p[3] == pytest.approx(1 / (1 + np.exp(-6.0)))  # no fold mean: the SLM's own
    assert p[0] < item_probabilities(cal, slm, slm, llm).p_right[0]  # judged by itself, it claims more


def test_fine_tune_folds_give_their_mean_logits_to_rows_without_a_label():
    from freeal_stream.config import FreeALConfig, SLMConfig
    from freeal_stream.slm.trainer import TrainingData, out_of_fold_logits

    words = (["great", "wonderful", "superb", "lovely"], ["awful", "dreadful", "boring", "terrible"])
    texts = [f"a {words[k % 2][k % 4]} film, truly {words[k % 2][(k + 1) % 4]}" for k in range(24)]
    labels = np.array([k % 2 for k in range(20)] + [-1] * 4)
    cfg = SLMConfig(mode="finetune", epochs=1, batch_size=8, max_length=16)
    out = out_of_fold_logits(TrainingData(labels, texts=texts), 2, cfg, FreeALConfig(warmup_epochs=0), 2, seed=0)
    assert np.isfinite(out).all()  # held-out labelled rows, and the 4 unlabelled rows from the folds' mean


def test_the_estimate_tracks_the_truth_and_its_interval_covers_it():
    logits, llm, truth = synthetic(6000, 1.5, (0.93, 0.9), seed=2)
    labelled = np.zeros(len(llm), bool)
    labelled[:2000] = True
    llm_seen = np.where(labelled, llm, -1)
    cal = fit_calibration(logits[labelled], llm[labelled], 2)
    probs = item_probabilities(cal, logits, logits, llm_seen)
    clean = np.ones(len(llm), bool)
    wins = slm_wins("auto", probs, llm_seen, clean)
    record = np.where(wins, logits.argmax(1), llm_seen)
    tally = Tally()
    tally.add(np.where(wins, probs.p_right, probs.llm_p_right), wins)
    true_acc = (record == truth).mean()
    low, high = interval(
        "auto",
        cal,
        logits,
        logits,
        llm_seen,
        clean,
        np.zeros(len(llm_seen), bool),
        (logits[labelled], llm[labelled]),
        seed=0,
    )
    assert tally.total / tally.n == pytest.approx(true_acc, abs=0.015)
    assert low <= true_acc <= high and high - low < 0.04
    cover = tally.coverage()
    assert [c["threshold"] for c in cover] == list(COVERAGE)
    assert all(a["share"] >= b["share"] for a, b in itertools.pairwise(cover))  # a higher bar keeps fewer labels


def test_tally_of_an_empty_shard_changes_nothing():
    tally = Tally()
    tally.add(np.array([0.9, 0.6]), np.array([True, False]))
    tally.add(np.zeros(0), np.zeros(0, bool))
    assert (
        tally.n == 2
        and tally.slm_labels == 1
        and tally.coverage()[0] == {"threshold": 0.5, "share": 1.0, "accuracy": 0.75}
    )
    assert isinstance(ItemProbabilities(np.zeros(1), np.zeros(1)).p_right, np.ndarray)


def test_out_of_fold_logits_come_from_models_that_never_saw_the_label():
    """Each labelled row is scored by the fold model that had its label hidden; unlabelled rows get none. A row
    whose label contradicts its neighbours is scored against that label out of fold (a model trained on it
    would have fitted it)."""
    from freeal_stream.config import FreeALConfig, SLMConfig
    from freeal_stream.slm.trainer import TrainingData, fold_of, out_of_fold_logits

    rng = np.random.default_rng(0)
    centre = rng.normal(size=(2, 384)).astype(np.float32)
    labels = np.array([0, 1] * 40 + [-1] * 10)
    emb = centre[np.maximum(labels, 0)] + 0.3 * rng.normal(size=(90, 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels[0] = 1  # a wrong label on a class-0 row
    out = out_of_fold_logits(
        TrainingData(labels, emb=emb), 2, SLMConfig(mode="head", epochs=2), FreeALConfig(), 4, seed=0
    )
    assert np.isnan(out[labels < 0]).all() and np.isfinite(out[labels >= 0]).all()
    assert out[0].argmax() == 0  # out of fold, the wrong label is not believed
    assert (out[1:80].argmax(1) == labels[1:80]).mean() > 0.9
    capped = fold_of(labels, 4, seed=0, held_out=5)
    assert np.bincount(capped[capped >= 0]).tolist() == [5, 5, 5, 5] and (capped[labels < 0] == -1).all()
