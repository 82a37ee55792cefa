"""Sparse random projection of patch embeddings for coreset selection.

Coreset distances are computed on a very sparse random projection of the embeddings (Li, Hastie
and Church, "Very sparse random projections", KDD 2006), which keeps pairwise distances
approximately and makes each greedy step cheaper.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["SparseRandomProjection", "project_chunks"]

logger = logging.getLogger(__name__)


class SparseRandomProjection:
    """Seeded very sparse random projection from `n_features` to `n_components` dimensions.

    Entries are +-sqrt(1 / (density * n_components)) with probability density / 2 each and 0
    otherwise, with density = 1 / sqrt(n_features), so squared distances are kept in
    expectation. When n_components >= n_features the projection is the identity.
    """

    def __init__(self, n_features: int, n_components: int = 128, random_state: int | None = 0):
        if n_features < 1 or n_components < 1:
            raise ValueError(f"n_features and n_components must be positive, got {n_features} and {n_components}")
        self.n_features = n_features
        self.n_components = n_components
        self.random_state = random_state
        self.identity_ = n_components >= n_features

        if self.identity_:
            self.components_ = None
            return
        rng = np.random.default_rng(random_state)
        density = 1.0 / math.sqrt(n_features)
        scale = math.sqrt(1.0 / (density * n_components))
        draws = rng.random((n_features, n_components))
        signs = np.where(rng.random((n_features, n_components)) < 0.5, -scale, scale)
        self.components_ = np.where(draws < density, signs, 0.0).astype(np.float32)

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """Project (n, n_features) float32 to (n, n_components) float32 on the same device."""
        if self.identity_:
            return features.float()
        components = torch.from_numpy(self.components_).to(features.device)
        return features.float() @ components

    @property
    def output_dim(self) -> int:
        return self.n_features if self.identity_ else self.n_components


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def project_chunks(
    chunks: Iterable[np.ndarray],
    n_rows: int,
    projection: SparseRandomProjection,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    progress: bool = False,
) -> torch.Tensor:
    """Project embedding chunks (m, d) into one (n_rows, k) tensor of `dtype` on `device`.

    Only the projected matrix and one chunk are held in memory at a time. float16 and bfloat16
    halve the matrix; the projection itself is computed in float32.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"projection dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    started = time.perf_counter()
    projected = torch.empty((n_rows, projection.output_dim), dtype=_DTYPES[dtype], device=device)
    row = 0
    with tqdm(total=n_rows, desc="projection", unit="patch", unit_scale=True, disable=not progress) as bar:
        for chunk in chunks:
            if row + len(chunk) > n_rows:
                raise ValueError(f"expected {n_rows} rows of embeddings, got more")
            block = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).to(device)
            projected[row : row + len(block)] = projection.transform(block)
            row += len(block)
            bar.update(len(block))
    if row != n_rows:
        raise ValueError(f"expected {n_rows} rows of embeddings, got {row}")

    elapsed = time.perf_counter() - started
    logger.info(
        "projected %d rows to %d dimensions (%s) in %.1f s (%.0f rows/s)",
        n_rows, projection.output_dim, dtype, elapsed, n_rows / max(elapsed, 1e-9),
    )
    return projected
