"""Per-item arrays on disk: rows written out of order become valid only at commit, reads copy just what is asked."""

from __future__ import annotations

import numpy as np
import pytest

from freeal_stream.rounds.arrays import RowArray
from freeal_stream.rounds.training import CONSISTENCY_SAMPLE, training_rows


def test_rows_written_out_of_order_are_valid_only_once_committed(tmp_path):
    path = tmp_path / "emb.f32"
    assert RowArray.open(path) is None
    a = RowArray.create(path, 3)
    block = np.arange(12, dtype=np.float32).reshape(4, 3)
    a.write(2, block[2:])  # the second shard finishes first
    a.write(0, block[:2])
    assert RowArray.open(path).rows == 0  # not committed: a killed run computes them again
    a.commit(4)
    b = RowArray.open(path)
    assert b.rows == 4 and b.width == 3
    assert np.array_equal(b.read(0, 10), block)  # clipped to the valid rows
    assert np.array_equal(b.gather(np.array([3, 0, 3])), block[[3, 0, 3]])
    assert [s for s, _ in b.shards(3)] == [0, 3] and np.array_equal(b.shards(3).__next__()[1], block[:3])
    with pytest.raises(IndexError):
        b.gather(np.array([4]))
    with pytest.raises(ValueError, match="expected"):
        b.write(0, np.zeros((1, 2), np.float32))


def test_open_or_create_starts_over_when_the_width_changed(tmp_path):
    a = RowArray.create(tmp_path / "x.f32", 2)
    a.write(0, np.ones((1, 2), np.float32))
    a.commit(1)
    assert RowArray.open_or_create(tmp_path / "x.f32", 2).rows == 1
    assert RowArray.open_or_create(tmp_path / "x.f32", 5).rows == 0


def test_training_rows_keep_every_label_and_sample_the_rest_only_above_the_cap():
    small = np.array([-1, 0, -1, 1, -1])
    assert list(training_rows(small, seed=0)) == [0, 1, 2, 3, 4]  # all rows, as the paper does
    big = np.full(CONSISTENCY_SAMPLE + 1000, -1)
    big[[5, 70_000 % len(big)]] = 1
    rows = training_rows(big, seed=0)
    assert len(rows) == CONSISTENCY_SAMPLE + 2 and {5, 70_000 % len(big)} <= set(rows.tolist())
    assert np.array_equal(rows, np.sort(rows)) and np.array_equal(rows, training_rows(big, seed=0))


def test_gather_maps_one_window_at_a_time_and_returns_rows_in_the_order_asked(tmp_path, monkeypatch):
    """A sample of rows spread over a big file must not map the whole file into the process at once."""
    from freeal_stream.rounds import arrays

    rows, width = 1000, 4
    a = RowArray.create(tmp_path / "big.f32", width)
    data = np.random.default_rng(0).standard_normal((rows, width)).astype(np.float32)
    a.write(0, data)
    a.commit(rows)
    monkeypatch.setattr(arrays, "WINDOW_BYTES", 64 * width * 4)  # 64 rows a window
    mapped_rows: list[int] = []
    real_memmap = np.memmap

    def recording_memmap(*args, **kwargs):
        m = real_memmap(*args, **kwargs)
        mapped_rows.append(m.shape[0])
        return m

    monkeypatch.setattr(arrays.np, "memmap", recording_memmap)
    positions = np.random.default_rng(1).integers(0, rows, size=300)  # random order, with repeats
    assert np.array_equal(a.gather(positions), data[positions])
    assert mapped_rows and max(mapped_rows) <= 64
    assert np.array_equal(a.gather(np.array([999, 0])), data[[999, 0]])  # first and last window


def test_an_empty_pool_has_empty_embedding_arrays_not_none(tmp_path):
    """Nothing ingested yet (a service started before its data): the pool's arrays read as zero rows."""
    from freeal_stream.progress import Progress
    from freeal_stream.rounds.pool import Pool
    from freeal_stream.store import Store

    store = Store(tmp_path / "state.duckdb")
    try:
        pool = Pool(
            store,
            tmp_path / "arrays",
            scorers=None,
            encoder="all-MiniLM-L6-v2",
            max_length=64,
            class_names=["a", "b"],
            progress=Progress(),
        )
        assert pool.size == 0
        assert pool.frozen().rows == 0 and pool.frozen().gather(np.array([], dtype=np.int64)).shape[0] == 0
    finally:
        store.close()
