"""Approximate k-center greedy for row counts too large for one exact run: greedy per part,
then greedy over the union of the parts' selections.

Each part (for example one HDF5 shard) contributes centers in proportion to its rows, times an
oversampling factor. An exact greedy over their union then picks the final centers. Every row lies
within the part's covering radius of a part center, and every part center within the union's
covering radius of a final center, so the sum of the two radii bounds the covering radius.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Iterable

import numpy as np
import torch

from .greedy import GreedyInfo, k_center_greedy

__all__ = ["approximate_k_center_greedy"]

logger = logging.getLogger(__name__)


def approximate_k_center_greedy(
    parts: Iterable[tuple[int, torch.Tensor]],
    n_rows: int,
    n_centers: int,
    *,
    oversample: float = 2.0,
    random_state: int | None = 0,
    block_size: int = 64,
    return_info: bool = False,
):
    """Select about `n_centers` of `n_rows` rows, one part at a time.

    Parameters
    ----------
    parts : iterable of (first_row, (m, k) tensor)
        Consecutive parts covering rows 0 .. n_rows - 1; only one part is needed at a time.
    n_rows, n_centers : int
        Total rows, and rows to select.
    oversample : float
        Each part selects oversample * n_centers * m / n_rows centers (at least 1).
    random_state : int or None
        Seed of each part's first center.

    Returns
    -------
    (n_centers,) int64 array of global row numbers in the union greedy's order, and a
    `GreedyInfo` whose covering radius is the upper bound above when `return_info` is set.
    """
    if not 1 <= n_centers <= n_rows:
        raise ValueError(f"n_centers must be between 1 and {n_rows}, got {n_centers}")
    if not (math.isfinite(oversample) and oversample >= 1):
        raise ValueError(f"oversample must be at least 1, got {oversample!r}")

    started = time.perf_counter()
    rng = np.random.default_rng(random_state)
    union_rows: list[np.ndarray] = []
    union_points: list[torch.Tensor] = []
    part_radius = 0.0
    evaluations = 0
    expected = 0
    for first_row, points in parts:
        if first_row != expected:
            raise ValueError(f"parts must be consecutive: expected one starting at row {expected}, got {first_row}")
        size = points.shape[0]
        quota = min(size, max(1, math.ceil(oversample * n_centers * size / n_rows)))
        local, info = k_center_greedy(
            points, quota, int(rng.integers(size)), block_size=block_size, return_info=True
        )
        union_rows.append(local + first_row)
        union_points.append(points.index_select(0, torch.from_numpy(local).to(points.device)).float())
        part_radius = max(part_radius, info.covering_radius)
        evaluations += info.distance_evaluations
        expected += size
        logger.info(
            "approximate coreset: part at row %d: %d of %d rows, radius %.4g", first_row, len(local), size, info.covering_radius
        )
    if expected != n_rows:
        raise ValueError(f"parts hold {expected} rows, expected {n_rows}")

    rows = np.concatenate(union_rows)
    points = torch.cat(union_points)
    chosen, info = k_center_greedy(points, min(n_centers, len(rows)), 0, block_size=block_size, return_info=True)
    selected = rows[chosen]

    result = GreedyInfo(
        method="approximate", n_rows=n_rows, n_centers=len(selected),
        covering_radius=part_radius + info.covering_radius,
        distance_evaluations=evaluations + info.distance_evaluations,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "approximate coreset: %d of %d rows from a union of %d in %.1f s, covering radius at most %.4g",
        len(selected), n_rows, len(rows), result.seconds, result.covering_radius,
    )
    return (selected, result) if return_info else selected
