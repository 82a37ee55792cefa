import json
import tracemalloc

import h5py
import numpy as np
import pytest

from patchindex.store import ShardStore, ShardWriter


def _image(rng, n, dim=8):
    """One image's rows: embeddings (n, dim) float32 and patch positions (n, 2) int16."""
    return rng.standard_normal((n, dim)).astype(np.float32), rng.integers(0, 28, (n, 2)).astype(np.int16)


def test_shards_hold_whole_images_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = [_image(rng, 300) for _ in range(10)]
    writer = ShardWriter(tmp_path / "store", dim=8, dtype="float32", rows_per_shard=1000)
    for number, (embeddings, position) in enumerate(images):
        writer.add_image(f"image{number}.png", embeddings, position)
    store = writer.close()

    assert len(store) == 3000
    # A shard is finished after the image that reaches 1000 rows: 4 images of 300 rows each.
    assert [rows for _, rows in store.shards] == [1200, 1200, 600]
    assert store.images[3] == "image3.png"
    chunks = list(store.iter_chunks(chunk_rows=700, fields=("embeddings", "image_index", "patch_position")))
    assert all(len(chunk[1]) <= 700 for chunk in chunks)
    assert [chunk[0] for chunk in chunks[:3]] == [0, 700, 1200]
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), np.concatenate([e for e, _ in images]))
    np.testing.assert_array_equal(np.concatenate([c[2] for c in chunks]), np.repeat(np.arange(10), 300))
    np.testing.assert_array_equal(np.concatenate([c[3] for c in chunks]), np.concatenate([p for _, p in images]))
    second = list(store.iter_chunks(chunk_rows=5000, shard=1))
    assert len(second) == 1
    assert second[0][0] == 1200
    np.testing.assert_array_equal(second[0][1], np.concatenate([e for e, _ in images[4:8]]))


def test_float16_store_returns_float32(tmp_path):
    rng = np.random.default_rng(1)
    embeddings, position = _image(rng, 50)
    writer = ShardWriter(tmp_path, dim=8, dtype="float16")
    writer.add_image("a.png", embeddings, position)
    store = writer.close()

    (_, stored), = store.iter_chunks()

    assert stored.dtype == np.float32
    np.testing.assert_allclose(stored, embeddings, rtol=1e-3, atol=1e-3)
    with h5py.File(tmp_path / "shard-00000.h5", "r") as handle:
        assert handle["embeddings"].dtype == np.float16


def test_take_gathers_in_requested_order(tmp_path):
    rng = np.random.default_rng(2)
    writer = ShardWriter(tmp_path, dim=8, dtype="float32", rows_per_shard=1000)
    images = [_image(rng, 500) for _ in range(5)]
    for number, (embeddings, position) in enumerate(images):
        writer.add_image(str(number), embeddings, position)
    store = writer.close()
    embeddings = np.concatenate([e for e, _ in images])
    rows = np.array([2499, 3, 1000, 999, 3, 1500])

    np.testing.assert_array_equal(store.take(rows, chunk_rows=256), embeddings[rows])
    with pytest.raises(IndexError, match="2500"):
        store.take(np.array([2500]))


def test_writer_memory_does_not_grow(tmp_path):
    rng = np.random.default_rng(3)
    embeddings, position = _image(rng, 2000, dim=152)  # 1.2 MB of float32 per image
    writer = ShardWriter(tmp_path, dim=152, dtype="float16", rows_per_shard=1 << 20)

    tracemalloc.start()
    for number in range(100):  # 120 MB in total
        writer.add_image(str(number), embeddings.copy(), position)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    store = writer.close()

    assert len(store) == 200_000
    assert peak < 10 * 2**20


