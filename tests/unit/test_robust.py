import numpy as np
import pytest
import torch

from freeal_stream.slm.augment import feature_noise, perturb
from freeal_stream.slm.robust import (
    alpha_ramp,
    classwise_clean_split,
    gmm_clean_split,
    kl_consistency,
    mixup,
    normalised_losses,
    soft_ce,
)


def test_normalised_losses_range_and_constant():
    x = normalised_losses(np.array([2.0, 4.0, 3.0]))
    assert x.tolist() == [0.0, 1.0, 0.5]
    assert normalised_losses(np.full(5, 0.7)).tolist() == [0.0] * 5


def test_gmm_split_recovers_a_known_mixture():
    rng = np.random.default_rng(0)
    losses = np.concatenate([rng.gamma(2.0, 0.05, 900), rng.normal(2.5, 0.5, 100).clip(0.5)])
    truly_clean = np.arange(1000) < 900
    clean, w = gmm_clean_split(losses, tau=0.7, seed=0)
    precision = (clean & truly_clean).sum() / clean.sum()
    recall = (clean & truly_clean).sum() / truly_clean.sum()
    assert precision > 0.9 and recall > 0.9
    assert w.shape == (1000,) and ((w >= 0) & (w <= 1)).all()
    assert w[truly_clean].mean() > w[~truly_clean].mean()


@pytest.mark.parametrize("losses", [np.array([0.1, 5.0, 0.2]), np.full(50, 0.3), np.array([])])
def test_gmm_split_degenerate_cases_keep_everything(losses):
    clean, w = gmm_clean_split(losses, tau=0.7, seed=0)
    assert clean.all() and len(clean) == len(losses) and (w == 1).all()


def test_classwise_split_keeps_a_class_the_model_under_predicts():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 200)
    losses = np.where(labels == 0, rng.gamma(2.0, 0.03, 400), 1.0 + rng.gamma(2.0, 0.03, 400))
    losses[[5, 250]] += 4.0  # one clearly mislabelled row per class
    assert not gmm_clean_split(losses, 0.7, seed=0)[0][labels == 1].any()  # one global fit drops class 1
    clean, w = classwise_clean_split(losses, labels, 0.7, seed=0)
    assert clean[labels == 0].mean() > 0.9 and clean[labels == 1].mean() > 0.9
    assert not clean[5] and not clean[250] and w.shape == (400,)


def test_mixup_keeps_own_label_dominant_and_targets_sum_to_one():
    rng = np.random.default_rng(1)
    emb = torch.randn(16, 8)
    onehot = torch.nn.functional.one_hot(torch.arange(16) % 3, 3).float()
    for _ in range(20):
        mixed = mixup(emb, onehot, alpha=4.0, rng=rng)
        assert 0.5 <= mixed.lam <= 1.0
        assert torch.allclose(mixed.targets.sum(-1), torch.ones(16))
        assert mixed.emb.shape == emb.shape
    assert torch.allclose(
        mixup(emb, onehot, 4.0, np.random.default_rng(2)).emb, mixup(emb, onehot, 4.0, np.random.default_rng(2)).emb
    )


def test_soft_ce_equals_ce_for_one_hot_targets():
    logits = torch.randn(5, 3)
    y = torch.tensor([0, 2, 1, 1, 0])
    expected = torch.nn.functional.cross_entropy(logits, y)
    assert torch.allclose(soft_ce(logits, torch.nn.functional.one_hot(y, 3).float()), expected)


def test_kl_consistency_zero_when_equal_and_grad_only_through_aug():
    logits = torch.randn(4, 3)
    assert float(kl_consistency(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    aug = torch.randn(4, 3, requires_grad=True)
    orig = torch.randn(4, 3, requires_grad=True)
    kl = kl_consistency(aug, orig)
    assert kl.item() > 0
    kl.backward()
    assert aug.grad is not None and aug.grad.abs().sum() > 0
    assert orig.grad is None
    assert float(kl_consistency(torch.zeros(0, 3), torch.zeros(0, 3))) == 0.0


def test_alpha_ramp():
    assert [alpha_ramp(e, warmup=1, rampup=2) for e in range(1, 6)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert alpha_ramp(3, warmup=2, rampup=0) == 1.0
    assert alpha_ramp(1, warmup=0, rampup=4) == 0.25


def test_perturb_changes_some_words_and_is_seeded():
    text = " ".join(f"w{i}" for i in range(40))
    a, b = perturb(text, np.random.default_rng(0)), perturb(text, np.random.default_rng(0))
    assert a == b and a != text
    words = a.split()
    assert 28 <= len(words) <= 40 and set(words) <= set(text.split())
    assert perturb("single", np.random.default_rng(0)) == "single"


def test_feature_noise_stays_unit_norm_and_close():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(64, 384), dim=-1)
    noisy = feature_noise(emb)
    assert torch.allclose(noisy.norm(dim=-1), torch.ones(64), atol=1e-5)
    cos = (noisy * emb).sum(-1)
    assert 0.7 < float(cos.mean()) < 0.99
