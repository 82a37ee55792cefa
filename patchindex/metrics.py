"""Evaluation metrics for anomaly detection: image AUROC, pixel AUROC and PRO.

Image AUROC compares one anomaly score per image with the image labels. Pixel AUROC
and the per-region overlap (PRO) score compare anomaly maps with ground-truth
masks. Masks and anomaly maps are given per image and may differ in size from
image to image, but each mask must have the same shape as its anomaly map.

Pixel scores are converted to float32 to keep memory low on large test sets
(about 50 million pixels), so scores that differ only beyond float32 precision
count as ties.
"""

import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

__all__ = ["image_auroc", "pixel_auroc", "pro_score"]

logger = logging.getLogger(__name__)

# Number of offending values or positions quoted in an error message.
_MAX_REPORTED = 5


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Compute the image-level AUROC of anomaly scores against image labels.

    Parameters
    ----------
    labels : np.ndarray, shape (n_images,), int or bool
        Ground truth per image: 0 for normal, 1 for anomalous.
    scores : np.ndarray, shape (n_images,), float
        Anomaly score per image. Higher means more anomalous.

    Returns
    -------
    float
        Area under the ROC curve, from ``sklearn.metrics.roc_auc_score``.

    Raises
    ------
    ValueError
        If the arrays are not 1-D or differ in length, if a label is not 0 or 1,
        if only one class is present, or if a score is NaN or infinite.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)

    if labels.ndim != 1 or scores.ndim != 1:
        raise ValueError(
            f"labels and scores must be 1-D arrays of shape (n_images,), got shapes "
            f"{labels.shape} and {scores.shape}. Pass one label and one score per image."
        )
    if labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores differ in length: {labels.shape[0]} labels and "
            f"{scores.shape[0]} scores. Pass one label and one score per image."
        )

    invalid_labels = ~np.isin(labels, (0, 1))
    if invalid_labels.any():
        bad_values = np.unique(labels[invalid_labels])[:_MAX_REPORTED].tolist()
        raise ValueError(
            f"labels must be 0 (normal) or 1 (anomalous), got {bad_values}. "
            f"Map the image labels to 0 and 1 before computing image AUROC."
        )
    is_anomalous = labels.astype(bool)
    n_anomalous = int(np.count_nonzero(is_anomalous))
    _check_both_classes(labels.size - n_anomalous, n_anomalous, "images")

    non_finite = np.flatnonzero(~np.isfinite(scores))
    if non_finite.size:
        raise ValueError(
            f"scores contain {non_finite.size} non-finite values (NaN or infinity), "
            f"first at indices {non_finite[:_MAX_REPORTED].tolist()}. Replace them with finite "
            f"anomaly scores."
        )

    return float(roc_auc_score(is_anomalous, scores))


def pixel_auroc(masks: Sequence[np.ndarray], anomaly_maps: Sequence[np.ndarray]) -> float:
    """Compute the pixel-level AUROC of anomaly maps against ground-truth masks.

    The pixels of all images are pooled into one ROC curve, so large images weigh
    more than small ones.

    Parameters
    ----------
    masks : sequence of np.ndarray, each of shape (height_i, width_i), any numeric or bool dtype
        Ground-truth mask per image. Pixels greater than 0 are anomalous.
    anomaly_maps : sequence of np.ndarray, each of shape (height_i, width_i), float
        Anomaly map per image, with the same shape as its mask. Higher means more
        anomalous. Converted to float32.

    Returns
    -------
    float
        Area under the ROC curve, from ``sklearn.metrics.roc_auc_score``.

    Raises
    ------
    ValueError
        If the sequences differ in length or are empty, if a mask and its anomaly
        map differ in shape or are not 2-D, if only one class is present, or if a
        score is NaN or infinite.
    """
    pixel_masks, pixel_scores = _flatten_pixels(masks, anomaly_maps)

    n_anomalous = int(np.count_nonzero(pixel_masks))
    _check_both_classes(pixel_masks.size - n_anomalous, n_anomalous, "pixels")

    return float(roc_auc_score(pixel_masks, pixel_scores))


