"""Budget policy, apart from selection: what a request costs, how much of a round fits, when to stop.

A round's cost is estimated before it is spent (input tokens from the prompt, output tokens at the
request's cap, input billed at the full, uncached price: an estimate that can only err high), the round
is shrunk to fit what is left, and while it runs `BudgetGuard` admits chunks of requests only while
spent + reserved stays under every cap, so a cap is never exceeded by more than the requests in flight.
Requests sent through a provider's batch API (`llm.mode: batch`) are priced at the batch discount, both
in estimates and in what was spent; cached prompt tokens the provider reports are billed at cached_input.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from freeal_stream.config import BudgetConfig, Price
from freeal_stream.errors import UserError
from freeal_stream.llm.ratelimit import estimate_usage


class BudgetConfigError(UserError):
    """The budget cannot be enforced as written (e.g. a money cap without a price for the model)."""


@dataclass(frozen=True)
class Spent:
    requests: float = 0  # counts, but math.inf in headroom() where nothing is capped
    tokens: float = 0
    cost: float = 0.0

    def __add__(self, other: Spent) -> Spent:
        return Spent(self.requests + other.requests, self.tokens + other.tokens, self.cost + other.cost)

    def __sub__(self, other: Spent) -> Spent:
        return Spent(self.requests - other.requests, self.tokens - other.tokens, self.cost - other.cost)


def mode_price(price: Price | None, batch: bool) -> Price | None:
    """The price of a token sent live, or through the batch API (every price less the batch discount)."""
    if price is None or not batch:
        return price
    keep = 1.0 - price.batch_discount
    return Price(
        input=price.input * keep,
        output=price.output * keep,
        batch_discount=0.0,
        cached_input=None if price.cached_input is None else price.cached_input * keep,
    )


def price_for(budget: BudgetConfig, model: str, batch: bool = False) -> Price | None:
    """The model's price in the job's mode; a money cap without one is refused, since it could not be kept."""
    price = budget.prices.get(model)
    if price is None and budget.max_cost is not None:
        raise BudgetConfigError(
            f"budget.max_cost is set but budget.prices has no entry for model '{model}'. Fix: add "
            f"'budget: {{prices: {{{model}: {{input: ..., cached_input: ..., output: ...}}}}}}' "
            "(money per million tokens), or drop max_cost"
        )
    return mode_price(price, batch)


def cost(price: Price | None, prompt_tokens: float, cached_tokens: float, completion_tokens: float) -> float:
    """Money for one request's (or a sum of requests') tokens; 0 without a price."""
    if price is None:
        return 0.0
    cached_price = price.input if price.cached_input is None else price.cached_input
    return (
        (prompt_tokens - cached_tokens) * price.input + cached_tokens * cached_price + completion_tokens * price.output
    ) / 1e6


def spent_from_usage(usage: Sequence[Mapping[str, Any]], budget: BudgetConfig) -> Spent:
    """Spent from usage rows (model, batch, requests, prompt_tokens, cached_tokens, completion_tokens);
    rows with `batch` true were answered through the batch API and are priced at its discount."""
    total = Spent()
    for u in usage:
        price = mode_price(budget.prices.get(u["model"]), bool(u.get("batch")))
        total = total + Spent(
            int(u["requests"]),
            int(u["prompt_tokens"] + u["completion_tokens"]),
            cost(price, u["prompt_tokens"], u["cached_tokens"], u["completion_tokens"]),
        )
    return total


def estimate(messages: Sequence[tuple[str, str]], max_tokens: int, price: Price | None) -> Spent:
    """One request before it is sent: as many output tokens as allowed, no prefix-cache discount."""
    prompt, completion = estimate_usage(messages, max_tokens)
    return Spent(1, prompt + completion, cost(price, prompt, 0, completion))


def headroom(spent: Spent, budget: BudgetConfig) -> Spent | None:
    """What is left under each cap (math.inf where there is none); None when nothing is capped."""
    if budget.max_requests is None and budget.max_tokens is None and budget.max_cost is None:
        return None
    left = lambda cap, used: math.inf if cap is None else max(0.0, cap - used)
    return Spent(
        left(budget.max_requests, spent.requests),
        left(budget.max_tokens, spent.tokens),
        left(budget.max_cost, spent.cost),
    )


def affordable(estimates: Sequence[Spent], spent: Spent, budget: BudgetConfig) -> int:
    """How many of the requests (in order) fit in what is left of the budget (0 when it is exhausted)."""
    left = headroom(spent, budget)
    if left is None:
        return len(estimates)
    used = Spent()
    for n, e in enumerate(estimates):
        used = used + e
        if used.requests > left.requests or used.tokens > left.tokens or used.cost > left.cost + 1e-12:
            return n
    return len(estimates)


def round_size(pool_size: int, fraction: float) -> int:
    """P% of the still-unannotated pool, at least one item while any is left."""
    if pool_size <= 0:
        return 0
    return max(1, min(pool_size, int(round(pool_size * fraction))))


class BudgetGuard:
    """The cap at dispatch time: spent (as stored) + reserved for work in flight never passes a cap.

    Answers are stored before a chunk's task returns, so once `release` runs the stored spend holds what
    the reservation stood for. Thread-safe: annotator results may be collected from another thread.
    """

    def __init__(self, budget: BudgetConfig, spent: Callable[[], Spent]):
        self.budget, self._spent = budget, spent
        self._reserved = Spent()
        self._lock = threading.Lock()
        self.refused = 0

    def admit(self, estimates: Sequence[Spent]) -> int:
        """Reserve the longest prefix of `estimates` that fits; returns its length."""
        if headroom(Spent(), self.budget) is None:  # no cap: nothing to reserve, no need to ask the store
            return len(estimates)
        with self._lock:
            n = affordable(estimates, self._spent() + self._reserved, self.budget)
            for e in estimates[:n]:
                self._reserved = self._reserved + e
            self.refused += len(estimates) - n
            return n

    def reserve(self, estimates: Sequence[Spent]) -> None:
        """Reserve work already in flight whatever the caps say (a batch a killed run submitted)."""
        with self._lock:
            for e in estimates:
                self._reserved = self._reserved + e

    def release(self, estimates: Sequence[Spent]) -> None:
        with self._lock:
            for e in estimates:
                self._reserved = self._reserved - e
