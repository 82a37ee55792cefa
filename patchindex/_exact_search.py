"""Exact k-NN search over the memory bank by blocked float32 matrix products in torch.

Flat search is a matrix product followed by a minimum per row. faiss-cpu wheels call the
OpenBLAS they bundle for the product, and that OpenBLAS can fall back to old generic kernels
on recent CPUs: on a Sapphire Rapids machine, faiss-cpu 1.15.1 reached a quarter of torch's
float32 matrix-product rate. torch's product runs near that rate on every machine we measured,
so exact search on the CPU uses it (benchmarks/search.py measures both against the bound).

Each query block meets each bank block in one product of the augmented rows
``[q, 1] . [-2 b, |b|^2]`` = ``|b|^2 - 2 q.b``, so that the distances need no second pass
before the minimum. Blocks of 1024 queries x 4096 bank rows (16 MiB of products) keep the
products in cache for the minimum that follows.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

__all__ = ["BANK_BLOCK", "QUERY_BLOCK", "exact_knn"]

logger = logging.getLogger(__name__)

QUERY_BLOCK = 1024
BANK_BLOCK = 4096


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """Wrap a float32 array without copying it; read-only arrays (memory maps) are never written."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def exact_knn(queries: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Find the `k` nearest bank rows of each query by exhaustive search.

    Parameters
    ----------
    queries : (m, d) float32, C-contiguous
    bank : (n, d) float32, C-contiguous
    k : int, 1 <= k <= n

    Both arrays must be finite. Returns squared L2 distances (m, k) float32, ascending,
    computed as ``|q|^2 + |b|^2 - 2 q.b`` (tiny negative values are possible), and bank row
    numbers (m, k) int64, the lower row first among equal distances. For k = 1 the lowest of
    equally near rows is returned; for k > 1, which of several rows tied at the k-th distance
    are kept is not specified, as in FAISS.
    """
    m, dim = queries.shape
    n = bank.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the bank size {n}, got {k}")
    query_rows = _as_tensor(queries)
    bank_rows = _as_tensor(bank)

    augmented = torch.ones(m, dim + 1, dtype=torch.float32)
    augmented[:, :dim] = query_rows
    best = torch.full((m, k), float("inf"), dtype=torch.float32)
    labels = torch.full((m, k), -1, dtype=torch.int64)
    products = torch.empty(min(m, QUERY_BLOCK) * min(n, BANK_BLOCK), dtype=torch.float32)

    for bank_start in range(0, n, BANK_BLOCK):
        block = bank_rows[bank_start : bank_start + BANK_BLOCK]
        block_augmented = torch.empty(block.shape[0], dim + 1, dtype=torch.float32)
        torch.mul(block, -2.0, out=block_augmented[:, :dim])
        torch.sum(block * block, dim=1, out=block_augmented[:, dim])
        width = min(k, block.shape[0])

        for query_start in range(0, m, QUERY_BLOCK):
            query_block = augmented[query_start : query_start + QUERY_BLOCK]
            out = products[: query_block.shape[0] * block.shape[0]].view(query_block.shape[0], block.shape[0])
            torch.mm(query_block, block_augmented.T, out=out)

            # Most rows find nothing nearer than their current k-th result in a later block:
            # a plain minimum rules them out, and only the others are ranked.
            minima = out.amin(dim=1)
            rows = torch.nonzero(minima < best[query_start : query_start + QUERY_BLOCK, -1]).squeeze(1)
            if rows.numel() == 0:
                continue
            rows_global = rows + query_start
            if k == 1:
                # argmin returns the first of equal minima, so the lower row wins a tie.
                best[rows_global, 0] = minima[rows]
                labels[rows_global, 0] = out[rows].argmin(dim=1) + bank_start
                continue
            values, found = torch.topk(out[rows], width, dim=1, largest=False, sorted=False)
            merged_values = torch.cat([best[rows_global], values], dim=1)
            merged_labels = torch.cat([labels[rows_global], found + bank_start], dim=1)
            kept_values, kept = torch.topk(merged_values, k, dim=1, largest=False, sorted=True)
            best[rows_global] = kept_values
            labels[rows_global] = torch.gather(merged_labels, 1, kept)

    # Ascending distance, and the lower row first among equal distances.
    best += (query_rows * query_rows).sum(dim=1, keepdim=True)
    labels, order = torch.sort(labels, dim=1)
    best = torch.gather(best, 1, order)
    best, order = torch.sort(best, dim=1, stable=True)
    return best.numpy(), torch.gather(labels, 1, order).numpy()
