"""Patch scores, PatchCore image scores and anomaly maps.

The patch score is the Euclidean distance from a patch embedding to its nearest memory bank
entry. The image score is the largest patch score, reweighted as in Roth et al., "Towards
Total Recall in Industrial Anomaly Detection" (CVPR 2022, eq. 7): with m_test the patch of
largest score s*, m* its nearest bank entry and N_b(m*) the b nearest bank entries of m*,

    s = (1 - exp(|m_test - m*|) / sum_{m in N_b(m*)} exp(|m_test - m|)) * s*

so that a patch near a sparse part of the bank, which the bank covers poorly, counts less.
The anomaly map is the patch-score grid upsampled to the image and blurred with a Gaussian
(sigma 4 px), drawn in the input image's own coordinates.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .data import Geometry
from .index import MemoryBankIndex

__all__ = ["anomaly_map", "gaussian_blur", "reweighted_image_scores"]


def reweighted_image_scores(
    embeddings: np.ndarray,
    patch_scores: np.ndarray,
    nearest: np.ndarray,
    bank: np.ndarray,
    index: MemoryBankIndex,
    num_neighbors: int = 9,
) -> np.ndarray:
    """Compute image scores from the patches of a batch of images.

    Parameters
    ----------
    embeddings : (B, P, d) float32
        Patch embeddings of B images with P patches each.
    patch_scores : (B, P) float32
        Euclidean distance of each patch to its nearest bank entry.
    nearest : (B, P) int64
        Row number of that nearest bank entry.
    bank : (n, d) float32
        The memory bank that `index` searches.
    num_neighbors : int
        Size b of the support set N_b(m*); 1 gives the plain maximum patch score.

    Returns
    -------
    (B,) float32 image scores.
    """
    if num_neighbors < 1:
        raise ValueError(f"num_neighbors must be at least 1, got {num_neighbors}")
    batch = np.arange(patch_scores.shape[0])
    worst = np.argmax(patch_scores, axis=1)
    max_scores = patch_scores[batch, worst].astype(np.float64)
    if num_neighbors == 1:
        return max_scores.astype(np.float32)

    # Support set: the b nearest bank entries of m*, which include m* itself.
    worst_patches = embeddings[batch, worst]
    nearest_entries = bank[nearest[batch, worst]]
    k = min(num_neighbors, len(bank))
    _, support = index.search(nearest_entries, k)
    support_distances = np.linalg.norm(
        worst_patches[:, None, :].astype(np.float64) - bank[support].astype(np.float64), axis=2
    )

    # 1 - exp(s*) / sum(exp(d)), evaluated in log space so that large distances stay finite.
    largest = support_distances.max(axis=1, initial=-np.inf)
    largest = np.maximum(largest, max_scores)
    log_sum = largest + np.log(np.exp(support_distances - largest[:, None]).sum(axis=1))
    weights = 1.0 - np.exp(max_scores - log_sum)
    return (np.clip(weights, 0.0, 1.0) * max_scores).astype(np.float32)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(4.0 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur an (H, W) float32 map with a separable Gaussian, truncated at 4 sigma.

    Borders are reflected (replicated when the map is smaller than the kernel radius).
    """
    if sigma <= 0:
        return image
    kernel = _gaussian_kernel(sigma).to(image.device)
    radius = (len(kernel) - 1) // 2
    height, width = image.shape
    mode = "reflect" if min(height, width) > radius else "replicate"

    x = image[None, None]
    x = F.pad(x, (radius, radius, 0, 0), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[0, 0]


def _linear_taps(n_out: int, scale: float, offset: float, n_in: int):
    """Return source indices (i0, i1) and weights w for linear resampling along one axis.

    Output pixel centre j sits at (j + 0.5) * scale - offset in source pixels. Positions
    beyond the source are clamped, which repeats its border values.
    """
    position = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - offset - 0.5
    position = np.clip(position, 0.0, n_in - 1)
    lower = np.floor(position).astype(np.int64)
    upper = np.minimum(lower + 1, n_in - 1)
    return lower, upper, (position - lower).astype(np.float32)


def anomaly_map(patch_grid: np.ndarray, geometry: Geometry, sigma: float = 4.0) -> np.ndarray:
    """Turn a patch-score grid (h, w) into an anomaly map (H, W) float32 of the input image.

    The grid covers the network input, that is the crop of the resized image. It is upsampled
    bilinearly to the crop and blurred with a Gaussian of `sigma` crop pixels. The result is
    resampled linearly at every pixel of the original image. Pixels that the crop cut off have
    no patches of their own, so they repeat the value at the nearest crop border.
    """
    grid = torch.from_numpy(np.ascontiguousarray(patch_grid, dtype=np.float32))[None, None]
    crop = F.interpolate(grid, size=(geometry.crop_height, geometry.crop_width), mode="bilinear", align_corners=False)
    crop = gaussian_blur(crop[0, 0], sigma).numpy()

    # Work is proportional to the crop and the output, never to the resized image, which can
    # be huge for long, thin inputs.
    height, width = geometry.original_size
    resized_height, resized_width = geometry.resized_size
    top, bottom, weight_y = _linear_taps(height, resized_height / height, geometry.crop_top, geometry.crop_height)
    left, right, weight_x = _linear_taps(width, resized_width / width, geometry.crop_left, geometry.crop_width)
    rows = crop[top] * (1.0 - weight_y)[:, None] + crop[bottom] * weight_y[:, None]
    return np.ascontiguousarray(rows[:, left] * (1.0 - weight_x) + rows[:, right] * weight_x, dtype=np.float32)
