import logging

import faiss
import numpy as np
import pytest
import torch

from patchindex import _faiss_gpu, _index_auto
from patchindex import index as index_module
from patchindex._index_auto import choose_auto_spec, ivf_nlist
from patchindex.index import MemoryBankIndex, check_index_spec

# One spec per index family: exact, inverted lists, inverted lists with product-quantizer
# codes (4 bits, which train fast), graph, and codes refined with exact distances. Values are
# the least fraction of queries whose exact nearest neighbour is among 5 results: 4-bit codes
# of 2-d subvectors lose it for about 30% of the test queries.
SPECS = {"Flat": 1.0, "IVF16,Flat": 0.95, "IVF16,PQ8x4": 0.6, "HNSW16": 0.95, "IVF16,PQ8x4,RFlat": 0.6}


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
    with pytest.raises(ValueError, match="k must be an integer between 1 and the bank size 10"):
        index.search(np.zeros((3, 4), np.float32), k=11)
    with pytest.raises(ValueError, match="NaN"):
        MemoryBankIndex().build(np.full((3, 4), np.nan, np.float32))
    with pytest.raises(RuntimeError, match="build"):
        MemoryBankIndex().search(np.zeros((1, 4), np.float32))
    (tmp_path / "broken.faiss").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="broken.faiss"):
        MemoryBankIndex.load(tmp_path / "broken.faiss")


def _clustered_bank(n, dim, seed):
    """Draw from 32 Gaussian clusters, the same for every seed, so that approximate indexes
    have structure to find and queries come from the bank's distribution."""
    centers = np.random.default_rng(0).standard_normal((32, dim)).astype(np.float32) * 3
    rng = np.random.default_rng(seed)
    return centers[rng.integers(32, size=n)] + rng.standard_normal((n, dim)).astype(np.float32)


@pytest.mark.parametrize("spec, min_found", SPECS.items())
def test_every_index_returns_euclidean_distances(spec, min_found):
    bank = _clustered_bank(2000, 16, seed=3)
    queries = _clustered_bank(200, 16, seed=4)
    index = MemoryBankIndex(spec).build(bank)
    if "nprobe" in index.search_params:
        index.set_search_params(nprobe=4)

    distances, labels = index.search(queries, k=5)

    assert index.spec_ == spec
    assert distances.dtype == np.float32
    assert labels.dtype == np.int64
    assert labels.min() >= 0
    assert np.all(np.diff(distances, axis=1) >= 0)
    recomputed = np.linalg.norm(queries[:, None, :] - bank[labels], axis=2)
    np.testing.assert_allclose(distances, recomputed, rtol=1e-4, atol=1e-4)
    exact_distances, _ = _brute_force(bank, queries, 1)
    found_nearest = np.isclose(distances, exact_distances, rtol=1e-4, atol=1e-4).any(axis=1)
    assert found_nearest.mean() >= min_found


@pytest.mark.parametrize("spec", SPECS)
def test_every_index_survives_save_and_load(spec, tmp_path):
    bank = _clustered_bank(2000, 16, seed=5)
    queries = _clustered_bank(300, 16, seed=6)
    index = MemoryBankIndex(spec).build(bank)
    if "nprobe" in index.search_params:
        index.set_search_params(nprobe=3)
    if "ef_search" in index.search_params:
        index.set_search_params(ef_search=20)
    index.save(tmp_path / "index.faiss")

    loaded = MemoryBankIndex.load(tmp_path / "index.faiss", spec, bank=bank)

    assert loaded.spec_ == spec
    assert loaded.search_params == index.search_params
    for before, after in zip(index.search(queries, 4), loaded.search(queries, 4)):
        np.testing.assert_array_equal(before, after)


def test_search_params_change_without_rebuild():
    bank = _clustered_bank(2000, 16, seed=7)
    queries = _clustered_bank(300, 16, seed=8)
    index = MemoryBankIndex("IVF32,Flat").build(bank)
    expected_distances, expected_labels = _brute_force(bank, queries, 3)

    index.set_search_params(nprobe=32)
    distances, labels = index.search(queries, k=3)

    assert index.search_params == {"nprobe": 32}
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-4, atol=1e-4)
    assert np.mean(labels == expected_labels) > 0.99


def test_ivf_results_missing_from_probed_lists_are_filled():
    bank = _clustered_bank(2000, 8, seed=9)
    queries = _clustered_bank(50, 8, seed=10)
    index = MemoryBankIndex("IVF50,Flat").build(bank).set_search_params(nprobe=1)
    _, raw_labels = index.index_.search(queries, 200)
    assert (raw_labels < 0).any()

    distances, labels = index.search(queries, k=200)

    expected_distances, _ = _brute_force(bank, queries, 200)
    assert labels.min() >= 0
    assert np.all(distances[:, -1] <= expected_distances[:, -1] * 1.5 + 1e-3)
    recomputed = np.linalg.norm(queries[:, None, :] - bank[labels], axis=2)
    np.testing.assert_allclose(distances, recomputed, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "spec, n, reason",
    [("IVF64,Flat", 1000, "64 inverted lists need 39 training points each"), ("PQ4", 200, "8 bits needs 256")],
)
def test_small_bank_falls_back_to_flat(spec, n, reason, caplog):
    bank = _clustered_bank(n, 16, seed=11)
    with caplog.at_level(logging.WARNING, logger="patchindex.index"):
        index = MemoryBankIndex(spec).build(bank)
    assert index.spec_ == "Flat"
    assert index.search_params == {}
    assert spec in caplog.text
    assert reason in caplog.text


