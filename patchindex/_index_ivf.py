"""Train, fill and search IVF indexes with `exact_knn`'s matrix products for the coarse quantizer.

An IVF index spends most of its build time in the coarse quantizer: k-means training, then
assigning every bank vector to its nearest centroid. Search starts the same way, by finding
the nprobe nearest centroids of each query. FAISS computes these distances with the BLAS that
faiss-cpu bundles, which can run old generic kernels on recent CPUs (see `_exact_search`).
Here the same steps run through `exact_knn`, and FAISS still encodes, stores and scans the
inverted lists.

This applies to a plain IVF index with an exact L2 quantizer (``IVF<nlist>,Flat``,
``IVF<nlist>,PQ<m>``, ``IVF<nlist>,SQ8``). Other indexes (HNSW quantizers, pre-transforms,
refinement) return False from `is_plain_ivf` and are trained, filled and searched by FAISS.
"""

from __future__ import annotations

import logging
import time

import faiss
import numpy as np
import torch

from ._exact_search import _as_tensor, exact_knn

__all__ = ["add", "is_plain_ivf", "prepare", "search", "train"]

logger = logging.getLogger(__name__)

# Bank vectors assigned and added per step, which bounds the temporary arrays to a few tens of MB.
ADD_ROWS = 65536
# Relative change that separates a copied centroid from the cluster it splits.
_SPLIT_EPSILON = 1.0 / 1024


def prepare(index: faiss.Index) -> None:
    """Let a plain IVF index search its queries on all FAISS threads when lists are preassigned.

    In parallel mode 0, FAISS splits the queries among threads in `search` and runs
    `search_preassigned` on one thread. Mode 3 splits them inside `search_preassigned`, and
    FAISS's own `search` still works. The mode is not saved with the index.
    """
    faiss.downcast_index(index).parallel_mode = 3


def is_plain_ivf(index: faiss.Index) -> bool:
    """Return True if `index` is an L2 IVF index with an exact L2 quantizer and no wrapper."""
    # The downcast proxy does not own the index, so `index` must stay referenced while it is used.
    ivf = faiss.downcast_index(index)
    if not isinstance(ivf, faiss.IndexIVF) or ivf.metric_type != faiss.METRIC_L2:
        return False
    quantizer = faiss.downcast_index(ivf.quantizer)
    return type(quantizer) in (faiss.IndexFlat, faiss.IndexFlatL2) and quantizer.metric_type == faiss.METRIC_L2


def _centroids(index: faiss.IndexIVF) -> np.ndarray:
    """Return the coarse centroids (nlist, d) float32 of a trained plain IVF index, without copying."""
    quantizer = faiss.downcast_index(index.quantizer)
    return faiss.rev_swig_ptr(quantizer.get_xb(), quantizer.ntotal * quantizer.d).reshape(quantizer.ntotal, quantizer.d)


def kmeans(sample: np.ndarray, n_clusters: int, n_iterations: int, seed: int) -> np.ndarray:
    """Cluster `sample` (n, d) float32 into `n_clusters` centroids (n_clusters, d) float32 by Lloyd's algorithm.

    Centroids start at distinct random rows. A cluster left empty by an iteration takes a copy
    of the largest cluster's centroid, and the two copies move apart by a relative
    `_SPLIT_EPSILON` in opposite directions, so that the next assignment splits that cluster.
    """
    n, dim = sample.shape
    rng = np.random.default_rng(seed)
    centroids = np.ascontiguousarray(sample[np.sort(rng.choice(n, size=n_clusters, replace=False))])

    for _ in range(n_iterations):
        counts = torch.zeros(n_clusters, dtype=torch.int64)
        sums = torch.zeros(n_clusters, dim, dtype=torch.float32)
        for start in range(0, n, ADD_ROWS):
            part = sample[start : start + ADD_ROWS]
            labels = torch.from_numpy(exact_knn(part, centroids, 1)[1][:, 0])
            counts += torch.bincount(labels, minlength=n_clusters)
            sums.index_add_(0, labels, _as_tensor(part))

        occupied = counts > 0
        updated = torch.from_numpy(centroids.copy())
        updated[occupied] = sums[occupied] / counts[occupied, None]
        _split_largest(updated, counts)
        centroids = updated.numpy()
    return centroids


