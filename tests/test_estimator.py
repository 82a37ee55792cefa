import json
import logging
import shutil

import numpy as np
import pytest
import torch

from conftest import write_bad_images
from patchindex import PatchCore
from patchindex._weights import create_classifier
from patchindex.data import ImageLoadError
from patchindex.index import MemoryBankIndex
from patchindex.store import ShardStore


def test_constructor_stores_params_unchanged():
    model = PatchCore("tf_efficientnet_lite0", resize=(300, 200), coreset_ratio=0.25, weights="imagenet", random_state=7)
    params = model.get_params()
    assert params["resize"] == [300, 200]
    assert model.resize == (300, 200)
    assert params["coreset_ratio"] == 0.25
    assert params["random_state"] == 7
    assert not hasattr(model, "index_")


def test_fit_returns_self_with_fitted_state(demo_data, tmp_path):
    model = PatchCore(coreset_ratio=0.1, progress=False, store_dir=tmp_path / "store", shard_rows=4000)
    assert model.fit(demo_data) is model

    assert model.n_train_images_ == 12
    assert model.n_train_patches_ == 12 * 28 * 28
    assert model.memory_bank_.shape == (round(12 * 784 * 0.1), 152)
    assert model.memory_bank_.dtype == np.float32
    assert model.index_.ntotal == len(model.memory_bank_)
    assert model.feature_grid_ == (28, 28)
    assert model.skipped_images_ == []
    store = ShardStore(tmp_path / "store")
    assert len(store) == 12 * 784
    assert len(store.shards) == 2  # whole images: a shard is finished after 6 x 784 >= 4000 rows
    np.testing.assert_allclose(store.take(model.coreset_indices_), model.memory_bank_)


def test_same_seed_same_bank(demo_data):
    first = PatchCore(progress=False, random_state=3).fit(demo_data)
    second = PatchCore(progress=False, random_state=3).fit(demo_data)
    third = PatchCore(progress=False, random_state=4).fit(demo_data)
    np.testing.assert_array_equal(first.coreset_indices_, second.coreset_indices_)
    np.testing.assert_array_equal(first.memory_bank_, second.memory_bank_)
    assert first.coreset_indices_[0] != third.coreset_indices_[0]