def pro_score(
    masks: Sequence[np.ndarray],
    anomaly_maps: Sequence[np.ndarray],
    fpr_limit: float = 0.3,
) -> float:
    """Compute the normalized area under the per-region-overlap (PRO) curve.

    This follows the MVTec AD evaluation (Bergmann et al., "The MVTec Anomaly
    Detection Dataset", IJCV 2021). The ground-truth regions are the connected
    components of each mask under 4-connectivity (the default structure of
    ``scipy.ndimage.label``). At a threshold t, a pixel is predicted anomalous
    when its score is >= t. The overlap of a region is the fraction of its pixels
    predicted anomalous, and PRO(t) is the mean overlap over all regions of all
    images, so each region counts equally whatever its size. FPR(t) is the
    fraction of normal pixels, pooled over all images including fully normal
    ones, that are predicted anomalous.

    The curve is computed exactly at every distinct score, and pixels with equal
    scores enter the curve together, so a tie between normal and anomalous pixels
    gives a diagonal segment. The curve starts at (0, 0). PRO is integrated over
    FPR from 0 to ``fpr_limit`` with the trapezoid rule, interpolating linearly at
    ``fpr_limit``, and divided by ``fpr_limit`` so that a perfect detector scores 1.0.

    Parameters
    ----------
    masks : sequence of np.ndarray, each of shape (height_i, width_i), any numeric or bool dtype
        Ground-truth mask per image. Pixels greater than 0 are anomalous. Fully
        normal images have all-zero masks.
    anomaly_maps : sequence of np.ndarray, each of shape (height_i, width_i), float
        Anomaly map per image, with the same shape as its mask. Higher means more
        anomalous. Converted to float32.
    fpr_limit : float, default 0.3
        Upper FPR bound of the integration, in (0, 1]. MVTec AD reports 0.3.

    Returns
    -------
    float
        Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit``,
        in [0, 1].

    Raises
    ------
    ValueError
        If ``fpr_limit`` is outside (0, 1], or if there is no anomalous region
        or no normal pixel. Also if the sequences differ in length or are empty,
        if a mask and its anomaly map differ in shape or are not 2-D, or if a
        score is NaN or infinite.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}. MVTec AD uses 0.3.")

    fpr, pro = _pro_curve(masks, anomaly_maps)

    return _normalized_area_up_to(fpr, pro, fpr_limit)


def _pro_curve(
    masks: Sequence[np.ndarray], anomaly_maps: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Compute the PRO curve at every distinct score, from the highest score down.

    Returns the FPR and PRO arrays, both float64 of shape (n_distinct_scores,),
    without the starting point (0, 0). The last point is (1, 1).
    """
    pixel_regions, pixel_scores, region_sizes = _label_regions(masks, anomaly_maps)

    n_regions = region_sizes.size - 1
    n_normal = int(region_sizes[0])
    if n_regions == 0:
        raise ValueError(
            "masks contain no anomalous region (no mask pixel is > 0), but PRO needs at "
            "least one image with a ground-truth defect."
        )
    if n_normal == 0:
        raise ValueError(
            "masks contain no normal pixel (every mask pixel is > 0), but PRO needs normal "
            "pixels to measure the false-positive rate."
        )
    logger.debug(
        "PRO curve over %d pixels: %d normal pixels, %d anomalous regions",
        pixel_scores.size,
        n_normal,
        n_regions,
    )

    # Sort descending. The order within a group of equal scores does not matter
    # because only the cumulative sums at the end of each group are kept.
    order = np.argsort(pixel_scores)[::-1]
    sorted_scores = pixel_scores[order]
    sorted_regions = pixel_regions[order]
    del order, pixel_scores, pixel_regions

    # Index of the last pixel of each group of equal scores.
    group_ends = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    group_ends = np.append(group_ends, sorted_scores.size - 1)
    del sorted_scores

    # FPR counts normal pixels exactly in int64 before dividing.
    normal_counts = np.cumsum(sorted_regions == 0, dtype=np.int64)[group_ends]
    fpr = normal_counts / n_normal
    del normal_counts

    # Each pixel of region r adds 1 / (size_r * n_regions) to PRO, and normal pixels add 0.
    region_weights = np.zeros(region_sizes.size, dtype=np.float64)
    region_weights[1:] = 1.0 / (region_sizes[1:] * n_regions)
    pixel_weights = region_weights[sorted_regions]
    del sorted_regions
    np.cumsum(pixel_weights, out=pixel_weights)
    pro = pixel_weights[group_ends]

    return fpr, pro


