"""A small synthetic dataset in the MVTec AD layout, made from a texture shipped with scikit-image.

Normal images are random 256 x 256 crops of the ``brick`` texture, flipped at random and given a
warm tint. Defective images add a scratch, a dark spot or a blue contamination, with masks.
Nothing is downloaded.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["DEFECT_TYPES", "make_demo_dataset"]

logger = logging.getLogger(__name__)

DEFECT_TYPES = ("scratch", "spot", "contamination")
_SIZE = 256


def _normal_image(texture: np.ndarray, rng: np.random.Generator) -> Image.Image:
    top, left = rng.integers(0, texture.shape[0] - _SIZE + 1, size=2)
    crop = texture[top : top + _SIZE, left : left + _SIZE].astype(np.float32)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    tint = np.array([1.0, 0.85, 0.7], dtype=np.float32)
    rgb = np.clip(crop[..., None] * tint, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(rgb))


def _add_defect(image: Image.Image, defect: str, rng: np.random.Generator) -> Image.Image:
    """Draw a defect on `image` in place and return its mask ("L", 0 or 255)."""
    mask = Image.new("L", image.size, 0)
    draw_image = ImageDraw.Draw(image)
    draw_mask = ImageDraw.Draw(mask)
    cx, cy = rng.integers(48, _SIZE - 48, size=2)

    if defect == "scratch":
        angle = rng.uniform(0, math.pi)
        half = rng.uniform(30, 60)
        dx, dy = half * math.cos(angle), half * math.sin(angle)
        line = [(cx - dx, cy - dy), (cx + dx, cy + dy)]
        width = int(rng.integers(3, 6))
        draw_image.line(line, fill=(235, 235, 225), width=width)
        draw_mask.line(line, fill=255, width=width)
    elif defect == "spot":
        rx, ry = rng.uniform(8, 18, size=2)
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        draw_image.ellipse(box, fill=(25, 20, 15))
        draw_mask.ellipse(box, fill=255)
    elif defect == "contamination":
        points = [
            (cx + r * math.cos(t), cy + r * math.sin(t))
            for t, r in zip(np.linspace(0, 2 * math.pi, 9)[:-1], rng.uniform(8, 22, size=8))
        ]
        draw_image.polygon(points, fill=(60, 90, 200))
        draw_mask.polygon(points, fill=255)
    else:
        raise ValueError(f"unknown defect type {defect!r}; expected one of {DEFECT_TYPES}")
    return mask


def make_demo_dataset(root: str | Path, n_train: int = 40, n_test_good: int = 10, n_test_defect: int = 8, seed: int = 0) -> Path:
    """Write the demo dataset to `root` in the MVTec AD layout and return `root`."""
    from skimage import data as skimage_data

    root = Path(root)
    rng = np.random.default_rng(seed)
    texture = skimage_data.brick()

    train = root / "train" / "good"
    train.mkdir(parents=True, exist_ok=True)
    for number in range(n_train):
        _normal_image(texture, rng).save(train / f"{number:03d}.png")

    good = root / "test" / "good"
    good.mkdir(parents=True, exist_ok=True)
    for number in range(n_test_good):
        _normal_image(texture, rng).save(good / f"{number:03d}.png")

    for defect in DEFECT_TYPES:
        images = root / "test" / defect
        masks = root / "ground_truth" / defect
        images.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        for number in range(n_test_defect):
            image = _normal_image(texture, rng)
            mask = _add_defect(image, defect, rng)
            image.save(images / f"{number:03d}.png")
            mask.save(masks / f"{number:03d}_mask.png")

    n_images = n_train + n_test_good + n_test_defect * len(DEFECT_TYPES)
    logger.info("wrote the demo dataset (%d images) to %s", n_images, root)
    return root
