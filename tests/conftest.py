"""Shared fixtures: a small synthetic dataset, a model fitted on it, and the real datasets."""

import os

# Keep timm from retrying hub downloads: these machines have no internet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchindex import PatchCore
from patchindex._demo import make_demo_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A synthetic MVTec AD layout: 12 training images, 4 good and 3 x 3 defective test images."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=12, n_test_good=4, n_test_defect=3)


@pytest.fixture(scope="session")
def fitted_model(demo_data) -> PatchCore:
    """A default PatchCore fitted on `demo_data`; tests must not change it."""
    return PatchCore(progress=False).fit(demo_data)


@pytest.fixture(scope="session")
def calibrated_model(demo_data) -> PatchCore:
    """A model fitted on 9 demo training images and calibrated on the other 3; do not change it."""
    return PatchCore(progress=False, coreset_ratio=0.2, calibration_fraction=0.25).fit(demo_data)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA


def write_bad_images(folder: Path) -> list[Path]:
    """Write a corrupt PNG, a zero-byte file and a text file named .png into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "_source.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(good)
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:60])
    good.unlink()
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    text = folder / "notes.png"
    text.write_text("this is not an image\n")
    return [corrupt, empty, text]
