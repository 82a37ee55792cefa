"""FAISS nearest-neighbour search over the memory bank.

FAISS L2 indexes return squared distances; `MemoryBankIndex.search` returns Euclidean ones,
which is what PatchCore's patch scores and reweighting use.
"""

from __future__ import annotations

import logging
import os
import time

import faiss
import numpy as np

__all__ = ["MemoryBankIndex"]

logger = logging.getLogger(__name__)


class MemoryBankIndex:
    """Exact k-NN search over a memory bank (n, d) float32 with a FAISS ``IndexFlatL2``.

    Parameters
    ----------
    factory : str
        FAISS index factory string; only ``"Flat"`` (exact search) is supported for now.
    chunk_rows : int
        Queries are searched at most this many at a time, which bounds the temporary
        (chunk_rows, k) result arrays.
    """

    def __init__(self, factory: str = "Flat", chunk_rows: int = 65536):
        if factory != "Flat":
            raise ValueError(f"unsupported index {factory!r}; only 'Flat' is available")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        self.factory = factory
        self.chunk_rows = chunk_rows
        self.index_: faiss.Index | None = None

    @property
    def ntotal(self) -> int:
        return 0 if self.index_ is None else self.index_.ntotal

    @property
    def dim(self) -> int:
        self._check_built()
        return self.index_.d

    def _check_built(self) -> None:
        if self.index_ is None:
            raise RuntimeError("the index is empty; call build() or load() first")

    def build(self, bank: np.ndarray) -> "MemoryBankIndex":
        """Add the memory bank (n, d) float32 to a new index."""
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or bank.shape[0] < 1:
            raise ValueError(f"memory bank must be a non-empty (n, d) array, got shape {bank.shape}")
        if not np.isfinite(bank).all():
            raise ValueError("memory bank contains NaN or infinite values")

        started = time.perf_counter()
        index = faiss.index_factory(bank.shape[1], self.factory, faiss.METRIC_L2)
        index.add(bank)
        self.index_ = index
        logger.info(
            "built %s index of %d vectors, d=%d, in %.2f s",
            self.factory, index.ntotal, index.d, time.perf_counter() - started,
        )
        return self

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Find the `k` nearest bank entries of each query (m, d) float32.

        Returns Euclidean distances (m, k) float32, ascending, and bank row numbers (m, k) int64.
        """
        self._check_built()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index_.d:
            raise ValueError(f"queries must have shape (m, {self.index_.d}), got {queries.shape}")
        if not 1 <= k <= self.index_.ntotal:
            raise ValueError(f"k must be between 1 and the bank size {self.index_.ntotal}, got {k}")

        m = queries.shape[0]
        distances = np.empty((m, k), dtype=np.float32)
        labels = np.empty((m, k), dtype=np.int64)
        for start in range(0, m, self.chunk_rows):
            stop = min(start + self.chunk_rows, m)
            squared, labels[start:stop] = self.index_.search(queries[start:stop], k)
            # Rounding in |x|^2 + |y|^2 - 2 x.y can leave tiny negative squares.
            np.sqrt(np.maximum(squared, 0.0), out=distances[start:stop])
        return distances, labels

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to a FAISS index file."""
        self._check_built()
        faiss.write_index(self.index_, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike, factory: str = "Flat") -> "MemoryBankIndex":
        """Read an index written by `save`."""
        instance = cls(factory)
        try:
            instance.index_ = faiss.read_index(os.fspath(path))
        except RuntimeError as error:
            raise ValueError(f"cannot read FAISS index {path}: {str(error).splitlines()[0]}") from None
        return instance
