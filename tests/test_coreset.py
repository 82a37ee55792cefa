import logging
import math

import numpy as np
import pytest
import torch

from patchindex.coreset import SparseRandomProjection, coreset_size, k_center_greedy, project_chunks


def _reference_greedy(points: np.ndarray, n_centers: int, start: int) -> list[int]:
    """Plain k-center greedy with direct float64 distances."""
    points = points.astype(np.float64)
    selected = [start]
    nearest = ((points - points[start]) ** 2).sum(axis=1)
    while len(selected) < n_centers:
        farthest = int(np.argmax(nearest))
        selected.append(farthest)
        nearest = np.minimum(nearest, ((points - points[farthest]) ** 2).sum(axis=1))
    return selected


def _clustered(rng, n_clusters=20, per_cluster=50, dim=16):
    centers = rng.standard_normal((n_clusters, dim)) * 10
    return np.concatenate([c + rng.standard_normal((per_cluster, dim)) * 0.3 for c in centers]).astype(np.float32)


@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_greedy_matches_reference(kind):
    rng = np.random.default_rng(0)
    points = rng.standard_normal((600, 16)).astype(np.float32) if kind == "random" else _clustered(rng)

    selected = k_center_greedy(torch.from_numpy(points), 60, start_index=17, progress=False)

    assert selected.dtype == np.int64
    assert selected.tolist() == _reference_greedy(points, 60, 17)


def test_greedy_starts_at_seed_point_and_covers():
    rng = np.random.default_rng(1)
    points = _clustered(rng)
    selected = k_center_greedy(torch.from_numpy(points), 20, start_index=5, progress=False)

    assert selected[0] == 5
    assert len(set(selected.tolist())) == 20
    # With 20 well-separated clusters, 20 centers land one per cluster.
    assert sorted(selected // 50) == list(range(20))


def test_greedy_with_duplicates_keeps_distinct(caplog):
    points = torch.tensor(np.repeat(np.eye(4, dtype=np.float32), 5, axis=0))
    with caplog.at_level(logging.WARNING):
        selected = k_center_greedy(points, 8, start_index=0, progress=False)
    assert len(selected) == 4
    assert len({tuple(points[i].tolist()) for i in selected}) == 4
    assert "only 4 distinct" in caplog.text


@pytest.mark.parametrize("n_centers, start", [(0, 0), (11, 0), (3, 10), (3, -1)])
def test_greedy_rejects_bad_sizes(n_centers, start):
    with pytest.raises(ValueError):
        k_center_greedy(torch.zeros(10, 2), n_centers, start_index=start, progress=False)


def test_coreset_size_validation():
    assert coreset_size(163856, 0.1) == 16386
    assert coreset_size(100, 1.0) == 100
    for ratio in (0, -0.1, 1.5, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="coreset_ratio"):
            coreset_size(100, ratio)
    with pytest.raises(ValueError, match="memory bank of 1"):
        coreset_size(10, 0.1)
    with pytest.raises(ValueError, match="at least 2 training patches"):
        coreset_size(1, 1.0)


def test_projection_is_seeded_and_sparse():
    first = SparseRandomProjection(152, 128, random_state=3)
    second = SparseRandomProjection(152, 128, random_state=3)
    other = SparseRandomProjection(152, 128, random_state=4)

    np.testing.assert_array_equal(first.components_, second.components_)
    assert not np.array_equal(first.components_, other.components_)
    density = np.count_nonzero(first.components_) / first.components_.size
    assert abs(density - 1 / math.sqrt(152)) < 0.02
    assert SparseRandomProjection(64, 128).identity_


def test_projection_keeps_distances_roughly():
    rng = np.random.default_rng(5)
    points = torch.from_numpy(rng.standard_normal((200, 1536)).astype(np.float32))
    projected = SparseRandomProjection(1536, 128, random_state=0).transform(points)

    ratio = torch.pdist(projected) / torch.pdist(points)

    assert 0.9 < ratio.mean().item() < 1.1
    assert ratio.min().item() > 0.5
    assert ratio.max().item() < 1.5


def test_project_chunks_checks_row_count():
    projection = SparseRandomProjection(8, 4, random_state=0)
    chunks = [np.ones((3, 8), np.float32), np.ones((2, 8), np.float32)]
    result = project_chunks(iter(chunks), 5, projection)
    assert tuple(result.shape) == (5, 4)
    with pytest.raises(ValueError, match="expected 6 rows"):
        project_chunks(iter(chunks), 6, projection)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_greedy_same_on_cuda():
    rng = np.random.default_rng(6)
    points = torch.from_numpy(_clustered(rng))
    on_cpu = k_center_greedy(points, 40, start_index=3, progress=False)
    on_cuda = k_center_greedy(points.cuda(), 40, start_index=3, progress=False)
    np.testing.assert_array_equal(on_cpu, on_cuda)
