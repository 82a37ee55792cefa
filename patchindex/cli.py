"""Command-line interface: ``patchindex fit | evaluate | score | demo``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

__all__ = ["main"]

logger = logging.getLogger("patchindex")


def _size(text: str) -> int | tuple[int, int] | None:
    """Parse a --resize or --crop value: pixels N, HEIGHTxWIDTH, or 'none'."""
    if text.lower() == "none":
        return None
    try:
        values = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive pixels N or HEIGHTxWIDTH, or 'none', got {text!r}")
    return values[0] if len(values) == 1 else values


def _add_weights_override(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights", default=None,
        help="backbone weights file to use when the one the model was fitted with has moved; it must hold the same weights",
    )


def _add_search_options(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--nprobe", type=int, default=None, help=f"inverted lists an IVF index visits per query (default: {default})"
    )
    parser.add_argument(
        "--ef-search", type=int, default=None, help=f"candidate list size of an HNSW index search (default: {default})"
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors, no progress bars")
    parser.add_argument("--device", default=None, help="torch device for the backbone and coreset, e.g. cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="images per backbone forward pass (default 8)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchindex", description="PatchCore anomaly detection: fit, evaluate and score.")
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="fit a memory bank on normal images and save the model")
    fit.add_argument("--data", required=True, help="MVTec AD category (uses train/good), image folder, glob or list file")
    fit.add_argument("--out", required=True, help="model folder to write")
    fit.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm backbone name (default tf_efficientnet_lite0)")
    fit.add_argument("--weights", default="imagenet", help="'imagenet' (default), a state-dict file, or 'random'")
    fit.add_argument("--coreset-ratio", type=float, default=0.1, help="fraction of training patches kept (default 0.1)")
    fit.add_argument("--seed", type=int, default=0, help="random seed of the projection and the first coreset center")
    fit.add_argument(
        "--resize", type=_size, default=256,
        help="resize: N pixels for the shorter side, HEIGHTxWIDTH, or 'none' (default 256)",
    )
    fit.add_argument(
        "--crop", type=_size, default=224,
        help="center crop: N or HEIGHTxWIDTH pixels, or 'none' for the whole image (default 224)",
    )
    fit.add_argument(
        "--index", default="Flat",
        help="FAISS index factory string for the memory bank: Flat (exact, default), IVF<nlist>,Flat, "
        "IVF<nlist>,PQ<m>, HNSW<M>, or auto (chosen from the bank size for --recall-target)",
    )
    fit.add_argument("--recall-target", type=float, default=0.99, help="recall@1 that --index auto tunes for (default 0.99)")
    _add_search_options(fit, "the FAISS default, or the value that --index auto tunes")
    fit.add_argument("--num-neighbors", type=int, default=9, help="support set size of the image-score reweighting; 1 takes the maximum patch score (default 9)")
    fit.add_argument("--embedding-dim", type=int, default=None, help="reduce patch embeddings to this many channels (default: keep all)")
    fit.add_argument(
        "--coreset-method", choices=("auto", "exact", "approximate"), default="auto",
        help="exact k-center greedy, or greedy per shard then over the union (default auto: exact up to about 4M patches)",
    )
    fit.add_argument(
        "--store-dir", default=None,
        help="keep the HDF5 embedding shards in this folder; a rerun with the same inputs resumes or reuses them",
    )
    fit.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    fit.add_argument(
        "--calibration-fraction", type=float, default=None,
        help="fraction of the normal images held back from the memory bank to calibrate decision thresholds "
        "(default 0.1 without --calibration-data; 0 for none)",
    )
    fit.add_argument(
        "--calibration-data", default=None,
        help="folder, glob or list file of other normal images to calibrate on; then no training image is held back",
    )
    _add_common(fit)

    evaluate = commands.add_parser("evaluate", help="compute image AUROC, pixel AUROC and PRO on an MVTec AD test split")
    evaluate.add_argument("--model", required=True, help="model folder written by 'patchindex fit'")
    evaluate.add_argument("--data", required=True, help="MVTec AD category folder with test/ and ground_truth/")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object on standard output")
    _add_weights_override(evaluate)
    _add_search_options(evaluate, "the value saved with the model")
    _add_common(evaluate)

    score = commands.add_parser(
        "score", help="score images into a resumable folder: a table of scores and decisions, anomaly maps, overlays"
    )
    score.add_argument("--model", required=True, help="model folder written by 'patchindex fit'")
    score.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, globs or text files listing paths")
    score.add_argument(
        "--out", required=True,
        help="output folder; a rerun into it skips images already scored (same path, size and modification time)",
    )
    score.add_argument(
        "--overlays", choices=("all", "anomalous", "none"), default=None,
        help="images that get a PNG heatmap overlay (default: anomalous when there is a threshold, else none)",
    )
    decision = score.add_mutually_exclusive_group()
    decision.add_argument(
        "--fpr", type=float, default=0.01,
        help="target false-positive rate on normal images that sets the decision threshold from the model's calibration (default 0.01)",
    )
    decision.add_argument("--threshold", type=float, default=None, help="decision threshold on the raw image score, instead of --fpr")
    score.add_argument(
        "--max-pixels", type=int, default=50_000_000,
        help="images with more pixels (width x height) get an error row instead of being decoded (default 50000000)",
    )
    score.add_argument("--workers", type=int, default=2, help="background threads that decode images (default 2)")
    score.add_argument("--allow-errors", action="store_true", help="exit with status 0 even when some images failed")
    _add_weights_override(score)
    _add_search_options(score, "the value saved with the model")
    _add_common(score)

    demo = commands.add_parser("demo", help="fit, evaluate and score a small built-in synthetic dataset")
    demo.add_argument("--out", default="patchindex-demo", help="output folder (default ./patchindex-demo)")
    _add_common(demo)
    return parser


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("faiss").setLevel(logging.WARNING)


def _overrides(args: argparse.Namespace) -> dict:
    values = {"progress": not args.quiet}
    if args.device:
        values["device"] = args.device
    if args.batch_size is not None:
        values["batch_size"] = args.batch_size
    return values


def _load_model(args: argparse.Namespace):
    from .estimator import PatchCore

    model = PatchCore.load(args.model, weights=args.weights, device=args.device)
    for name, value in _overrides(args).items():
        setattr(model, name, value)
    if args.nprobe is not None or args.ef_search is not None:
        model.set_search_params(nprobe=args.nprobe, ef_search=args.ef_search)
    return model


def _run_fit(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder; choose a folder for the model")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create --out {out}: {error.strerror}") from None
    try:
        return _fit_and_save(args, out)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


def _calibration_fraction(args: argparse.Namespace) -> float:
    """Return the fit's calibration_fraction: 0.1 by default, 0 with --calibration-data."""
    if args.calibration_data is None:
        return 0.1 if args.calibration_fraction is None else args.calibration_fraction
    if args.calibration_fraction:
        raise ValueError(
            f"--calibration-fraction {args.calibration_fraction} and --calibration-data are both given; "
            "use one of them (with --calibration-data no training image is held back)"
        )
    return 0.0


