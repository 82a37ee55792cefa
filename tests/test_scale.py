"""Streaming fit at scale: resumable extraction, reuse of a finished store, fitting from a
store, the approximate coreset and bounded memory, on scaled-down inputs."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from patchindex import PatchCore
from patchindex.store import ShardStore, ShardWriter

REPOSITORY = Path(__file__).resolve().parent.parent


def _python(script: str, *args: str, **kwargs) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args], env=environment, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
    )


def _finished_shards(store_dir: Path) -> int:
    try:
        return len(json.loads((store_dir / "progress.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def long_list(demo_data, tmp_path_factory) -> Path:
    """A list file naming the 12 demo training images three times: 36 inputs."""
    images = sorted((demo_data / "train" / "good").glob("*.png"))
    path = tmp_path_factory.mktemp("lists") / "train.txt"
    path.write_text("\n".join(str(image) for image in images * 3) + "\n")
    return path


SETTINGS = dict(shard_rows=2 * 784, batch_size=2, coreset_ratio=0.05, progress=False)


def test_fit_resumes_after_kill(long_list, tmp_path, caplog):
    store_dir = tmp_path / "store"
    worker = _python(
        """
        import sys
        from patchindex import PatchCore
        PatchCore(store_dir=sys.argv[2], shard_rows=2 * 784, batch_size=2, coreset_ratio=0.05, progress=False).fit(sys.argv[1])
        """,
        str(long_list), str(store_dir),
    )
    deadline = time.monotonic() + 300
    while _finished_shards(store_dir) < 3 and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.communicate()
    done = _finished_shards(store_dir)
    assert 3 <= done < 18, "the fit must be killed half way for this test"

    with caplog.at_level(logging.INFO, logger="patchindex"):
        resumed = PatchCore(store_dir=store_dir, **SETTINGS).fit(long_list)
    complete = PatchCore(store_dir=tmp_path / "complete", **SETTINGS).fit(long_list)

    assert "resuming embedding store" in caplog.text
    store, reference = ShardStore(store_dir), ShardStore(tmp_path / "complete")
    assert store.images == reference.images
    assert len(store.images) == 36
    assert len(store) == len(reference) == 36 * 784
    chunks = list(store.iter_chunks(chunk_rows=1 << 16, fields=("embeddings", "image_index")))
    expected = list(reference.iter_chunks(chunk_rows=1 << 16, fields=("embeddings", "image_index")))
    image_index = np.concatenate([chunk[2] for chunk in chunks])
    np.testing.assert_array_equal(image_index, np.repeat(np.arange(36), 784))
    np.testing.assert_array_equal(image_index, np.concatenate([chunk[2] for chunk in expected]))
    np.testing.assert_allclose(
        np.concatenate([chunk[1] for chunk in chunks]), np.concatenate([chunk[1] for chunk in expected]), atol=1e-3
    )
    np.testing.assert_array_equal(resumed.coreset_indices_, complete.coreset_indices_)


def test_fit_reuses_finished_store_of_same_inputs(long_list, demo_data, tmp_path, caplog):
    store_dir = tmp_path / "store"
    first = PatchCore(store_dir=store_dir, **SETTINGS).fit(long_list)
    with caplog.at_level(logging.INFO, logger="patchindex"):
        second = PatchCore(store_dir=store_dir, **{**SETTINGS, "coreset_ratio": 0.1}).fit(long_list)

    assert "reusing the embedding store" in caplog.text
    assert second.n_train_patches_ == first.n_train_patches_ == 36 * 784
    assert len(second.memory_bank_) == round(36 * 784 * 0.1)
    assert second.feature_grid_ == (28, 28)
    with pytest.raises(ValueError, match="differs in: crop"):
        PatchCore(store_dir=store_dir, crop=200, **SETTINGS).fit(long_list)
    with pytest.raises(ValueError, match="differs in: inputs_sha256, n_inputs"):
        PatchCore(store_dir=store_dir, **SETTINGS).fit(demo_data)


def _synthetic_store(directory: Path, n_rows: int, shard_rows: int, dim: int = 152) -> ShardStore:
    """Clustered float16 embeddings in 'images' of 784 patches."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, (64, dim)).astype(np.float32)
    writer = ShardWriter(directory, dim, dtype="float16", rows_per_shard=shard_rows)
    position = np.zeros((784, 2), np.int16)
    for image in range(n_rows // 784):
        rows = centers[rng.integers(0, 64, 784)] + rng.standard_normal((784, dim), dtype=np.float32)
        writer.add_image(f"synthetic-{image:06d}", rows, position)
    return writer.close()


def test_fit_from_store_with_approximate_coreset(tmp_path):
    store = _synthetic_store(tmp_path / "store", 40 * 784, shard_rows=10 * 784)
    approximate = PatchCore(coreset_ratio=0.02, coreset_method="approximate", progress=False).fit(store)
    exact = PatchCore(coreset_ratio=0.02, coreset_method="exact", projection_dtype="float16", progress=False).fit(store)

    for model in (approximate, exact):
        assert model.memory_bank_.shape == (round(40 * 784 * 0.02), 152)
        assert len(np.unique(model.coreset_indices_)) == len(model.coreset_indices_)
        np.testing.assert_allclose(store.take(model.coreset_indices_), model.memory_bank_)
    assert approximate.coreset_info_.method == "approximate"
    assert exact.coreset_info_.method == "pruned"
    assert approximate.coreset_info_.covering_radius < 2 * exact.coreset_info_.covering_radius
    with pytest.raises(ValueError, match="backbone gives 1536"):
        PatchCore("wide_resnet50_2", weights="random", progress=False).fit(store)
    with pytest.raises(ValueError, match="coreset_method"):
        PatchCore(coreset_method="fast").fit(store)


def test_fit_from_store_warns_calibration_fraction_ignored(tmp_path, caplog):
    store = _synthetic_store(tmp_path / "store", 4 * 784, shard_rows=2 * 784)

    model = PatchCore(coreset_ratio=0.05, calibration_fraction=0.2, progress=False).fit(store)

    assert model.calibration_ is None
    assert "calibration_fraction 0.2 is ignored when fitting a ShardStore" in caplog.text


def test_fit_from_store_memory_is_bounded(tmp_path):
    # 600k patches of 152 float32 values are 365 MB. With 25k-row shards the approximate
    # coreset holds one projected shard (13 MB) and its working copies at a time.
    n_rows = 765 * 784
    _synthetic_store(tmp_path / "store", n_rows, shard_rows=32 * 784)
    worker = _python(
        """
        import resource, sys
        from patchindex import PatchCore
        from patchindex.store import ShardStore
        store = ShardStore(sys.argv[1])
        model = PatchCore(coreset_ratio=0.002, coreset_method="approximate", progress=False)
        model._validate_params()
        model._build_network()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model.fit(store)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(len(model.memory_bank_), (after - before) * 1024)
        """,
        str(tmp_path / "store"),
    )
    output, errors = worker.communicate(timeout=600)
    assert worker.returncode == 0, errors
    bank_size, growth = (int(value) for value in output.split())

    raw_bytes = n_rows * 152 * 4
    assert bank_size == round(n_rows * 0.002)
    assert growth < raw_bytes / 2, f"peak memory grew by {growth / 2**20:.0f} MiB during fit"