@pytest.mark.parametrize(
    "spec, message",
    [
        ("IVF16,PQ7", "multiple of the number of subquantizers"),
        ("bogus", "could not parse index string bogus"),
        ("", "invalid index ''"),
    ],
)
def test_bad_index_spec_rejected(spec, message):
    with pytest.raises(ValueError, match=message) as raised:
        MemoryBankIndex(spec).build(np.zeros((100, 16), np.float32)) if spec else MemoryBankIndex(spec)
    assert "'IVF1024,Flat'" in str(raised.value)
    assert "Error in" not in str(raised.value)


def test_search_params_checked_against_index():
    with pytest.raises(ValueError, match="nprobe=4 applies to IVF indexes, but the index is 'HNSW32'"):
        check_index_spec("HNSW32", 16, nprobe=4)
    with pytest.raises(ValueError, match="ef_search=8 applies to HNSW"):
        check_index_spec("IVF16,Flat", 16, ef_search=8)
    with pytest.raises(ValueError, match="exceeds the 16 inverted lists"):
        check_index_spec("IVF16,Flat", 16, nprobe=17)
    check_index_spec("auto", 16, nprobe=4)
    check_index_spec("IVF16_HNSW8,Flat", 16, nprobe=4, ef_search=8)

    index = MemoryBankIndex("HNSW16").build(_clustered_bank(500, 16, seed=12))
    with pytest.raises(ValueError, match="nprobe applies to IVF indexes"):
        index.set_search_params(nprobe=2)
    with pytest.raises(ValueError, match="ef_search must be a positive integer"):
        index.set_search_params(ef_search=0)


def test_auto_picks_by_bank_size():
    assert choose_auto_spec(_index_auto.AUTO_FLAT_MAX - 1) == "Flat"
    assert choose_auto_spec(1_000_000) == "IVF1024,Flat"
    for n in (1000, 60_000, 1_000_000, 10_000_000):
        assert n >= 39 * ivf_nlist(n)


def test_auto_meets_recall_target(monkeypatch):
    monkeypatch.setattr(_index_auto, "AUTO_FLAT_MAX", 1000)
    # Keep the tuned index whatever its speed, which on a bank this small is mostly overhead.
    monkeypatch.setattr(index_module, "MIN_SPEEDUP", 0.0)
    bank = _clustered_bank(5000, 16, seed=13)
    queries = _clustered_bank(1000, 16, seed=14)

    index = MemoryBankIndex("auto", recall_target=0.95).build(bank)
    distances, _ = index.search(queries, k=1)

    assert index.spec_ == "IVF64,Flat"
    assert set(index.search_params) == {"nprobe"}
    exact_distances, _ = _brute_force(bank, queries, 1)
    assert np.mean(distances[:, 0] <= exact_distances[:, 0] + 1e-4) >= 0.95


@pytest.mark.skipif(_faiss_gpu.available(), reason="the speed check applies to CPU search only")
def test_auto_builds_flat_when_not_faster(monkeypatch, caplog):
    monkeypatch.setattr(_index_auto, "AUTO_FLAT_MAX", 1000)
    monkeypatch.setattr(index_module, "MIN_SPEEDUP", 1e9)
    bank = _clustered_bank(5000, 16, seed=13)
    queries = _clustered_bank(100, 16, seed=14)

    with caplog.at_level(logging.INFO, logger="patchindex.index"):
        index = MemoryBankIndex("auto").build(bank)
    distances, labels = index.search(queries, k=2)

    assert index.spec_ == "Flat"
    assert index.ntotal == 5000
    assert "IVF64,Flat" in caplog.text
    assert "building Flat instead" in caplog.text
    exact_distances, exact_labels = _brute_force(bank, queries, 2)
    np.testing.assert_array_equal(labels, exact_labels)


def test_backend_and_threads_logged(caplog):
    bank = np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="patchindex.index"):
        MemoryBankIndex().build(bank)
        ivf = MemoryBankIndex("IVF8,Flat").build(bank)
        MemoryBankIndex("HNSW8").build(bank)
    if not _faiss_gpu.available():
        assert ivf.backend == "CPU"
        assert f"searching on CPU by torch matrix products with {torch.get_num_threads()} threads" in caplog.text
        assert (
            f"lists chosen by torch matrix products with {torch.get_num_threads()} threads, "
            f"scanned by FAISS with {faiss.omp_get_max_threads()} threads"
        ) in caplog.text
        assert f"searching on CPU with {faiss.omp_get_max_threads()} FAISS threads" in caplog.text


@pytest.mark.skipif(_faiss_gpu.available(), reason="this FAISS sees a GPU")
def test_gpu_request_without_gpu_faiss_rejected():
    with pytest.raises(ValueError, match="use_gpu=True, but this FAISS has no GPU support"):
        MemoryBankIndex(use_gpu=True)


def test_non_integer_k_rejected():
    index = MemoryBankIndex().build(np.eye(4, dtype=np.float32))

    with pytest.raises(ValueError, match="k must be an integer between 1 and the bank size 4, got 2.0"):
        index.search(np.eye(4, dtype=np.float32), 2.0)


def test_zero_width_bank_rejected():
    with pytest.raises(ValueError, match=r"non-empty \(n, d\) array, got shape \(10, 0\)"):
        MemoryBankIndex().build(np.ones((10, 0), dtype=np.float32))
