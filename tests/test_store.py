import tracemalloc

import h5py
import numpy as np
import pytest

from patchindex.store import ShardStore, ShardWriter


def _rows(rng, n, dim=8):
    return (
        rng.standard_normal((n, dim)).astype(np.float32),
        rng.integers(0, 1000, n).astype(np.int32),
        rng.integers(0, 28, (n, 2)).astype(np.int16),
    )


def test_shards_bounded_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    batches = [_rows(rng, 300) for _ in range(10)]
    writer = ShardWriter(tmp_path / "store", dim=8, dtype="float32", rows_per_shard=1000)
    for batch in batches:
        writer.append(*batch)
    store = writer.close(images=[f"image{i}.png" for i in range(10)])

    assert len(store) == 3000
    assert [rows for _, rows in store.shards] == [1000, 1000, 1000]
    assert store.images[3] == "image3.png"
    chunks = list(store.iter_chunks(chunk_rows=700, fields=("embeddings", "image_index", "patch_position")))
    assert all(len(chunk[1]) <= 700 for chunk in chunks)
    assert [chunk[0] for chunk in chunks[:3]] == [0, 700, 1000]
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), np.concatenate([b[0] for b in batches]))
    np.testing.assert_array_equal(np.concatenate([c[2] for c in chunks]), np.concatenate([b[1] for b in batches]))
    np.testing.assert_array_equal(np.concatenate([c[3] for c in chunks]), np.concatenate([b[2] for b in batches]))


def test_float16_store_returns_float32(tmp_path):
    rng = np.random.default_rng(1)
    embeddings, index, position = _rows(rng, 50)
    writer = ShardWriter(tmp_path, dim=8, dtype="float16")
    writer.append(embeddings, index, position)
    store = writer.close(images=["a.png"])

    (_, stored), = store.iter_chunks()

    assert stored.dtype == np.float32
    np.testing.assert_allclose(stored, embeddings, rtol=1e-3, atol=1e-3)
    with h5py.File(tmp_path / "shard-00000.h5", "r") as handle:
        assert handle["embeddings"].dtype == np.float16


def test_take_gathers_in_requested_order(tmp_path):
    rng = np.random.default_rng(2)
    embeddings, index, position = _rows(rng, 2500)
    writer = ShardWriter(tmp_path, dim=8, dtype="float32", rows_per_shard=1000)
    writer.append(embeddings, index, position)
    store = writer.close(images=[])
    rows = np.array([2499, 3, 1000, 999, 3, 1500])

    np.testing.assert_array_equal(store.take(rows, chunk_rows=256), embeddings[rows])
    with pytest.raises(IndexError, match="2500"):
        store.take(np.array([2500]))


def test_writer_memory_does_not_grow(tmp_path):
    rng = np.random.default_rng(3)
    batch = _rows(rng, 2000, dim=152)  # 1.2 MB of float32 per batch
    writer = ShardWriter(tmp_path, dim=152, dtype="float16", rows_per_shard=1 << 20)

    tracemalloc.start()
    for _ in range(100):  # 120 MB in total
        writer.append(batch[0].copy(), batch[1], batch[2])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    store = writer.close(images=[])

    assert len(store) == 200_000
    assert peak < 10 * 2**20


def test_writer_rejects_bad_input(tmp_path):
    writer = ShardWriter(tmp_path / "a", dim=8)
    with pytest.raises(ValueError, match=r"\(n, 8\)"):
        writer.append(np.zeros((3, 5), np.float32), np.zeros(3), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="image_index"):
        writer.append(np.zeros((3, 8), np.float32), np.zeros(2), np.zeros((3, 2)))
    writer.append(np.zeros((3, 8), np.float32), np.zeros(3), np.zeros((3, 2)))
    writer.close(images=[])
    with pytest.raises(ValueError, match="already contains"):
        ShardWriter(tmp_path / "a", dim=8)
    with pytest.raises(ValueError, match="float64"):
        ShardWriter(tmp_path / "b", dim=8, dtype="float64")


def test_store_needs_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShardStore(tmp_path)