def _split_largest(centroids: torch.Tensor, counts: torch.Tensor) -> None:
    """Move each empty cluster's centroid next to the centroid of the then largest cluster, in place."""
    empty = torch.nonzero(counts == 0).view(-1).tolist()
    if not empty:
        return
    counts = counts.clone()
    signs = torch.ones(centroids.shape[1])
    signs[1::2] = -1.0
    for cluster in empty:
        largest = int(torch.argmax(counts))
        source = centroids[largest].clone()
        centroids[cluster] = source * (1 + _SPLIT_EPSILON * signs)
        centroids[largest] = source * (1 - _SPLIT_EPSILON * signs)
        counts[cluster] = counts[largest] // 2
        counts[largest] -= counts[cluster]
    logger.debug("k-means: %d empty clusters split from the largest ones", len(empty))


def train(index: faiss.Index, bank: np.ndarray, seed: int = 1234) -> None:
    """Train a plain IVF index on `bank` (n, d) float32: coarse k-means here, the codes by FAISS.

    As FAISS does, k-means runs on at most ``cp.max_points_per_centroid`` random rows per list
    for ``cp.niter`` iterations. With the centroids added to the quantizer, ``index.train``
    only trains the vector codes (PQ or SQ; nothing for Flat), on the same rows.
    """
    ivf = faiss.downcast_index(index)
    started = time.perf_counter()
    n = bank.shape[0]
    n_sample = min(n, ivf.cp.max_points_per_centroid * ivf.nlist)
    sample = bank
    if n_sample < n:
        sample = bank[np.sort(np.random.default_rng(seed).choice(n, size=n_sample, replace=False))]

    centroids = kmeans(sample, ivf.nlist, ivf.cp.niter, seed)
    ivf.quantizer.add(centroids)
    clustered = time.perf_counter()

    ivf.train(sample)
    logger.info(
        "trained IVF%d on %d of %d vectors: k-means %.2f s, codes %.2f s",
        ivf.nlist, n_sample, n, clustered - started, time.perf_counter() - clustered,
    )


def add(index: faiss.Index, bank: np.ndarray) -> None:
    """Add `bank` (n, d) float32 to a trained plain IVF index, assigning lists with `exact_knn`.

    Every vector is assigned first, so that each inverted list of an ArrayInvertedLists
    storage is allocated once at its final size. Lists that grow one vector at a time end
    with up to twice the memory they need.
    """
    ivf = faiss.downcast_index(index)
    started = time.perf_counter()
    centroids = _centroids(ivf)
    n = bank.shape[0]
    assignment = np.empty(n, dtype=np.int64)
    for start in range(0, n, ADD_ROWS):
        assignment[start : start + ADD_ROWS] = exact_knn(bank[start : start + ADD_ROWS], centroids, 1)[1][:, 0]
    assigned = time.perf_counter()

    _reserve(ivf, np.bincount(assignment, minlength=ivf.nlist))
    for start in range(0, n, ADD_ROWS):
        part = bank[start : start + ADD_ROWS]
        ivf.add_core(
            len(part), faiss.swig_ptr(part), None, faiss.swig_ptr(assignment[start : start + ADD_ROWS]),
        )
    logger.info(
        "added %d vectors to IVF%d: assignment %.2f s, encoding %.2f s",
        n, ivf.nlist, assigned - started, time.perf_counter() - assigned,
    )


def _reserve(ivf: faiss.IndexIVF, added: np.ndarray) -> None:
    """Allocate room in each inverted list for `added` (nlist,) more entries, if the storage allows."""
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(lists, faiss.ArrayInvertedLists):
        return
    # Growing a list to its final size and back leaves it empty with its final capacity,
    # because shrinking a std::vector keeps its capacity.
    for list_number in np.flatnonzero(added).tolist():
        size = lists.list_size(list_number)
        lists.resize(list_number, size + int(added[list_number]))
        lists.resize(list_number, size)


def search(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Search a plain IVF index for (m, d) float32 queries; return squared distances and labels, (m, k) each.

    The `nprobe` (default: the index's) nearest lists of each query come from `exact_knn`,
    and FAISS scans them. Labels are -1 where the probed lists contain fewer than k vectors.
    """
    ivf = faiss.downcast_index(index)
    nprobe = min(ivf.nprobe if nprobe is None else nprobe, ivf.nlist)
    centroid_distances, lists = exact_knn(queries, _centroids(ivf), nprobe)

    # nprobe goes in the call's parameters, so that a concurrent set_search_params cannot
    # change it between choosing and scanning the lists.
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe
    distances = np.empty((len(queries), k), dtype=np.float32)
    labels = np.empty((len(queries), k), dtype=np.int64)
    ivf.search_preassigned_c(
        len(queries), faiss.swig_ptr(queries), k, faiss.swig_ptr(lists), faiss.swig_ptr(centroid_distances),
        faiss.swig_ptr(distances), faiss.swig_ptr(labels), False, params,
    )
    return distances, labels