def test_invalid_params_rejected(demo_data):
    for params, message in [
        ({"coreset_ratio": 0.0}, "coreset_ratio"),
        ({"coreset_ratio": 2}, "coreset_ratio"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_neighbors": 0}, "num_neighbors"),
        ({"coreset_ratio": 1e-5}, "memory bank of 0"),
        ({"device": "banana"}, "invalid device 'banana'"),
    ]:
        with pytest.raises(ValueError, match=message):
            PatchCore(progress=False, **params).fit(demo_data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_without_gpu_rejected(demo_data):
    with pytest.raises(ValueError, match="CUDA is not available"):
        PatchCore(device="cuda", progress=False).fit(demo_data)


def test_predict_before_fit_fails():
    with pytest.raises(RuntimeError, match="not fitted"):
        PatchCore().predict([np.zeros((64, 64, 3), np.uint8)])


def test_predict_separates_defects(fitted_model, demo_data):
    good = fitted_model.predict(demo_data / "test" / "good")
    bad = fitted_model.predict(str(demo_data / "test" / "spot" / "*.png"))
    assert len(good.scores) == 4
    assert len(bad.scores) == 3
    assert bad.scores.min() > good.scores.max()
    assert all(amap.shape == (256, 256) for amap in good.anomaly_maps)
    assert good.paths[0].endswith("000.png")


def test_predict_accepts_arrays_and_grayscale(fitted_model, demo_data):
    from patchindex.data import load_image

    path = sorted((demo_data / "test" / "good").glob("*.png"))[0]
    rgb = load_image(path)
    by_path = fitted_model.predict([path])
    by_array = fitted_model.predict([rgb])
    gray = fitted_model.predict([rgb[..., 0]])
    assert by_array.scores[0] == pytest.approx(by_path.scores[0], rel=1e-6)
    assert by_array.paths == [None]
    assert gray.anomaly_maps[0].shape == (256, 256)


def test_bad_file_predict_vs_iter_predict(fitted_model, demo_data, tmp_path):
    bad = write_bad_images(tmp_path)
    good = sorted((demo_data / "test" / "good").glob("*.png"))[:2]

    with pytest.raises(ImageLoadError, match="corrupt.png"):
        fitted_model.predict([good[0], bad[0], good[1]])
    results = list(fitted_model.iter_predict([good[0], *bad, good[1]], batch_size=2))

    assert [result.error is None for result in results] == [True, False, False, False, True]
    assert [result.path for result in results] == [str(p) for p in [good[0], *bad, good[1]]]
    assert "empty" in results[2].error
    assert np.isfinite(results[4].score)


def test_fit_skips_bad_images_with_one_warning(demo_data, tmp_path, caplog):
    folder = tmp_path / "train"
    shutil.copytree(demo_data / "train" / "good", folder)
    bad = write_bad_images(folder)

    with caplog.at_level(logging.WARNING, logger="patchindex"):
        model = PatchCore(progress=False).fit(folder)

    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    for path in bad:
        assert str(path) in warnings[0].getMessage()
    assert sorted(path for path, _ in model.skipped_images_) == sorted(map(str, bad))
    assert model.n_train_images_ == 12


def test_fit_strict_stops_at_bad_image(demo_data, tmp_path):
    folder = tmp_path / "train"
    shutil.copytree(demo_data / "train" / "good", folder)
    write_bad_images(folder)
    with pytest.raises(ImageLoadError, match="corrupt.png"):
        PatchCore(progress=False, strict=True).fit(folder)


def test_fit_with_only_bad_images_fails(tmp_path):
    write_bad_images(tmp_path)
    with pytest.raises(ValueError, match="none of the 3 training images"):
        PatchCore(progress=False).fit(tmp_path)


def test_save_load_gives_identical_predictions(fitted_model, demo_data, tmp_path):
    fitted_model.save(tmp_path / "model")
    loaded = PatchCore.load(tmp_path / "model")
    images = sorted((demo_data / "test").glob("*/*.png"))[:4]

    before = fitted_model.predict(images)
    after = loaded.predict(images)

    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "index.faiss", "memory_bank.npy"]
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["format_version"] == 1
    assert config["backbone"]["name"] == "tf_efficientnet_lite0"
    np.load(tmp_path / "model" / "memory_bank.npy", allow_pickle=False)
    np.testing.assert_array_equal(before.scores, after.scores)
    for a, b in zip(before.anomaly_maps, after.anomaly_maps):
        np.testing.assert_array_equal(a, b)
    assert loaded.get_params() == fitted_model.get_params()


def test_load_incomplete_folder(fitted_model, tmp_path):
    fitted_model.save(tmp_path / "model")
    (tmp_path / "model" / "index.faiss").unlink()
    with pytest.raises(ValueError, match="incomplete: missing index.faiss"):
        PatchCore.load(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PatchCore.load(tmp_path / "nowhere")


def test_load_other_format_version(fitted_model, tmp_path):
    fitted_model.save(tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config["format_version"] = 99
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format version 99"):
        PatchCore.load(tmp_path / "model")


def test_load_mismatched_backbone(fitted_model, tmp_path):
    fitted_model.save(tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config["params"]["backbone"] = "tf_efficientnet_lite1"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="backbone mismatch.*tf_efficientnet_lite0"):
        PatchCore.load(tmp_path / "model")


def test_load_with_changed_weights_file(demo_data, tmp_path):
    classifier, _ = create_classifier("tf_efficientnet_lite0")
    weights = tmp_path / "lite0.pth"
    torch.save(classifier.state_dict(), weights)
    model = PatchCore(weights=weights, progress=False, coreset_ratio=0.05).fit(demo_data / "train" / "good")
    model.save(tmp_path / "model")
    assert PatchCore.load(tmp_path / "model").memory_bank_.shape == model.memory_bank_.shape

    state = classifier.state_dict()
    state["conv_stem.weight"] = state["conv_stem.weight"] * 1.01
    torch.save(state, weights)

    with pytest.raises(ValueError, match="backbone mismatch.*weights"):
        PatchCore.load(tmp_path / "model")


def test_evaluate_reports_metrics(fitted_model, demo_data):
    report = fitted_model.evaluate(demo_data)
    assert report["n_images"] == 13
    assert report["n_anomalous"] == 9
    assert report["n_failed"] == 0
    assert report["image_auroc"] >= 0.95
    assert report["pixel_auroc"] >= 0.95
    assert 0.5 <= report["pro"] <= 1.0


def test_evaluate_without_masks(fitted_model, demo_data, tmp_path):
    root = tmp_path / "category"
    shutil.copytree(demo_data / "test", root / "test")
    report = fitted_model.evaluate(root)
    assert report["pixel_auroc"] is None
    assert report["pro"] is None
    assert report["image_auroc"] >= 0.95


def test_fit_accepts_arrays(demo_data):
    from patchindex.data import load_image

    images = [load_image(path) for path in sorted((demo_data / "train" / "good").glob("*.png"))[:4]]
    model = PatchCore(progress=False, coreset_ratio=0.1).fit(images)
    assert model.n_train_images_ == 4
    assert model.n_train_patches_ == 4 * 784


def test_numpy_scalars_accepted_bools_rejected(demo_data):
    model = PatchCore(progress=False, coreset_ratio=np.float32(0.05), num_neighbors=np.int64(3))
    assert model.fit(demo_data / "train" / "good").memory_bank_.shape[0] == round(12 * 784 * 0.05)
    for params in ({"coreset_ratio": True}, {"random_state": -1}, {"resize": 100}):
        with pytest.raises(ValueError):
            PatchCore(progress=False, **params).fit(demo_data)


def test_iter_predict_reports_missing_and_empty_sources(fitted_model, demo_data, tmp_path):
    (tmp_path / "empty").mkdir()
    good = demo_data / "test" / "good" / "000.png"
    inputs = [good, tmp_path / "missing.png", tmp_path / "empty", np.zeros((0, 4, 3), np.uint8), good]

    results = list(fitted_model.iter_predict(inputs))

    assert [result.error is None for result in results] == [True, False, False, False, True]
    assert results[1].error == "file not found"
    assert "no images found" in results[2].error
    assert "empty image" in results[3].error
    assert results[0].score == results[4].score
    with pytest.raises(ValueError, match="batch_size"):
        list(fitted_model.iter_predict([good], batch_size=-1))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda config: [], "must contain a JSON object"),
        (lambda config: {k: v for k, v in config.items() if k != "params"}, "missing the 'params' section"),
        (lambda config: {**config, "params": {**config["params"], "colour": 1}}, r"unknown parameters \['colour'\]"),
        (lambda config: {**config, "params": {**config["params"], "num_neighbors": 0}}, "invalid parameter in .*config.json"),
        (lambda config: {**config, "backbone": {k: v for k, v in config["backbone"].items() if k != "weights_sha256"}}, "backbone.weights_sha256"),
    ],
)
def test_load_broken_config(fitted_model, tmp_path, change, message):
    fitted_model.save(tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    config_path.write_text(json.dumps(change(json.loads(config_path.read_text()))))
    with pytest.raises(ValueError, match=message):
        PatchCore.load(tmp_path / "model")


def test_load_broken_files(fitted_model, tmp_path):
    fitted_model.save(tmp_path / "model")
    (tmp_path / "model" / "memory_bank.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read .*memory_bank.npy"):
        PatchCore.load(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        PatchCore.load(tmp_path / "model")


def test_weights_file_not_state_dict(tmp_path):
    path = tmp_path / "script.py"
    path.write_text("print('hello')\n")
    with pytest.raises(ValueError, match="is not a state-dict file"):
        PatchCore(weights=path, progress=False).fit([np.zeros((64, 64, 3), np.uint8)] * 2)
    with pytest.raises(ValueError, match="is a folder"):
        PatchCore(weights=tmp_path, progress=False).fit([np.zeros((64, 64, 3), np.uint8)] * 2)


def test_training_score_reference_saved(fitted_model, tmp_path):
    assert fitted_model.training_patch_score_p99_ > 0
    fitted_model.save(tmp_path / "model")
    assert PatchCore.load(tmp_path / "model").training_patch_score_p99_ == fitted_model.training_patch_score_p99_


def test_partial_crop_coverage_warns(demo_data, caplog):
    from patchindex.data import load_image

    wide = [np.concatenate([load_image(path)] * 3, axis=1) for path in sorted((demo_data / "train" / "good").glob("*.png"))[:3]]
    with caplog.at_level(logging.WARNING, logger="patchindex"):
        PatchCore(progress=False, coreset_ratio=0.2).fit(wide)
    assert "keeps less than half of 3 of 3 images" in caplog.text
    assert "--crop none" in caplog.text


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("training", None, "x"),
        ("training", "patch_score_p99", "x"),
        ("training", "feature_grid", 5),
        ("training", "skipped_images", [1, 2]),
        ("params", "embedding_dim", "abc"),
        ("params", "out_indices", "ab"),
        ("params", "backbone", 123),
        ("params", "weights", 123),
        ("params", "resize", 256.5),
        ("params", "blur_sigma", float("inf")),
        (None, "format_version", True),
    ],
)
def test_load_rejects_bad_config_values(fitted_model, tmp_path, section, key, value):
    fitted_model.save(tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    config = json.loads(config_path.read_text())
    if section is None:
        config[key] = value
    elif key is None:
        config[section] = value
    else:
        config[section][key] = value
    config_path.write_text(json.dumps(config))

    with pytest.raises(ValueError, match="config.json"):
        PatchCore.load(tmp_path / "model")


def test_load_rejects_nan_bank(fitted_model, tmp_path):
    fitted_model.save(tmp_path / "model")
    bank = np.load(tmp_path / "model" / "memory_bank.npy")
    np.save(tmp_path / "model" / "memory_bank.npy", np.full_like(bank, np.nan))
    with pytest.raises(ValueError, match="finite"):
        PatchCore.load(tmp_path / "model")


def test_predict_rejects_non_image_inputs(fitted_model, demo_data):
    with pytest.raises(ValueError, match="got int"):
        fitted_model.predict(5)
    with pytest.raises(ValueError, match="got dict"):
        fitted_model.predict({"a": 1})
    path = demo_data / "test" / "good" / "000.png"
    assert fitted_model.predict(bytes(path)).scores.shape == (1,)


def test_approximate_index_survives_save_and_load(demo_data, tmp_path):
    model = PatchCore(index="IVF8,Flat", nprobe=2, coreset_ratio=0.1, progress=False).fit(demo_data)
    images = sorted((demo_data / "test").glob("*/*.png"))[:4]
    before = model.predict(images)
    model.save(tmp_path / "model")

    loaded = PatchCore.load(tmp_path / "model")
    after = loaded.predict(images)

    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["params"]["index"] == "IVF8,Flat"
    assert config["index"]["factory"] == "IVF8,Flat"
    assert config["index"]["search_params"] == {"nprobe": 2}
    assert loaded.index_.search_params == {"nprobe": 2}
    np.testing.assert_array_equal(before.scores, after.scores)
    for a, b in zip(before.anomaly_maps, after.anomaly_maps):
        np.testing.assert_array_equal(a, b)

    assert loaded.set_search_params(nprobe=8) is loaded
    assert loaded.index_.search_params == {"nprobe": 8}
    assert loaded.nprobe == 8
    exact = PatchCore.load(tmp_path / "model")
    exact.index_ = MemoryBankIndex().build(exact.memory_bank_)
    np.testing.assert_allclose(loaded.predict(images).scores, exact.predict(images).scores, rtol=1e-5)


def test_model_folder_without_index_params_loads(fitted_model, demo_data, tmp_path):
    fitted_model.save(tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    config = json.loads(config_path.read_text())
    for name in ("index", "recall_target", "nprobe", "ef_search"):
        del config["params"][name]
    config["index"] = {"file": "index.faiss", "factory": "Flat"}
    config_path.write_text(json.dumps(config))
    images = sorted((demo_data / "test").glob("*/*.png"))[:2]

    loaded = PatchCore.load(tmp_path / "model")

    assert loaded.index == "Flat"
    assert loaded.index_.spec_ == "Flat"
    np.testing.assert_array_equal(loaded.predict(images).scores, fitted_model.predict(images).scores)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"index": "IVF8,PQ7"}, "invalid index 'IVF8,PQ7' for dimension 152"),
        ({"index": ""}, "invalid index ''"),
        ({"index": "HNSW16", "nprobe": 4}, "nprobe=4 applies to IVF indexes"),
        ({"nprobe": 0}, "nprobe must be None or a positive integer"),
        ({"recall_target": 1.5}, "recall_target must be in"),
    ],
)
def test_invalid_index_params_rejected(demo_data, params, message):
    with pytest.raises(ValueError, match=message):
        PatchCore(progress=False, **params).fit(demo_data)


def test_search_params_rejected_on_flat_model(fitted_model):
    with pytest.raises(ValueError, match="nprobe applies to IVF indexes, but this index is 'Flat'"):
        fitted_model.set_search_params(nprobe=4)
    assert fitted_model.nprobe is None
