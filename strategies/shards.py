"""Shards over arrays already in memory: how the loop (and the tests) feed `select`."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from strategies.base import COLUMNS, Shard

DEFAULT_SHARD_ROWS = 65536


def array_shards(
    ids: np.ndarray,
    *,
    rows: np.ndarray | None = None,
    needs: frozenset[str] = COLUMNS,
    size: int = DEFAULT_SHARD_ROWS,
    **columns: np.ndarray | None,
) -> Callable[[], Iterator[Shard]]:
    """A re-openable stream of shards of `size` rows over `ids` and the aligned `columns` (Shard's names).

    `rows` picks the selectable rows (a bool mask such as ~annotated, or positions; None = all); only the
    columns in `needs` are sliced, a shard at a time, so nothing pool-sized is copied.
    """
    unknown = set(columns) - COLUMNS
    if unknown:
        raise ValueError(f"unknown column(s) {sorted(unknown)}; the columns are {sorted(COLUMNS)}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    ids = np.asarray(ids, dtype=object)
    picked = np.arange(len(ids)) if rows is None else np.asarray(rows)
    if picked.dtype == bool:
        picked = np.flatnonzero(picked)
    kept = {c: v for c, v in columns.items() if c in needs and v is not None}

    def shards() -> Iterator[Shard]:
        for start in range(0, len(picked), size):
            at = picked[start : start + size]
            yield Shard(ids[at], **{c: v[at] for c, v in kept.items()})

    return shards
