"""Coreset selection for the memory bank: sparse random projection and k-center greedy.

PatchCore keeps a coreset of the training patches whose covering radius (the largest distance
from any patch to its nearest coreset member) is greedily minimized. Distances are computed on
a sparse random projection of the embeddings (Li, Hastie and Church, "Very sparse random
projections", KDD 2006), which keeps pairwise distances approximately and makes each greedy
step cheaper.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["SparseRandomProjection", "check_coreset_ratio", "coreset_size", "k_center_greedy", "project_chunks"]

logger = logging.getLogger(__name__)


def check_coreset_ratio(ratio: float) -> None:
    """Raise ValueError unless `ratio` is a real number in (0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not (math.isfinite(ratio) and 0 < ratio <= 1):
        raise ValueError(f"coreset_ratio must be in (0, 1], got {ratio!r}")


def coreset_size(n_patches: int, ratio: float) -> int:
    """Return the memory bank size for `n_patches` at `ratio`, validating both.

    Raises ValueError when the ratio is outside (0, 1] or the bank would hold fewer than two
    patches, which makes nearest-neighbour scoring meaningless.
    """
    check_coreset_ratio(ratio)
    if n_patches < 2:
        raise ValueError(f"need at least 2 training patches to build a memory bank, got {n_patches}")
    size = int(round(n_patches * ratio))
    if size < 2:
        raise ValueError(
            f"coreset_ratio {ratio} of {n_patches} patches gives a memory bank of {size}; "
            f"use a ratio of at least {2 / n_patches:.3g} or more training images"
        )
    return size


class SparseRandomProjection:
    """Seeded very sparse random projection from `n_features` to `n_components` dimensions.

    Entries are +-sqrt(1 / (density * n_components)) with probability density / 2 each and 0
    otherwise, with density = 1 / sqrt(n_features), so squared distances are kept in
    expectation. When n_components >= n_features the projection is the identity.
    """

    def __init__(self, n_features: int, n_components: int = 128, random_state: int | None = 0):
        if n_features < 1 or n_components < 1:
            raise ValueError(f"n_features and n_components must be positive, got {n_features} and {n_components}")
        self.n_features = n_features
        self.n_components = n_components
        self.random_state = random_state
        self.identity_ = n_components >= n_features

        if self.identity_:
            self.components_ = None
            return
        rng = np.random.default_rng(random_state)
        density = 1.0 / math.sqrt(n_features)
        scale = math.sqrt(1.0 / (density * n_components))
        draws = rng.random((n_features, n_components))
        signs = np.where(rng.random((n_features, n_components)) < 0.5, -scale, scale)
        self.components_ = np.where(draws < density, signs, 0.0).astype(np.float32)

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """Project (n, n_features) float32 to (n, n_components) float32 on the same device."""
        if self.identity_:
            return features.float()
        components = torch.from_numpy(self.components_).to(features.device)
        return features.float() @ components

    @property
    def output_dim(self) -> int:
        return self.n_features if self.identity_ else self.n_components


def project_chunks(
    chunks: Iterable[np.ndarray], n_rows: int, projection: SparseRandomProjection, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Project embedding chunks (m, d) into one (n_rows, k) float32 tensor on `device`.

    Only the projected matrix and one chunk are held in memory at a time.
    """
    projected = torch.empty((n_rows, projection.output_dim), dtype=torch.float32, device=device)
    row = 0
    for chunk in chunks:
        block = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).to(device)
        projected[row : row + len(block)] = projection.transform(block)
        row += len(block)
    if row != n_rows:
        raise ValueError(f"expected {n_rows} rows of embeddings, got {row}")
    return projected


def k_center_greedy(
    features: torch.Tensor, n_centers: int, start_index: int = 0, progress: bool = True
) -> np.ndarray:
    """Select `n_centers` rows of `features` (n, k) float32 by k-center greedy.

    Starts from `start_index`, then repeatedly adds the row farthest from all selected rows.
    Returns the selected row numbers (n_centers,) int64 in selection order. Runs on the tensor's
    device without host-device synchronization inside the loop. If fewer than `n_centers`
    distinct rows exist, the result contains each distinct row once, with a warning.
    """
    n = features.shape[0]
    if not 1 <= n_centers <= n:
        raise ValueError(f"n_centers must be between 1 and {n}, got {n_centers}")
    if not 0 <= start_index < n:
        raise ValueError(f"start_index must be between 0 and {n - 1}, got {start_index}")

    # NOTE: tests compare CPU and CUDA results, but no CUDA device has run them yet.
    started = time.perf_counter()
    device = features.device
    squared_norms = (features * features).sum(dim=1)
    selected = torch.empty(n_centers, dtype=torch.long, device=device)
    selected[0] = start_index

    # min_distances[i] is the squared distance from row i to its nearest selected row, computed
    # as |x|^2 - 2 x.c + |c|^2. (torch.addmv would fuse this but runs several times slower on CPU.)
    min_distances = torch.full((n,), float("inf"), dtype=features.dtype, device=device)
    distances = torch.empty_like(min_distances)
    index = selected[0:1]
    for step in tqdm(range(n_centers), desc="coreset", unit="center", disable=not progress, mininterval=1.0):
        if step > 0:
            index = torch.argmax(min_distances).view(1)
            selected[step] = index[0]
        center = features.index_select(0, index).view(-1)
        torch.mv(features, center, out=distances)
        distances.mul_(-2.0).add_(squared_norms).add_(squared_norms.index_select(0, index))
        torch.minimum(min_distances, distances, out=min_distances)

    result = selected.cpu().numpy()
    _, first = np.unique(result, return_index=True)
    if len(first) < n_centers:
        logger.warning(
            "only %d distinct patches among %d requested coreset members; the memory bank keeps %d",
            len(first), n_centers, len(first),
        )
        result = result[np.sort(first)]

    elapsed = time.perf_counter() - started
    logger.info("k-center greedy: %d of %d rows in %.1f s (%.0f centers/s)", len(result), n, elapsed, n_centers / max(elapsed, 1e-9))
    return result
