import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import data as skimage_data

from patchindex import PatchCore
from patchindex.data import Geometry, Preprocessor
from patchindex.index import MemoryBankIndex
from patchindex.scoring import anomaly_map, gaussian_blur, reweighted_image_scores


def _score(bank, patches, num_neighbors):
    bank = np.asarray(bank, np.float32)
    patches = np.asarray(patches, np.float32)[None]
    index = MemoryBankIndex().build(bank)
    distances, nearest = index.search(patches[0], 1)
    return reweighted_image_scores(patches, distances[:, 0][None], nearest[:, 0][None], bank, index, num_neighbors)[0]


def test_reweighting_hand_computed():
    # Bank {0, 1, 3} on a line; patches 0.1 and 2.5. The worst patch is 2.5 with s* = 0.5 and
    # m* = 3. Its support N_2(m*) = {3, 1} lies at 0.5 and 1.5 from the patch, so
    # w = 1 - e^0.5 / (e^0.5 + e^1.5) = e / (1 + e) and s = 0.5 e / (1 + e).
    score = _score([[0.0], [1.0], [3.0]], [[0.1], [2.5]], num_neighbors=2)
    assert score == pytest.approx(0.5 * math.e / (1 + math.e), rel=1e-5)


def test_one_neighbor_gives_max_patch_score():
    assert _score([[0.0], [1.0], [3.0]], [[0.1], [2.5]], num_neighbors=1) == pytest.approx(0.5, rel=1e-6)


def test_support_capped_by_bank_size():
    # With b larger than the bank, the support set is the whole bank {0, 1}; the worst patch 4
    # is at 3 from m* = 1 and at 4 from 0: s = 3 * (1 - e^3 / (e^3 + e^4)).
    score = _score([[0.0], [1.0]], [[4.0]], num_neighbors=9)
    assert score == pytest.approx(3 * (1 - 1 / (1 + math.e)), rel=1e-5)


def test_reweighting_finite_for_huge_distances():
    score = _score([[0.0], [1e4], [3e4]], [[9e4], [5.0]], num_neighbors=3)
    assert np.isfinite(score)
    assert 0 < score <= 6e4


def test_blur_matches_scipy_mirror():
    rng = np.random.default_rng(0)
    image = rng.random((60, 80)).astype(np.float32)
    blurred = gaussian_blur(torch.from_numpy(image), 4.0).numpy()
    expected = ndimage.gaussian_filter(image.astype(np.float64), 4.0, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(blurred, expected, atol=1e-5)
    tiny = gaussian_blur(torch.ones(5, 5), 4.0)
    assert torch.allclose(tiny, torch.ones(5, 5), atol=1e-6)


@pytest.mark.parametrize(
    "original, resize, crop",
    [((256, 256), 256, 224), ((300, 600), 256, 224), ((900, 450), 256, 224), ((300, 600), None, None), ((240, 320), (224, 224), None)],
)
def test_map_places_hot_cell_in_image_coordinates(original, resize, crop):
    geometry = Preprocessor(resize, crop).geometry(*original)
    grid_height, grid_width = geometry.crop_height // 8, geometry.crop_width // 8
    grid = np.zeros((grid_height, grid_width), np.float32)
    row, col = grid_height // 4, (3 * grid_width) // 4
    grid[row, col] = 1.0

    amap = anomaly_map(grid, geometry, sigma=4.0)

    # Cell centre in crop pixels, then resized-image pixels, then original pixels.
    y = ((row + 0.5) * 8 + geometry.crop_top) * original[0] / geometry.resized_size[0]
    x = ((col + 0.5) * 8 + geometry.crop_left) * original[1] / geometry.resized_size[1]
    peak = np.unravel_index(np.argmax(amap), amap.shape)
    assert amap.shape == original
    assert amap.dtype == np.float32
    assert abs(peak[0] - y) <= 2 + original[0] / geometry.resized_size[0] * 2
    assert abs(peak[1] - x) <= 2 + original[1] / geometry.resized_size[1] * 2


def test_map_outside_crop_repeats_border():
    geometry = Geometry((256, 256), (256, 256), 16, 16, 224, 224)
    grid = np.arange(28 * 28, dtype=np.float32).reshape(28, 28)
    amap = anomaly_map(grid, geometry, sigma=0.0)
    assert np.isfinite(amap).all()
    np.testing.assert_array_equal(amap[:16, 100], np.full(16, amap[16, 100]))
    np.testing.assert_array_equal(amap[100, 240:], np.full(16, amap[100, 239]))


def _defect_image(width, height, center, rng):
    texture = skimage_data.brick()
    crop = texture[:height, :width].astype(np.float32)
    rgb = np.clip(crop[..., None] * np.array([1.0, 0.85, 0.7]), 0, 255).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(rgb))
    mask = Image.new("L", image.size, 0)
    box = [center[0] - 12, center[1] - 12, center[0] + 12, center[1] + 12]
    ImageDraw.Draw(image).ellipse(box, fill=(20, 15, 10))
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return np.asarray(image), np.asarray(mask) > 0


@pytest.mark.parametrize("resize, crop", [(256, 224), (None, None), (300, 256)])
def test_off_centre_defect_located(demo_data, resize, crop):
    model = PatchCore(resize=resize, crop=crop, coreset_ratio=0.25, progress=False)
    model.fit(demo_data)
    rng = np.random.default_rng(0)
    # A wide image (400 x 256): the defect sits right of centre and above the middle.
    image, mask = _defect_image(400, 256, center=(250, 90), rng=rng)

    prediction = model.predict([image])

    amap = prediction.anomaly_maps[0]
    assert amap.shape == (256, 400)
    peak = np.unravel_index(np.argmax(amap), amap.shape)
    near_defect = ndimage.binary_dilation(mask, iterations=10)
    assert near_defect[peak]
    assert amap[mask].mean() > 2 * amap[~near_defect].mean()


def test_scores_independent_of_batch_and_order(fitted_model, demo_data):
    images = sorted((demo_data / "test").glob("*/*.png"))[:7]

    single = fitted_model.predict(images, batch_size=1)
    many = fitted_model.predict(images, batch_size=5)
    reverse = fitted_model.predict(images[::-1], batch_size=3)

    np.testing.assert_allclose(single.scores, many.scores, rtol=1e-4)
    np.testing.assert_allclose(single.scores, reverse.scores[::-1], rtol=1e-4)
    for a, b in zip(single.anomaly_maps, many.anomaly_maps):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert np.isfinite(single.scores).all()


def test_map_of_long_thin_image_stays_small():
    import tracemalloc

    geometry = Preprocessor(256, 224).geometry(8, 20000)  # resized to 256 x 640000
    grid = np.zeros((28, 28), np.float32)
    grid[14, 3] = 1.0

    tracemalloc.start()
    amap = anomaly_map(grid, geometry)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert amap.shape == (8, 20000)
    assert peak < 20 * 2**20
    assert 0 < np.argmax(amap[4]) < 20000
