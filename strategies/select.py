"""One selection path for every strategy: stream the pool's shards through it, check what it returns, merge.

Memory stays flat as the pool grows: besides the shard being read, `select` holds only the running top n
(and a set of that shard's ids for the checks). A strategy that raises or returns something it must not is
stopped with a `StrategyError` naming it and the problem, before the caller's round sees any of its output.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from strategies.base import COLUMNS, Candidates, QueryContext, QueryStrategy, Shard, StrategyError, describe
from strategies.order import order, tiebreak

ShardSource = Iterable[Shard] | Callable[[], Iterable[Shard]]
T = TypeVar("T")


class _PoolError(ValueError):
    """The caller's shards are malformed: not the strategy's fault, so never reported as a StrategyError."""


def check_declared(strategy: QueryStrategy) -> None:
    """Refuse an object that is not a QueryStrategy or declares columns that do not exist."""
    if not isinstance(strategy, QueryStrategy):
        raise StrategyError(describe(strategy), "must subclass strategies.base.QueryStrategy")
    unknown = set(strategy.needs) - COLUMNS
    if unknown:
        raise StrategyError(
            describe(strategy), f"needs unknown column(s) {sorted(unknown)}; the columns are {sorted(COLUMNS)}"
        )


def select(strategy: QueryStrategy, shards: ShardSource, n: int, ctx: QueryContext) -> np.ndarray:
    """The ids to send to the LLM this round, best first: min(n, pool size) of them (an object array).

    `shards` hold only selectable (never-annotated) rows, each id once across the pool. A strategy that
    overrides `fit` reads the pool twice, so pass a callable returning a fresh iterable (or a list), not a
    one-shot generator.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    check_declared(strategy)
    if n == 0:
        return np.empty(0, dtype=object)
    name = describe(strategy)
    if type(strategy).fit is not QueryStrategy.fit:
        if not callable(shards) and iter(shards) is shards:
            raise ValueError(
                f"strategy '{name}' reads the pool twice (fit, then candidates): pass a callable "
                "that returns a fresh iterable of shards, not a one-shot iterator"
            )
        _guarded(name, "fit", lambda: strategy.fit(_prepared(_open(shards), strategy.needs, ctx), ctx))
    best = _Best.empty()
    for shard in _prepared(_open(shards), strategy.needs, ctx):
        cand = _guarded(name, "candidates", functools.partial(strategy.candidates, shard, n, ctx))
        best = best.merge(_checked(name, cand, shard, n), n, ctx)
    if len(set(best.ids.tolist())) != len(best.ids):
        raise _PoolError("an id appears in more than one shard; each id must be in the pool once")
    return best.ids


def _open(shards: ShardSource) -> Iterable[Shard]:
    return shards() if callable(shards) else shards


def _guarded(name: str, method: str, call: Callable[[], T]) -> T:
    try:
        return call()
    except _PoolError:
        raise
    except Exception as e:  # any failure inside user code must not corrupt the round
        raise StrategyError(name, f"{method}() raised {type(e).__name__}: {e}") from e


def _prepared(shards: Iterable[Shard], needs: frozenset[str], ctx: QueryContext) -> Iterator[Shard]:
    """Non-empty shards reduced to the declared columns, so a strategy cannot lean on one it did not ask for."""
    present: frozenset[str] | None = None
    for shard in shards:
        if not isinstance(shard, Shard):
            raise _PoolError(f"the pool yielded a {type(shard).__name__}, not a Shard")
        if not len(shard):
            continue
        cols = frozenset(c for c in needs if getattr(shard, c) is not None)
        if present is not None and cols != present:
            raise _PoolError(f"column(s) {sorted(cols ^ present)} are set in some shards and None in others")
        present = cols
        probs = shard.probs
        if "probs" in cols and probs is not None and (probs.ndim != 2 or probs.shape[1] != ctx.n_classes):
            raise _PoolError(f"probs has shape {probs.shape}, expected (rows, {ctx.n_classes})")
        for c in cols & {"llm_labels", "slm_labels"}:
            labels = getattr(shard, c)
            if labels.min() < -1 or labels.max() >= ctx.n_classes:
                raise _PoolError(f"{c} must be in [-1, {ctx.n_classes - 1}] (-1 = none)")
        yield shard.only(needs)


def _checked(name: str, cand: object, shard: Shard, n: int) -> Candidates:
    """`cand` if it keeps the contract (see QueryStrategy), else a StrategyError saying what it broke."""
    if not isinstance(cand, Candidates):
        raise StrategyError(name, f"candidates() returned a {type(cand).__name__}, not Candidates")
    ids = np.asarray(cand.ids, dtype=object)
    try:
        scores = np.asarray(cand.scores, dtype=np.float64)
        groups = None if cand.groups is None else np.asarray(cand.groups, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise StrategyError(name, f"candidates() returned scores or groups that are not numbers ({e})") from None
    if scores.shape != ids.shape or (groups is not None and groups.shape != ids.shape):
        raise StrategyError(
            name,
            f"candidates() returned {len(ids)} ids but scores of shape {scores.shape}"
            + ("" if groups is None else f" and groups of shape {groups.shape}"),
        )
    want = min(n, len(shard))
    if len(ids) > want:
        raise StrategyError(
            name, f"candidates() returned {len(ids)} ids for a shard of {len(shard)} with n={n}: at most {want} allowed"
        )
    if len(ids) < want:
        raise StrategyError(
            name,
            f"candidates() returned {len(ids)} ids, expected min(n, shard size) = {want}: "
            "a strategy ranks, the budget decides how many",
        )
    if not np.isfinite(scores).all():
        raise StrategyError(name, "candidates() returned a NaN or infinite score")
    seen: set = set()
    for i in ids.tolist():
        if i in seen:
            raise StrategyError(name, f"candidates() returned id {i!r} more than once")
        seen.add(i)
    unknown = seen - set(shard.ids.tolist())
    if unknown:
        raise StrategyError(
            name,
            f"candidates() returned id {next(iter(unknown))!r}, which is not in the shard it "
            "was given (unknown, or already annotated)",
        )
    return Candidates(ids, scores, groups)


@dataclass(frozen=True)
class _Best:
    """The running top n of everything merged so far, with each item's tie-break."""

    ids: np.ndarray
    scores: np.ndarray
    groups: np.ndarray
    ties: np.ndarray

    @classmethod
    def empty(cls) -> _Best:
        return cls(np.empty(0, dtype=object), np.empty(0), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.uint64))

    def merge(self, cand: Candidates, n: int, ctx: QueryContext) -> _Best:
        groups = np.zeros(len(cand.ids), dtype=np.int64) if cand.groups is None else cand.groups
        ids = np.concatenate([self.ids, cand.ids])
        scores = np.concatenate([self.scores, cand.scores])
        groups = np.concatenate([self.groups, groups])
        ties = np.concatenate([self.ties, tiebreak(cand.ids, ctx)])
        keep = order(scores, groups, ties)[:n]
        return _Best(ids[keep], scores[keep], groups[keep], ties[keep])
