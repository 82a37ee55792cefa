import faiss
import numpy as np
import pytest

from patchindex import _index_ivf
from patchindex.index import MemoryBankIndex


def _blobs(n_per_blob: int, centers: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    points = centers[:, None, :] + 0.01 * rng.standard_normal((len(centers), n_per_blob, centers.shape[1]))
    return points.reshape(-1, centers.shape[1]).astype(np.float32)


@pytest.mark.parametrize(
    "spec, plain",
    [
        ("IVF16,Flat", True),
        ("IVF16,PQ4x4", True),
        ("IVF16,SQ8", True),
        ("IVF16_HNSW8,Flat", False),
        ("PCA8,IVF16,Flat", False),
        ("Flat", False),
        ("HNSW8", False),
    ],
)
def test_plain_ivf_detected(spec, plain):
    index = faiss.index_factory(16, spec)

    assert _index_ivf.is_plain_ivf(index) is plain


def test_kmeans_converges_to_cluster_means():
    centers = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32) * 10
    sample = _blobs(100, centers, seed=1)

    centroids = _index_ivf.kmeans(sample, 8, n_iterations=20, seed=0)

    # Lloyd's algorithm can stop in a local optimum, but each centroid is then the mean of
    # the rows nearest to it, and every row is near some centroid of a blob or blob pair.
    nearest = np.argmin(((sample[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert centroids.shape == (8, 6)
    for cluster in np.unique(nearest):
        np.testing.assert_allclose(centroids[cluster], sample[nearest == cluster].mean(axis=0), atol=1e-3)
    assert len(np.unique(nearest)) == 8


def test_kmeans_splits_empty_clusters():
    # 3 distinct rows for 6 clusters: duplicated initial centroids leave clusters empty.
    sample = np.repeat(np.eye(3, 4, dtype=np.float32), 50, axis=0)

    centroids = _index_ivf.kmeans(sample, 6, n_iterations=5, seed=0)

    assert np.isfinite(centroids).all()
    assert len(np.unique(centroids.round(6), axis=0)) == 6


@pytest.mark.parametrize("spec", ["IVF32,Flat", "IVF32,SQ8", "IVF32,PQ4x4"])
def test_every_vector_added_to_its_nearest_list(spec):
    rng = np.random.default_rng(2)
    bank = rng.standard_normal((4000, 16)).astype(np.float32)
    index = faiss.index_factory(16, spec)

    _index_ivf.train(index, bank)
    _index_ivf.add(index, bank)

    ivf = faiss.downcast_index(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    sizes = [lists.list_size(number) for number in range(ivf.nlist)]
    stored = np.concatenate([faiss.rev_swig_ptr(lists.get_ids(number), size) for number, size in enumerate(sizes) if size])
    assert index.ntotal == len(bank)
    np.testing.assert_array_equal(np.sort(stored), np.arange(len(bank)))
    # With one list probed, each bank vector is found in the list it was added to.
    _, labels = _index_ivf.search(index, bank, 1)
    assert (labels[:, 0] == np.arange(len(bank))).mean() > (0.999 if spec == "IVF32,Flat" else 0.5)


def test_search_matches_faiss_search():
    rng = np.random.default_rng(3)
    bank = rng.standard_normal((6000, 16)).astype(np.float32)
    queries = rng.standard_normal((500, 16)).astype(np.float32)
    index = faiss.index_factory(16, "IVF64,Flat")
    _index_ivf.train(index, bank)
    _index_ivf.add(index, bank)
    faiss.downcast_index(index).nprobe = 4

    distances, labels = _index_ivf.search(index, queries, 5)
    faiss_distances, faiss_labels = index.search(queries, 5)

    # The two choose lists from distances rounded differently, so near ties may differ.
    assert (labels == faiss_labels).all(axis=1).mean() > 0.98
    np.testing.assert_allclose(np.median(distances, axis=0), np.median(faiss_distances, axis=0), rtol=1e-4)


def test_ivf_with_all_lists_probed_is_exact():
    rng = np.random.default_rng(4)
    bank = rng.standard_normal((3000, 12)).astype(np.float32)
    queries = rng.standard_normal((200, 12)).astype(np.float32)

    index = MemoryBankIndex("IVF16,Flat").build(bank).set_search_params(nprobe=16)
    distances, labels = index.search(queries, 4)
    exact_distances, exact_labels = MemoryBankIndex("Flat").build(bank).search(queries, 4)

    np.testing.assert_array_equal(labels, exact_labels)
    np.testing.assert_allclose(distances, exact_distances, rtol=1e-5, atol=1e-5)


def test_training_uses_a_sample_per_list():
    rng = np.random.default_rng(5)
    bank = rng.standard_normal((5000, 8)).astype(np.float32)
    index = faiss.index_factory(8, "IVF4,Flat")
    ivf = faiss.downcast_index(index)
    ivf.cp.max_points_per_centroid = 100

    _index_ivf.train(index, bank)

    assert index.is_trained
    assert ivf.quantizer.ntotal == 4


def test_read_only_bank_accepted():
    bank = np.random.default_rng(6).standard_normal((2000, 8)).astype(np.float32)
    bank.setflags(write=False)

    index = MemoryBankIndex("IVF8,Flat").build(bank)

    assert index.ntotal == 2000


def test_search_nprobe_argument_leaves_index_unchanged():
    rng = np.random.default_rng(7)
    bank = rng.standard_normal((3000, 8)).astype(np.float32)
    queries = rng.standard_normal((100, 8)).astype(np.float32)
    index = MemoryBankIndex("IVF16,Flat").build(bank).set_search_params(nprobe=1)

    _, labels = _index_ivf.search(index.index_, queries, 3, nprobe=16)
    _, exact_labels = MemoryBankIndex("Flat").build(bank).search(queries, 3)

    np.testing.assert_array_equal(labels, exact_labels)
    assert index.search_params == {"nprobe": 1}


@pytest.mark.parametrize("spec", ["IVF64,Flat", "IVF64,SQ8", "IVF64_HNSW8,Flat"])
def test_loaded_without_bank_fills_short_lists(tmp_path, spec):
    rng = np.random.default_rng(8)
    bank = rng.standard_normal((5000, 8)).astype(np.float32)
    queries = rng.standard_normal((50, 8)).astype(np.float32)
    MemoryBankIndex(spec).build(bank).save(tmp_path / "index.faiss")

    loaded = MemoryBankIndex.load(tmp_path / "index.faiss", spec).set_search_params(nprobe=1)
    distances, labels = loaded.search(queries, 500)

    # One list of 64 contains about 80 vectors, so every query needs the other lists.
    assert (labels >= 0).all()
    assert np.isfinite(distances).all()
    assert (np.diff(distances, axis=1) >= -1e-4).all()
    if spec == "IVF64,Flat":
        _, exact_labels = MemoryBankIndex("Flat").build(bank).search(queries, 500)
        assert (np.sort(labels, axis=1) == np.sort(exact_labels, axis=1)).mean() > 0.999
