import threading

import pytest

from freeal_stream.budget import (
    BudgetConfigError,
    BudgetGuard,
    Spent,
    affordable,
    cost,
    estimate,
    headroom,
    price_for,
    round_size,
    spent_from_usage,
)
from freeal_stream.config import BudgetConfig, Price
from freeal_stream.llm.ratelimit import estimate_tokens

PRICE = Price(input=1.0, cached_input=0.25, output=4.0)  # per million tokens


def test_estimate_counts_input_and_output():
    """The budget's per-request estimate (shared with the rate limiter): ~4 characters a token, plus output."""
    assert estimate_tokens([("user", "x" * 396)], 5) == 105
    assert estimate_tokens([("user", "x" * 397)], 0) == 101
    e = estimate([("user", "x" * 396)], 5, PRICE)
    assert e.requests == 1 and e.tokens == 105
    assert e.cost == pytest.approx((100 * 1.0 + 5 * 4.0) / 1e6)  # no cache discount: it can only err high


def test_cost_prices_cached_input_apart():
    assert cost(PRICE, 1000, 400, 10) == pytest.approx((600 * 1.0 + 400 * 0.25 + 10 * 4.0) / 1e6)
    assert cost(Price(input=2.0, output=2.0), 1000, 400, 0) == pytest.approx(2000 / 1e6)  # no cached price
    assert cost(None, 1000, 0, 10) == 0.0


def test_spent_from_usage_prices_each_model():
    b = BudgetConfig(prices={"a": PRICE})
    s = spent_from_usage(
        [
            {"model": "a", "requests": 2, "prompt_tokens": 1000, "cached_tokens": 0, "completion_tokens": 0},
            {"model": "b", "requests": 1, "prompt_tokens": 10, "cached_tokens": 0, "completion_tokens": 1},
        ],
        b,
    )
    assert s == Spent(3, 1011, pytest.approx(1000 / 1e6))


def test_affordable_respects_each_cap():
    e = [Spent(1, 50, 0.5)] * 100
    assert affordable(e, Spent(), BudgetConfig()) == 100
    assert affordable(e, Spent(90, 0), BudgetConfig(max_requests=100)) == 10
    assert affordable(e, Spent(0, 1000), BudgetConfig(max_tokens=2000)) == 20
    assert affordable(e, Spent(0, 2500), BudgetConfig(max_tokens=2000)) == 0
    assert affordable(e, Spent(5, 0), BudgetConfig(max_requests=50, max_tokens=1000)) == 20
    assert affordable(e, Spent(0, 0, 1.0), BudgetConfig(max_cost=3.0)) == 4
    assert headroom(Spent(), BudgetConfig()) is None


def test_money_cap_needs_a_price():
    with pytest.raises(BudgetConfigError, match="no entry for model 'gpt-x'"):
        price_for(BudgetConfig(max_cost=1.0), "gpt-x")
    assert price_for(BudgetConfig(), "gpt-x") is None


def test_guard_never_admits_past_the_cap_with_work_in_flight():
    """Reservations for chunks in flight count against the cap until the store holds their cost."""
    stored = [Spent()]
    guard = BudgetGuard(BudgetConfig(max_requests=10), lambda: stored[0])
    chunk = [Spent(1, 10)] * 4
    assert guard.admit(chunk) == 4 and guard.admit(chunk) == 4 and guard.admit(chunk) == 2
    assert guard.admit(chunk) == 0 and guard.refused == 6
    stored[0] = Spent(10, 100)  # the answers landed
    for c in (chunk, chunk, chunk[:2]):
        guard.release(c)
    assert guard.admit(chunk) == 0


def test_guard_is_thread_safe():
    guard = BudgetGuard(BudgetConfig(max_requests=1000), lambda: Spent())
    admitted = []
    threads = [
        threading.Thread(target=lambda: admitted.append(sum(guard.admit([Spent(1, 1)]) for _ in range(300))))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted) == 1000


def test_round_size_is_p_percent_of_remaining_pool():
    assert round_size(1000, 0.1) == 100
    assert round_size(3, 0.1) == 1
    assert round_size(0, 0.1) == 0
    assert round_size(10, 1.0) == 10
