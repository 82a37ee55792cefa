"""Command-line interface: ``patchindex fit | evaluate | score | demo``."""

from __future__ import annotations

import argparse
import csv
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
    fit.add_argument("--store-dir", default=None, help="keep the HDF5 embedding shards in this folder")
    fit.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    _add_common(fit)

    evaluate = commands.add_parser("evaluate", help="compute image AUROC, pixel AUROC and PRO on an MVTec AD test split")
    evaluate.add_argument("--model", required=True, help="model folder written by 'patchindex fit'")
    evaluate.add_argument("--data", required=True, help="MVTec AD category folder with test/ and ground_truth/")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object on standard output")
    _add_weights_override(evaluate)
    _add_search_options(evaluate, "the value saved with the model")
    _add_common(evaluate)

    score = commands.add_parser("score", help="score images: a CSV of image scores and PNG heatmap overlays")
    score.add_argument("--model", required=True, help="model folder written by 'patchindex fit'")
    score.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, globs or text files listing paths")
    score.add_argument("--out", required=True, help="output folder for scores.csv and overlays/")
    score.add_argument("--overlays", choices=("all", "none"), default="all", help="write a PNG overlay per image (default all)")
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


def _fit_and_save(args: argparse.Namespace, out: Path) -> int:
    from .estimator import PatchCore

    model = PatchCore(
        args.backbone,
        weights=args.weights,
        coreset_ratio=args.coreset_ratio,
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
    model.fit(args.data)
    model.save(out)
    print(
        f"fitted {args.backbone} on {model.n_train_images_} images ({model.n_train_patches_} patches, "
        f"{len(model.skipped_images_)} skipped): memory bank of {len(model.memory_bank_)} "
        f"in {time.perf_counter() - started:.1f} s; model saved to {args.out}"
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


def score_to_folder(model, inputs, out: Path, overlays: str = "all") -> tuple[int, int]:
    """Score `inputs` with `model`, writing out/scores.csv and out/overlays/*.png.

    Rows are written and flushed as images finish, so an interrupted job keeps them. Returns
    (number scored, number failed).
    """
    from .data import load_image
    from .visualize import save_overlay

    out.mkdir(parents=True, exist_ok=True)
    overlay_dir = out / "overlays"
    stale = list(overlay_dir.glob("[0-9][0-9][0-9][0-9][0-9]_*.png"))
    for path in stale:
        path.unlink()
    if stale:
        logger.info("removed %d overlays of an earlier run from %s", len(stale), overlay_dir)
    if overlays != "none":
        overlay_dir.mkdir(exist_ok=True)

    # One color scale for every image of the model: from the typical training patch score
    # (99th percentile) to three times that value.
    reference = getattr(model, "training_patch_score_p99_", None)
    vmin, vmax = (reference, 3.0 * reference) if reference else (0.0, None)

    scored = failed = 0
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score", "overlay", "error"])
        for number, result in enumerate(model.iter_predict(inputs)):
            overlay = ""
            if result.error is None and overlays != "none" and result.path is not None:
                # The stem is shortened so that the number prefix keeps the name under 255 bytes.
                overlay_path = overlay_dir / f"{number:05d}_{Path(result.path).stem[:100]}.png"
                try:
                    save_overlay(
                        overlay_path, load_image(result.path), result.anomaly_map, result.score,
                        vmin=vmin, vmax=vmax, title=result.path,
                    )
                    overlay = str(overlay_path)
                except OSError as error:
                    logger.warning("cannot write the overlay of %s: %s", result.path, error)
            if result.error is None:
                scored += 1
                writer.writerow([result.path, f"{result.score:.6f}", overlay, ""])
            else:
                failed += 1
                logger.warning("cannot score %s: %s", result.path, result.error)
                writer.writerow([result.path, "", "", result.error])
            handle.flush()
    return scored, failed


def _run_score(args: argparse.Namespace) -> int:
    model = _load_model(args)
    out = Path(args.out)
    scored, failed = score_to_folder(model, args.inputs, out, args.overlays)
    print(f"scored {scored} images, {failed} failed; results in {out / 'scores.csv'}")
    return 1 if failed and not args.allow_errors else 0


def _run_demo(args: argparse.Namespace) -> int:
    from ._demo import make_demo_dataset
    from .estimator import PatchCore

    out = Path(args.out)
    data = make_demo_dataset(out / "data")
    model = PatchCore(**_overrides(args)).fit(data)
    model.save(out / "model")
    report = model.evaluate(data)
    (out / "evaluation.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    test_images = sorted((data / "test").glob("*/*.png"))
    scored, failed = score_to_folder(model, test_images, out / "scores")

    print(f"demo dataset:  {data}")
    print(f"model:         {out / 'model'}")
    print(
        f"evaluation:    {out / 'evaluation.json'} (image AUROC {report['image_auroc']:.3f}, "
        f"pixel AUROC {report['pixel_auroc']:.3f}, PRO {report['pro']:.3f})"
    )
    print(f"scores:        {out / 'scores' / 'scores.csv'} ({scored} images, {failed} failed)")
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