def test_interrupted_writer_resumes_from_finished_shards(tmp_path):
    rng = np.random.default_rng(4)
    images = [_image(rng, 100) for _ in range(10)]
    fingerprint = {"inputs": "abc", "crop": [224, 224]}
    writer = ShardWriter(tmp_path, dim=8, dtype="float32", rows_per_shard=250, fingerprint=fingerprint)
    # Input 5 is unreadable, so image k is input k + 1 from image 5 on. Shards finish after
    # 3 images (300 rows); the run stops inside the third shard, after image 6.
    writer.add_skipped(5, "broken.png", "corrupt")
    for number in range(7):
        writer.add_image(f"{number}.png", *images[number], inputs_done=number + 1 + (number >= 5))
    writer.abort()

    with pytest.raises(ValueError, match="differs in: inputs"):
        ShardWriter(tmp_path, dim=8, dtype="float32", rows_per_shard=250, fingerprint={"inputs": "xyz", "crop": [224, 224]})
    resumed = ShardWriter(tmp_path, dim=8, dtype="float32", rows_per_shard=250, fingerprint=fingerprint)
    assert resumed.inputs_done == 7
    assert resumed.images == ["0.png", "1.png", "2.png", "3.png", "4.png", "5.png"]
    assert resumed.skipped == [(5, "broken.png", "corrupt")]
    for number in range(6, 10):
        resumed.add_image(f"{number}.png", *images[number], inputs_done=number + 2)
    store = resumed.close()

    assert len(store) == 1000
    assert store.images == [f"{number}.png" for number in range(10)]
    chunks = list(store.iter_chunks(chunk_rows=5000, fields=("embeddings", "image_index")))
    embeddings = np.concatenate([chunk[1] for chunk in chunks])
    image_index = np.concatenate([chunk[2] for chunk in chunks])
    np.testing.assert_array_equal(embeddings, np.concatenate([e for e, _ in images]))
    np.testing.assert_array_equal(image_index, np.repeat(np.arange(10), 100))
    assert store.fingerprint == fingerprint
    assert store.skipped == [(5, "broken.png", "corrupt")]
    assert not (tmp_path / "progress.json").exists()
    assert json.loads((tmp_path / "manifest.json").read_text())["n_rows"] == 1000


def test_writer_rejects_bad_input(tmp_path):
    writer = ShardWriter(tmp_path / "a", dim=8)
    with pytest.raises(ValueError, match=r"\(n, 8\)"):
        writer.add_image("x", np.zeros((3, 5), np.float32), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="patch_position"):
        writer.add_image("x", np.zeros((3, 8), np.float32), np.zeros((2, 2)))
    writer.add_image("x", np.zeros((3, 8), np.float32), np.zeros((3, 2)))
    writer.close()
    with pytest.raises(ValueError, match="already contains"):
        ShardWriter(tmp_path / "a", dim=8)
    with pytest.raises(ValueError, match="float64"):
        ShardWriter(tmp_path / "b", dim=8, dtype="float64")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "shard-00000.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="no progress.json"):
        ShardWriter(tmp_path / "c", dim=8)
    (tmp_path / "c" / "progress.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot resume"):
        ShardWriter(tmp_path / "c", dim=8)


def test_store_needs_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ShardStore(tmp_path)


def test_writer_rejects_values_float16_cannot_store(tmp_path):
    writer = ShardWriter(tmp_path / "a", dim=2, dtype="float16")
    position = np.zeros((1, 2), np.int16)
    with pytest.raises(ValueError, match="image big.png"):
        writer.add_image("big.png", np.array([[1e5, 0.0]], np.float32), position)
    with pytest.raises(ValueError, match="image nan.png"):
        writer.add_image("nan.png", np.array([[np.nan, 0.0]], np.float32), position)


@pytest.mark.parametrize("damage", ["delete", "truncate", "manifest"])
def test_damaged_store_names_the_file(tmp_path, damage):
    rng = np.random.default_rng(5)
    writer = ShardWriter(tmp_path, dim=8, dtype="float32", rows_per_shard=100)
    for number in range(3):
        writer.add_image(str(number), *_image(rng, 100))
    writer.close()
    if damage == "delete":
        (tmp_path / "shard-00001.h5").unlink()
    elif damage == "truncate":
        with open(tmp_path / "shard-00001.h5", "r+b") as handle:
            handle.truncate(2000)
    else:
        (tmp_path / "manifest.json").write_text("{broken")
    expected = "manifest.json is damaged" if damage == "manifest" else "shard-00001.h5 is missing or damaged"
    with pytest.raises(ValueError, match=expected):
        ShardStore(tmp_path)


def test_second_writer_of_folder_rejected(tmp_path):
    first = ShardWriter(tmp_path, dim=8, dtype="float32")
    first.add_image("a.png", *_image(np.random.default_rng(0), 4))

    with pytest.raises(ValueError, match="another process is writing an embedding store in"):
        ShardWriter(tmp_path, dim=8, dtype="float32")
    store = first.close()

    assert len(store) == 4
    with pytest.raises(ValueError, match="already contains a finished embedding store"):
        ShardWriter(tmp_path, dim=8, dtype="float32")
