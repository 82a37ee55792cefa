"""FAISS nearest-neighbour search over the memory bank: exact (Flat) or approximate.

An index is chosen with a FAISS index factory string and always uses the L2 metric: ``"Flat"``
(exact), ``"IVF1024,Flat"``, ``"IVF1024,PQ8"`` or ``"HNSW32"`` (approximate), or ``"auto"``,
which picks one from the bank size and tunes it to a recall target (see `_index_auto`).
FAISS L2 indexes return squared distances; `MemoryBankIndex.search` returns Euclidean ones,
which is what PatchCore's patch scores and reweighting use. Flat search on the CPU runs as
blocked torch matrix products (`_exact_search`), which are faster than the BLAS that faiss-cpu
bundles. The Flat index still stores the vectors and is what is saved. IVF indexes with an
exact quantizer use the same products for k-means training, list assignment and the choice of
lists to probe (`_index_ivf`), and FAISS for the rest.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time

import faiss
import numpy as np
import torch

from . import _faiss_gpu, _index_ivf
from ._exact_search import exact_knn
from ._index_auto import CALIBRATION_QUERIES, MIN_SPEEDUP, choose_auto_spec, tune_search_params

__all__ = ["AUTO", "MIN_POINTS_PER_LIST", "MemoryBankIndex", "check_index_spec"]

logger = logging.getLogger(__name__)

AUTO = "auto"

# FAISS warns when k-means gets fewer than 39 training points per centroid.
MIN_POINTS_PER_LIST = 39

_SPEC_EXAMPLES = "'Flat', 'IVF1024,Flat', 'IVF1024,PQ8' (PQ m must divide the dimension), 'HNSW32' or 'auto'"

# Lossy codes (PQ, SQ) are searched for this many times k candidates, which are reranked by
# their exact distances from the bank.
RERANK_FACTOR = 4

# Index types whose search returns exact L2 distances to the stored vectors.
_EXACT_TYPES = (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexHNSWFlat, faiss.IndexRefineFlat)


def _faiss_message(error: Exception) -> str:
    """Reduce a FAISS C++ exception to its message, without the source file and line."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    match = re.search(r"Error in .*? at \S+:\d+: (?:Error: '.*?' failed: )?(.*)", text)
    return match.group(1) if match else text


def _new_index(spec: str, dim: int) -> faiss.Index:
    """Create an empty L2 index from a factory string, raising ValueError for a bad spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"invalid index {spec!r}; write a FAISS factory string such as {_SPEC_EXAMPLES}")
    try:
        index = faiss.index_factory(dim, spec, faiss.METRIC_L2)
    except RuntimeError as error:
        raise ValueError(
            f"invalid index {spec!r} for dimension {dim}: {_faiss_message(error)}; "
            f"write a FAISS factory string such as {_SPEC_EXAMPLES}"
        ) from None
    return index


def check_index_spec(spec: str, dim: int, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Raise ValueError unless `spec` is ``"auto"`` or a factory string valid for dimension `dim`.

    `nprobe` and `ef_search`, when given, must be search parameters that the index has.
    """
    if spec == AUTO:
        return
    index = _new_index(spec, dim)
    ivf = _ivf(index)
    if nprobe is not None and ivf is None:
        raise ValueError(f"nprobe={nprobe} applies to IVF indexes, but the index is {spec!r}; remove nprobe")
    if nprobe is not None and nprobe > ivf.nlist:
        raise ValueError(f"nprobe={nprobe} exceeds the {ivf.nlist} inverted lists of {spec!r}")
    if ef_search is not None and _hnsw(index) is None:
        raise ValueError(f"ef_search={ef_search} applies to HNSW indexes, but the index is {spec!r}; remove ef_search")


def _sub_indexes(index: faiss.Index) -> list:
    """List `index` and the indexes it wraps (pre-transform, refine, HNSW storage, IVF), downcast."""
    found, pending = [], [index]
    while pending:
        current = faiss.downcast_index(pending.pop())
        found.append(current)
        for name in ("index", "base_index", "storage"):
            inner = getattr(current, name, None)
            if isinstance(inner, faiss.Index):
                pending.append(inner)
    return found


