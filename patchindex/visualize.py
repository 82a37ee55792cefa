"""Heatmap overlays of anomaly maps for people to look at."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["save_overlay"]


def save_overlay(
    path: str | os.PathLike,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    score: float,
    vmin: float = 0.0,
    vmax: float | None = None,
    title: str | None = None,
) -> None:
    """Write a PNG with the image beside the anomaly map drawn over it, with a color scale.

    image is (H, W, 3) uint8 and anomaly_map (H, W) float32 in the same coordinates. The
    color scale runs from `vmin` to `vmax` (default: the map's maximum), in patch-score units;
    a fixed scale for all images of a model makes them comparable.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if image.shape[:2] != anomaly_map.shape:
        raise ValueError(f"image {image.shape[:2]} and anomaly map {anomaly_map.shape} differ in size")
    vmax = float(vmax if vmax is not None else max(float(np.max(anomaly_map)), vmin + 1e-6))

    height, width = anomaly_map.shape
    scale = 4.0 / max(height, width)
    figure, axes = plt.subplots(1, 2, figsize=(2 * width * scale + 1.2, height * scale + 0.6), dpi=100)
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(image)
    heat = axes[1].imshow(anomaly_map, cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax)
    axes[1].set_title(f"anomaly map, image score {score:.3f}", fontsize=9)
    for axis in axes:
        axis.set_axis_off()
    colorbar = figure.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.02)
    colorbar.ax.tick_params(labelsize=7)
    colorbar.set_label("patch score", fontsize=7)
    if title:
        figure.suptitle(title, fontsize=8)
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
