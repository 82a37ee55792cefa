"""Coreset selection for the memory bank.

PatchCore keeps a coreset of the training patches whose covering radius (the largest distance
from any patch to its nearest coreset member) is greedily minimized, on a sparse random
projection of the embeddings:

- `projection`: the seeded very sparse random projection, applied chunk by chunk;
- `greedy`: exact k-center greedy, plain and pruned (same selection, far less work);
- `approximate`: greedy per part, then over the union, for very large row counts.
"""

from __future__ import annotations

import math
import numbers

from .approximate import approximate_k_center_greedy
from .greedy import GreedyInfo, k_center_greedy, squared_distances
from .projection import SparseRandomProjection, project_chunks

__all__ = [
    "GreedyInfo",
    "SparseRandomProjection",
    "approximate_k_center_greedy",
    "check_coreset_ratio",
    "coreset_size",
    "k_center_greedy",
    "project_chunks",
    "squared_distances",
]


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
