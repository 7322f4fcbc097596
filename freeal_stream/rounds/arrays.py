"""Per-item arrays on disk (embeddings, SLM logits), aligned with pool positions and read a shard at a time.

A pool of millions never sits in memory: each array is one raw float32 file of `rows x width` values plus a
small JSON header saying how many rows are valid. Rows are written at their offsets (shards may finish out of
order) and become valid only when `commit` records the new row count, so a run killed mid-write leaves the
old count and simply computes those rows again. Reads copy just the rows asked for (no long-lived memory
map), so a process's memory stays O(shard) however large the file grows.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np

from freeal_stream.private_files import private_dir

DTYPE = np.dtype(np.float32)
WINDOW_BYTES = 64 * 2**20  # the most of an array file `gather` maps at once


class RowArray:
    """A float32 (rows, width) array in `path`, with its header in `path.json`; one writer (the coordinator)."""

    def __init__(self, path: Path, width: int, rows: int = 0):
        self.path, self.width, self.rows = Path(path), int(width), int(rows)
        self._row_bytes = self.width * DTYPE.itemsize

    # ---- opening ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path) -> RowArray | None:
        """The array stored at `path`, or None if there is none yet."""
        header = Path(path).with_suffix(".json")
        if not header.exists():
            return None
        meta = json.loads(header.read_text(encoding="utf-8"))
        return cls(path, meta["width"], meta["rows"])

    @classmethod
    def create(cls, path: Path, width: int) -> RowArray:
        """A new, empty array (replacing any array stored at `path`)."""
        array = cls(path, width)
        private_dir(array.path.parent)
        array.path.write_bytes(b"")
        array.commit(0)
        return array

    @classmethod
    def open_or_create(cls, path: Path, width: int) -> RowArray:
        array = cls.open(path)
        if array is None or array.width != width:
            return cls.create(path, width)
        return array

    # ---- writing ----------------------------------------------------------------------------------
    def write(self, start: int, block: np.ndarray) -> None:
        """Write rows `start .. start + len(block)` (not valid until `commit`)."""
        block = np.ascontiguousarray(block, dtype=DTYPE)
        if block.ndim != 2 or block.shape[1] != self.width:
            raise ValueError(f"{self.path.name}: block of shape {block.shape}, expected (n, {self.width})")
        with open(self.path, "r+b") as f:
            f.seek(start * self._row_bytes)
            f.write(block.tobytes())

    def commit(self, rows: int) -> None:
        """Record that rows 0 .. rows are written (after the data itself is on disk)."""
        header = self.path.with_suffix(".json")
        tmp = header.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"width": self.width, "rows": int(rows), "dtype": DTYPE.str}), encoding="utf-8")
        os.replace(tmp, header)
        self.rows = int(rows)

    # ---- reading ----------------------------------------------------------------------------------
    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start .. stop (clipped to the valid rows), as a new array."""
        stop = min(stop, self.rows)
        if stop <= start:
            return np.zeros((0, self.width), DTYPE)
        with open(self.path, "rb") as f:
            f.seek(start * self._row_bytes)
            data = np.fromfile(f, dtype=DTYPE, count=(stop - start) * self.width)
        return data.reshape(stop - start, self.width)

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """The rows at `positions` (any order, repeats allowed), as a new array.

        Read through one memory map per window of WINDOW_BYTES, in position order, each unmapped before the
        next: mapping the whole file instead put all of it in this process's RSS for a moment (the kernel maps
        the pages around every row read; a 50,000-row sample of a 1 GB array touched it all)."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) and (positions.min() < 0 or positions.max() >= self.rows):
            raise IndexError(f"{self.path.name}: positions outside 0..{self.rows - 1}")
        out = np.empty((len(positions), self.width), DTYPE)
        if not len(positions):
            return out
        window = max(1, WINDOW_BYTES // self._row_bytes)
        order = np.argsort(positions, kind="stable")
        ordered = positions[order]
        cuts = np.searchsorted(ordered, np.arange(0, self.rows + window, window))
        for w, (a, b) in enumerate(itertools.pairwise(cuts)):
            if a == b:
                continue
            start = w * window
            mapped = np.memmap(
                self.path,
                dtype=DTYPE,
                mode="r",
                offset=start * self._row_bytes,
                shape=(min(window, self.rows - start), self.width),
            )
            try:
                out[order[a:b]] = mapped[ordered[a:b] - start]
            finally:
                del mapped  # unmapped at once: the pages read do not stay in this process
        return out

    def shards(self, size: int, stop: int | None = None):
        """(start, rows) blocks of `size` rows over the valid rows (or up to `stop`)."""
        end = self.rows if stop is None else min(stop, self.rows)
        for start in range(0, end, size):
            yield start, self.read(start, min(start + size, end))
