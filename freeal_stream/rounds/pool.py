"""The pool as the coordinator sees it: positions 0..size-1 in ingestion order, nothing pool-sized in memory.

Texts and ids stay in the store and are fetched for the rows at hand (a shard, a round's targets, the demos);
per-item vectors (frozen embeddings of the texts and of their views) live in `RowArray` files next to the
state, filled by the scorer actors a shard at a time for the rows that do not have one yet. Only small
per-item columns (gold class, has-a-view) are held whole: a byte or two per item.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from freeal_stream.actors.scorers import ScorerPool
from freeal_stream.progress import Progress
from freeal_stream.records import ItemColumns
from freeal_stream.rounds.arrays import RowArray
from freeal_stream.slm.encoder import cache_key
from freeal_stream.store import Store

SHARD_ROWS = 4096  # rows per store read and per scorer task
TEXT_SHARD_ROWS = 1024  # rows per scorer task that runs the encoder over texts (~5-10 s on a CPU core): progress


def embedding_space(encoder: str, max_length: int) -> str:
    """The name part of an embedding array's file: arrays from different encoders never mix."""
    return hashlib.sha1(cache_key(encoder, max_length).encode()).hexdigest()[:12]


class Pool:
    """Positions, texts on demand, and the frozen-embedding arrays of one job's items.

    `size` is a snapshot taken by `refresh` (at the start of each round): items ingested meanwhile are stored
    at once but join the pool at the next refresh, so every per-item array of a round has the same length.
    """

    def __init__(
        self,
        store: Store,
        arrays_dir: Path,
        scorers: ScorerPool,
        encoder: str,
        max_length: int,
        class_names: Sequence[str],
        progress: Progress,
    ):
        self.store, self.scorers, self.progress = store, scorers, progress
        self.arrays_dir, self.encoder = Path(arrays_dir), encoder
        self.class_names = list(class_names)
        self._space = embedding_space(encoder, max_length)
        self._flags: dict[str, np.ndarray] = {}
        self.size = 0
        self.refresh()

    def refresh(self) -> int:
        """Take in the items ingested since the last look (they join the next round); returns how many."""
        before, self.size = self.size, self.store.count_items()
        if self.size != before:
            self._flags = {}
        return self.size - before

    # ---- rows -------------------------------------------------------------------------------------
    def columns(self, positions: Sequence[int] | np.ndarray) -> ItemColumns:
        return self.store.items_at(list(map(int, positions)))

    def texts(self, positions: Sequence[int] | np.ndarray) -> list[str]:
        return self.columns(positions).texts

    def shards(
        self, start: int = 0, stop: int | None = None, size: int = SHARD_ROWS
    ) -> Iterator[tuple[int, ItemColumns]]:
        """(start, items) for consecutive shards of `size` positions start .. stop, read lazily."""
        stop = self.size if stop is None else stop
        for s in range(start, stop, size):
            yield s, self.store.items_range(s, min(s + size, stop))

    def gold(self) -> np.ndarray:
        """Each item's gold class index (-1 = none); for reporting only."""
        return self._flag("gold")

    def has_view(self) -> np.ndarray:
        return self._flag("has_view")

    def _flag(self, name: str) -> np.ndarray:
        if not self._flags:
            self._flags = self.store.item_flags(self.class_names, self.size)
        return self._flags[name]

    # ---- frozen embeddings ------------------------------------------------------------------------
    def frozen(self) -> RowArray:
        """Frozen-encoder embeddings of every item's text (round 1's retrieval; head mode's inputs)."""
        return self._embedded("frozen", lambda cols: cols.texts)

    def frozen_views(self) -> RowArray:
        """Frozen-encoder embeddings of every item's view (its own text where it has none)."""
        return self._embedded("views", lambda cols: [v if v is not None else t for v, t in zip(cols.views, cols.texts)])

    def _embedded(self, kind: str, pick: Callable[[ItemColumns], list[str]]) -> RowArray:
        path = self.arrays_dir / f"{kind}-{self._space}.f32"
        array = RowArray.open(path)
        start = array.rows if array is not None else 0
        if array is None and self.size == 0:
            return RowArray(path, width=0)  # an empty pool: no rows to read, nothing stored
        if start >= self.size:
            assert array is not None
            return array
        n = self.size - start
        what = "texts" if kind == "frozen" else "views"
        self.progress.say(f"embedding {n:,} {what} with the frozen encoder ({len(self.scorers.actors)} scorer actors)")
        done = 0
        self.progress.update(f"embed {what}", 0, n)

        def write(at: int, emb: np.ndarray) -> None:
            nonlocal array, done
            if array is None:
                array = RowArray.create(path, emb.shape[1])
            array.write(at, emb)
            done += len(emb)
            self.progress.update(f"embed {what}", done, n)

        shards = ((s, pick(cols)) for s, cols in self.shards(start, size=TEXT_SHARD_ROWS))
        self.scorers.embed_shards(self.encoder, shards, write)
        assert array is not None  # write() created it: there were rows to embed
        array.commit(self.size)
        return array