def _normalized_area_up_to(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Integrate PRO over FPR from 0 to fpr_limit and divide by fpr_limit.

    Prepends the point (0, 0). ``fpr`` must be non-decreasing and end at 1.0.
    """
    fpr = np.concatenate(([0.0], fpr))
    pro = np.concatenate(([0.0], pro))

    # Keep the points with FPR <= fpr_limit. Because the last FPR is 1.0 >= fpr_limit,
    # a point beyond the limit exists whenever the kept part stops short of it.
    n_kept = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x = fpr[:n_kept]
    y = pro[:n_kept]

    if x[-1] < fpr_limit:
        x_before, y_before = fpr[n_kept - 1], pro[n_kept - 1]
        x_after, y_after = fpr[n_kept], pro[n_kept]
        y_at_limit = y_before + (y_after - y_before) * (fpr_limit - x_before) / (x_after - x_before)
        x = np.append(x, fpr_limit)
        y = np.append(y, y_at_limit)

    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2.0)
    return area / fpr_limit


def _label_regions(
    masks: Sequence[np.ndarray], anomaly_maps: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label the connected regions of all masks and pool the pixels of all images.

    Returns
    -------
    pixel_regions : np.ndarray, shape (n_pixels,), int32 or int64
        Region id per pixel, 0 for normal pixels and 1..n_regions for regions,
        numbered across images.
    pixel_scores : np.ndarray, shape (n_pixels,), float32
        Anomaly score per pixel.
    region_sizes : np.ndarray, shape (n_regions + 1,), int64
        Pixel count per region id. Entry 0 is the number of normal pixels.
    """
    pairs = _validated_pairs(masks, anomaly_maps)

    n_pixels = sum(scores.size for _, scores in pairs)
    region_dtype = np.int32 if n_pixels < np.iinfo(np.int32).max else np.int64
    pixel_regions = np.empty(n_pixels, dtype=region_dtype)
    pixel_scores = np.empty(n_pixels, dtype=np.float32)

    start = 0
    n_regions = 0
    for is_anomalous, scores in pairs:
        regions, n_image_regions = ndimage.label(is_anomalous)
        regions = regions.ravel().astype(region_dtype, copy=False)
        regions[regions > 0] += n_regions

        stop = start + scores.size
        pixel_regions[start:stop] = regions
        pixel_scores[start:stop] = scores.ravel()
        start = stop
        n_regions += n_image_regions

    region_sizes = np.bincount(pixel_regions, minlength=n_regions + 1).astype(np.int64)
    return pixel_regions, pixel_scores, region_sizes


def _flatten_pixels(
    masks: Sequence[np.ndarray], anomaly_maps: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Pool the pixels of all images into a bool mask array and a float32 score array.

    Both returned arrays have shape (n_pixels,).
    """
    pairs = _validated_pairs(masks, anomaly_maps)

    pixel_masks = np.concatenate([is_anomalous.ravel() for is_anomalous, _ in pairs])
    pixel_scores = np.concatenate([scores.ravel() for _, scores in pairs])
    return pixel_masks, pixel_scores


def _validated_pairs(
    masks: Sequence[np.ndarray], anomaly_maps: Sequence[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validate masks and anomaly maps and return (bool mask, float32 map) per image.

    Raises ValueError on a length or shape mismatch, a non-2-D array, an empty
    input or a non-finite score.
    """
    if len(masks) != len(anomaly_maps):
        raise ValueError(
            f"masks and anomaly_maps differ in length: {len(masks)} masks and "
            f"{len(anomaly_maps)} anomaly maps. Pass one mask per anomaly map."
        )
    if len(masks) == 0:
        raise ValueError("masks and anomaly_maps are empty. Pass at least one image.")

    pairs = []
    for position, (mask, anomaly_map) in enumerate(zip(masks, anomaly_maps)):
        mask = np.asarray(mask)
        anomaly_map = np.asarray(anomaly_map, dtype=np.float32)

        if mask.shape != anomaly_map.shape:
            raise ValueError(
                f"masks[{position}] has shape {mask.shape} but anomaly_maps[{position}] "
                f"has shape {anomaly_map.shape}. Resize the anomaly map to the mask size."
            )
        if mask.ndim != 2:
            raise ValueError(
                f"masks[{position}] and anomaly_maps[{position}] must be 2-D (height, width), "
                f"got shape {mask.shape}. Pass one 2-D array per image."
            )

        non_finite = np.argwhere(~np.isfinite(anomaly_map))
        if non_finite.size:
            positions = [tuple(int(i) for i in row) for row in non_finite[:_MAX_REPORTED]]
            raise ValueError(
                f"anomaly_maps[{position}] contains {len(non_finite)} non-finite scores "
                f"(NaN, infinity or beyond the float32 range), first at (row, column) "
                f"{positions}. "
                f"Replace them with finite anomaly scores."
            )

        pairs.append((mask > 0, anomaly_map))
    return pairs


def _check_both_classes(n_normal: int, n_anomalous: int, unit: str) -> None:
    """Raise ValueError unless there is at least one normal and one anomalous sample."""
    if n_normal == 0 or n_anomalous == 0:
        raise ValueError(
            f"AUROC needs both classes, got {n_normal} normal and {n_anomalous} anomalous "
            f"{unit}. Evaluate on a set that contains normal and anomalous {unit}."
        )
