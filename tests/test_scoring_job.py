import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import write_bad_images
from patchindex import PatchCore
from patchindex._journal import Journal
from patchindex._maps import read_map
from patchindex.cli import main
from patchindex.scoring_job import COLUMNS, run_scoring_job


@pytest.fixture(scope="module")
def calibrated_dir(calibrated_model, tmp_path_factory):
    return calibrated_model.save(tmp_path_factory.mktemp("job") / "model")


@pytest.fixture(scope="module")
def image_folder(demo_data, tmp_path_factory):
    """A folder of 25 symbolic links to the demo images, the way a night's images arrive."""
    folder = tmp_path_factory.mktemp("images") / "night"
    folder.mkdir()
    images = sorted(demo_data.glob("train/good/*.png")) + sorted(demo_data.glob("test/*/*.png"))
    for number, path in enumerate(images):
        (folder / f"{number:03d}_{path.parent.name}.png").symlink_to(path)
    return folder


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_job_rows_maps_and_decisions(calibrated_model, image_folder, tmp_path):
    out = tmp_path / "out"
    summary = run_scoring_job(calibrated_model, image_folder, out, overlays="anomalous", progress=False)

    rows = read_rows(out / "scores.csv")
    assert list(rows[0]) == COLUMNS
    assert len(rows) == 25
    assert summary.n_scored == 25
    assert summary.n_failed == 0
    threshold = calibrated_model.calibration_.threshold(0.01)
    assert summary.threshold == pytest.approx(threshold)
    for row in rows:
        raw = float(row["raw_score"])
        assert float(row["normalized_score"]) == pytest.approx(raw / threshold, rel=1e-5)
        assert row["decision"] == ("anomalous" if raw > threshold else "normal")
        assert (row["overlay"] != "") == (row["decision"] == "anomalous")
    defective = [row for row in rows if not row["path"].endswith(("_good.png"))]
    assert all(row["decision"] == "anomalous" for row in defective)
    for row in rows:
        if row["overlay"]:
            assert Image.open(out / row["overlay"]).size[0] > 300

    first = os.path.abspath(image_folder / "000_good.png")
    expected = calibrated_model.predict([first]).anomaly_maps[0]
    # The backbone's float32 results on CPU change slightly with the batch it runs in.
    np.testing.assert_allclose(read_map(out, first), expected, rtol=1e-2, atol=1e-3)
    with h5py.File(out / "anomaly_maps.h5", "r") as handle:
        assert len(handle["maps"]) == 25
        assert handle["maps"][rows[0]["map_key"]].compression == "gzip"
    assert not (out / ".anomaly_maps.parts").exists()

    job = json.loads((out / "job.json").read_text())
    stages = job["runs"][0]["stage_seconds"]
    assert set(stages) == {"decode", "backbone", "search", "postprocess", "write"}
    assert stages["backbone"] > 0
    assert job["runs"][0]["images_per_second"] > 0


def test_bad_inputs_get_error_rows(calibrated_model, demo_data, tmp_path):
    folder = tmp_path / "mixed"
    bad = write_bad_images(folder)
    shutil.copy(demo_data / "test" / "good" / "000.png", folder / "good.png")
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(folder / "huge.png")
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"

    summary = run_scoring_job(
        calibrated_model, [folder, missing, tmp_path / "empty_glob_*.png"], out, max_pixels=256 * 256, progress=False
    )

    errors = {os.path.basename(row["path"]): row["error"] for row in read_rows(out / "scores.csv")}
    assert errors["good.png"] == ""
    assert "not a recognized image format" in errors["notes.png"]
    assert "empty (0 bytes)" in errors["empty.png"]
    assert "corrupt" in errors["corrupt.png"]
    assert "400x300 = 120000 pixels exceeds the limit of 65536" in errors["huge.png"]
    assert errors["missing.png"] == "file not found"
    assert "no images found" in errors["empty_glob_*.png"]
    assert summary.n_failed == len(bad) + 3
    assert summary.n_scored == 1


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files without read permission")
def test_unreadable_file_gets_error_row(calibrated_model, demo_data, tmp_path):
    locked = tmp_path / "locked.png"
    shutil.copy(demo_data / "test" / "good" / "000.png", locked)
    locked.chmod(0)
    try:
        summary = run_scoring_job(calibrated_model, [locked], tmp_path / "out", progress=False)
    finally:
        locked.chmod(0o644)
    assert summary.n_failed == 1
    assert read_rows(tmp_path / "out" / "scores.csv")[0]["error"] == "permission denied"


