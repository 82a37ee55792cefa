"""Tests for patchindex.metrics: image AUROC, pixel AUROC and PRO."""

import numpy as np
import pytest
from scipy import ndimage

from patchindex.metrics import image_auroc, pixel_auroc, pro_score


def reference_pro_score(masks, anomaly_maps, fpr_limit):
    """Compute the PRO score slowly, one distinct threshold at a time.

    A pixel is predicted anomalous at threshold t when its score is >= t.
    """
    maps = [np.asarray(anomaly_map, dtype=np.float32) for anomaly_map in anomaly_maps]
    normal_scores = np.concatenate([m[mask == 0] for mask, m in zip(masks, maps)])
    region_scores = []
    for mask, m in zip(masks, maps):
        regions, n_regions = ndimage.label(mask > 0)
        for region_id in range(1, n_regions + 1):
            region_scores.append(m[regions == region_id])

    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    points = [(0.0, 0.0)]
    for threshold in thresholds:
        fpr = np.mean(normal_scores >= threshold)
        pro = np.mean([np.mean(scores >= threshold) for scores in region_scores])
        points.append((fpr, pro))

    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def random_blob_mask(rng, shape):
    """Return a uint8 mask with a few smooth random blobs set to 255."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0)
    return np.where(noise > np.quantile(noise, 0.85), 255, 0).astype(np.uint8)


def random_test_set(seed):
    """Return masks and float32 anomaly maps of varied sizes, with tied scores."""
    rng = np.random.default_rng(seed)
    shapes = [(24, 32), (16, 16), (30, 20), (12, 40)]
    masks = [random_blob_mask(rng, shape) for shape in shapes]
    masks[1][:] = 0  # one fully normal image

    anomaly_maps = []
    for mask in masks:
        scores = rng.normal(size=mask.shape) + 1.5 * (mask > 0)
        # Round to create ties between normal and anomalous pixels.
        anomaly_maps.append(np.round(scores, 1).astype(np.float32))
    return masks, anomaly_maps


# image AUROC


def test_image_auroc_hand_computed():
    # Anomalous 0.35 beats normal 0.1 only, and 0.8 beats both: 3 of 4 pairs.
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])

    assert image_auroc(labels, scores) == pytest.approx(0.75)


def test_image_auroc_perfect_and_inverted():
    labels = np.array([0, 1, 0, 1, 1])
    scores = np.array([0.2, 0.9, 0.1, 0.7, 0.8])

    assert image_auroc(labels, scores) == pytest.approx(1.0)
    assert image_auroc(labels, -scores) == pytest.approx(0.0)


def test_image_auroc_accepts_bool_labels():
    labels = np.array([False, False, True, True])
    scores = np.array([0.1, 0.4, 0.35, 0.8])

    assert image_auroc(labels, scores) == pytest.approx(0.75)


def test_image_auroc_one_class():
    with pytest.raises(ValueError, match=r"0 normal and 3 anomalous images"):
        image_auroc(np.array([1, 1, 1]), np.array([0.1, 0.2, 0.3]))


def test_image_auroc_bad_labels():
    with pytest.raises(ValueError, match=r"0 \(normal\) or 1 \(anomalous\), got \[2\]"):
        image_auroc(np.array([0, 1, 2]), np.array([0.1, 0.2, 0.3]))


def test_image_auroc_nan_score():
    with pytest.raises(ValueError, match=r"2 non-finite values .* indices \[1, 3\]"):
        image_auroc(np.array([0, 1, 0, 1]), np.array([0.1, np.nan, 0.3, np.inf]))


def test_image_auroc_length_mismatch():
    with pytest.raises(ValueError, match=r"3 labels and 2 scores"):
        image_auroc(np.array([0, 1, 1]), np.array([0.1, 0.2]))


# pixel AUROC


def test_pixel_auroc_different_image_sizes():
    # Anomalous pixels score 0.6 and 0.5, normal pixels 0.2, 0.1, 0.7 and 0.3.
    # Each anomalous pixel beats 3 of the 4 normal pixels: 6 of 8 pairs.
    masks = [
        np.array([[0, 255]], dtype=np.uint8),
        np.array([[0, 0], [1, 0]], dtype=np.uint8),
    ]
    anomaly_maps = [
        np.array([[0.2, 0.6]]),
        np.array([[0.1, 0.7], [0.5, 0.3]]),
    ]

    assert pixel_auroc(masks, anomaly_maps) == pytest.approx(0.75)


def test_pixel_auroc_shape_mismatch():
    masks = [np.zeros((2, 2)), np.zeros((3, 4))]
    anomaly_maps = [np.zeros((2, 2)), np.zeros((4, 3))]

    with pytest.raises(ValueError, match=r"masks\[1\] has shape \(3, 4\) .* shape \(4, 3\)"):
        pixel_auroc(masks, anomaly_maps)


def test_pixel_auroc_one_class():
    masks = [np.zeros((2, 2)), np.zeros((1, 3))]
    anomaly_maps = [np.ones((2, 2)), np.ones((1, 3))]

    with pytest.raises(ValueError, match=r"7 normal and 0 anomalous pixels"):
        pixel_auroc(masks, anomaly_maps)


def test_pixel_auroc_nan_score():
    masks = [np.array([[0, 1]]), np.array([[0, 1], [1, 0]])]
    anomaly_maps = [np.array([[0.1, 0.2]]), np.array([[0.1, np.nan], [0.3, 0.4]])]

    expected_message = r"anomaly_maps\[1\] contains 1 non-finite .* \[\(0, 1\)\]"
    with pytest.raises(ValueError, match=expected_message):
        pixel_auroc(masks, anomaly_maps)


def test_pixel_auroc_length_mismatch():
    with pytest.raises(ValueError, match=r"2 masks and 1 anomaly maps"):
        pixel_auroc([np.zeros((2, 2)), np.zeros((2, 2))], [np.zeros((2, 2))])


# PRO


def test_pro_perfect_separation():
    masks = [
        np.array([[0, 1, 1], [0, 0, 0], [1, 0, 0]]),
        np.zeros((2, 4)),
    ]
    anomaly_maps = [
        np.array([[0.1, 0.8, 0.9], [0.2, 0.3, 0.1], [0.7, 0.0, 0.4]]),
        np.array([[0.5, 0.6, 0.2, 0.1], [0.0, 0.3, 0.6, 0.45]]),
    ]

    assert pro_score(masks, anomaly_maps) == pytest.approx(1.0)
    assert pro_score(masks, anomaly_maps, fpr_limit=1.0) == pytest.approx(1.0)


def test_pro_two_regions_hand_computed():
    # One row of 11 pixels: region A (2 pixels), a normal pixel, region B
    # (4 pixels), then 4 normal pixels. 5 normal pixels, 2 regions.
    mask = np.array([[1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0]])
    scores = np.array([[0.9, 0.5, 0.7, 0.8, 0.8, 0.4, 0.2, 0.6, 0.4, 0.1, 0.05]])
    # Thresholds from high to low, as (FPR, PRO):
    #   0.9: A 1/2 covered             -> (0,   (1/2 + 0) / 2   = 0.25)
    #   0.8: B 2/4 covered             -> (0,   (1/2 + 1/2) / 2 = 0.5)
    #   0.7: 1 normal pixel            -> (0.2, 0.5)
    #   0.6: 2 normal pixels           -> (0.4, 0.5)
    #   0.5: A fully covered           -> (0.4, (1 + 1/2) / 2   = 0.75)
    #   0.4: tie, 3 normal, B 3/4      -> (0.6, (1 + 3/4) / 2   = 0.875)
    # With fpr_limit 0.5 the curve crosses the limit on the diagonal tie segment
    # from (0.4, 0.75) to (0.6, 0.875), where PRO(0.5) = 0.8125.
    # Area = 0.4 * 0.5 + 0.1 * (0.75 + 0.8125) / 2 = 0.2 + 0.078125 = 0.278125.
    # Normalized: 0.278125 / 0.5 = 0.55625.
    assert pro_score([mask], [scores], fpr_limit=0.5) == pytest.approx(0.55625, abs=1e-12)


def test_pro_limit_on_flat_segment():
    # Same data as the two-region case. With fpr_limit 0.3 the limit lies on the
    # flat segment from (0.2, 0.5) to (0.4, 0.5), so PRO(0.3) = 0.5.
    # Area = 0.3 * 0.5 = 0.15. Normalized: 0.15 / 0.3 = 0.5.
    mask = np.array([[1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0]])
    scores = np.array([[0.9, 0.5, 0.7, 0.8, 0.8, 0.4, 0.2, 0.6, 0.4, 0.1, 0.05]])

    assert pro_score([mask], [scores], fpr_limit=0.3) == pytest.approx(0.5, abs=1e-12)


def test_pro_full_curve_hand_computed():
    # Same data with fpr_limit 1.0. After the points above:
    #   0.2:  B fully covered -> (0.6, 1.0)
    #   0.1:  4 normal pixels -> (0.8, 1.0)
    #   0.05: 5 normal pixels -> (1.0, 1.0)
    # Area = 0.2 * 0.5 + 0.2 * 0.5 + 0.2 * (0.75 + 0.875) / 2 + 0.4 * 1.0
    #      = 0.1 + 0.1 + 0.1625 + 0.4 = 0.7625.
    # The vertical steps at FPR 0 and 0.4 add no area.
    mask = np.array([[1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0]])
    scores = np.array([[0.9, 0.5, 0.7, 0.8, 0.8, 0.4, 0.2, 0.6, 0.4, 0.1, 0.05]])

    assert pro_score([mask], [scores], fpr_limit=1.0) == pytest.approx(0.7625, abs=1e-12)


def test_pro_all_scores_tied():
    # All pixels enter together, so the curve is the diagonal from (0, 0) to
    # (1, 1) and PRO(f) = f. Area up to 0.3 = 0.3 * 0.3 / 2 = 0.045. Normalized: 0.15.
    mask = np.array([[0, 1, 1], [0, 0, 0], [1, 0, 0]])
    scores = np.full(mask.shape, 0.5)

    assert pro_score([mask], [scores], fpr_limit=0.3) == pytest.approx(0.15, abs=1e-12)


def test_pro_partial_tie_normal_anomalous():
    # 4 normal pixels and 2 regions of one pixel each (diagonal neighbors are not
    # connected under 4-connectivity).
    # 0.9: region 1              -> (0,    0.5)
    # 0.6: tie, region 2 and 2 normal pixels -> (0.5, 1.0)
    # With fpr_limit 0.25 the limit is halfway up the tie segment: PRO = 0.75.
    # Area = 0.25 * (0.5 + 0.75) / 2 = 0.15625. Normalized: 0.625.
    mask = np.array([[1, 0, 0], [0, 1, 0]])
    scores = np.array([[0.9, 0.6, 0.1], [0.6, 0.6, 0.2]])

    assert pro_score([mask], [scores], fpr_limit=0.25) == pytest.approx(0.625, abs=1e-12)


def test_pro_regions_in_different_images():
    # Image 0: region R1 of 4 pixels at 0.9, 2 normal pixels at 0.1.
    # Image 1: region R2 of 1 pixel at 0.05, 3 normal pixels at 0.1.
    # Image 2: fully normal, one pixel at 0.95 and 3 at 0.0.
    # 9 normal pixels in all. Each region counts 1/2 whatever its size.
    #   0.95: (1/9, 0)
    #   0.9:  (1/9, 0.5)
    #   0.1:  (6/9, 0.5)
    #   0.05: (6/9, 1.0)
    # With fpr_limit 0.5 the limit is on the flat segment at PRO 0.5.
    # Area = (0.5 - 1/9) * 0.5 = 7/36. Normalized: 7/18.
    # Ignoring image 2 would give 0.5, and weighting regions by pixel count 28/45.
    masks = [
        np.array([[1, 1, 0], [1, 1, 0]]),
        np.array([[0, 0], [1, 0]]),
        np.zeros((2, 2)),
    ]
    anomaly_maps = [
        np.array([[0.9, 0.9, 0.1], [0.9, 0.9, 0.1]]),
        np.array([[0.1, 0.1], [0.05, 0.1]]),
        np.array([[0.95, 0.0], [0.0, 0.0]]),
    ]

    assert pro_score(masks, anomaly_maps, fpr_limit=0.5) == pytest.approx(7 / 18, abs=1e-12)


def test_pro_uses_four_connectivity():
    # Pixel (0, 0) touches (1, 1) only diagonally, so under 4-connectivity the mask
    # has 2 regions: {(0, 0)} of 1 pixel and {(1, 1), (1, 2), (2, 1)} of 3 pixels.
    # 5 normal pixels score 0.6, 0.5, 0.4, 0.3 and 0.1.
    #   0.9: (0,   0.5)
    #   0.6: (0.2, 0.5)
    #   0.5: (0.4, 0.5)
    #   0.4: (0.6, 0.5)
    # With fpr_limit 0.5: area 0.5 * 0.5 = 0.25. Normalized: 0.5.
    # One 8-connected region of 4 pixels would give PRO 0.25 on this part: 0.25.
    mask = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 0]])
    scores = np.array([[0.9, 0.5, 0.4], [0.3, 0.2, 0.2], [0.6, 0.2, 0.1]])

    assert pro_score([mask], [scores], fpr_limit=0.5) == pytest.approx(0.5, abs=1e-12)


def test_pro_monotonic_transform_invariance():
    masks, anomaly_maps = random_test_set(seed=1)
    # Computed in float64 so that no two distinct scores collapse in float32.
    transformed_maps = [
        2.0 * np.exp(anomaly_map.astype(np.float64)) + 1.0 for anomaly_map in anomaly_maps
    ]

    expected = pro_score(masks, anomaly_maps)
    actual = pro_score(masks, transformed_maps)

    assert 0.0 < expected < 1.0
    assert actual == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 0.77, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pro_matches_reference(seed, fpr_limit):
    masks, anomaly_maps = random_test_set(seed)

    expected = reference_pro_score(masks, anomaly_maps, fpr_limit)
    actual = pro_score(masks, anomaly_maps, fpr_limit=fpr_limit)

    assert actual == pytest.approx(expected, abs=1e-9)


def test_pro_no_anomalous_region():
    masks = [np.zeros((2, 3)), np.zeros((4, 4))]
    anomaly_maps = [np.ones((2, 3)), np.ones((4, 4))]

    with pytest.raises(ValueError, match=r"no anomalous region"):
        pro_score(masks, anomaly_maps)


def test_pro_no_normal_pixels():
    masks = [np.ones((2, 3)), np.full((1, 2), 255)]
    anomaly_maps = [np.ones((2, 3)), np.ones((1, 2))]

    with pytest.raises(ValueError, match=r"no normal pixel"):
        pro_score(masks, anomaly_maps)


@pytest.mark.parametrize("fpr_limit", [0.0, 1.5, -0.1, float("nan")])
def test_pro_invalid_fpr_limit(fpr_limit):
    masks = [np.array([[0, 1]])]
    anomaly_maps = [np.array([[0.1, 0.9]])]

    with pytest.raises(ValueError, match=r"fpr_limit must be in \(0, 1\], got"):
        pro_score(masks, anomaly_maps, fpr_limit=fpr_limit)


def test_pro_shape_mismatch():
    masks = [np.zeros((3, 3)), np.array([[0, 1]])]
    anomaly_maps = [np.zeros((3, 3)), np.array([[0.1], [0.9]])]

    with pytest.raises(ValueError, match=r"masks\[1\] has shape \(1, 2\) .* shape \(2, 1\)"):
        pro_score(masks, anomaly_maps)


def test_pro_nan_score():
    masks = [np.array([[0, 1], [1, 0]])]
    anomaly_maps = [np.array([[np.nan, 0.2], [0.3, np.inf]])]

    with pytest.raises(ValueError, match=r"2 non-finite .* \[\(0, 0\), \(1, 1\)\]"):
        pro_score(masks, anomaly_maps)
