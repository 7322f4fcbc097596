"""The functional core of robust self-training (docs/METHOD.md section 3): pure functions, each testable alone."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

MIN_GMM_SAMPLES = 10


def normalised_losses(losses: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] so the mixture sees the same range every epoch; all-equal -> zeros."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.size == 0:
        return losses
    span = float(losses.max() - losses.min())
    if span < 1e-12:
        return np.zeros_like(losses)
    return (losses - losses.min()) / span


def gmm_clean_split(losses: np.ndarray, tau: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(clean mask, w): w = posterior of the low-loss component of a 2-component 1-D GMM, clean = w >= tau.

    Too few samples or identical losses carry no clean/noisy signal, so everything counts as clean
    rather than splitting on noise.
    """
    losses = np.asarray(losses, dtype=np.float64)
    n = losses.size
    x = normalised_losses(losses)
    if n < MIN_GMM_SAMPLES or not x.any():
        return np.ones(n, dtype=bool), np.ones(n)
    gmm = GaussianMixture(n_components=2, max_iter=20, tol=1e-2, reg_covar=5e-4, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(x.reshape(-1, 1))
    w = gmm.predict_proba(x.reshape(-1, 1))[:, int(np.argmin(gmm.means_.ravel()))]
    return w >= tau, w


def classwise_clean_split(
    losses: np.ndarray, labels: np.ndarray, tau: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """`gmm_clean_split` within each given class, so a class the model still under-predicts is not
    discarded wholesale as 'noisy' (the failure mode after a short warm-up or with a label-biased LLM)."""
    clean, w = np.zeros(len(losses), dtype=bool), np.zeros(len(losses))
    for c in np.unique(labels):
        rows = labels == c
        clean[rows], w[rows] = gmm_clean_split(losses[rows], tau, seed)
    return clean, w


class Mixed(NamedTuple):
    emb: torch.Tensor
    targets: torch.Tensor
    lam: float


def mixup(emb: torch.Tensor, onehot: torch.Tensor, alpha: float, rng: np.random.Generator) -> Mixed:
    """Mix each embedding and target with a random partner; λ = max(λ, 1-λ) keeps the own label dominant."""
    lam = float(rng.beta(alpha, alpha))
    lam = max(lam, 1.0 - lam)
    perm = torch.from_numpy(rng.permutation(emb.shape[0])).to(emb.device)
    return Mixed(lam * emb + (1 - lam) * emb[perm], lam * onehot + (1 - lam) * onehot[perm], lam)


def soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a probability vector (mixup targets); mean over the batch."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def kl_consistency(aug_logits: torch.Tensor, orig_logits: torch.Tensor) -> torch.Tensor:
    """KL(S(x) ‖ S(x_aug)), batch mean; the original view is a fixed target, so only the aug side learns.

    docs/METHOD.md writes L_cr_u = KL(S(x^aug) ‖ S(x)) with the target side detached; this is that term in
    PyTorch's `kl_div(input=aug, target=orig)` convention, the direction UDA uses (the authors' code
    averages both directions, each with its own detached target).
    """
    if aug_logits.shape[0] == 0:
        return aug_logits.sum() * 0.0
    return F.kl_div(
        F.log_softmax(aug_logits, dim=-1),
        F.log_softmax(orig_logits.detach(), dim=-1),
        log_target=True,
        reduction="batchmean",
    )


def alpha_ramp(epoch: int, warmup: int, rampup: int) -> float:
    """Weight of the auxiliary terms in 1-based `epoch`: 0 during warm-up, then linear to 1 over `rampup`."""
    if epoch <= warmup:
        return 0.0
    if rampup <= 0:
        return 1.0
    return min(1.0, (epoch - warmup) / rampup)
