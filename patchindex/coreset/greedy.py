"""Exact k-center greedy: the plain algorithm and a pruned one that selects the same rows.

k-center greedy starts from one row and repeatedly adds the row farthest from all selected
rows. The plain algorithm computes the distance from every row to every new center. The pruned
algorithm gives the same selection with far fewer distance evaluations:

1. Rows are reordered once into blocks of nearby rows (a binary split tree). Each block keeps
   its mean and radius, and each row its distance to the block mean.
2. For a new center, the triangle inequality bounds every row's distance to it from below. A
   block or row whose bound exceeds its current nearest-center distance cannot get closer to
   the new center and is skipped.
3. The remaining rows are screened with the inner-product form |x|^2 - 2 x.c + |c|^2 and a
   bound on its float32 rounding error; only rows that may move closer are then evaluated
   exactly.

All bounds carry slack for float32 rounding, and the exact distances come from the same
row-by-row function as the plain algorithm. Both therefore return identical indices, ties
included: of several rows at the same largest distance, the lowest row number is taken.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["GreedyInfo", "k_center_greedy", "squared_distances"]

logger = logging.getLogger(__name__)

# Relative slack of the triangle-inequality bounds. Rounding in the float32 distances is below
# 1e-5 relative for widths up to a few hundred, so skipped rows can never move closer.
_SLACK = 1e-4
# Unit roundoff of float32.
_UNIT = 2.0**-24
# Rows per chunk in dense passes, bounding temporary memory to a few tens of MB.
_CHUNK_ROWS = 16384
# Largest magnitude accepted: squared distances of wider values can overflow float32.
_MAX_MAGNITUDE = 1e15


@dataclass
class GreedyInfo:
    """Work and result figures of one k-center greedy run."""

    method: str
    n_rows: int
    n_centers: int
    covering_radius: float  # largest distance from any row to its nearest center
    distance_evaluations: int  # full-width distance computations, exact or screening
    seconds: float


def squared_distances(points: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (m,) float32 from `points` (m, k) to `center` (k,) float32.

    Computed as the sum of squared differences, one row at a time, so a row's value does not
    depend on which other rows are passed with it.
    """
    return (points.float() - center).square_().sum(dim=-1)


