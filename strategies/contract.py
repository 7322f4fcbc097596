"""Contract checks for a query strategy: run them on your own strategy before a job uses it.

    python -m strategies.contract path/to/my_strategy.py:MyStrategy --params '{"power": 2.0}'

or, in a test, `check_strategy(lambda: MyStrategy(power=2.0))`. Each check runs `select` on a synthetic pool
(with tied scores, annotated rows, and shards of awkward sizes) and raises AssertionError naming the check.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from strategies.base import COLUMNS, QueryContext, QueryStrategy, StrategyError
from strategies.select import select
from strategies.shards import array_shards

Factory = Callable[[], QueryStrategy]


@dataclass(frozen=True)
class Pool:
    """A synthetic pool: every column, some rows annotated (never selectable), one row in ten a copy of another
    row's columns (so scores tie and the tie-break is exercised)."""

    ids: np.ndarray
    columns: dict[str, np.ndarray]
    annotated: np.ndarray
    n_classes: int

    @classmethod
    def make(cls, rows: int, n_classes: int, seed: int, dim: int = 16) -> Pool:
        rng = np.random.default_rng(seed)
        centers = rng.normal(size=(6, dim))
        emb = (centers[rng.integers(0, 6, rows)] + 0.3 * rng.normal(size=(rows, dim))).astype(np.float32)
        cols = {
            "probs": rng.dirichlet(np.full(n_classes, 0.7), rows).astype(np.float32),
            "embeddings": emb / np.linalg.norm(emb, axis=1, keepdims=True),
            "llm_labels": np.where(rng.random(rows) < 0.3, rng.integers(0, n_classes, rows), -1),
            "slm_labels": np.where(rng.random(rows) < 0.8, rng.integers(0, n_classes, rows), -1),
        }
        copies = rng.choice(rows, size=rows // 10, replace=False)
        for c in cols.values():
            c[copies] = c[rng.choice(rows, size=len(copies))]
        ids = np.array([f"doc-{i:05d}" for i in rng.permutation(rows)], dtype=object)
        return cls(ids, cols, rng.random(rows) < 0.2, n_classes)

    @property
    def selectable(self) -> set[str]:
        return set(self.ids[~self.annotated].tolist())

    def shards(self, size: int, needs: frozenset[str] = COLUMNS, without: frozenset[str] = frozenset()):
        cols = {c: None if c in without else v for c, v in self.columns.items()}
        return array_shards(self.ids, rows=~self.annotated, needs=needs, size=size, **cols)

    def ctx(self, round_: int = 2, seed: int = 7) -> QueryContext:
        return QueryContext(round=round_, seed=seed, n_classes=self.n_classes)


def _pick(factory: Factory, pool: Pool, n: int, size: int = 10_000, **kw) -> list[str]:
    return select(factory(), pool.shards(size, **kw), n, pool.ctx()).tolist()


def _check_empty(factory: Factory, pool: Pool) -> None:
    assert select(factory(), [], 5, pool.ctx()).tolist() == [], "a pool with no shards must give no ids"
    empty = Pool(pool.ids[:0], {c: v[:0] for c, v in pool.columns.items()}, pool.annotated[:0], pool.n_classes)
    assert _pick(factory, empty, 5) == [], "a pool of empty shards must give no ids"


def _check_n_zero(factory: Factory, pool: Pool) -> None:
    assert _pick(factory, pool, 0) == [], "n=0 must give no ids"


def _check_n_over_pool(factory: Factory, pool: Pool) -> None:
    got = _pick(factory, pool, len(pool.ids) + 5, size=37)
    assert sorted(got) == sorted(pool.selectable), "n >= pool size must give every selectable id once"


def _check_budget(factory: Factory, pool: Pool) -> None:
    n = max(1, len(pool.selectable) // 10)
    got = _pick(factory, pool, n)
    assert len(got) == n == len(set(got)), f"expected {n} distinct ids, got {len(got)} ({len(set(got))} distinct)"
    assert set(got) <= pool.selectable, "returned an annotated or unknown id"


def _check_deterministic(factory: Factory, pool: Pool) -> None:
    n = len(pool.selectable) // 10
    assert _pick(factory, pool, n) == _pick(factory, pool, n), "two instances, same seed: different picks"
    reused = factory()
    first = select(reused, pool.shards(50), n, pool.ctx(round_=2)).tolist()
    select(reused, pool.shards(50), n, pool.ctx(round_=3))
    again = select(reused, pool.shards(50), n, pool.ctx(round_=2)).tolist()
    assert first == again, "an instance reused across rounds must give the same picks for the same round"


def _check_shard_merge(factory: Factory, pool: Pool) -> None:
    n = len(pool.selectable) // 7
    whole = _pick(factory, pool, n, size=len(pool.ids))
    for size in (1, 13, 64):
        assert _pick(factory, pool, n, size=size) == whole, f"shards of {size} rows differ from the whole pool"


def _check_needs_only(factory: Factory, pool: Pool) -> None:
    needs = factory().needs
    assert set(needs) <= COLUMNS, f"needs {sorted(needs)} names columns outside {sorted(COLUMNS)}"
    n = len(pool.selectable) // 10
    assert _pick(factory, pool, n, needs=needs) == _pick(factory, pool, n), (
        "given only the declared columns, it picks differently than given all"
    )


def _check_before_first_slm(factory: Factory, pool: Pool) -> None:
    n = len(pool.selectable) // 10
    without = frozenset({"probs", "embeddings"})
    got = _pick(factory, pool, n, without=without)
    assert len(got) == n == len(set(got)) and set(got) <= pool.selectable, "round 1 (no probs/embeddings) failed"
    assert got == _pick(factory, pool, n, size=11, without=without), "round 1 (no probs/embeddings): shards differ"


CHECKS: dict[str, Callable[[Factory, Pool], None]] = {
    "empty pool": _check_empty,
    "n = 0": _check_n_zero,
    "n >= pool size": _check_n_over_pool,
    "budget, distinct, unannotated": _check_budget,
    "deterministic": _check_deterministic,
    "shard merge = whole pool": _check_shard_merge,
    "works with only its needs": _check_needs_only,
    "before the first SLM": _check_before_first_slm,
}


def check_strategy(factory: Factory, *, n_classes: int = 3, rows: int = 300, seed: int = 0) -> list[str]:
    """Run every contract check on fresh strategies from `factory`; return the checks' names, or raise
    AssertionError naming the first that failed (a StrategyError from `select` counts as a failure)."""
    pool = Pool.make(rows, n_classes, seed)
    for name, check in CHECKS.items():
        try:
            check(factory, pool)
        except (AssertionError, StrategyError) as e:
            raise AssertionError(f"contract check '{name}' failed: {e}") from e
    return list(CHECKS)


def main(argv: list[str] | None = None) -> int:
    from strategies.registry import load_strategy  # here: the checks themselves need no registry

    ap = argparse.ArgumentParser(description="Run the query-strategy contract checks on one strategy.")
    ap.add_argument("strategy", help="a built-in name, module:Class, path/to/file.py:Class, or an entry point")
    ap.add_argument("--params", default="{}", help="the strategy's parameters as JSON, as under strategy.params")
    ap.add_argument("--classes", type=int, default=3)
    args = ap.parse_args(argv)
    params = json.loads(args.params)
    try:
        load_strategy(args.strategy, params)  # a load error is reported as such, not as a failed check
        passed = check_strategy(lambda: load_strategy(args.strategy, params), n_classes=args.classes)
    except (AssertionError, StrategyError) as e:
        print(f"FAIL {args.strategy}: {e}", file=sys.stderr)
        return 1
    for name in passed:
        print(f"ok  {name}")
    print(f"{args.strategy}: all {len(passed)} contract checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
