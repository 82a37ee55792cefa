import numpy as np
import pytest

from patchindex import _exact_search
from patchindex._exact_search import exact_knn
from patchindex.index import MemoryBankIndex


def _brute_force(bank, queries, k):
    squared = ((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)
    order = np.argsort(squared, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(squared, order, axis=1), order


@pytest.fixture(params=[(2048, 1024), (7, 5)], ids=["default-blocks", "tiny-blocks"])
def blocks(request, monkeypatch):
    """Run with the default blocks and with blocks so small that every case spans many."""
    monkeypatch.setattr(_exact_search, "QUERY_BLOCK", request.param[0])
    monkeypatch.setattr(_exact_search, "BANK_BLOCK", request.param[1])
    return request.param


@pytest.mark.parametrize("k", [1, 3, 9, 61])
def test_matches_brute_force(blocks, k):
    rng = np.random.default_rng(k)
    bank = rng.standard_normal((61, 6)).astype(np.float32)
    queries = rng.standard_normal((23, 6)).astype(np.float32)

    squared, labels = exact_knn(queries, bank, k)
    expected_squared, expected_labels = _brute_force(bank, queries, k)

    assert squared.shape == (23, k)
    assert labels.shape == (23, k)
    assert squared.dtype == np.float32
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(squared, expected_squared, rtol=1e-5, atol=1e-4)


def test_equal_distances_list_the_lower_row_first(blocks):
    bank = np.ones((40, 3), np.float32)
    bank[[9, 13, 17, 21, 25, 30]] = 0.0
    queries = np.zeros((2, 3), np.float32)

    _, nearest = exact_knn(queries, bank, 1)
    _, labels = exact_knn(queries, bank, 5)

    np.testing.assert_array_equal(nearest, [[9], [9]])
    assert set(labels[0]) <= {9, 13, 17, 21, 25, 30}
    assert (np.diff(labels, axis=1) > 0).all()


def test_read_only_memory_map_bank(tmp_path):
    bank = np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32)
    np.save(tmp_path / "bank.npy", bank)
    mapped = np.load(tmp_path / "bank.npy", mmap_mode="r")
    queries = bank[:10] + 0.01

    _, labels = exact_knn(queries, mapped, 1)

    np.testing.assert_array_equal(labels[:, 0], np.arange(10))


def test_k_outside_bank_rejected():
    bank = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match="k must be between 1 and the bank size 4, got 5"):
        exact_knn(bank, bank, 5)


def test_flat_index_search_uses_exact_search():
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((5000, 16)).astype(np.float32)
    queries = rng.standard_normal((300, 16)).astype(np.float32)
    index = MemoryBankIndex("Flat").build(bank)

    distances, labels = index.search(queries, 4)
    expected_squared, expected_labels = _brute_force(bank, queries, 4)

    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(distances, np.sqrt(expected_squared), rtol=1e-4)


def test_non_finite_queries_rejected():
    index = MemoryBankIndex("Flat").build(np.ones((4, 2), np.float32))
    queries = np.zeros((3, 2), np.float32)
    queries[2, 1] = np.nan
    with pytest.raises(ValueError, match="1 of 3 queries contain NaN or infinite values, the first is row 2"):
        index.search(queries)
