"""Calibration of image scores on normal images that the memory bank has not seen.

A fitted model stores the image scores of held-back normal images. A decision threshold for a
target false-positive rate (FPR) is an order statistic of those scores, chosen as in split
conformal prediction: with n calibration scores, the k-th smallest for k = ceil((n + 1)(1 - fpr))
is exceeded by a new normal image with probability at most `fpr`, when new normal images come
from the same distribution as the calibration images. The normalized score is the raw image
score divided by the threshold, so 1.0 is the decision boundary whatever the model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_FPR", "Calibration", "check_fpr"]

logger = logging.getLogger(__name__)

DEFAULT_FPR = 0.01


def check_fpr(fpr: float) -> float:
    """Return `fpr` as a float, raising ValueError unless it lies in (0, 1)."""
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0.0 < fpr < 1.0:
        raise ValueError(f"the target false-positive rate must lie in (0, 1), got {fpr!r}")
    return float(fpr)


@dataclass(frozen=True)
class Calibration:
    """Image scores (n,) float64, sorted, of normal images left out of the memory bank."""

    scores: np.ndarray
    source: str

    @classmethod
    def from_scores(cls, scores, source: str) -> "Calibration":
        """Build a calibration from raw image scores; raises ValueError when none is finite."""
        values = np.asarray(scores, dtype=np.float64).ravel()
        if values.size == 0 or not np.isfinite(values).all():
            raise ValueError(f"calibration needs at least one finite image score, got {values.size} scores from {source}")
        return cls(np.sort(values), source)

    @property
    def n_images(self) -> int:
        return int(self.scores.size)

    def min_fpr(self) -> float:
        """Smallest false-positive rate that these scores can set, 1 / (n + 1)."""
        return 1.0 / (self.n_images + 1)

    def threshold(self, fpr: float = DEFAULT_FPR) -> float:
        """Return the image-score threshold above which an image is anomalous at rate `fpr`.

        When `fpr` is below 1 / (n + 1), this is the largest calibration score. The
        false-positive rate on new normal images is then about 1 / (n + 1), see `warn_if_coarse`.
        """
        fpr = check_fpr(fpr)
        rank = math.ceil((self.n_images + 1) * (1.0 - fpr))
        return float(self.scores[min(rank, self.n_images) - 1])

    def warn_if_coarse(self, fpr: float = DEFAULT_FPR) -> None:
        """Log a warning when there are too few calibration scores to set `fpr`."""
        if check_fpr(fpr) < self.min_fpr():
            logger.warning(
                "%d calibration images cannot set a false-positive rate of %g (the smallest is 1/(n+1) = %.3g), "
                "so the largest calibration score is the threshold. Calibrate on at least %d normal images for this rate",
                self.n_images, fpr, self.min_fpr(), math.ceil(1.0 / fpr) - 1,
            )

    def false_positive_rate(self, threshold: float) -> float:
        """Fraction of calibration scores strictly above `threshold`."""
        return float(np.mean(self.scores > threshold))

    def to_config(self, fpr: float = DEFAULT_FPR) -> dict:
        """Return the JSON section stored in a model's config.json, with the threshold at `fpr`."""
        return {
            "source": self.source,
            "n_images": self.n_images,
            "fpr": fpr,
            "threshold": self.threshold(fpr),
            "scores": [float(value) for value in self.scores],
        }

    @classmethod
    def from_config(cls, section: dict, path) -> "Calibration":
        """Read the section written by `to_config`, raising ValueError that names `path`."""
        scores = section.get("scores") if isinstance(section, dict) else None
        source = section.get("source", "unknown") if isinstance(section, dict) else None
        valid = (
            isinstance(scores, list)
            and len(scores) > 0
            and all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in scores)
            and isinstance(source, str)
        )
        if not valid:
            raise ValueError(f"{path} has an invalid 'calibration' section; fit the model again")
        return cls.from_scores(scores, source)
