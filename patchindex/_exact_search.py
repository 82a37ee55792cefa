"""Exact k-NN search over the memory bank by blocked float32 matrix products in torch.

Flat search is a matrix product followed by a minimum per row. faiss-cpu wheels compute the
product with the OpenBLAS they bundle, which can fall back to old generic kernels on recent
CPUs. On a 2-core Sapphire Rapids machine, faiss-cpu 1.15.1 (OpenBLAS 0.3.15, SSE3 kernels)
searched at about a fifth of torch's float32 matrix-product rate. torch's product (MKL on
x86) picks kernels for the CPU it runs on, so exact search on the CPU uses it.
benchmarks/search.py measures both against that rate.

Each query block meets each bank block in one product of the augmented rows
``[q, 1] . [-2 b, |b|^2]`` = ``|b|^2 - 2 q.b``, so that the minimum reads the products
directly, with no pass that adds the norms first. Blocks of 2048 queries x 1024 bank rows
(8 MiB of products) keep the products in cache for the minimum that follows. They were the
fastest of the sizes tried on 16k, 164k and 1M-row banks in benchmarks/search.py's setting
(2 cores).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["BANK_BLOCK", "QUERY_BLOCK", "exact_knn"]

QUERY_BLOCK = 2048
BANK_BLOCK = 1024


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """Wrap a float32 array without copying it; read-only arrays (memory maps) are never written."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _augment_bank(block: torch.Tensor) -> torch.Tensor:
    """Return the rows [-2 b, |b|^2] (n, d + 1) float32 of bank rows (n, d)."""
    dim = block.shape[1]
    augmented = torch.empty(block.shape[0], dim + 1, dtype=torch.float32)
    torch.mul(block, -2.0, out=augmented[:, :dim])
    torch.sum(block * block, dim=1, out=augmented[:, dim])
    return augmented


def _products(queries: torch.Tensor, bank_block: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """Return |b|^2 - 2 q.b (m, n) for augmented queries (m, d + 1) and bank rows (n, d + 1)."""
    out = buffer[: queries.shape[0] * bank_block.shape[0]].view(queries.shape[0], bank_block.shape[0])
    return torch.mm(queries, bank_block.T, out=out)


def _nearest(queries: torch.Tensor, bank: torch.Tensor, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return |b|^2 - 2 q.b (m,) and the row (m,) of the nearest bank row to each augmented query.

    The first pass keeps only each query's least value and the block it came from, because a
    plain minimum is several times faster than one that also returns its position. The second
    pass finds the row within that block. Equal values resolve to the lowest row: the earlier
    block wins in the first pass and argmin returns the first position in the second.
    """
    m, n = queries.shape[0], bank.shape[0]
    best = torch.full((m,), float("inf"), dtype=torch.float32)
    labels = torch.empty(m, dtype=torch.int64)
    if n <= BANK_BLOCK:
        # A bank of one block, such as the centroids of an IVF quantizer, needs only the second pass.
        block = _augment_bank(bank)
        for query_start in range(0, m, QUERY_BLOCK):
            stop = query_start + QUERY_BLOCK
            torch.min(_products(queries[query_start:stop], block, buffer), dim=1, out=(best[query_start:stop], labels[query_start:stop]))
        return best, labels

    best_block = torch.zeros(m, dtype=torch.int64)
    for block_number, bank_start in enumerate(range(0, n, BANK_BLOCK)):
        block = _augment_bank(bank[bank_start : bank_start + BANK_BLOCK])
        for query_start in range(0, m, QUERY_BLOCK):
            stop = query_start + QUERY_BLOCK
            minima = _products(queries[query_start:stop], block, buffer).amin(dim=1)
            best_block[query_start:stop].masked_fill_(minima < best[query_start:stop], block_number)
            torch.minimum(best[query_start:stop], minima, out=best[query_start:stop])

    order = torch.argsort(best_block, stable=True)
    block_numbers, counts = torch.unique_consecutive(best_block[order], return_counts=True)
    for block_number, rows in zip(block_numbers.tolist(), torch.split(order, counts.tolist())):
        bank_start = block_number * BANK_BLOCK
        block = _augment_bank(bank[bank_start : bank_start + BANK_BLOCK])
        for chunk in torch.split(rows, QUERY_BLOCK):
            values, positions = torch.min(_products(queries[chunk], block, buffer), dim=1)
            best[chunk] = values
            labels[chunk] = positions + bank_start
    return best, labels


def _k_nearest(queries: torch.Tensor, bank: torch.Tensor, k: int, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return |b|^2 - 2 q.b (m, k) and the rows (m, k) of the k nearest bank rows to each augmented query."""
    m, n = queries.shape[0], bank.shape[0]
    best = torch.full((m, k), float("inf"), dtype=torch.float32)
    labels = torch.full((m, k), -1, dtype=torch.int64)
    for bank_start in range(0, n, BANK_BLOCK):
        block = _augment_bank(bank[bank_start : bank_start + BANK_BLOCK])
        width = min(k, block.shape[0])

        for query_start in range(0, m, QUERY_BLOCK):
            out = _products(queries[query_start : query_start + QUERY_BLOCK], block, buffer)

            # Most rows find nothing nearer than their current k-th result in a later block:
            # a plain minimum rules them out, and only the others are ranked.
            minima = out.amin(dim=1)
            rows = torch.nonzero(minima < best[query_start : query_start + QUERY_BLOCK, -1]).squeeze(1)
            if rows.numel() == 0:
                continue
            rows_global = rows + query_start
            values, found = torch.topk(out[rows], width, dim=1, largest=False, sorted=False)
            merged_values = torch.cat([best[rows_global], values], dim=1)
            merged_labels = torch.cat([labels[rows_global], found + bank_start], dim=1)
            nearest_values, positions = torch.topk(merged_values, k, dim=1, largest=False, sorted=True)
            best[rows_global] = nearest_values
            labels[rows_global] = torch.gather(merged_labels, 1, positions)
    return best, labels


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
    buffer = torch.empty(min(m, QUERY_BLOCK) * min(n, BANK_BLOCK), dtype=torch.float32)

    if k == 1:
        best, labels = _nearest(augmented, bank_rows, buffer)
        best, labels = best[:, None], labels[:, None]
    else:
        best, labels = _k_nearest(augmented, bank_rows, k, buffer)

    # Ascending distance, and the lower row first among equal distances.
    best += (query_rows * query_rows).sum(dim=1, keepdim=True)
    labels, order = torch.sort(labels, dim=1)
    best = torch.gather(best, 1, order)
    best, order = torch.sort(best, dim=1, stable=True)
    return best.numpy(), torch.gather(labels, 1, order).numpy()
