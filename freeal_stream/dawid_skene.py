"""How likely each label is right, without gold: the SLM's confidence calibrated against the LLM's noisy labels.

Agreement with the LLM is not correctness: the LLM is wrong on some of the labels the SLM is checked against.
So the model fitted here is a two-annotator latent-class model (Dawid and Skene, 1979) with one annotator
made of the SLM's logits:

    true class   y | x ~ softmax(z(x) / T)          (the SLM, temperature-scaled; z out of fold, see below)
    LLM label    l | y ~ M[y, :]                    (the LLM's confusion matrix, one row per true class)

fitted by maximum likelihood (EM; the temperature by a 1-D search) on items the LLM labelled, with logits from
SLMs that did not train on them (cross-fitted: `rounds.quality` trains fold models). Assumed: the LLM's errors
depend on the true class only, not on the text otherwise (so they are independent of the SLM's errors given
the class), and the SLM's confidence is right up to one temperature. Neither holds exactly (texts that are hard
for one model tend to be hard for the other); `bench/bench_pool_quality.py` measures how far the estimate this
gives is from the truth.

From the fit: P(the SLM's label is right) for every item, and for an LLM-labelled item the posterior of both
labels given both models (`posteriors`), which is what the `auto` label-of-record rule compares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOG_T_BOUNDS = (np.log(0.02), np.log(50.0))  # temperatures searched
PRIOR_DIAG, PRIOR_OFF = 3.0, 2.0  # Dirichlet parameters on M rows: a weak lean to an LLM better than chance
MIN_LABELS_PER_CLASS = 10  # LLM-labelled items per class (on average) below which a fit says nothing


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature for the SLM's logits and the LLM's confusion matrix (rows: true class)."""

    temperature: float
    llm_confusion: tuple[tuple[float, ...], ...]
    n_items: int  # LLM-labelled items it was fitted on

    @property
    def confusion(self) -> np.ndarray:
        return np.asarray(self.llm_confusion, dtype=np.float64)

    @property
    def llm_accuracy(self) -> list[float]:
        """P(the LLM's label is right | true class), per class."""
        return [float(v) for v in np.diag(self.confusion)]

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The SLM's calibrated class probabilities."""
        return _softmax(np.asarray(logits, dtype=np.float64) / self.temperature)

    def posteriors(self, logits: np.ndarray, llm_labels: np.ndarray) -> np.ndarray:
        """P(true class | the SLM's logits, the LLM's label); rows without an LLM label (-1) get the SLM's
        calibrated probabilities alone."""
        p = self.probs(logits)
        has = llm_labels >= 0
        if has.any():
            joint = p[has] * self.confusion[:, llm_labels[has]].T
            p[has] = joint / joint.sum(1, keepdims=True)
        return p

    def to_json(self) -> dict:
        return {
            "temperature": round(self.temperature, 4),
            "llm_confusion": [[round(v, 4) for v in row] for row in self.llm_confusion],
            "llm_accuracy": [round(v, 4) for v in self.llm_accuracy],
            "n_items": self.n_items,
        }

    @classmethod
    def from_json(cls, d: dict) -> Calibration:
        return cls(float(d["temperature"]), tuple(tuple(map(float, r)) for r in d["llm_confusion"]), int(d["n_items"]))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def can_fit(n_labelled: int, n_classes: int) -> bool:
    """Whether `n_labelled` LLM-labelled items are enough for a fit: MIN_LABELS_PER_CLASS a class on average."""
    return n_labelled >= MIN_LABELS_PER_CLASS * n_classes


def fit_calibration(
    logits: np.ndarray, llm_labels: np.ndarray, n_classes: int, start: Calibration | None = None
) -> Calibration | None:
    """The latent-class fit on out-of-fold `logits` (n, C) of items the LLM labelled (`llm_labels` >= 0): the
    maximum of the marginal likelihood of the LLM's labels (with a weak Dirichlet prior on M's rows) over the
    temperature and M, by L-BFGS with the exact gradient, from `start` or from T = 1 and an LLM right 90% of the
    time. None when there are too few labelled items (`can_fit`) to say anything."""
    from scipy.optimize import minimize

    z = np.asarray(logits, dtype=np.float64)
    lab = np.asarray(llm_labels, dtype=np.int64)
    keep = lab >= 0
    z, lab = z[keep], lab[keep]
    c = n_classes
    if not can_fit(len(lab), c):
        return None
    onehot = np.eye(c)[lab]
    alpha = np.full((c, c), PRIOR_OFF) + np.eye(c) * (PRIOR_DIAG - PRIOR_OFF) - 1.0  # prior pseudo-counts

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        log_t, rows = theta[0], theta[1:].reshape(c, c)  # M[j] = softmax(rows[j])
        t = np.exp(log_t)
        log_m = _log_softmax(rows)
        log_p = _log_softmax(z / t)
        log_joint = log_p + log_m[:, lab].T  # (n, C): log p(y) + log M[y, l]
        norm = np.logaddexp.reduce(log_joint, axis=1)
        resp = np.exp(log_joint - norm[:, None])  # posterior of the true class
        m = np.exp(log_m)
        ll = norm.sum() + (alpha * log_m).sum()
        mean_z = (np.exp(log_p) * z).sum(1, keepdims=True)
        d_log_t = -(resp * (z - mean_z)).sum() / t
        d_rows = resp.T @ onehot - resp.sum(0)[:, None] * m + alpha - alpha.sum(1, keepdims=True) * m
        return -ll, -np.concatenate([[d_log_t], d_rows.ravel()])

    if start is None:
        theta0 = np.concatenate([[0.0], (np.eye(c) * np.log(9.0 * max(1, c - 1))).ravel()])
    else:
        theta0 = np.concatenate([[np.log(start.temperature)], np.log(start.confusion).ravel()])
    res = minimize(loss, theta0, jac=True, method="L-BFGS-B", bounds=[LOG_T_BOUNDS] + [(-30.0, 30.0)] * (c * c))
    confusion = np.exp(_log_softmax(res.x[1:].reshape(c, c)))
    return Calibration(float(np.exp(res.x[0])), tuple(tuple(float(v) for v in row) for row in confusion), len(lab))