@contextlib.contextmanager
def _single_thread():
    """Run torch's CPU operations on one thread inside the block, then restore the count.

    The pruned greedy is thousands of small operations per second, for which intra-op threads
    cost more in synchronization than they save: on a busy 2-core machine it ran 10 times
    slower with two threads than with one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_sizes(features: torch.Tensor, n_centers: int, start_index: int) -> None:
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"features must be a torch tensor, got {type(features).__name__}; use torch.from_numpy")
    if features.ndim != 2 or features.shape[0] < 1:
        raise ValueError(f"features must be a non-empty (n, k) matrix, got shape {tuple(features.shape)}")
    for first in range(0, features.shape[0], _CHUNK_ROWS):
        part = features[first : first + _CHUNK_ROWS].float()
        bad = ~(torch.isfinite(part).all(dim=1) & (part.abs() <= _MAX_MAGNITUDE).all(dim=1))
        if bool(bad.any()):
            row = first + int(torch.nonzero(bad)[0])
            raise ValueError(
                f"features row {row} has a NaN, infinite or larger than {_MAX_MAGNITUDE:g} value; "
                "check the embeddings (a float16 store or projection overflows above 65504)"
            )
    n = features.shape[0]
    if not 1 <= n_centers <= n:
        raise ValueError(f"n_centers must be between 1 and {n}, got {n_centers}")
    if not 0 <= start_index < n:
        raise ValueError(f"start_index must be between 0 and {n - 1}, got {start_index}")


def _drop_repeats(selected: np.ndarray) -> np.ndarray:
    _, first = np.unique(selected, return_index=True)
    if len(first) == len(selected):
        return selected
    logger.warning(
        "only %d distinct patches among %d requested coreset members; the memory bank keeps %d",
        len(first), len(selected), len(first),
    )
    return selected[np.sort(first)]


def k_center_greedy(
    features: torch.Tensor,
    n_centers: int,
    start_index: int = 0,
    *,
    method: str = "pruned",
    block_size: int = 64,
    progress: bool = False,
    return_info: bool = False,
):
    """Select `n_centers` rows of `features` (n, k) by k-center greedy.

    Parameters
    ----------
    features : (n, k) float32, float16 or bfloat16 tensor
        Rows to select from; distances are computed in float32 whatever the storage type.
    n_centers : int
        Number of rows to select.
    start_index : int
        The first selected row.
    method : "pruned" or "plain"
        "pruned" skips distance evaluations that cannot change the result (on CPU; on other
        devices it runs the plain loop, which needs no host-device synchronization). "plain"
        evaluates every row for every center. Both return the same rows.
    block_size : int
        Rows per block of the pruned method.
    progress : bool
        Show a tqdm progress bar.
    return_info : bool
        Also return a `GreedyInfo` with the covering radius and the work done.

    Returns
    -------
    (n_centers,) int64 array of row numbers in selection order, and the `GreedyInfo` when
    `return_info` is set. If fewer than `n_centers` distinct rows exist, each distinct row
    appears once, with a warning.
    """
    _check_sizes(features, n_centers, start_index)
    if method not in ("pruned", "plain"):
        raise ValueError(f"method must be 'pruned' or 'plain', got {method!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")

    started = time.perf_counter()
    # NOTE: the pruned loop runs on the CPU only; on CUDA the plain loop runs, and no CUDA
    # device has run the tests yet.
    if method == "pruned" and features.device.type == "cpu":
        with _single_thread():
            selected, radius_sq, evaluations = _pruned(features, n_centers, start_index, block_size, progress)
        used = "pruned"
    else:
        selected, radius_sq, evaluations = _plain(features, n_centers, start_index, progress)
        used = "plain"
    selected = _drop_repeats(selected)

    info = GreedyInfo(
        method=used, n_rows=features.shape[0], n_centers=len(selected),
        covering_radius=math.sqrt(max(radius_sq, 0.0)), distance_evaluations=evaluations,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "k-center greedy (%s): %d of %d rows in %.1f s (%.0f centers/s, %.3g distance evaluations, "
        "covering radius %.4g)",
        used, info.n_centers, info.n_rows, info.seconds, n_centers / max(info.seconds, 1e-9),
        evaluations, info.covering_radius,
    )
    return (selected, info) if return_info else selected


def _plain(features: torch.Tensor, n_centers: int, start_index: int, progress: bool):
    """Evaluate every row for every center, in row chunks, with no host-device sync in the loop."""
    n = features.shape[0]
    device = features.device
    min_distances = torch.full((n,), float("inf"), dtype=torch.float32, device=device)
    selected = torch.empty(n_centers, dtype=torch.long, device=device)
    selected[0] = start_index
    index = selected[0:1]

    for step in tqdm(range(n_centers), desc="coreset", unit="center", disable=not progress, mininterval=1.0):
        if step > 0:
            index = torch.argmax(min_distances).view(1)
            selected[step] = index[0]
        center = features.index_select(0, index).view(-1).float()
        for start in range(0, n, _CHUNK_ROWS):
            part = min_distances[start : start + _CHUNK_ROWS]
            torch.minimum(part, squared_distances(features[start : start + _CHUNK_ROWS], center), out=part)

    return selected.cpu().numpy(), float(min_distances.max()), n * n_centers


def _split_order(features: torch.Tensor, leaf_size: int) -> torch.Tensor:
    """Permutation (n,) int64 that puts nearby rows next to each other in runs of `leaf_size`.

    Each node of a binary tree splits its rows along the line between two far-apart rows, with
    the left part a multiple of `leaf_size` rows, so every run but the last is full. Only the
    speed of the pruned greedy depends on this order, so inner-product distances suffice.
    """
    norms = torch.cat([part.float().square().sum(dim=1) for part in features.split(_CHUNK_ROWS)])
    leaves = []
    stack = [torch.arange(features.shape[0])]
    while stack:
        rows = stack.pop()
        if len(rows) <= leaf_size:
            leaves.append(rows)
            continue
        whole = len(rows) == features.shape[0]  # the root: no need to copy the rows
        points = features.float() if whole else features.index_select(0, rows).float()
        row_norms = norms if whole else norms.index_select(0, rows)
        first = torch.argmax(row_norms - 2 * (points @ points.mean(dim=0)))
        second = torch.argmax(row_norms - 2 * (points @ points[first]))
        position = points @ (points[second] - points[first])
        left = max(leaf_size, (len(rows) // 2) // leaf_size * leaf_size)
        order = torch.argsort(position)
        stack.append(rows[order[left:]])
        stack.append(rows[order[:left]])
    return torch.cat(leaves)


def _pruned(features: torch.Tensor, n_centers: int, start_index: int, block: int, progress: bool):
    n, width = features.shape
    set_up = time.perf_counter()

    # Blocks of nearby rows. The last block is padded with copies of one row, and the padding
    # has distance -inf, so it is never selected or visited.
    order = _split_order(features, block)
    n_blocks = (n + block - 1) // block
    padding = n_blocks * block - n
    if padding:
        order = torch.cat([order, order[-1:].expand(padding)])
    # The screening copy is centered, which shrinks the norms that its error bound grows with;
    # exact distances are computed from `features` itself.
    offset = torch.zeros(width, dtype=torch.float64)
    for first in range(0, n, _CHUNK_ROWS):
        offset += features[first : first + _CHUNK_ROWS].double().sum(dim=0)
    offset = (offset / n).float()
    rows = torch.empty((n_blocks * block, width), dtype=torch.float32)
    for first in range(0, n_blocks * block, _CHUNK_ROWS):
        part = order[first : first + _CHUNK_ROWS]
        torch.sub(features.index_select(0, part).float(), offset, out=rows[first : first + len(part)])
    valid = torch.arange(n_blocks * block) < n

    # Block means and radii, each row's distance to its block mean, and the norms for screening.
    means = torch.empty((n_blocks, width), dtype=torch.float32)
    to_mean = torch.empty(n_blocks * block, dtype=torch.float32)
    row_norm_sq = torch.empty(n_blocks * block, dtype=torch.float32)
    step_blocks = max(1, _CHUNK_ROWS // block)
    for first in range(0, n_blocks, step_blocks):
        last = min(first + step_blocks, n_blocks)
        part = rows[first * block : last * block].view(last - first, block, width)
        mask = valid[first * block : last * block].view(last - first, block, 1)
        means[first:last] = (part * mask).sum(dim=1) / mask.sum(dim=1)
        to_mean[first * block : last * block] = squared_distances(part, means[first:last, None, :]).view(-1)
        row_norm_sq[first * block : last * block] = part.square().sum(dim=-1).view(-1)
    to_mean.sqrt_().masked_fill_(~valid, 0.0)
    block_radius = to_mean.view(n_blocks, block).amax(dim=1) * (1 + _SLACK)
    to_mean_low = (to_mean * (1 - _SLACK)).view(n_blocks, block)
    to_mean_high = (to_mean * (1 + _SLACK)).view(n_blocks, block)
    mean_norm = means.square().sum(dim=1).sqrt_()
    row_norm = row_norm_sq.sqrt()
    # Bound on the float32 error of |a|^2 - 2 a.c + |c|^2, as a factor of (|a| + |c|)^2, for
    # the dot product, the sums and the centering, with a safety factor of 2.
    screen_error = 2 * (width + 4) * _UNIT

    min_distances = torch.full((n_blocks * block,), float("inf"), dtype=torch.float32)
    min_distances.masked_fill_(~valid, float("-inf"))
    grid = min_distances.view(n_blocks, block)
    block_max = grid.amax(dim=1)
    offsets = torch.arange(block)
    selected = np.empty(n_centers, dtype=np.int64)
    evaluations = 0
    logger.debug("pruned greedy: %d blocks of %d rows set up in %.1f s", n_blocks, block, time.perf_counter() - set_up)

    index = start_index
    for step in tqdm(range(n_centers), desc="coreset", unit="center", disable=not progress, mininterval=1.0):
        if step > 0:
            index = _farthest(grid, block_max, order.view(n_blocks, block))
        selected[step] = index
        center = features[index].float()
        centered = center - offset
        center_norm = float(centered.square().sum().sqrt())

        # Lower and upper bounds on the distances from the new center to the block means.
        low, high = _distance_bounds(means, mean_norm, centered, center_norm, screen_error)
        reach = block_max.sqrt().mul_(1 + _SLACK)
        visit = torch.nonzero(low - block_radius <= reach).view(-1)
        evaluations += n_blocks

        # Rows of those blocks that their distance to the block mean does not rule out:
        # |x - c| >= |m - c| - |x - m| and |x - c| >= |x - m| - |m - c|.
        current = grid.index_select(0, visit).sqrt_().mul_(1 + _SLACK)
        bound = torch.maximum(
            low[visit, None] - to_mean_high.index_select(0, visit),
            to_mean_low.index_select(0, visit) - high[visit, None],
        )
        candidates = (visit[:, None] * block + offsets)[bound <= current]
        if candidates.numel() == 0:
            continue

        # Screen with the inner-product form, then evaluate exactly what may move closer.
        if candidates.numel() > len(rows) // 4:
            screen = (rows @ centered).index_select(0, candidates)
        else:
            screen = rows.index_select(0, candidates) @ centered
        screen.mul_(-2.0).add_(row_norm_sq.index_select(0, candidates)).add_(center_norm**2)
        current = min_distances.index_select(0, candidates)
        slack = (row_norm.index_select(0, candidates) + center_norm).square_().mul_(screen_error)
        closer = screen <= current + slack
        evaluations += candidates.numel()
        if bool(closer.any()):
            moved = candidates[closer]
            exact = torch.cat([
                squared_distances(features.index_select(0, part), center) for part in order[moved].split(_CHUNK_ROWS)
            ])
            min_distances.index_copy_(0, moved, torch.minimum(current[closer], exact))
            evaluations += moved.numel()
            block_max.index_copy_(0, visit, grid.index_select(0, visit).amax(dim=1))

    return selected, float(block_max.max()), evaluations


def _distance_bounds(points, norms, center, center_norm, relative_error):
    """Lower and upper bounds (m,) on the distances from `points` (m, k) to `center` (k,).

    Uses |a|^2 - 2 a.c + |c|^2 with `relative_error` times (|a| + |c|)^2 as its error bound.
    """
    squared = points @ center
    squared.mul_(-2.0).add_(norms.square()).add_(center_norm**2)
    error = (norms + center_norm).square_().mul_(relative_error)
    return (squared - error).clamp_(min=0.0).sqrt_(), (squared + error).sqrt_()


def _farthest(grid: torch.Tensor, block_max: torch.Tensor, original: torch.Tensor) -> int:
    """Original row number of the largest distance; the lowest one among ties."""
    largest = block_max.max()
    blocks = torch.nonzero(block_max == largest).view(-1)
    tied = grid.index_select(0, blocks) == largest
    return int(original.index_select(0, blocks)[tied].min())
