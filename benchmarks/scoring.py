"""Scoring throughput of the patchindex batch job against anomalib 2.7's PatchCore, in one run.

Both score the same image files with the same backbone weights and the same memory bank.
anomalib's ``PatchcoreModel`` is built for ``tf_efficientnet_lite0`` stages 2 and 3 without
pretrained weights, and the fitted patchindex model's backbone state dict and memory bank are
then loaded into it. Images are squeezed to 256 x 256 without a crop, which is the default
pre-processing of anomalib 2.7's PatchCore, and normalized with the backbone's mean and std of
0.5. The patchindex model must therefore be fitted with ``--resize 256x256 --crop none``, and
without ``--model`` one is fitted here.

patchindex runs its whole job (decode in background threads, score, anomaly maps at each
image's own size into gzip-compressed HDF5, results table). anomalib runs its torch model on
batches from a torch DataLoader over its ``PredictDataset`` with as many worker processes, and
keeps scores and 256 x 256 maps in memory, with no Lightning engine and nothing written. Passes
alternate between the two. Each pass is timed as a whole, so it includes listing the files
and, for anomalib, starting the DataLoader workers.

Needs an environment with both packages, for example a venv with anomalib 2.7 and this
repository's dependencies:

    PYTHONPATH=. python benchmarks/scoring.py --data magnetic_tile/magnetic_tile/test
    PYTHONPATH=. python benchmarks/scoring.py --model MODEL_DIR --data magnetic_tile/magnetic_tile/test --passes 2
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def link_images(source: Path, folder: Path, limit: int | None) -> list[Path]:
    """Link the images below `source` into one flat folder, so both tools read the same files."""
    from patchindex.data import resolve_images

    folder.mkdir(parents=True)
    images = resolve_images(source)[:limit]
    links = []
    for number, path in enumerate(images):
        link = folder / f"{number:06d}_{path.name}"
        link.symlink_to(path.resolve())
        links.append(link)
    return links


def fit_model(data: Path, out: Path) -> None:
    from patchindex.cli import main

    status = main(["fit", "--data", str(data), "--out", str(out), "--resize", "256x256", "--crop", "none", "--quiet"])
    if status != 0:
        raise RuntimeError(f"patchindex fit on {data} failed with status {status}")


def build_anomalib_model(model):
    """Return anomalib's PatchcoreModel with the backbone weights and memory bank of `model`."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    layers = list(model.feature_extractor_.out_indices)
    anomalib_model = PatchcoreModel(
        layers=layers, backbone=model.feature_extractor_.backbone, pre_trained=False, num_neighbors=model.num_neighbors
    )
    anomalib_model.feature_extractor.feature_extractor.load_state_dict(model.feature_extractor_.body.state_dict(), strict=True)
    anomalib_model.memory_bank = torch.from_numpy(np.ascontiguousarray(model.memory_bank_))
    return anomalib_model.eval()


def run_anomalib(anomalib_model, folder: Path, batch_size: int, workers: int, mean, std) -> tuple[float, dict[str, float]]:
    """Score every image in `folder`; return (seconds, image score by path)."""
    from anomalib.data import PredictDataset
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    transform = Compose([Resize((256, 256), antialias=True), Normalize(mean=list(mean), std=list(std))])
    dataset = PredictDataset(folder, transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=dataset.collate_fn, shuffle=False
    )
    scores, maps = {}, []
    started = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            output = anomalib_model(batch.image)
            maps.append(output.anomaly_map.numpy())
            for path, score in zip(batch.image_path, output.pred_score.numpy().ravel()):
                scores[os.path.abspath(path)] = float(score)
    return time.perf_counter() - started, scores


