"""Uncertainty of SLM class probabilities, computed by modAL's measures (higher = less certain).

modAL 0.4.2.1 is unmaintained (`ActiveLearner.teach` breaks on scikit-learn >= 1.8), but its measures only
call `predict_proba(X)` on a classifier, so they work behind `_GivenProbs`, which answers with X itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from modAL.uncertainty import classifier_entropy, classifier_margin, classifier_uncertainty

Measure = Literal["entropy", "margin", "least_confidence"]


class _GivenProbs:
    """A 'classifier' whose predictions are its input: lets modAL measure probabilities we already have."""

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return X


_MEASURES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "entropy": lambda p: classifier_entropy(_GivenProbs(), p),
    "margin": lambda p: 1.0 - classifier_margin(_GivenProbs(), p),  # a small top-2 gap = uncertain
    "least_confidence": lambda p: classifier_uncertainty(_GivenProbs(), p),  # 1 - max p
}
MEASURES: tuple[str, ...] = tuple(_MEASURES)


def uncertainty(probs: np.ndarray, measure: Measure) -> np.ndarray:
    """(n,) float64 uncertainty of each row of `probs` (n, C)."""
    return np.asarray(_MEASURES[measure](np.asarray(probs, dtype=np.float64)), dtype=np.float64)
