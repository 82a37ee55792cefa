import json

import numpy as np
import pytest

from patchindex import PatchCore
from patchindex.calibration import Calibration


def test_calibration_threshold_order_statistic():
    calibration = Calibration.from_scores(np.arange(1, 200, dtype=float)[::-1], "199 images")
    threshold = calibration.threshold(0.01)
    assert threshold == 198.0
    assert calibration.false_positive_rate(threshold) <= 0.01
    assert calibration.threshold(0.1) == 180.0


def test_calibration_too_few_images_warns(caplog):
    calibration = Calibration.from_scores([3.0, 1.0, 2.0], "3 images")
    assert calibration.threshold(0.01) == 3.0
    calibration.warn_if_coarse(0.5)
    assert caplog.text == ""
    calibration.warn_if_coarse(0.01)
    assert "cannot set a false-positive rate of 0.01" in caplog.text
    with pytest.raises(ValueError, match="false-positive rate"):
        calibration.threshold(1.5)


def test_fit_holds_back_calibration_images(calibrated_model):
    assert calibrated_model.n_train_images_ == 9
    assert calibrated_model.calibration_.n_images == 3
    assert "held back" in calibrated_model.calibration_.source


def test_calibration_saved_with_model(calibrated_model, tmp_path):
    calibrated_dir = calibrated_model.save(tmp_path / "model")
    config = json.loads((calibrated_dir / "config.json").read_text())
    stored = config["calibration"]
    assert stored["fpr"] == 0.01
    assert stored["threshold"] == pytest.approx(calibrated_model.calibration_.threshold(0.01))
    loaded = PatchCore.load(calibrated_dir)
    np.testing.assert_array_equal(loaded.calibration_.scores, calibrated_model.calibration_.scores)


def test_fit_calibration_folder(demo_data):
    model = PatchCore(progress=False, coreset_ratio=0.1).fit(
        demo_data / "train" / "good", calibration_source=demo_data / "test" / "good"
    )
    assert model.n_train_images_ == 12
    assert model.calibration_.n_images == 4


def test_fraction_with_calibration_source_rejected(demo_data):
    model = PatchCore(progress=False, calibration_fraction=0.2)
    with pytest.raises(ValueError, match="calibration_fraction is 0.2, but calibration_source is given too"):
        model.fit(demo_data, calibration_source=demo_data / "test" / "good")


def test_cli_fraction_with_calibration_data_rejected(demo_data, tmp_path, capsys):
    from patchindex.cli import main

    status = main([
        "fit", "--data", str(demo_data), "--out", str(tmp_path / "model"), "-q",
        "--calibration-fraction", "0.2", "--calibration-data", str(demo_data / "test" / "good"),
    ])

    assert status == 2
    assert "--calibration-fraction 0.2 and --calibration-data are both given" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_calibration_fraction_rejected(demo_data):
    for fraction in (-0.1, 1.0, "0.1"):
        with pytest.raises(ValueError, match="calibration_fraction"):
            PatchCore(progress=False, calibration_fraction=fraction).fit(demo_data)


def test_unreadable_calibration_keeps_fitted_model(demo_data, tmp_path, caplog):
    from conftest import write_bad_images

    write_bad_images(tmp_path / "bad")
    model = PatchCore(progress=False, coreset_ratio=0.05).fit(demo_data, calibration_source=tmp_path / "bad")

    assert model.calibration_ is None
    assert len(model.memory_bank_) == round(12 * 784 * 0.05)
    assert "not calibrated" in caplog.text
