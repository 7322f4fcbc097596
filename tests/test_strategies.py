import numpy as np
import pytest

from strategies.base import QueryContext
from strategies.registry import load_strategy


def test_random_is_seeded_distinct_and_bounded():
    s = load_strategy("random", {})
    ids = np.array([f"i{n}" for n in range(100)], dtype=object)
    a = s.query(ids, 10, QueryContext(round=1, probs=None, seed=3))
    b = s.query(ids, 10, QueryContext(round=1, probs=None, seed=3))
    c = s.query(ids, 10, QueryContext(round=2, probs=None, seed=3))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert len(set(a.tolist())) == 10 and set(a.tolist()) <= set(ids.tolist())
    assert len(s.query(ids, 500, QueryContext(1, None, 0))) == 100
    assert len(s.query(ids[:0], 5, QueryContext(1, None, 0))) == 0


def test_registry_errors_name_the_strategy():
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        load_strategy("nope", {})
    with pytest.raises(ValueError, match="strategy 'no_such_mod:X' cannot be loaded"):
        load_strategy("no_such_mod:X", {})
    with pytest.raises(ValueError, match="bad parameters"):
        load_strategy("random", {"temperature": 3})
    assert load_strategy("strategies.random:RandomStrategy", {}) is not None
