"""Budget policy, apart from selection: how many requests a round may send before it starts.

A round's cost is estimated before it is spent (input and output tokens, with the per-request estimate
the rate limiter uses: `llm.ratelimit.estimate_tokens`), the round is shrunk to fit what is left, and
the run stops cleanly at the cap instead of discovering the overrun afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass

from freeal_stream.config import BudgetConfig


@dataclass(frozen=True)
class Spent:
    requests: int
    tokens: int


def affordable(wanted: int, tokens_per_request: float, spent: Spent, budget: BudgetConfig) -> int:
    """How many of `wanted` requests fit in what is left of the budget (0 when it is exhausted)."""
    n = wanted
    if budget.max_requests is not None:
        n = min(n, max(0, budget.max_requests - spent.requests))
    if budget.max_tokens is not None and tokens_per_request > 0:
        n = min(n, max(0, int((budget.max_tokens - spent.tokens) // tokens_per_request)))
    return n


def round_size(pool_size: int, fraction: float) -> int:
    """P% of the still-unannotated pool, at least one item while any is left."""
    if pool_size <= 0:
        return 0
    return max(1, min(pool_size, int(round(pool_size * fraction))))
