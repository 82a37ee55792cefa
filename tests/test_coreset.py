import logging
import math

import numpy as np
import pytest
import torch

from patchindex.coreset import (
    SparseRandomProjection,
    approximate_k_center_greedy,
    coreset_size,
    k_center_greedy,
    project_chunks,
)


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


def test_project_chunks_half_precision():
    projection = SparseRandomProjection(16, 8, random_state=0)
    chunks = [np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)]
    full = project_chunks(iter(chunks), 5, projection)
    half = project_chunks(iter(chunks), 5, projection, dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="projection dtype"):
        project_chunks(iter(chunks), 5, projection, dtype="int8")


def _greedy_inputs(kind: str) -> torch.Tensor:
    rng = np.random.default_rng(7)
    if kind == "random":
        points = rng.standard_normal((1500, 24))
    elif kind == "clustered":
        points = _clustered(rng, n_clusters=30, per_cluster=60, dim=24)
    elif kind == "lattice":
        # 3^5 = 243 distinct points among 1500 rows: exact ties and duplicates everywhere.
        points = rng.integers(0, 3, (1500, 5))
    else:  # far from the origin, where the inner-product form loses most precision
        points = rng.standard_normal((1500, 24)) + 1000.0
    return torch.from_numpy(np.asarray(points, dtype=np.float32))


@pytest.mark.parametrize("kind", ["random", "clustered", "lattice", "offset"])
@pytest.mark.parametrize("block_size", [7, 64])
def test_pruned_greedy_selects_same_rows_as_plain(kind, block_size):
    points = _greedy_inputs(kind)
    n_centers = 200 if kind == "lattice" else 300

    plain, plain_info = k_center_greedy(points, n_centers, 11, method="plain", return_info=True)
    pruned, pruned_info = k_center_greedy(points, n_centers, 11, block_size=block_size, return_info=True)

    np.testing.assert_array_equal(pruned, plain)
    assert pruned_info.covering_radius == plain_info.covering_radius
    assert (pruned_info.method, plain_info.method) == ("pruned", "plain")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pruned_greedy_same_rows_in_half_precision(dtype):
    points = _greedy_inputs("clustered").to(dtype)
    plain = k_center_greedy(points, 200, 3, method="plain")
    pruned = k_center_greedy(points, 200, 3, block_size=32)
    np.testing.assert_array_equal(pruned, plain)


def test_greedy_breaks_ties_by_lowest_row():
    # From row 0, rows 2, 3 and 4 are all at distance 2: row 2 comes first. Then rows 3 and 4
    # tie at distance 2 again, and row 3 comes first.
    points = torch.tensor([[0, 0], [0, 1], [2, 0], [0, -2], [-2, 0]], dtype=torch.float32)
    for method in ("plain", "pruned"):
        assert k_center_greedy(points, 5, 0, method=method, block_size=2).tolist() == [0, 2, 3, 4, 1]


def test_pruned_greedy_does_less_work_and_reports_radius():
    points = _greedy_inputs("clustered")
    selected, info = k_center_greedy(points, 120, 0, block_size=32, return_info=True)
    _, plain_info = k_center_greedy(points, 120, 0, method="plain", return_info=True)

    nearest = torch.cdist(points.double(), points[selected].double()).min(dim=1).values
    assert info.covering_radius == pytest.approx(nearest.max().item(), rel=1e-5)
    assert info.distance_evaluations < 0.3 * plain_info.distance_evaluations


def test_approximate_greedy_bounds_its_radius():
    points = _greedy_inputs("clustered")
    parts = [(start, points[start : start + 400]) for start in range(0, len(points), 400)]

    selected, info = approximate_k_center_greedy(iter(parts), len(points), 90, random_state=0, return_info=True)
    _, exact = k_center_greedy(points, 90, 0, return_info=True)

    assert len(set(selected.tolist())) == 90
    assert selected.max() < len(points)
    radius = torch.cdist(points, points[selected]).min(dim=1).values.max().item()
    assert radius <= info.covering_radius * (1 + 1e-5)
    assert radius <= 2 * exact.covering_radius
    assert info.method == "approximate"


def test_approximate_greedy_checks_parts():
    points = torch.zeros((10, 2))
    with pytest.raises(ValueError, match="consecutive"):
        approximate_k_center_greedy(iter([(0, points), (5, points)]), 20, 4)
    with pytest.raises(ValueError, match="expected 30"):
        approximate_k_center_greedy(iter([(0, points), (10, points)]), 30, 4)
    with pytest.raises(ValueError, match="oversample"):
        approximate_k_center_greedy(iter([(0, points)]), 10, 4, oversample=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_greedy_same_on_cuda():
    points = _greedy_inputs("clustered")
    on_cpu = k_center_greedy(points, 100, start_index=3)
    on_cuda = k_center_greedy(points.cuda(), 100, start_index=3)
    np.testing.assert_array_equal(on_cpu, on_cuda)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e20])
def test_greedy_rejects_non_finite_or_huge_values(value):
    points = _greedy_inputs("random")
    points[123, 4] = value
    for method in ("plain", "pruned"):
        with pytest.raises(ValueError, match="row 123"):
            k_center_greedy(points, 10, 0, method=method)
    with pytest.raises(ValueError, match="torch tensor"):
        k_center_greedy(points.numpy(), 10, 0)
