"""End-to-end checks on the real datasets in ../shared/data (skipped when they are absent)."""

import numpy as np
import pytest

from patchindex import PatchCore
from patchindex.data import load_image, load_mask, load_test_split

pytestmark = pytest.mark.real_data


def test_bottle_subset_reaches_paper_accuracy(shared_data):
    root = shared_data / "mvtec_ad" / "bottle"
    train = sorted((root / "train" / "good").glob("*.png"))[::5]  # 42 of 209 images

    model = PatchCore(progress=False).fit(train)
    report = model.evaluate(root)

    assert report["n_images"] == 83
    assert report["image_auroc"] >= 0.98
    assert report["pixel_auroc"] >= 0.97
    assert report["pro"] >= 0.85


def test_magnetic_tile_grayscale_non_square(shared_data):
    root = shared_data / "magnetic_tile" / "magnetic_tile"
    train = sorted((root / "train" / "good").glob("*.png"))[::25]
    samples = [s for s in load_test_split(root) if s.defect_type in ("good", "blowhole")][::8]

    model = PatchCore(progress=False).fit(train)
    prediction = model.predict([sample.path for sample in samples])

    assert len({load_image(s.path).shape for s in samples}) > 1
    for sample, amap in zip(samples, prediction.anomaly_maps):
        height, width, _ = load_image(sample.path).shape
        assert amap.shape == (height, width)
        if sample.mask_path is not None:
            assert load_mask(sample.mask_path, amap.shape).shape == amap.shape
    assert np.isfinite(prediction.scores).all()
