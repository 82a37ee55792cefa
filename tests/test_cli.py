import csv
import json
import shutil
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
from PIL import Image

from conftest import write_bad_images
from patchindex.cli import main


@pytest.fixture(scope="module")
def cli_model(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "model"
    assert main(["fit", "--data", str(demo_data), "--out", str(out), "--coreset-ratio", "0.2", "--seed", "1", "-q"]) == 0
    return out


def test_console_script_registered():
    scripts = entry_points(group="console_scripts", name="patchindex")
    assert [script.value for script in scripts] == ["patchindex.cli:main"]
    completed = subprocess.run([sys.executable, "-m", "patchindex.cli", "--help"], capture_output=True, text=True)
    assert completed.returncode == 0
    for command in ("fit", "evaluate", "score", "demo"):
        assert command in completed.stdout


def test_fit_writes_model(cli_model):
    config = json.loads((cli_model / "config.json").read_text())
    assert config["params"]["coreset_ratio"] == 0.2
    assert config["params"]["random_state"] == 1
    assert config["memory_bank"]["shape"] == [round(11 * 784 * 0.2), 152]
    assert config["calibration"]["n_images"] == 1


def test_evaluate_json(cli_model, demo_data, capsys):
    assert main(["evaluate", "--model", str(cli_model), "--data", str(demo_data), "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_images"] == 13
    assert report["image_auroc"] >= 0.95
    assert report["pixel_auroc"] >= 0.95
    assert 0 <= report["pro"] <= 1


def test_evaluate_without_test_folder(cli_model, tmp_path, capsys):
    assert main(["evaluate", "--model", str(cli_model), "--data", str(tmp_path), "-q"]) == 2
    assert "has no 'test' folder" in capsys.readouterr().err


def test_score_writes_rows_and_overlays(cli_model, demo_data, tmp_path, capsys):
    bad = write_bad_images(tmp_path / "bad")
    good = sorted((demo_data / "test" / "spot").glob("*.png"))
    out = tmp_path / "scores"

    status = main([
        "score", "--model", str(cli_model), str(demo_data / "test" / "spot"), str(tmp_path / "bad"),
        "--out", str(out), "--overlays", "all", "-q",
    ])

    assert status == 1
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == [str(p) for p in good] + sorted(str(p) for p in bad)
    errors = {row["path"]: row["error"] for row in rows if row["error"]}
    assert set(errors) == {str(p) for p in bad}
    for row in rows[:3]:
        assert float(row["raw_score"]) > 0
        assert row["decision"] in ("normal", "anomalous")
        overlay = Image.open(out / row["overlay"])
        assert overlay.size[0] > 300
        assert np.asarray(overlay).std() > 10
    output = capsys.readouterr().out
    assert "3 scored, 3 failed" in output
    assert "images/s; stages: decode" in output


def test_score_allow_errors_and_list_file(cli_model, demo_data, tmp_path):
    listing = tmp_path / "images.txt"
    listing.write_text(f"{demo_data / 'test' / 'good' / '000.png'}\n{tmp_path / 'missing.png'}\n")
    out = tmp_path / "scores"
    status = main(["score", "--model", str(cli_model), str(listing), "--out", str(out), "--overlays", "none", "--allow-errors", "-q"])
    assert status == 0
    rows = list(csv.DictReader(open(out / "scores.csv", newline="")))
    assert len(rows) == 2
    assert rows[0]["error"] == ""
    assert "missing.png" in rows[1]["path"]
    assert not (out / "overlays").exists()


def test_fit_skips_bad_files_and_strict_stops(demo_data, tmp_path):
    folder = tmp_path / "train"
    shutil.copytree(demo_data / "train" / "good", folder)
    bad = write_bad_images(folder)
    command = [sys.executable, "-m", "patchindex.cli", "fit", "--data", str(folder), "--quiet"]

    lenient = subprocess.run([*command, "--out", str(tmp_path / "m1")], capture_output=True, text=True)
    strict = subprocess.run([*command, "--out", str(tmp_path / "m2"), "--strict"], capture_output=True, text=True)

    assert lenient.returncode == 0, lenient.stderr
    assert "3 skipped" in lenient.stdout
    # Held-back calibration images that fail are named in a warning of their own.
    warning_lines = [line for line in lenient.stderr.splitlines() if "unreadable" in line]
    assert 1 <= len(warning_lines) <= 2
    assert all(any(str(path) in line for line in warning_lines) for path in bad)
    assert strict.returncode == 2
    assert "corrupt.png" in strict.stderr
    assert "Traceback" not in strict.stderr
    assert not (tmp_path / "m2").exists()


def test_missing_data_is_clear_error(tmp_path, capsys):
    assert main(["fit", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m"), "-q"]) == 2
    assert "image source not found" in capsys.readouterr().err


def test_fit_checks_out_before_work(demo_data, tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["fit", "--data", str(demo_data), "--out", str(target), "-q"]) == 2
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--data", str(demo_data), "--out", str(tmp_path / "m"), "--crop", "0"])


def test_score_missing_input_gets_row(cli_model, demo_data, tmp_path):
    out = tmp_path / "scores"
    good = demo_data / "test" / "good" / "000.png"
    status = main(["score", "--model", str(cli_model), str(good), str(tmp_path / "missing.png"), "--out", str(out), "-q"])
    rows = list(csv.DictReader(open(out / "scores.csv", newline="")))
    assert status == 1
    assert [row["error"] for row in rows] == ["", "file not found"]


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "-q"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "demo" / "evaluation.json").read_text())
    assert report["image_auroc"] >= 0.95
    assert report["pixel_auroc"] >= 0.95
    assert (tmp_path / "demo" / "model" / "index.faiss").is_file()
    assert len(list((tmp_path / "demo" / "scores" / "overlays").glob("*.png"))) == 34
    assert str(tmp_path / "demo" / "scores" / "scores.csv") in out


def test_size_options_parse():
    from patchindex.cli import _build_parser

    parser = _build_parser()
    args = parser.parse_args(["fit", "--data", "d", "--out", "o", "--resize", "256x320", "--crop", "none"])
    assert args.resize == (256, 320)
    assert args.crop is None
    for bad in ("0", "-5", "12x", "axb"):
        with pytest.raises(SystemExit):
            parser.parse_args(["fit", "--data", "d", "--out", "o", "--crop", bad])


def test_score_long_names_and_threshold(cli_model, demo_data, tmp_path):
    long_name = tmp_path / ("a" * 250 + ".png")
    shutil.copy(demo_data / "test" / "good" / "000.png", long_name)
    out = tmp_path / "scores"

    status = main(["score", "--model", str(cli_model), str(long_name), "--out", str(out), "--threshold", "0.001", "-q"])

    assert status == 0
    rows = list(csv.DictReader(open(out / "scores.csv", newline="")))
    assert rows[0]["decision"] == "anomalous"
    assert len(list((out / "overlays").glob("*.png"))) == 1
    with pytest.raises(SystemExit):
        main(["score", "--model", str(cli_model), str(long_name), "--out", str(out), "--threshold", "1", "--fpr", "0.1"])


def test_fit_out_under_a_file_rejected(demo_data, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["fit", "--data", str(demo_data), "--out", str(tmp_path / "afile" / "sub"), "-q"]) == 2
    assert "cannot create --out" in capsys.readouterr().err


def test_score_weights_override(cli_model, demo_data, tmp_path, capsys):
    status = main(["score", "--model", str(cli_model), str(demo_data / "test" / "good" / "000.png"),
                   "--out", str(tmp_path / "s"), "--weights", str(tmp_path / "missing.pth"), "-q"])
    assert status == 2
    assert "missing.pth" in capsys.readouterr().err


def test_fit_rejects_bad_index_before_work(demo_data, tmp_path, capsys):
    status = main(["fit", "--data", str(demo_data), "--out", str(tmp_path / "model"), "--index", "IVF8,PQ7", "-q"])
    error = capsys.readouterr().err
    assert status == 2
    assert "invalid index 'IVF8,PQ7' for dimension 152" in error
    assert "Error in" not in error
    assert not (tmp_path / "model").exists()


def test_search_options_on_loaded_model(cli_model, demo_data, capsys):
    status = main(["evaluate", "--model", str(cli_model), "--data", str(demo_data), "--nprobe", "4", "-q"])
    assert status == 2
    assert "nprobe applies to IVF indexes, but this index is 'Flat'" in capsys.readouterr().err
    completed = subprocess.run([sys.executable, "-m", "patchindex.cli", "score", "--help"], capture_output=True, text=True)
    assert "--ef-search" in completed.stdout
    assert "--nprobe" in completed.stdout
