"""The query-strategy contract: ids and the scores a strategy asks for in, the ids to annotate out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class QueryContext:
    """What a strategy may look at: never the texts, only ids and scores aligned with them."""

    round: int
    probs: np.ndarray | None      # (n, C) SLM class probabilities for `ids`; None before the first SLM
    seed: int


class QueryStrategy(Protocol):
    def query(self, ids: np.ndarray, n: int, ctx: QueryContext) -> np.ndarray:
        """Return at most n distinct ids from `ids` to send to the LLM this round."""
        ...
