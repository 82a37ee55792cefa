"""The ``"auto"`` index: choose a factory string from the bank size, then tune it to a recall.

Recall is measured with held-out bank vectors as queries: the index is tuned while it contains
the rest of the bank, and the held-out vectors are added afterwards.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ._exact_search import exact_knn

__all__ = [
    "AUTO_FLAT_MAX", "CALIBRATION_QUERIES", "MIN_SPEEDUP", "Tuning", "choose_auto_spec", "ivf_nlist", "tune_search_params",
]

logger = logging.getLogger(__name__)

# Below this bank size exact search is chosen: building and tuning an approximate index then
# takes about as long as the exact searches it would save.
# NOTE: estimated from the search benchmark on a 2-core CPU; a different machine may move it.
AUTO_FLAT_MAX = 50_000

# Bank vectors held out as queries to measure recall while tuning, at most a tenth of the bank.
CALIBRATION_QUERIES = 2000
# NOTE: an estimate from benchmarks/search.py with full banks (coreset ratio 1.0). Held-out
# tuning chose nprobe 3 on MVTec AD bottle, which reached recall@1 0.980 on test patches, and
# nprobe 12 on magnetic_tile, where test patches needed more than 32 (0.987 at 32).
SAFETY_FACTOR = 4
# The tuned index is kept only if it searches the held-out vectors at least this many times as
# fast as exact search does. Otherwise auto builds Flat, which is exact and about as fast.
MIN_SPEEDUP = 1.5

_NPROBE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048)
_EF_SEARCH_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def ivf_nlist(n: int, points_per_list: int = 39) -> int:
    """Return a power of two near sqrt(n) inverted lists, with `points_per_list` each at least.

    More lists make each probe cheaper but k-means training slower: on a 2-core CPU, training
    1024 lists on a million vectors took 30 s.
    """
    nlist = 2 ** round(math.log2(math.sqrt(n)))
    while nlist > 1 and n < points_per_list * nlist:
        nlist //= 2
    return nlist


def choose_auto_spec(n: int) -> str:
    """Return the factory string that ``"auto"`` builds for a bank of `n` vectors.

    Small banks get Flat, larger ones IVF with about sqrt(n) lists. In the search benchmark
    IVF reached recall@1 0.99 at more queries per second than HNSW32, built in a fraction
    of its time, and it also runs on GPU FAISS, which has no HNSW.
    """
    if n < AUTO_FLAT_MAX:
        return "Flat"
    return f"IVF{ivf_nlist(n)},Flat"


@dataclass
class Tuning:
    """Search parameters chosen by `tune_search_params` and what they were measured at."""

    params: dict
    recall: float  # recall@1 on the held-out queries at the smallest value that reached the aim, else the largest tried
    exact_seconds: float  # exact search of the held-out queries
    approximate_seconds: float  # search of the held-out queries with `params`

    @property
    def speedup(self) -> float:
        return self.exact_seconds / max(self.approximate_seconds, 1e-9)


def _distances_to(queries: np.ndarray, vectors: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return float64 Euclidean distances (m,) of queries to vectors[labels], inf where label is -1.

    Recomputing both sides in float64 keeps the rounding of FAISS's exact search, which
    expands |x - y|^2 as |x|^2 + |y|^2 - 2 x.y in float32, from counting as a miss.
    """
    differences = queries.astype(np.float64) - vectors[np.maximum(labels, 0)].astype(np.float64)
    return np.where(labels >= 0, np.linalg.norm(differences, axis=1), np.inf)


def tune_search_params(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    set_params: Callable[..., object],
    indexed: np.ndarray,
    queries: np.ndarray,
    params: dict,
    recall_target: float,
) -> Tuning | None:
    """Set nprobe or efSearch to SAFETY_FACTOR times the smallest value that reaches `recall_target`.

    `search(queries, k)` returns squared distances and labels of the index being tuned, which
    contains the vectors `indexed` (n, d) float32, and `set_params(**params)` changes its search
    parameters. `queries` (m, d) float32 must not be in the index. A hit is a distance no larger
    than the exact one, so ties and duplicates count. Recall is measured on `queries`. Returns
    the chosen parameters with the search times of exact search and of the chosen setting on
    `queries`, or None for an index without such parameters. When no step reaches the
    target, the largest is kept and a warning gives the recall it reached.
    """
    if "nprobe" in params:
        name, steps = "nprobe", _NPROBE_STEPS
    elif "ef_search" in params:
        name, steps = "ef_search", _EF_SEARCH_STEPS
    else:
        return None
    started = time.perf_counter()
    exact_labels = exact_knn(queries, indexed, 1)[1][:, 0]
    exact_seconds = time.perf_counter() - started
    exact = _distances_to(queries, indexed, exact_labels)

    # Tuning aims at half the miss rate that the target allows, so that sampling noise of a
    # few thousand queries rarely leaves unseen queries below the target.
    aim = 1.0 - (1.0 - recall_target) / 2
    recall, reached = 0.0, None
    for value in steps:
        try:
            set_params(**{name: value})
        except ValueError:
            break
        reached = value
        approximate = _distances_to(queries, indexed, search(queries, 1)[1][:, 0])
        recall = float(np.mean(approximate <= exact * (1 + 1e-6)))
        if recall >= aim:
            break
    if recall < aim:
        logger.warning("auto index: %s=%d reaches recall@1 %.4f on held-out bank vectors, below %.4f", name, reached, recall, aim)

    # Test patches, anomalous ones above all, lie farther from the bank than held-out bank
    # vectors and are harder to search, so the value found is multiplied by SAFETY_FACTOR
    # where the index allows.
    chosen = reached
    for value in steps:
        if value < SAFETY_FACTOR * reached:
            continue
        try:
            set_params(**{name: value})
        except ValueError:
            break
        chosen = value
        break
    set_params(**{name: chosen})
    started = time.perf_counter()
    search(queries, 1)
    tuning = Tuning({name: chosen}, recall, exact_seconds, time.perf_counter() - started)
    logger.info(
        "auto index: %s=%d gives recall@1 %.4f on %d held-out bank vectors; %s=%d, chosen for unseen queries, "
        "searches them %.1f times as fast as exact search",
        name, reached, recall, len(queries), name, chosen, tuning.speedup,
    )
    return tuning