def _fit_and_save(args: argparse.Namespace, out: Path) -> int:
    from .estimator import PatchCore

    model = PatchCore(
        args.backbone,
        calibration_fraction=_calibration_fraction(args),
        weights=args.weights,
        coreset_ratio=args.coreset_ratio,
        coreset_method=args.coreset_method,
        random_state=args.seed,
        resize=args.resize,
        crop=args.crop,
        num_neighbors=args.num_neighbors,
        index=args.index,
        recall_target=args.recall_target,
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        embedding_dim=args.embedding_dim,
        store_dir=args.store_dir,
        strict=args.strict,
        **_overrides(args),
    )
    started = time.perf_counter()
    model.fit(args.data, calibration_source=args.calibration_data)
    model.save(out)
    print(
        f"fitted {args.backbone} on {model.n_train_images_} images ({model.n_train_patches_} patches, "
        f"{len(model.skipped_images_)} skipped): memory bank of {len(model.memory_bank_)} "
        f"in {time.perf_counter() - started:.1f} s; model saved to {args.out}"
    )
    if model.calibration_ is None:
        print("the model is not calibrated: 'score' gives no decisions unless it gets --threshold")
    else:
        calibration = model.calibration_
        print(
            f"calibrated on {calibration.source}: threshold {calibration.threshold():.6g} "
            f"at a false-positive rate of 0.01 (the smallest these images can set is {calibration.min_fpr():.3g})"
        )
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    report = _load_model(args).evaluate(args.data)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            if value is None:
                value = "n/a (no masks)"
            elif key in ("image_auroc", "pixel_auroc", "pro"):
                value = f"{value:.4f}"
            print(f"{key}: {value}")
    return 0


def _run_score(args: argparse.Namespace) -> int:
    from .scoring_job import run_scoring_job

    model = _load_model(args)
    summary = run_scoring_job(
        model, args.inputs, Path(args.out), overlays=args.overlays, fpr=args.fpr, threshold=args.threshold,
        max_pixels=args.max_pixels, workers=args.workers, progress=not args.quiet,
    )
    print(summary.report())
    return 1 if summary.n_failed and not args.allow_errors else 0


def _run_demo(args: argparse.Namespace) -> int:
    from ._demo import make_demo_dataset
    from .estimator import PatchCore

    out = Path(args.out)
    data = make_demo_dataset(out / "data")
    from .scoring_job import run_scoring_job

    model = PatchCore(calibration_fraction=0.1, **_overrides(args)).fit(data)
    model.save(out / "model")
    report = model.evaluate(data)
    (out / "evaluation.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    test_images = sorted((data / "test").glob("*/*.png"))
    summary = run_scoring_job(model, test_images, out / "scores", overlays="all", progress=not args.quiet)

    print(f"demo dataset:  {data}")
    print(f"model:         {out / 'model'}")
    print(
        f"evaluation:    {out / 'evaluation.json'} (image AUROC {report['image_auroc']:.3f}, "
        f"pixel AUROC {report['pixel_auroc']:.3f}, PRO {report['pro']:.3f})"
    )
    print(f"scores:        {out / 'scores' / 'scores.csv'} ({summary.n_scored} images, {summary.n_failed} failed)")
    print(f"overlays:      {out / 'scores' / 'overlays'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    runners = {"fit": _run_fit, "evaluate": _run_evaluate, "score": _run_score, "demo": _run_demo}
    try:
        return runners[args.command](args)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"patchindex {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
