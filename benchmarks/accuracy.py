"""Fit, evaluate and time PatchCore on the real datasets through the command line.

For each dataset, runs ``patchindex fit`` and ``patchindex evaluate --json`` in fresh processes,
measures the wall time and peak RSS of the fit, and appends a table to benchmarks/RESULTS.md.
Image AUROC and pixel AUROC are compared with anomalib 2.7's figures on the same data (same
backbone, resize 256, crop 224, coreset ratio 0.1) as ratios.

    python benchmarks/accuracy.py                       # the three default datasets
    python benchmarks/accuracy.py --datasets mvtec_ad/bottle
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
DEFAULT_DATASETS = ("mvtec_ad/bottle", "mpdd/metal_plate", "magnetic_tile/magnetic_tile")

# anomalib 2.7 PatchCore with tf_efficientnet_lite0 stages 2 and 3, 256 px, crop 224, ratio 0.1,
# measured on this data on a 2-core machine. Its fit on bottle took about 1000 s.
ANOMALIB_REFERENCE = {"mvtec_ad/bottle": {"image_auroc": 1.000, "pixel_auroc": 0.979, "fit_seconds": 1000.0}}

# Runs a CLI command in a child process and prints its peak RSS (KiB) as the last line.
_RUN_WITH_RSS = (
    "import resource, sys\n"
    "from patchindex.cli import main\n"
    "status = main(sys.argv[1:])\n"
    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"
    "sys.exit(status)\n"
)


def run_cli(arguments: list[str]) -> tuple[str, float, int]:
    """Run ``patchindex ARGUMENTS`` in a child process; return (stdout, seconds, peak RSS in KiB)."""
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-c", _RUN_WITH_RSS, *arguments], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"patchindex {' '.join(arguments)} failed:\n{completed.stderr[-3000:]}")
    lines = completed.stdout.strip().splitlines()
    rss = int(lines[-1].split()[1])
    return "\n".join(lines[:-1]), seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), help="paths under ../shared/data")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--resize", default="256", help="passed to patchindex fit --resize")
    parser.add_argument("--crop", default="224", help="passed to patchindex fit --crop")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="patchindex-bench-") as work:
        for name in args.datasets:
            data = DATA / name
            model = Path(work) / name.replace("/", "_")
            _, fit_seconds, fit_rss = run_cli(
                ["fit", "--data", str(data), "--out", str(model), "--backbone", args.backbone,
                 "--coreset-ratio", str(args.coreset_ratio), "--resize", args.resize, "--crop", args.crop, "--quiet"]
            )
            output, eval_seconds, _ = run_cli(["evaluate", "--model", str(model), "--data", str(data), "--json", "--quiet"])
            report = json.loads(output.splitlines()[-1])
            config = json.loads((model / "config.json").read_text())
            row = {
                "dataset": name,
                "train_images": config["training"]["n_images"],
                "patches": config["training"]["n_patches"],
                "bank": config["memory_bank"]["shape"][0],
                "fit_s": fit_seconds,
                "fit_rss_mib": fit_rss / 1024,
                "eval_s": eval_seconds,
                **report,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)

    command = "python " + " ".join(shlex.quote(part) for part in sys.argv)
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [
        "",
        f"## accuracy.py, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{command}` at commit {revision or 'unknown'}",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"backbone {args.backbone}, resize {args.resize}, crop {args.crop}, coreset ratio {args.coreset_ratio}.",
        "Fit wall time and peak RSS are of the whole `patchindex fit` process (model load, feature "
        "extraction, coreset, index, save).",
        "",
        "| dataset | train images | patches | bank | fit s | fit peak RSS MiB | image AUROC | pixel AUROC | PRO | test images |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        pixel = "n/a" if row["pixel_auroc"] is None else f"{row['pixel_auroc']:.4f}"
        pro = "n/a" if row["pro"] is None else f"{row['pro']:.4f}"
        lines.append(
            f"| {row['dataset']} | {row['train_images']} | {row['patches']} | {row['bank']} | {row['fit_s']:.1f} | "
            f"{row['fit_rss_mib']:.0f} | {row['image_auroc']:.4f} | {pixel} | {pro} | {row['n_images']} |"
        )
    for row in rows:
        reference = ANOMALIB_REFERENCE.get(row["dataset"])
        if reference is None or (args.resize, args.crop, args.coreset_ratio) != ("256", "224", 0.1):
            continue
        lines.append("")
        lines.append(
            f"{row['dataset']} against anomalib 2.7 (reference figures from an earlier run on this machine type, "
            f"not this run): image AUROC {row['image_auroc']:.4f} vs {reference['image_auroc']:.3f}, pixel AUROC "
            f"{row['pixel_auroc']:.4f} vs {reference['pixel_auroc']:.3f}, fit time {row['fit_s']:.0f} s vs about "
            f"{reference['fit_seconds']:.0f} s (ratio {reference['fit_seconds'] / row['fit_s']:.1f}x)."
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        if not RESULTS.exists():
            RESULTS.write_text("# Benchmark results\n\nEach section is appended by the script it names.\n", encoding="utf-8")
        with open(RESULTS, "a", encoding="utf-8") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
