"""The contract suite on every built-in, on a sample third-party strategy loaded by file path, and on the CLI."""

from pathlib import Path

import numpy as np
import pytest

from strategies.base import Candidates, QueryContext, QueryStrategy, Shard
from strategies.contract import check_strategy, main
from strategies.order import top
from strategies.registry import BUILTINS, load_strategy


class ClassBalancedUncertainty(QueryStrategy):
    """A third-party example: least-confident first, round-robin over the SLM's predicted classes, so a batch
    is not all one class. `power` sharpens the score (here only to show a typed parameter)."""

    needs = frozenset({"probs"})

    def __init__(self, power: float = 1.0):
        if power <= 0:
            raise ValueError(f"power must be > 0, got {power}")
        self.power = power

    def candidates(self, shard: Shard, n: int, ctx: QueryContext) -> Candidates:
        if shard.probs is None:
            return top(shard.ids, np.zeros(len(shard)), n, ctx)
        return top(shard.ids, (1.0 - shard.probs.max(1)) ** self.power, n, ctx, groups=shard.probs.argmax(1))


SAMPLE = f"{Path(__file__)}:ClassBalancedUncertainty"
CASES = [(name, {}) for name in BUILTINS] + [
    ("uncertainty", {"measure": "margin"}),
    ("uncertainty", {"measure": "least_confidence"}),
    ("hybrid", {"n_clusters": 5, "batch_rows": 40}),  # k-means fitted over several re-cut batches
    (SAMPLE, {"power": 2}),
]


@pytest.mark.parametrize("name, params", CASES, ids=[f"{n.rpartition(':')[2]}{p or ''}" for n, p in CASES])
def test_contract(name, params):
    assert len(check_strategy(lambda: load_strategy(name, params), n_classes=3)) == 8


def test_contract_catches_a_position_tie_break():
    class FirstSeen(QueryStrategy):  # ties broken by position in the shard: sharding changes the picks
        def candidates(self, shard, n, ctx):
            return Candidates(shard.ids[:n], np.zeros(min(n, len(shard))))

    with pytest.raises(AssertionError, match="'shard merge = whole pool' failed: shards of 1 rows differ"):
        check_strategy(FirstSeen)


def test_contract_catches_an_undeclared_column():
    class Sneaky(QueryStrategy):  # reads probs without declaring them
        def candidates(self, shard, n, ctx):
            return top(shard.ids, shard.probs.max(1), n, ctx)

    with pytest.raises(AssertionError, match="strategy 'Sneaky': candidates\\(\\) raised AttributeError"):
        check_strategy(Sneaky)


def test_cli_runs_the_suite_on_a_file_strategy(capsys):
    assert main([SAMPLE, "--params", '{"power": 0.5}']) == 0
    assert "all 8 contract checks passed" in capsys.readouterr().out
    assert main([SAMPLE, "--params", '{"power": -1}']) == 1
    assert "power must be > 0" in capsys.readouterr().err
