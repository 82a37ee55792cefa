import numpy as np
import pytest

from patchindex.index import MemoryBankIndex


def _brute_force(bank, queries, k):
    distances = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1))
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, axis=1), order


def test_search_returns_euclidean_distances():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((500, 24)).astype(np.float32)
    queries = rng.standard_normal((300, 24)).astype(np.float32)

    distances, labels = MemoryBankIndex().build(bank).search(queries, k=3)
    expected_distances, expected_labels = _brute_force(bank, queries, 3)

    assert distances.dtype == np.float32
    assert labels.dtype == np.int64
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(labels, expected_labels)


def test_chunked_search_is_identical():
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((200, 8)).astype(np.float32)
    queries = rng.standard_normal((1000, 8)).astype(np.float32)
    whole = MemoryBankIndex(chunk_rows=100_000).build(bank).search(queries, k=2)
    chunked = MemoryBankIndex(chunk_rows=64).build(bank).search(queries, k=2)
    np.testing.assert_array_equal(whole[1], chunked[1])
    np.testing.assert_allclose(whole[0], chunked[0], rtol=1e-6)


def test_exact_match_distance_is_zero():
    bank = np.array([[1e3, -1e3, 5.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    distances, labels = MemoryBankIndex().build(bank).search(bank, k=1)
    assert labels[:, 0].tolist() == [0, 1]
    assert np.all(distances >= 0)
    assert np.all(distances < 1e-1)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    bank = rng.standard_normal((100, 16)).astype(np.float32)
    queries = rng.standard_normal((50, 16)).astype(np.float32)
    index = MemoryBankIndex().build(bank)
    index.save(tmp_path / "index.faiss")

    loaded = MemoryBankIndex.load(tmp_path / "index.faiss")

    assert loaded.ntotal == 100
    assert loaded.dim == 16
    for before, after in zip(index.search(queries, 4), loaded.search(queries, 4)):
        np.testing.assert_array_equal(before, after)


def test_index_rejects_bad_input(tmp_path):
    bank = np.zeros((10, 4), np.float32)
    index = MemoryBankIndex().build(bank)
    with pytest.raises(ValueError, match=r"\(m, 4\)"):
        index.search(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="k must be between 1 and the bank size 10"):
        index.search(np.zeros((3, 4), np.float32), k=11)
    with pytest.raises(ValueError, match="NaN"):
        MemoryBankIndex().build(np.full((3, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="IVF"):
        MemoryBankIndex("IVF16,Flat")
    with pytest.raises(RuntimeError, match="build"):
        MemoryBankIndex().search(np.zeros((1, 4), np.float32))
    (tmp_path / "broken.faiss").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="broken.faiss"):
        MemoryBankIndex.load(tmp_path / "broken.faiss")
