from freeal_stream.budget import Spent, affordable, round_size
from freeal_stream.config import BudgetConfig
from freeal_stream.llm.ratelimit import estimate_tokens


def test_estimate_counts_input_and_output():
    """The budget's per-request estimate (shared with the rate limiter): ~4 characters a token, plus output."""
    assert estimate_tokens([("user", "x" * 396)], 5) == 105
    assert estimate_tokens([("user", "x" * 397)], 0) == 101


def test_affordable_respects_each_cap():
    assert affordable(100, 50.0, Spent(0, 0), BudgetConfig()) == 100
    assert affordable(100, 50.0, Spent(90, 0), BudgetConfig(max_requests=100)) == 10
    assert affordable(100, 50.0, Spent(0, 1000), BudgetConfig(max_tokens=2000)) == 20
    assert affordable(100, 50.0, Spent(0, 2500), BudgetConfig(max_tokens=2000)) == 0
    assert affordable(100, 50.0, Spent(5, 0), BudgetConfig(max_requests=50, max_tokens=1000)) == 20


def test_round_size_is_p_percent_of_remaining_pool():
    assert round_size(1000, 0.1) == 100
    assert round_size(3, 0.1) == 1
    assert round_size(0, 0.1) == 0
    assert round_size(10, 1.0) == 10
