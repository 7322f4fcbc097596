"""The query-strategy contract: a strategy ranks a shard of the pool; `select` merges shards and applies the budget.

A strategy sees ids and only the columns it declares in `needs`, never the texts. It scores items (higher =
ask the LLM first) and, for each shard, returns its best min(n, len(shard)) as `Candidates`, ordered by
`strategies.order` (the canonical order, which breaks ties by a seeded hash of the id). Because that order is
the same whoever computes it, merging the shards' candidates gives exactly the whole pool's top n, however the
pool is sharded. How many to pick is the budget's decision, not the strategy's (as in small-text and
scikit-activeml, where utility and budget are separate).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from freeal_stream.errors import UserError

COLUMNS = frozenset({"probs", "embeddings", "llm_labels", "slm_labels"})


class StrategyError(UserError):
    """A strategy could not be loaded, or misbehaved during selection; the round must not use its output."""

    def __init__(self, strategy: str, problem: str):
        super().__init__(f"strategy '{strategy}': {problem}")
        self.strategy, self.problem = strategy, problem


@dataclass(frozen=True)
class Shard:
    """A slice of the selectable pool: ids plus the columns a strategy declared, aligned row by row.

    A column is None when the caller did not load it (the strategy did not ask) or it does not exist yet:
    `probs` come from the SLM, so they are None before the first SLM has been trained (round 1); the loop's
    `embeddings` are then the frozen encoder's (the space round 1's demos are retrieved in), later the SLM's.
    `slm_labels` is the label the *previous* round's SLM gave (one round older than `probs`), so a strategy
    can see which predictions moved. Labels are class indices, -1 = none.
    """

    ids: np.ndarray  # (n,) object or str
    probs: np.ndarray | None = None  # (n, C) float32 SLM class probabilities
    embeddings: np.ndarray | None = None  # (n, d) float32 SLM sentence embeddings
    llm_labels: np.ndarray | None = None  # (n,) int, the LLM's label
    slm_labels: np.ndarray | None = None  # (n,) int, the previous SLM's label

    def __post_init__(self) -> None:
        for name in COLUMNS:
            col = getattr(self, name)
            if col is not None and len(col) != len(self.ids):
                raise ValueError(f"Shard.{name} has {len(col)} rows but ids has {len(self.ids)}")

    def __len__(self) -> int:
        return len(self.ids)

    def only(self, needs: frozenset[str]) -> Shard:
        """The same rows with every column outside `needs` dropped (no copy)."""
        return Shard(
            self.ids,
            **{f.name: getattr(self, f.name) if f.name in needs else None for f in fields(self) if f.name != "ids"},
        )


@dataclass(frozen=True)
class QueryContext:
    """The round a selection is for. `seed` and `round` seed the tie-break; `budget_left` is the LLM requests
    still allowed (None = no cap), for strategies that plan across rounds."""

    round: int
    seed: int
    n_classes: int
    budget_left: int | None = None


@dataclass(frozen=True)
class Candidates:
    """A shard's best items, best first. `groups` (int, e.g. a cluster id) makes the merge take items
    round-robin across groups (each group's best, then each group's second best, ...); None = one group."""

    ids: np.ndarray
    scores: np.ndarray
    groups: np.ndarray | None = None


class QueryStrategy:
    """Subclass and implement `candidates`; optionally declare `needs` and override `fit`.

    Contract (checked by `strategies.select.select`, tested by `strategies.contract.check_strategy`):
    `candidates(shard, n, ctx)` returns exactly min(n, len(shard)) distinct ids of that shard, chosen and
    ordered by `strategies.order.top` (use it: it is what makes sharding exact), and must not depend on any
    other shard. Anything the strategy needs from the whole pool it computes in `fit`, which sees every shard
    once (streamed) before any `candidates` call of the round. Same inputs and seed -> same output.
    """

    needs: ClassVar[frozenset[str]] = frozenset()
    name: ClassVar[str] = ""

    def fit(self, shards: Iterable[Shard], ctx: QueryContext) -> None:
        """Pre-pass over the whole pool (streamed); the default needs none."""

    def candidates(self, shard: Shard, n: int, ctx: QueryContext) -> Candidates:
        raise NotImplementedError(f"{type(self).__qualname__} must implement candidates(shard, n, ctx)")


def describe(strategy: object) -> str:
    """The name errors use: the registry name of a built-in, else the class name."""
    return getattr(strategy, "name", "") or type(strategy).__name__