def run_patchindex(model, folder: Path, out: Path, batch_size: int, workers: int):
    """Run the scoring job into the new folder `out`; return (seconds, image score by path, summary)."""
    from patchindex.scoring_job import run_scoring_job

    started = time.perf_counter()
    summary = run_scoring_job(model, folder, out, overlays="none", workers=workers, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - started

    with open(out / "scores.csv", newline="", encoding="utf-8") as handle:
        scores = {row["path"]: float(row["raw_score"]) for row in csv.DictReader(handle) if row["raw_score"]}
    return seconds, scores, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="magnetic_tile/magnetic_tile/test", help="images to score, a path under ../shared/data")
    parser.add_argument("--model", default=None, help="patchindex model folder fitted with --resize 256x256 --crop none")
    parser.add_argument("--fit-data", default="mvtec_ad/bottle", help="dataset to fit a model on when --model is not given")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images")
    parser.add_argument("--passes", type=int, default=2, help="timed passes of each tool, alternating (default 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="decode threads (patchindex) and DataLoader processes (anomalib)")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()

    import anomalib

    from patchindex import PatchCore

    with tempfile.TemporaryDirectory(prefix="patchindex-scoring-bench-") as work:
        work = Path(work)
        model_dir = Path(args.model) if args.model else work / "model"
        if args.model is None:
            fit_model(DATA / args.fit_data, model_dir)
        model = PatchCore.load(model_dir)
        model.progress = False
        if (model.resize, model.crop) not in (([256, 256], None), ((256, 256), None)):
            raise ValueError(f"the model must be fitted with --resize 256x256 --crop none, got resize {model.resize}, crop {model.crop}")
        anomalib_model = build_anomalib_model(model)
        links = link_images(DATA / args.data, work / "images", args.limit)

        timings = {"patchindex": [], "anomalib": []}
        summaries = []
        for number in range(args.passes):
            seconds, ours, summary = run_patchindex(model, work / "images", work / f"out{number}", args.batch_size, args.workers)
            timings["patchindex"].append(seconds)
            summaries.append(summary)
            seconds, theirs = run_anomalib(
                anomalib_model, work / "images", args.batch_size, args.workers,
                model.preprocessor_.mean, model.preprocessor_.std,
            )
            timings["anomalib"].append(seconds)
            print(f"pass {number + 1}: patchindex {timings['patchindex'][-1]:.1f} s, anomalib {seconds:.1f} s", flush=True)

    n_images = len(links)
    common = sorted(set(ours) & set(theirs))
    ratios = np.array([ours[path] / theirs[path] for path in common])
    correlation = float(np.corrcoef([ours[p] for p in common], [theirs[p] for p in common])[0, 1])
    best = {tool: min(values) for tool, values in timings.items()}
    rate = {tool: n_images / seconds for tool, seconds in best.items()}
    stages = summaries[int(np.argmin(timings["patchindex"]))].stage_seconds

    command = "python " + " ".join(shlex.quote(part) for part in sys.argv)
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [
        "",
        f"## scoring.py, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{command}` at commit {revision or 'unknown'}",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, anomalib {anomalib.__version__}; backbone {model.backbone}, resize 256x256, no crop, "
        f"memory bank {model.memory_bank_.shape[0]} x {model.memory_bank_.shape[1]}, batch size {args.batch_size}, "
        f"{args.workers} decode workers.",
        f"{n_images} images of {args.data}; best of {args.passes} alternating passes per tool.",
        "",
        "| tool | seconds | images/s |",
        "|---|---|---|",
        f"| patchindex job (maps to HDF5, table) | {best['patchindex']:.1f} | {rate['patchindex']:.2f} |",
        f"| anomalib PatchcoreModel + DataLoader | {best['anomalib']:.1f} | {rate['anomalib']:.2f} |",
        "",
        f"Throughput ratio patchindex / anomalib: {rate['patchindex'] / rate['anomalib']:.2f}x. "
        f"patchindex stage seconds (decode summed over workers): "
        + ", ".join(f"{stage} {value:.1f}" for stage, value in stages.items())
        + f". Image scores of the two agree with correlation {correlation:.4f} and a median ratio of "
        f"{np.median(ratios):.4f} (min {ratios.min():.4f}, max {ratios.max():.4f}) over {len(common)} images.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        with open(RESULTS, "a", encoding="utf-8") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