def test_rerun_skips_scored_and_retries_changed(calibrated_model, demo_data, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(demo_data / "test" / "good", folder)
    (folder / "broken.png").write_bytes(b"")
    out = tmp_path / "out"
    first = run_scoring_job(calibrated_model, folder, out, overlays="none", progress=False)
    table = (out / "scores.csv").read_text()

    second = run_scoring_job(calibrated_model, folder, out, overlays="none", progress=False)
    assert (first.n_scored, first.n_failed) == (4, 1)
    assert (second.n_skipped, second.n_scored, second.n_failed) == (4, 0, 1)
    assert (out / "scores.csv").read_text() == table

    shutil.copy(demo_data / "test" / "good" / "000.png", folder / "broken.png")
    os.utime(folder / "001.png", ns=(0, 10**18))
    third = run_scoring_job(calibrated_model, folder, out, overlays="none", progress=False)
    rows = read_rows(out / "scores.csv")
    assert (third.n_skipped, third.n_scored, third.n_failed) == (3, 2, 0)
    assert [os.path.basename(row["path"]) for row in rows] == ["000.png", "001.png", "002.png", "003.png", "broken.png"]
    assert all(row["error"] == "" for row in rows)
    assert rows[1]["mtime_ns"] == str(10**18)
    assert len(json.loads((out / "job.json").read_text())["runs"]) == 3


def test_parquet_matches_csv(calibrated_model, demo_data, tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    run_scoring_job(calibrated_model, demo_data / "test" / "good", out, overlays="none", progress=False)
    table = pq.read_table(out / "scores.parquet").to_pylist()
    rows = read_rows(out / "scores.csv")
    assert [row["path"] for row in table] == [row["path"] for row in rows]
    assert [round(row["raw_score"], 6) for row in table] == [float(row["raw_score"]) for row in rows]


def test_job_rejects_other_model(calibrated_model, fitted_model, demo_data, tmp_path):
    out = tmp_path / "out"
    run_scoring_job(calibrated_model, demo_data / "test" / "good", out, overlays="none", progress=False)
    with pytest.raises(ValueError, match="contains scores of another model"):
        run_scoring_job(fitted_model, demo_data / "test" / "good", out, overlays="none", progress=False)


@pytest.mark.skipif(os.name != "posix", reason="the lock uses fcntl")
def test_job_rejects_concurrent_run(calibrated_model, demo_data, tmp_path):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another scoring job is writing"):
            run_scoring_job(calibrated_model, demo_data / "test" / "good", out, progress=False)
    summary = run_scoring_job(calibrated_model, demo_data / "test" / "good", out, overlays="none", progress=False)
    assert summary.n_scored == 4


def test_uncalibrated_model_scores_without_decisions(fitted_model, demo_data, tmp_path):
    out = tmp_path / "out"
    summary = run_scoring_job(fitted_model, demo_data / "test" / "good", out, progress=False)
    rows = read_rows(out / "scores.csv")
    assert summary.threshold is None
    assert "no calibration" in summary.report()
    assert all(row["raw_score"] and not row["decision"] and not row["normalized_score"] for row in rows)
    with pytest.raises(ValueError, match="need a decision threshold"):
        run_scoring_job(fitted_model, demo_data / "test" / "good", out, overlays="anomalous", progress=False)
    explicit = run_scoring_job(fitted_model, demo_data / "test" / "good", tmp_path / "o2", threshold=1.0, progress=False)
    assert explicit.n_anomalous == 4


def test_old_model_folder_without_calibration(calibrated_dir, demo_data, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(calibrated_dir, old)
    config = json.loads((old / "config.json").read_text())
    del config["calibration"]
    (old / "config.json").write_text(json.dumps(config))

    status = main(["score", "--model", str(old), str(demo_data / "test" / "good"), "--out", str(tmp_path / "out"), "-q"])

    assert status == 0
    assert read_rows(tmp_path / "out" / "scores.csv")[0]["decision"] == ""
    assert "no calibration" in capsys.readouterr().out
    assert PatchCore.load(old).calibration_ is None


def test_journal_drops_incomplete_last_record(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append([{"path": "a"}, {"path": "b"}])
    journal.close()
    with open(tmp_path / "journal.jsonl", "ab") as handle:
        handle.write(b'{"path": "c", "raw_sc')
    assert [record["path"] for record in Journal(tmp_path / "journal.jsonl").read()] == ["a", "b"]
    assert (tmp_path / "journal.jsonl").read_bytes().endswith(b'"b"}\n')


def test_killed_job_resumes_to_same_table(calibrated_dir, image_folder, tmp_path, capsys):
    bad = write_bad_images(tmp_path / "bad")
    arguments = [
        "score", "--model", str(calibrated_dir), str(image_folder), str(tmp_path / "bad"),
        "--batch-size", "2", "--overlays", "anomalous", "-q",
    ]
    assert main([*arguments, "--out", str(tmp_path / "whole")]) == 1

    resumed = tmp_path / "resumed"
    command = [sys.executable, "-m", "patchindex.cli", *arguments, "--out", str(resumed)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = resumed / ".journal.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 8:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    records = Journal(journal).read()
    scored_at_kill = sum(record["error"] is None for record in records)
    assert 8 <= len(records) < 25 + len(bad)

    capsys.readouterr()
    status = main([*arguments, "--out", str(resumed)])

    assert status == 1
    assert f"{scored_at_kill} already scored by an earlier run" in capsys.readouterr().out
    assert (resumed / "scores.csv").read_text() == (tmp_path / "whole" / "scores.csv").read_text()
    rows = read_rows(resumed / "scores.csv")
    assert sorted(row["path"] for row in rows if row["error"]) == sorted(str(path) for path in bad)
    with h5py.File(tmp_path / "whole" / "anomaly_maps.h5", "r") as one, h5py.File(resumed / "anomaly_maps.h5", "r") as other:
        assert sorted(one["maps"]) == sorted(other["maps"])
        for key in one["maps"]:
            np.testing.assert_array_equal(one["maps"][key][()], other["maps"][key][()])
    overlays = sorted(path.name for path in (resumed / "overlays").iterdir())
    assert overlays == sorted(path.name for path in (tmp_path / "whole" / "overlays").iterdir())
    assert not (resumed / ".anomaly_maps.parts").exists()


def test_output_inside_input_folder_is_not_scored(calibrated_model, demo_data, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(demo_data / "test" / "good", folder)
    out = folder / "results"

    first = run_scoring_job(calibrated_model, folder, out, overlays="all", progress=False)
    second = run_scoring_job(calibrated_model, folder, out, overlays="all", progress=False)

    assert first.n_scored == 4
    assert second.n_scored == 0
    assert len(read_rows(out / "scores.csv")) == 4