def _ivf(index: faiss.Index):
    return faiss.try_extract_index_ivf(index)


def _hnsw(index: faiss.Index):
    """Return the HNSW index whose efSearch applies: the index itself or an IVF's quantizer."""
    for candidate in _sub_indexes(index):
        if hasattr(candidate, "hnsw"):
            return candidate
    ivf = _ivf(index)
    if ivf is not None:
        quantizer = faiss.downcast_index(ivf.quantizer)
        if hasattr(quantizer, "hnsw"):
            return quantizer
    return None


def _training_points_needed(index: faiss.Index) -> tuple[int, str]:
    """Return the bank size that training `index` needs and the reason, (0, "") when none."""
    needed, reason = 0, ""
    ivf = _ivf(index)
    if ivf is not None and MIN_POINTS_PER_LIST * ivf.nlist > needed:
        needed = MIN_POINTS_PER_LIST * ivf.nlist
        reason = f"{ivf.nlist} inverted lists need {MIN_POINTS_PER_LIST} training points each"
    for candidate in _sub_indexes(index) + ([ivf] if ivf is not None else []):
        pq = getattr(candidate, "pq", None)
        if pq is not None and 2**pq.nbits > needed:
            needed = 2**pq.nbits
            reason = f"a product quantizer with {pq.nbits} bits needs {needed} training points"
    return needed, reason


def _returns_exact_distances(index: faiss.Index) -> bool:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine) and not isinstance(index, faiss.IndexRefineFlat):
        return isinstance(faiss.downcast_index(index.refine_index), faiss.IndexFlat)
    return isinstance(index, _EXACT_TYPES)


def _flat_vectors(index: faiss.Index) -> np.ndarray | None:
    """Return the (n, d) float32 vectors of an exact L2 Flat index, without copying, else None."""
    index = faiss.downcast_index(index)
    if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_L2 or index.ntotal == 0:
        return None
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


class MemoryBankIndex:
    """k-NN search over a memory bank (n, d) float32 with a FAISS index.

    Parameters
    ----------
    factory : str
        FAISS index factory string (L2 metric), e.g. ``"Flat"`` (exact), ``"IVF1024,Flat"``,
        ``"IVF1024,PQ8"`` or ``"HNSW32"``, or ``"auto"`` to choose from the bank size.
    recall_target : float in (0, 1]
        Recall@1 that ``"auto"`` tunes nprobe or efSearch for; ignored by other specs.
    use_gpu : bool or None
        Search on a GPU with GPU FAISS. None uses one when GPU FAISS and a GPU are present;
        True raises ValueError when they are not.
    chunk_rows : int
        Queries are searched at most this many at a time, which bounds the temporary
        (chunk_rows, k) result arrays and stays below GPU FAISS limits.

    After `build` or `load`: ``index_`` (the CPU FAISS index), ``spec_`` (the factory string
    built, which differs from `factory` for ``"auto"`` or a fallback to Flat) and ``bank_``.
    """

    def __init__(
        self,
        factory: str = "Flat",
        *,
        recall_target: float = 0.99,
        use_gpu: bool | None = None,
        chunk_rows: int = 65536,
    ):
        if not isinstance(factory, str) or not factory.strip():
            raise ValueError(f"invalid index {factory!r}; write a FAISS factory string such as {_SPEC_EXAMPLES}")
        if isinstance(recall_target, bool) or not isinstance(recall_target, (int, float)) or not 0 < recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {recall_target!r}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        if use_gpu and not _faiss_gpu.available():
            raise ValueError("use_gpu=True, but this FAISS has no GPU support or finds no GPU; pass use_gpu=None")
        self.factory = factory
        self.recall_target = recall_target
        self.use_gpu = use_gpu
        self.chunk_rows = chunk_rows
        self.index_: faiss.Index | None = None
        self.spec_: str | None = None
        self.bank_: np.ndarray | None = None
        self._gpu_index = None

    @property
    def ntotal(self) -> int:
        return 0 if self.index_ is None else self.index_.ntotal

    @property
    def dim(self) -> int:
        self._check_built()
        return self.index_.d

    @property
    def backend(self) -> str:
        """Where searches run: ``"GPU"`` or ``"CPU"``."""
        return "CPU" if self._gpu_index is None else "GPU"

    @property
    def search_params(self) -> dict:
        """The search parameters that apply to this index: ``nprobe`` (IVF), ``ef_search`` (HNSW)."""
        self._check_built()
        params = {}
        ivf = _ivf(self.index_)
        if ivf is not None:
            params["nprobe"] = int(ivf.nprobe)
        hnsw = _hnsw(self.index_)
        if hnsw is not None:
            params["ef_search"] = int(hnsw.hnsw.efSearch)
        return params

    def _check_built(self) -> None:
        if self.index_ is None:
            raise RuntimeError("the index is empty; call build() or load() first")

    # -----------------------------------------------------------------------------------------
    # Build

    def build(self, bank: np.ndarray) -> "MemoryBankIndex":
        """Train the index on the memory bank (n, d) float32 and add it.

        A bank too small to train the requested index falls back to Flat with a warning.
        The bank is kept by reference (``bank_``) to return exact distances from lossy codes.
        """
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or bank.shape[0] < 1 or bank.shape[1] < 1:
            raise ValueError(f"memory bank must be a non-empty (n, d) array, got shape {bank.shape}")
        if not np.isfinite(bank).all():
            raise ValueError("memory bank contains NaN or infinite values")
        n, dim = bank.shape
        started = time.perf_counter()
        self._gpu_index = None

        auto = self.factory == AUTO
        spec = choose_auto_spec(n) if auto else self.factory
        index = _new_index(spec, dim)
        needed, reason = _training_points_needed(index)
        if n < needed:
            logger.warning(
                "index %r falls back to Flat (exact search): the memory bank has %d vectors, but %s (%d); "
                "use a smaller nlist or PQ code, or a larger coreset_ratio", spec, n, reason, needed,
            )
            spec, index = "Flat", _new_index("Flat", dim)

        # "auto" tunes on the last rows of the bank as held-out queries, added after tuning so
        # that row numbers stay those of the bank.
        # NOTE: the last rows of a coreset are its last picks, which lie closer to other entries
        # than typical rows do. benchmarks/search.py checks the tuned recall on unseen patches.
        held_out = min(CALIBRATION_QUERIES, n // 10) if auto and spec != "Flat" else 0
        plain_ivf = _index_ivf.is_plain_ivf(index)
        train = functools.partial(_index_ivf.train, index) if plain_ivf else index.train
        add = functools.partial(_index_ivf.add, index) if plain_ivf else index.add
        try:
            if not index.is_trained:
                train(bank)
            add(bank[: n - held_out])
        except RuntimeError as error:
            raise ValueError(f"cannot build index {spec!r} on a memory bank of shape {bank.shape}: {_faiss_message(error)}") from None
        if plain_ivf:
            _index_ivf.prepare(index)
        self.index_, self.spec_, self.bank_ = index, spec, bank
        built = time.perf_counter()

        tuning_seconds = 0.0
        if held_out:
            tuning = tune_search_params(
                self._search_squared, self.set_search_params, bank[: n - held_out], bank[n - held_out :],
                self.search_params, self.recall_target,
            )
            tuning_seconds = time.perf_counter() - built
            # The check times CPU search, so an index bound for a GPU keeps the tuned setting.
            if tuning is not None and tuning.speedup < MIN_SPEEDUP and not self._want_gpu():
                logger.info(
                    "auto index: %s at %s searched %d held-out bank vectors %.2f times as fast as exact search, "
                    "less than %.1f times; building Flat instead", spec, tuning.params, held_out, tuning.speedup, MIN_SPEEDUP,
                )
                spec, index = "Flat", _new_index("Flat", dim)
                index.add(bank)
                self.index_, self.spec_ = index, spec
            else:
                add(bank[n - held_out :])
        self._to_gpu()
        logger.info(
            "built %s index of %d vectors, d=%d, in %.2f s (%.2f s of it tuning); %s, search %s; %s",
            spec, n, dim, time.perf_counter() - started, tuning_seconds,
            f"auto for recall@1 {self.recall_target}" if auto else f"requested {self.factory}",
            self.search_params or "exact", self._describe_backend(),
        )
        return self

    def _want_gpu(self) -> bool:
        return self.use_gpu is not False and _faiss_gpu.available()

    def _to_gpu(self) -> None:
        self._gpu_index = None
        if self._want_gpu():
            self._gpu_index = _faiss_gpu.to_gpu(self.index_)

    def _describe_backend(self) -> str:
        if self._gpu_index is not None:
            return "searching on GPU 0"
        if _flat_vectors(self.index_) is not None:
            return f"searching on CPU by torch matrix products with {torch.get_num_threads()} threads"
        if _index_ivf.is_plain_ivf(self.index_):
            return (
                f"searching on CPU: lists chosen by torch matrix products with {torch.get_num_threads()} threads, "
                f"scanned by FAISS with {faiss.omp_get_max_threads()} threads"
            )
        return f"searching on CPU with {faiss.omp_get_max_threads()} FAISS threads"

    # -----------------------------------------------------------------------------------------
    # Search

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> "MemoryBankIndex":
        """Set nprobe (IVF lists visited per query) or efSearch (HNSW candidate list size).

        Takes effect at once, without rebuilding. None leaves a parameter unchanged.
        """
        self._check_built()
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if nprobe is not None:
            ivf = _ivf(self.index_)
            if ivf is None:
                raise ValueError(f"nprobe applies to IVF indexes, but this index is {self.spec_!r}")
            if nprobe > ivf.nlist:
                raise ValueError(f"nprobe {nprobe} exceeds the number of inverted lists {ivf.nlist} of {self.spec_!r}")
            ivf.nprobe = int(nprobe)
            if self._gpu_index is not None:
                _faiss_gpu.set_nprobe(self._gpu_index, int(nprobe))
        if ef_search is not None:
            hnsw = _hnsw(self.index_)
            if hnsw is None:
                raise ValueError(f"ef_search applies to HNSW indexes, but this index is {self.spec_!r}")
            hnsw.hnsw.efSearch = int(ef_search)
        return self

    def _search_squared(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search one chunk (m, d) float32; return squared L2 distances and labels, (m, k) each."""
        # GPU FAISS k-selection handles k up to 2048; larger k is searched on the CPU.
        if self._gpu_index is not None and k <= 2048:
            return self._gpu_index.search(queries, k)
        vectors = _flat_vectors(self.index_)
        if vectors is not None:
            return exact_knn(queries, vectors, k)
        if _index_ivf.is_plain_ivf(self.index_):
            return _index_ivf.search(self.index_, queries, k)
        return self.index_.search(queries, k)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Find the `k` nearest bank entries of each query (m, d) float32.

        Returns Euclidean distances (m, k) float32, ascending, and bank row numbers (m, k) int64.
        Indexes with lossy codes (PQ, SQ) return RERANK_FACTOR * k candidates, which are
        reranked by their exact distances from ``bank_``.
        """
        self._check_built()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index_.d:
            raise ValueError(f"queries must have shape (m, {self.index_.d}), got {queries.shape}")
        finite = np.isfinite(queries).all(axis=1)
        if not finite.all():
            rows = np.flatnonzero(~finite)
            raise ValueError(f"{rows.size} of {len(queries)} queries contain NaN or infinite values, the first is row {rows[0]}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.index_.ntotal:
            raise ValueError(f"k must be an integer between 1 and the bank size {self.index_.ntotal}, got {k!r}")

        m = queries.shape[0]
        started = time.perf_counter()
        distances = np.empty((m, k), dtype=np.float32)
        labels = np.empty((m, k), dtype=np.int64)
        exact = _returns_exact_distances(self.index_) or self.bank_ is None
        candidates = k if exact else min(k * RERANK_FACTOR, self.index_.ntotal)
        for start in range(0, m, self.chunk_rows):
            stop = min(start + self.chunk_rows, m)
            squared, found = self._search_squared(queries[start:stop], candidates)
            squared, found = self._repair(queries[start:stop], squared, found, exact)
            squared, labels[start:stop] = squared[:, :k], found[:, :k]
            # Rounding in |x|^2 + |y|^2 - 2 x.y can leave tiny negative squares.
            np.sqrt(np.maximum(squared, 0.0), out=distances[start:stop])
        logger.debug(
            "searched %d queries, k=%d, in %.3f s; %s", m, k, time.perf_counter() - started, self._describe_backend()
        )
        return distances, labels

    def _repair(self, queries, squared, labels, exact: bool):
        """Fill results that approximate search missed and replace approximate distances.

        IVF search returns label -1 when the probed lists contain fewer than k vectors. Those
        queries are searched exactly in the bank, or in all lists of an index loaded without
        its bank. Lossy codes give approximate distances, so these are recomputed from the
        bank and the candidates sorted again.
        """
        missing = (labels < 0).any(axis=1)
        if missing.any():
            logger.debug("%d queries had fewer than %d results; searching them again", missing.sum(), labels.shape[1])
            squared = squared.copy()
            labels = labels.copy()
            if self.bank_ is not None:
                squared[missing], labels[missing] = exact_knn(queries[missing], self.bank_, labels.shape[1])
            else:
                squared[missing], labels[missing] = self._search_all_lists(queries[missing], labels.shape[1])
        if not exact and self.bank_ is not None:
            differences = queries[:, None, :] - self.bank_[labels]
            squared = np.einsum("mkd,mkd->mk", differences, differences)
            order = np.argsort(squared, axis=1, kind="stable")
            squared = np.take_along_axis(squared, order, axis=1)
            labels = np.take_along_axis(labels, order, axis=1)
        return squared, labels

    def _search_all_lists(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search (m, d) float32 queries in every inverted list; return squared distances and labels."""
        ivf = faiss.downcast_index(self.index_)
        if _index_ivf.is_plain_ivf(self.index_):
            return _index_ivf.search(self.index_, queries, k, nprobe=ivf.nlist)
        if isinstance(ivf, faiss.IndexIVF):
            params = faiss.SearchParametersIVF()
            params.nprobe = ivf.nlist
            return ivf.search(queries, k, params=params)
        raise ValueError(
            f"{len(queries)} queries found fewer than k={k} results in the probed lists of {self.spec_!r}; "
            "raise nprobe, lower k, or load the index with its memory bank (bank=...)"
        )

    # -----------------------------------------------------------------------------------------
    # Save and load

    def save(self, path: str | os.PathLike) -> None:
        """Write the index, with its search parameters, to a FAISS index file."""
        self._check_built()
        faiss.write_index(self.index_, os.fspath(path))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        factory: str = "Flat",
        *,
        bank: np.ndarray | None = None,
        use_gpu: bool | None = None,
    ) -> "MemoryBankIndex":
        """Read an index written by `save`.

        `factory` is the spec it was built from. `bank` (n, d) float32 is the memory bank it
        holds. Without it, lossy codes (PQ, SQ) return approximate distances.
        """
        instance = cls(factory, use_gpu=use_gpu)
        try:
            index = faiss.read_index(os.fspath(path))
        except RuntimeError as error:
            raise ValueError(f"cannot read FAISS index {path}: {_faiss_message(error)}") from None
        if bank is not None and (bank.shape[0] != index.ntotal or bank.shape[1] != index.d):
            raise ValueError(
                f"FAISS index {path} contains {index.ntotal} vectors of dimension {index.d}, "
                f"but the memory bank has shape {bank.shape}"
            )
        if _index_ivf.is_plain_ivf(index):
            _index_ivf.prepare(index)
        instance.index_ = index
        instance.spec_ = factory
        instance.bank_ = None if bank is None else np.ascontiguousarray(bank, dtype=np.float32)
        instance._to_gpu()
        logger.info("loaded %s index of %d vectors, search %s; %s", factory, index.ntotal,
                    instance.search_params or "exact", instance._describe_backend())
        return instance
