"""The PatchCore estimator: fit a memory bank on normal images, then score new images."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import numbers
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .calibration import Calibration
from .coreset import (
    SparseRandomProjection,
    approximate_k_center_greedy,
    check_coreset_ratio,
    coreset_size,
    k_center_greedy,
    project_chunks,
)
from .data import (
    Geometry,
    ImageLoadError,
    Preprocessor,
    UnreadableSource,
    describe_input,
    expand_score_inputs,
    expand_training_inputs,
    iter_batches,
    load_image,
    load_mask,
    load_test_split,
    to_rgb,
)
from .features import FeatureExtractor, default_normalization
from .index import MemoryBankIndex, check_index_spec
from .metrics import image_auroc, pixel_auroc, pro_score
from .scoring import anomaly_map, reweighted_image_scores
from .store import ShardStore, ShardWriter

__all__ = ["FORMAT_VERSION", "ImageResult", "PatchCore", "Prediction"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
BANK_FILE = "memory_bank.npy"
INDEX_FILE = "index.faiss"
# The "auto" coreset method runs the exact greedy while the projected matrix takes at most this
# many bytes (4.2M patches at 128 float32 dimensions), and the approximate one above it.
EXACT_CORESET_MAX_BYTES = 2 << 30
_PROJECTION_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class ImageResult:
    """The result for one input image; `error` is set, and the rest empty, when it failed."""

    path: str | None
    score: float = float("nan")
    anomaly_map: np.ndarray | None = None
    error: str | None = None
    geometry: Geometry | None = None


def _warn_partial_coverage(coverage: list[tuple[str, Geometry]], stage: str) -> None:
    """Warn once when the center crop drops more than half of some images."""
    partial = [(name, geometry) for name, geometry in coverage if geometry.coverage < 0.5]
    if not partial:
        return
    name, geometry = min(partial, key=lambda item: item[1].coverage)
    logger.warning(
        "%s: the center crop keeps less than half of %d of %d images (least: %.0f%% of %s), and "
        "anomalies outside the crop are not seen. To cover whole images, fit with crop=None "
        "(fit --crop none) or a square resize such as (256, 256) (fit --resize 256x256)",
        stage, len(partial), len(coverage), 100 * geometry.coverage, name,
    )


@dataclass
class Prediction:
    """Image scores (n,) float32 and anomaly maps, one (H_i, W_i) float32 array per image."""

    scores: np.ndarray
    anomaly_maps: list[np.ndarray] = field(default_factory=list)
    paths: list[str | None] = field(default_factory=list)


def _add_seconds(timings: dict | None, stage: str, started: float) -> float:
    """Add the seconds since `started` to timings[stage] and return the current clock."""
    now = time.perf_counter()
    if timings is not None:
        timings[stage] = timings.get(stage, 0.0) + (now - started)
    return now


def _inputs_digest(items: list) -> str:
    """SHA-256 over the training inputs: path, size and modification time, or array content."""
    digest = hashlib.sha256()
    for item in items:
        if isinstance(item, (str, os.PathLike, UnreadableSource)):
            name = describe_input(item)
            try:
                stat = os.stat(name)
                digest.update(f"{name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{name}|unreadable\n".encode())
        else:
            array = np.asarray(item)
            digest.update(f"array|{array.shape}|{array.dtype}|".encode())
            digest.update(hashlib.sha256(np.ascontiguousarray(array).tobytes()).digest())
    return digest.hexdigest()


def _feature_grid(store: ShardStore) -> tuple[int, int] | None:
    """Feature grid (rows, columns) of the store's first image, from its patch positions."""
    for _, image_index, position in store.iter_chunks(chunk_rows=1 << 16, fields=("image_index", "patch_position")):
        first = position[image_index == image_index[0]]
        return int(first[:, 0].max()) + 1, int(first[:, 1].max()) + 1
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_CONFIG_KEYS = {
    "params": dict,
    "backbone": {"name": str, "out_indices": list, "weights_source": str, "weights_sha256": str},
    "memory_bank": {"shape": list},
    "index": {"factory": str},
}


def _read_config(path: Path) -> dict:
    """Read and check a model's config.json, raising ValueError that names the file."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must contain a JSON object, found {type(config).__name__}")

    version = config.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {version!r}, but this patchindex {__version__} reads version "
            f"{FORMAT_VERSION}; fit the model again with this version"
        )
    for section, fields in _CONFIG_KEYS.items():
        value = config.get(section)
        if not isinstance(value, dict):
            raise ValueError(f"{path} is missing the '{section}' section; save the model again")
        if isinstance(fields, dict):
            for name, kind in fields.items():
                if not isinstance(value.get(name), kind):
                    raise ValueError(f"{path} is missing '{section}.{name}'; save the model again")
    return config


def _read_training(config: dict, path: Path) -> dict:
    """Return the optional 'training' section of a config, checking the types of its fields."""
    training = config.get("training", {})
    valid = isinstance(training, dict)
    if valid:
        grid = training.get("feature_grid")
        skipped = training.get("skipped_images", [])
        reference = training.get("patch_score_p99")
        valid = (
            (grid is None or (isinstance(grid, list) and len(grid) == 2 and all(_is_int(v) for v in grid)))
            and isinstance(skipped, list)
            and all(isinstance(item, list) and len(item) == 2 for item in skipped)
            and (reference is None or (isinstance(reference, (int, float)) and np.isfinite(reference)))
        )
    if not valid:
        raise ValueError(f"{path} has an invalid 'training' section; save the model again")
    return training


class PatchCore:
    """PatchCore anomaly detection with an HDF5-streamed, coreset-subsampled memory bank.

    Parameters
    ----------
    backbone : str
        timm model name; see `patchindex.features.FeatureExtractor`.
    out_indices : two ints or None
        Backbone stages to combine; None takes the backbone's default.
    weights : str or path
        ``"imagenet"`` (offline package or hub), a state-dict file, or ``"random"``.
    resize, crop : int, (height, width) or None
        Preprocessing: an int resize sets the shorter side; the crop is taken at the center.
    embedding_dim : int or None
        Reduce patch embeddings to this many channels; None keeps them all.
    coreset_ratio : float in (0, 1]
        Fraction of training patches kept in the memory bank.
    projection_dim : int
        Dimension of the sparse random projection used for coreset selection.
    projection_dtype : "float32", "float16" or "bfloat16"
        Storage type of the projected matrix during coreset selection. The 16-bit types halve
        its memory, and distances are still computed in float32.
    coreset_method : "auto", "exact" or "approximate"
        "exact" is k-center greedy over all patches (pruned, same result as the plain
        algorithm); "approximate" runs it per HDF5 shard, then over the union of the shards'
        selections, holding one shard at a time. "auto" takes "exact" while the projected
        matrix fits in `EXACT_CORESET_MAX_BYTES`.
    index : str
        FAISS index factory string for the memory bank: ``"Flat"`` (exact search, the default),
        ``"IVF<nlist>,Flat"``, ``"IVF<nlist>,PQ<m>"``, ``"HNSW<M>"`` and other L2 factory
        strings, or ``"auto"``, which chooses from the bank size and tunes to `recall_target`.
    recall_target : float in (0, 1]
        Recall@1 of approximate search that ``index="auto"`` tunes nprobe or efSearch for.
    nprobe, ef_search : int or None
        Search parameters of IVF (inverted lists visited) and HNSW (candidate list size)
        indexes; None keeps the FAISS default or the value ``"auto"`` tuned. Change them on a
        fitted model with `set_search_params`.
    num_neighbors : int
        Support-set size b of the image-score reweighting; 1 gives the maximum patch score.
    blur_sigma : float
        Standard deviation, in pixels of the resized image, of the anomaly-map Gaussian blur.
    batch_size : int
        Images per backbone forward pass.
    device : str
        Torch device for the backbone and the coreset, "cpu" or "cuda".
    store_dtype : "float16" or "float32"
        Type of the patch embeddings streamed to HDF5 during fit.
    shard_rows : int
        Maximum number of patches per HDF5 shard file.
    store_dir : path or None
        Folder for the embedding shards, kept after fit; None uses a temporary folder. A fit
        into a folder that contains the store of an interrupted fit with the same inputs and
        settings resumes it, and a finished store of them is reused.
    strict : bool
        Stop fit at the first unreadable training image instead of skipping it with a warning.
    calibration_fraction : float in [0, 1)
        Fraction of the training images held back from the memory bank and scored to
        calibrate decision thresholds (`calibration_`); 0 holds back none. Must be 0 when
        `fit` gets a `calibration_source`.
    random_state : int or None
        Seed of the random projection and of the coreset's first center.
    progress : bool
        Show tqdm progress bars.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        *,
        out_indices: Sequence[int] | None = None,
        weights: str | os.PathLike = "imagenet",
        resize: int | Sequence[int] | None = 256,
        crop: int | Sequence[int] | None = 224,
        embedding_dim: int | None = None,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        projection_dtype: str = "float32",
        coreset_method: str = "auto",
        index: str = "Flat",
        recall_target: float = 0.99,
        nprobe: int | None = None,
        ef_search: int | None = None,
        num_neighbors: int = 9,
        blur_sigma: float = 4.0,
        batch_size: int = 8,
        device: str = "cpu",
        store_dtype: str = "float16",
        shard_rows: int = 1 << 20,
        store_dir: str | os.PathLike | None = None,
        strict: bool = False,
        calibration_fraction: float = 0.0,
        random_state: int | None = 0,
        progress: bool = True,
    ):
        self.backbone = backbone
        self.out_indices = out_indices
        self.weights = weights
        self.resize = resize
        self.crop = crop
        self.embedding_dim = embedding_dim
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.projection_dtype = projection_dtype
        self.coreset_method = coreset_method
        self.index = index
        self.recall_target = recall_target
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.num_neighbors = num_neighbors
        self.blur_sigma = blur_sigma
        self.batch_size = batch_size
        self.device = device
        self.store_dtype = store_dtype
        self.shard_rows = shard_rows
        self.store_dir = store_dir
        self.strict = strict
        self.calibration_fraction = calibration_fraction
        self.random_state = random_state
        self.progress = progress

    # -----------------------------------------------------------------------------------------
    # Set-up

    def _validate_params(self) -> None:
        for name in ("batch_size", "num_neighbors", "projection_dim", "shard_rows"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.random_state is not None and (not _is_int(self.random_state) or self.random_state < 0):
            raise ValueError(f"random_state must be None or a non-negative integer (the seed), got {self.random_state!r}")
        if not isinstance(self.blur_sigma, numbers.Real) or not 0 <= self.blur_sigma < 1000:
            raise ValueError(f"blur_sigma must be at least 0 and below 1000 pixels, got {self.blur_sigma!r}")
        check_coreset_ratio(self.coreset_ratio)
        if self.store_dtype not in ("float16", "float32"):
            raise ValueError(f"store_dtype must be 'float16' or 'float32', got {self.store_dtype!r}")
        if self.projection_dtype not in _PROJECTION_BYTES:
            raise ValueError(f"projection_dtype must be one of {sorted(_PROJECTION_BYTES)}, got {self.projection_dtype!r}")
        if self.coreset_method not in ("auto", "exact", "approximate"):
            raise ValueError(f"coreset_method must be 'auto', 'exact' or 'approximate', got {self.coreset_method!r}")
        fraction = self.calibration_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 <= fraction < 1:
            raise ValueError(f"calibration_fraction must lie in [0, 1), got {fraction!r}")
        for name in ("nprobe", "ef_search"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
        MemoryBankIndex(self.index, recall_target=self.recall_target)
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"invalid device {self.device!r}; use 'cpu' or 'cuda'") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device {self.device!r} requested but CUDA is not available; use device 'cpu' (--device cpu)"
            )
        Preprocessor(self.resize, self.crop)

    def _build_network(self) -> None:
        self.feature_extractor_ = FeatureExtractor(
            self.backbone, self.out_indices, weights=self.weights, embedding_dim=self.embedding_dim
        ).to(self.device)
        mean, std = default_normalization(self.backbone)
        self.preprocessor_ = Preprocessor(self.resize, self.crop, mean, std)

    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise RuntimeError("this PatchCore is not fitted yet; call fit() or PatchCore.load() first")

    # -----------------------------------------------------------------------------------------
    # Embedding

    def _embed(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run the backbone on preprocessed images, batching those of equal size."""
        outputs: list[torch.Tensor | None] = [None] * len(tensors)
        by_shape: dict[tuple, list[int]] = {}
        for position, tensor in enumerate(tensors):
            by_shape.setdefault(tuple(tensor.shape), []).append(position)
        for positions in by_shape.values():
            batch = torch.stack([tensors[p] for p in positions]).to(self.device)
            embeddings = self.feature_extractor_(batch).float().cpu()
            for row, position in enumerate(positions):
                outputs[position] = embeddings[row]
        return outputs

    def _prepare(self, item: Any, name: str) -> tuple[torch.Tensor, Geometry]:
        """Decode and preprocess one input; raise ImageLoadError with `name` when either fails."""
        if isinstance(item, UnreadableSource):
            raise ImageLoadError(item.text, item.reason)
        try:
            rgb = load_image(item) if isinstance(item, (str, os.PathLike)) else to_rgb(item)
            return self.preprocessor_(rgb)
        except ImageLoadError:
            raise
        except ValueError as error:
            raise ImageLoadError(name, str(error)) from None

    # -----------------------------------------------------------------------------------------
    # Fit

    def fit(self, source, calibration_source=None) -> "PatchCore":
        """Build the memory bank from normal images.

        `source` is an MVTec AD category folder (its ``train/good`` images), an image folder,
        a glob pattern, a text file listing paths, or a list of paths, arrays and PIL images.
        Unreadable images are skipped with one warning naming them (`skipped_images_`), unless
        `strict` is set. `source` can also be a `ShardStore` of patch embeddings written with
        this model's backbone settings; its patches are then used as they are. Normal images in
        `calibration_source` (any of the image forms), or else a `calibration_fraction` of
        `source`, are scored after fitting to set `calibration_`.
        """
        self._validate_params()
        started = time.perf_counter()
        if calibration_source is not None and self.calibration_fraction > 0:
            raise ValueError(
                f"calibration_fraction is {self.calibration_fraction}, but calibration_source is given too. "
                "Set calibration_fraction=0 to calibrate on calibration_source only, or leave calibration_source out"
            )
        if isinstance(source, ShardStore):
            items = None
            calibration_items = [] if calibration_source is None else expand_training_inputs(calibration_source)
            if self.calibration_fraction > 0:
                logger.warning(
                    "calibration_fraction %g is ignored when fitting a ShardStore, which contains no images to hold "
                    "back, so the model is not calibrated; pass calibration_source to calibrate it",
                    self.calibration_fraction,
                )
        else:
            items, calibration_items = self._split_calibration(expand_training_inputs(source), calibration_source)
        self._build_network()
        self._check_index_spec()

        if items is None:
            store, grid = self._check_store(source), None
            self._select_memory_bank(store)
        else:
            temporary = None
            if self.store_dir is None:
                temporary = tempfile.mkdtemp(prefix="patchindex-store-")
                store_dir = Path(temporary)
            else:
                store_dir = Path(self.store_dir)
            try:
                store, grid = self._extract_to_store(items, store_dir)
                self._select_memory_bank(store)
            finally:
                if temporary is not None:
                    shutil.rmtree(temporary, ignore_errors=True)

        self.skipped_images_ = [(name, reason) for _, name, reason in store.skipped]
        self.feature_grid_ = grid
        self.calibration_ = self._calibrate(calibration_items, calibration_source)
        self.n_train_images_ = len(store.images)
        self.n_train_patches_ = len(store)
        self.fit_seconds_ = time.perf_counter() - started
        logger.info(
            "fitted on %d images (%d patches): memory bank of %d in %.1f s",
            self.n_train_images_, self.n_train_patches_, len(self.memory_bank_), self.fit_seconds_,
        )
        return self

    def _split_calibration(self, items: list, calibration_source) -> tuple[list, list]:
        """Split training items into (memory bank items, calibration items)."""
        if calibration_source is not None:
            return items, expand_training_inputs(calibration_source)
        count = int(round(self.calibration_fraction * len(items)))
        if count == 0:
            if self.calibration_fraction > 0:
                logger.warning(
                    "calibration_fraction %g of %d training images rounds to no image, so the model is not calibrated",
                    self.calibration_fraction, len(items),
                )
            return items, []
        if count >= len(items):
            raise ValueError(
                f"calibration_fraction {self.calibration_fraction} of {len(items)} training images leaves none "
                "for the memory bank; use a smaller fraction"
            )
        held_back = set(np.random.default_rng(self.random_state).choice(len(items), size=count, replace=False).tolist())
        bank_items = [item for position, item in enumerate(items) if position not in held_back]
        return bank_items, [items[position] for position in sorted(held_back)]

    def _calibrate(self, items: list, calibration_source) -> Calibration | None:
        """Score normal images that the memory bank has not seen; None when there are none.

        Unreadable calibration images join `skipped_images_`, or raise ImageLoadError when
        `strict` is set.
        """
        if not items:
            return None
        scores, failed = [], []
        for number, result in enumerate(self.iter_predict(items)):
            name = result.path or f"<calibration input {number}>"
            if result.error is None:
                scores.append(result.score)
            elif self.strict:
                raise ImageLoadError(name, result.error)
            else:
                failed.append((name, result.error))
        if failed:
            logger.warning(
                "left %d unreadable images out of calibration: %s",
                len(failed), "; ".join(f"{name} ({reason})" for name, reason in failed),
            )
            self.skipped_images_.extend(failed)
        if not scores:
            # The fit itself succeeded: keep it, uncalibrated, instead of discarding the work.
            logger.warning("none of the %d calibration images could be read; the model is not calibrated", len(items))
            return None

        if calibration_source is not None:
            source = f"{len(scores)} images from {describe_input(calibration_source) or 'the calibration images'}"
        else:
            source = f"{len(scores)} training images held back (calibration_fraction {self.calibration_fraction})"
        calibration = Calibration.from_scores(scores, source)
        logger.info("calibrated on %s: image scores %.4f to %.4f", source, calibration.scores[0], calibration.scores[-1])
        calibration.warn_if_coarse()
        return calibration

    def _store_fingerprint(self, items: list | None) -> dict:
        """Describe what a store's embeddings depend on: the backbone, preprocessing and inputs."""
        extractor = self.feature_extractor_
        fingerprint = {
            "backbone": extractor.backbone,
            "out_indices": list(extractor.out_indices),
            "weights_sha256": extractor.weights_sha256,
            "embedding_dim": extractor.embedding_dim,
            "resize": self.resize,
            "crop": self.crop,
        }
        if items is not None:
            fingerprint.update(n_inputs=len(items), inputs_sha256=_inputs_digest(items))
        return json.loads(json.dumps(fingerprint))  # tuples become lists, as in a stored one

    def _check_store(self, store: ShardStore) -> ShardStore:
        """Raise ValueError unless `store` contains embeddings of this model's backbone settings."""
        if store.dim != self.feature_extractor_.embedding_dim:
            raise ValueError(
                f"the embedding store {store.directory} has {store.dim}-dimensional patches, but this model's "
                f"backbone gives {self.feature_extractor_.embedding_dim}; use the backbone settings it was written with"
            )
        if store.fingerprint is not None:
            changed = [key for key in store.differences(self._store_fingerprint(None)) if key not in ("n_inputs", "inputs_sha256")]
            if changed:
                raise ValueError(
                    f"the embedding store {store.directory} was written with other settings (differs in: "
                    f"{', '.join(changed)}); fit with the settings it was written with"
                )
        return store

    def _extract_to_store(self, items: list, store_dir: Path):
        """Embed `items` into a store in `store_dir`, resuming or reusing what is there."""
        extractor = self.feature_extractor_
        fingerprint = self._store_fingerprint(items)
        if (store_dir / "manifest.json").exists():
            store = ShardStore(store_dir)
            changed = store.differences(fingerprint)
            if changed:
                raise ValueError(
                    f"{store_dir} contains the embeddings of other inputs or settings (differs in: {', '.join(changed)}); "
                    "use an empty store folder"
                )
            logger.info("reusing the embedding store in %s: %d patches of %d images", store_dir, len(store), len(store.images))
            return store, _feature_grid(store)

        writer = ShardWriter(
            store_dir, extractor.embedding_dim, dtype=self.store_dtype, rows_per_shard=self.shard_rows, fingerprint=fingerprint
        )
        try:
            grid = self._extract(items, writer)
        except BaseException:
            writer.abort()
            raise
        store = writer.close()
        return store, grid or _feature_grid(store)

    def _extract(self, items: list, writer: ShardWriter):
        coverage: list[tuple[str, Geometry]] = []
        grid = None
        started = time.perf_counter()
        first_input = writer.inputs_done
        patches_before = writer.n_rows

        numbered = list(enumerate(items))[first_input:]
        batches = iter_batches(numbered, self.batch_size)
        total = (len(numbered) + self.batch_size - 1) // self.batch_size
        for batch in tqdm(batches, total=total, desc="features", unit="batch", disable=not self.progress):
            tensors, names, numbers = [], [], []
            for number, item in batch:
                name = describe_input(item) or f"<input {number}>"
                try:
                    tensor, geometry = self._prepare(item, name)
                except ImageLoadError as error:
                    if self.strict:
                        raise
                    writer.add_skipped(number, name, error.reason)
                    continue
                tensors.append(tensor)
                names.append(name)
                numbers.append(number)
                coverage.append((name, geometry))

            for name, number, embedding in zip(names, numbers, self._embed(tensors)):
                dim, height, width = embedding.shape
                if grid is None:
                    # Fail before extracting everything when the bank would be too small.
                    coreset_size(len(items) * height * width, self.coreset_ratio)
                rows = embedding.permute(1, 2, 0).reshape(-1, dim).numpy()
                positions = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), axis=-1)
                writer.add_image(name, rows, positions.reshape(-1, 2).astype(np.int16), inputs_done=number + 1)
                grid = (height, width)

        if writer.skipped:
            logger.warning(
                "skipped %d unreadable training images: %s",
                len(writer.skipped), "; ".join(f"{name} ({reason})" for _, name, reason in writer.skipped),
            )
        if not writer.images:
            raise ValueError(f"none of the {len(items)} training images could be read")
        _warn_partial_coverage(coverage, "fit")
        elapsed = time.perf_counter() - started
        done = len(numbered)
        logger.info(
            "extracted %d patches from %d inputs in %.1f s (%.1f images/s)%s",
            writer.n_rows - patches_before, done, elapsed, done / max(elapsed, 1e-9),
            f", resumed after input {first_input}" if first_input else "",
        )
        return grid

    def _coreset_method(self, n_patches: int) -> str:
        if self.coreset_method != "auto":
            return self.coreset_method
        size = n_patches * self.projection_dim * _PROJECTION_BYTES[self.projection_dtype]
        return "exact" if size <= EXACT_CORESET_MAX_BYTES else "approximate"

    def _select_memory_bank(self, store: ShardStore) -> None:
        n_patches = len(store)
        size = coreset_size(n_patches, self.coreset_ratio)
        projection = SparseRandomProjection(store.dim, self.projection_dim, random_state=self.random_state)
        method = self._coreset_method(n_patches)

        if size == n_patches:
            selected = np.arange(n_patches)
            self.coreset_info_ = None
        elif method == "exact":
            chunks = (chunk for _, chunk in store.iter_chunks())
            projected = project_chunks(
                chunks, n_patches, projection, device=self.device, dtype=self.projection_dtype, progress=self.progress
            )
            start = int(np.random.default_rng(self.random_state).integers(n_patches))
            selected, self.coreset_info_ = k_center_greedy(
                projected, size, start_index=start, progress=self.progress, return_info=True
            )
            del projected
        else:
            selected, self.coreset_info_ = approximate_k_center_greedy(
                self._projected_shards(store, projection), n_patches, size,
                random_state=self.random_state, return_info=True,
            )

        # Up to 20000 random training patches give the scale of a normal patch score (its 99th
        # percentile), for example for the color scale of overlays. Training patches are close
        # to the bank by construction, so normal test patches score somewhat higher. Bank and
        # sample are gathered in one pass over the store.
        rng = np.random.default_rng(self.random_state)
        sample_rows = rng.choice(n_patches, size=min(20000, n_patches), replace=False)
        gathered = store.take(np.concatenate([selected, sample_rows]))

        self.coreset_indices_ = selected
        self.memory_bank_ = gathered[: len(selected)]
        self.index_ = self._build_index(self.memory_bank_)
        distances, _ = self.index_.search(gathered[len(selected) :], k=1)
        self.training_patch_score_p99_ = float(np.percentile(distances[:, 0], 99))

    def _projected_shards(self, store: ShardStore, projection: SparseRandomProjection):
        """Yield (first_row, projected shard) for each shard, one at a time."""
        first_row = 0
        for number, (_, rows) in enumerate(store.shards):
            chunks = (chunk for _, chunk in store.iter_chunks(shard=number))
            yield first_row, project_chunks(chunks, rows, projection, device=self.device, dtype=self.projection_dtype)
            first_row += rows

    # -----------------------------------------------------------------------------------------
    # Index

    def _check_index_spec(self) -> None:
        """Raise ValueError, before features are extracted, for an index that cannot be built."""
        check_index_spec(self.index, self.feature_extractor_.embedding_dim, nprobe=self.nprobe, ef_search=self.ef_search)

    def _build_index(self, bank: np.ndarray) -> MemoryBankIndex:
        index = MemoryBankIndex(self.index, recall_target=self.recall_target)
        index.build(bank)
        requested = {"nprobe": self.nprobe, "ef_search": self.ef_search}
        applicable = {name: value for name, value in requested.items() if value is not None and name in index.search_params}
        ignored = sorted(name for name, value in requested.items() if value is not None and name not in applicable)
        if ignored:
            logger.warning("%s does not apply to the %s index that was built; ignored", " and ".join(ignored), index.spec_)
        index.set_search_params(**applicable)
        return index

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> "PatchCore":
        """Change the approximate search of a fitted model without rebuilding its index.

        `nprobe` (inverted lists visited per query) applies to IVF indexes and `ef_search`
        (HNSW candidate list size) to HNSW ones; None leaves a parameter unchanged. Larger
        values raise recall and cost search time. Raises ValueError for a parameter that the
        model's index does not have.
        """
        self._check_fitted()
        self.index_.set_search_params(nprobe=nprobe, ef_search=ef_search)
        if nprobe is not None:
            self.nprobe = nprobe
        if ef_search is not None:
            self.ef_search = ef_search
        return self

    # -----------------------------------------------------------------------------------------
    # Predict

    def iter_predict(self, images, batch_size: int | None = None) -> Iterator[ImageResult]:
        """Score images one batch at a time, yielding an `ImageResult` per input, in order.

        An image that cannot be read yields a result with `error` set; the others go on.
        """
        self._check_fitted()
        batch_size = self.batch_size if batch_size is None else batch_size
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        items = expand_score_inputs(images)

        for batch in iter_batches(enumerate(items), batch_size):
            results: list[ImageResult] = []
            tensors, geometries, positions = [], [], []
            for number, item in batch:
                result = ImageResult(describe_input(item))
                results.append(result)
                try:
                    tensor, geometry = self._prepare(item, result.path or f"<input {number}>")
                except ImageLoadError as error:
                    result.error = error.reason
                    continue
                tensors.append(tensor)
                geometries.append(geometry)
                positions.append(len(results) - 1)

            if tensors:
                scores, maps = self._score_tensors(tensors, geometries)
                for position, score, amap, geometry in zip(positions, scores, maps, geometries):
                    results[position].score = float(score)
                    results[position].anomaly_map = amap
                    results[position].geometry = geometry
            yield from results

    def _score_tensors(self, tensors: list[torch.Tensor], geometries: list[Geometry], timings: dict | None = None):
        """Return image scores (n,) float32 and anomaly maps of preprocessed images.

        `timings`, when given, accumulates seconds under "backbone", "search" and "postprocess".
        """
        clock = time.perf_counter()
        embeddings = self._embed(tensors)
        _add_seconds(timings, "backbone", clock)
        return self._score_embeddings(embeddings, geometries, timings)

    def _score_embeddings(self, embeddings: list[torch.Tensor], geometries: list[Geometry], timings: dict | None = None):
        """Return image scores (n,) float32 and anomaly maps of patch embeddings (d, h, w) each."""
        clock = time.perf_counter()
        scores = np.empty(len(embeddings), dtype=np.float32)
        maps: list[np.ndarray | None] = [None] * len(embeddings)

        # Images of one size share a patch grid and are searched together.
        by_grid: dict[tuple, list[int]] = {}
        for position, embedding in enumerate(embeddings):
            by_grid.setdefault(tuple(embedding.shape), []).append(position)

        for positions in by_grid.values():
            dim, height, width = embeddings[positions[0]].shape
            patches = torch.stack([embeddings[p] for p in positions]).permute(0, 2, 3, 1)
            patches = patches.reshape(len(positions), height * width, dim).numpy()

            distances, nearest = self.index_.search(patches.reshape(-1, dim), k=1)
            patch_scores = distances[:, 0].reshape(len(positions), -1)
            nearest = nearest[:, 0].reshape(len(positions), -1)
            image_scores = reweighted_image_scores(
                patches, patch_scores, nearest, self.memory_bank_, self.index_, self.num_neighbors
            )
            clock = _add_seconds(timings, "search", clock)

            for row, position in enumerate(positions):
                scores[position] = image_scores[row]
                grid = patch_scores[row].reshape(height, width)
                maps[position] = anomaly_map(grid, geometries[position], self.blur_sigma)
            clock = _add_seconds(timings, "postprocess", clock)
        return scores, maps

    def predict(self, images, batch_size: int | None = None) -> Prediction:
        """Compute image scores and anomaly maps.

        `images` is a path, folder, glob or list file, or a list of paths, (H, W[, C]) arrays
        and PIL images. Raises ImageLoadError, naming the file, at the first unreadable image;
        use `iter_predict` to go on past bad files.
        """
        scores, maps, paths = [], [], []
        for number, result in enumerate(self.iter_predict(images, batch_size)):
            if result.error is not None:
                raise ImageLoadError(result.path or f"<input {number}>", result.error)
            scores.append(result.score)
            maps.append(result.anomaly_map)
            paths.append(result.path)
        return Prediction(np.asarray(scores, dtype=np.float32), maps, paths)

    # -----------------------------------------------------------------------------------------
    # Evaluate

    def evaluate(self, root: str | os.PathLike, batch_size: int | None = None) -> dict:
        """Score the test split of an MVTec AD category and compute its metrics.

        Returns a dict with ``image_auroc``, ``pixel_auroc`` and ``pro`` (both None when the
        category has no masks), ``n_images``, ``n_anomalous``, ``n_failed`` and ``seconds``.
        Unreadable test images are left out with a warning.
        """
        self._check_fitted()
        started = time.perf_counter()
        samples = load_test_split(root)
        has_masks = any(sample.mask_path is not None for sample in samples)

        labels, scores, masks, maps, failed, coverage = [], [], [], [], [], []
        results = self.iter_predict([sample.path for sample in samples], batch_size)
        for sample, result in tqdm(zip(samples, results), total=len(samples), desc="evaluate", unit="image", disable=not self.progress):
            if result.error is not None:
                failed.append(f"{sample.path} ({result.error})")
                continue
            labels.append(sample.label)
            scores.append(result.score)
            coverage.append((str(sample.path), result.geometry))
            if not has_masks or (sample.label == 1 and sample.mask_path is None):
                continue
            shape = result.anomaly_map.shape
            if sample.mask_path is None:
                masks.append(np.zeros(shape, dtype=bool))
            else:
                masks.append(load_mask(sample.mask_path, shape))
            maps.append(result.anomaly_map)

        if failed:
            logger.warning("left out %d unreadable test images: %s", len(failed), "; ".join(failed))
        _warn_partial_coverage(coverage, "evaluate")
        report = {
            "image_auroc": image_auroc(np.asarray(labels), np.asarray(scores)),
            "pixel_auroc": pixel_auroc(masks, maps) if maps else None,
            "pro": pro_score(masks, maps) if maps else None,
            "n_images": len(labels),
            "n_anomalous": int(np.sum(labels)),
            "n_failed": len(failed),
            "seconds": round(time.perf_counter() - started, 2),
        }
        logger.info("evaluated %s: %s", root, report)
        return report

    # -----------------------------------------------------------------------------------------
    # Save and load

    @classmethod
    def _param_names(cls) -> list[str]:
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    def get_params(self) -> dict:
        """Return the constructor parameters as a JSON-serializable dict."""
        params = {}
        for name in self._param_names():
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            elif isinstance(value, tuple):
                value = list(value)
            params[name] = value
        return params

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the fitted model to `directory`: config.json, memory_bank.npy and index.faiss.

        No pickle is used; the backbone is rebuilt from its name and weights on load and
        checked against the stored SHA-256 of its weights.
        """
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        extractor = self.feature_extractor_
        config = {
            "format_version": FORMAT_VERSION,
            "patchindex_version": __version__,
            "params": self.get_params(),
            "backbone": {
                "name": extractor.backbone,
                "out_indices": list(extractor.out_indices),
                "weights_source": extractor.weights_source,
                "weights_sha256": extractor.weights_sha256,
                "stage_channels": list(extractor.stage_channels),
                "stride": extractor.stride,
                "embedding_dim": extractor.embedding_dim,
            },
            "memory_bank": {"file": BANK_FILE, "shape": list(self.memory_bank_.shape), "dtype": "float32"},
            "index": {"file": INDEX_FILE, "factory": self.index_.spec_, "search_params": self.index_.search_params},
            "training": {
                "n_images": self.n_train_images_,
                "n_patches": self.n_train_patches_,
                "feature_grid": list(self.feature_grid_) if self.feature_grid_ else None,
                "skipped_images": [list(item) for item in self.skipped_images_],
                "patch_score_p99": self.training_patch_score_p99_,
            },
        }
        calibration = getattr(self, "calibration_", None)
        if calibration is not None:
            config["calibration"] = calibration.to_config()

        # Each file goes to a temporary name first, so an interrupted save leaves no mix.
        np.save(directory / (BANK_FILE + ".tmp.npy"), self.memory_bank_, allow_pickle=False)
        os.replace(directory / (BANK_FILE + ".tmp.npy"), directory / BANK_FILE)
        self.index_.save(directory / (INDEX_FILE + ".tmp"))
        os.replace(directory / (INDEX_FILE + ".tmp"), directory / INDEX_FILE)
        (directory / (CONFIG_FILE + ".tmp")).write_text(json.dumps(config, indent=2), encoding="utf-8")
        os.replace(directory / (CONFIG_FILE + ".tmp"), directory / CONFIG_FILE)
        logger.info("saved model to %s", directory)
        return directory

    @classmethod
    def load(
        cls, directory: str | os.PathLike, *, weights: str | os.PathLike | None = None, device: str | None = None
    ) -> "PatchCore":
        """Read a model written by `save`.

        `weights` replaces the stored weights location (for a file that moved); the weights
        must still be the ones the model was fitted with. `device` replaces the stored device.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"model folder not found: {directory}")
        missing = [name for name in (CONFIG_FILE, BANK_FILE, INDEX_FILE) if not (directory / name).is_file()]
        if missing:
            raise ValueError(f"model folder {directory} is incomplete: missing {', '.join(missing)}; save the model again")

        config = _read_config(directory / CONFIG_FILE)
        params = dict(config["params"])
        if weights is not None:
            params["weights"] = os.fspath(weights)
        if device is not None:
            params["device"] = device
        known = set(cls._param_names())
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"{directory / CONFIG_FILE} has unknown parameters {unknown}; it was not written by this patchindex")
        model = cls(**params)
        # A hand-edited or damaged config.json can hold values of any type: report them as
        # invalid parameters instead of failing deep inside torch or timm.
        try:
            model._validate_params()
            model._build_network()
        except (ValueError, TypeError, AttributeError, OverflowError) as error:
            raise ValueError(f"invalid parameter in {directory / CONFIG_FILE}: {error}") from None
        model._check_backbone(config["backbone"], directory)

        try:
            bank = np.load(directory / BANK_FILE, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise ValueError(
                f"cannot read {directory / BANK_FILE}: not a valid .npy array ({type(error).__name__}); "
                "save the model again"
            ) from None
        if bank.ndim != 2 or not np.issubdtype(bank.dtype, np.floating) or not np.isfinite(bank).all():
            raise ValueError(
                f"{directory / BANK_FILE} must hold a finite float (n, d) memory bank, got {bank.dtype} "
                f"{bank.shape}; save the model again"
            )
        index = MemoryBankIndex.load(directory / INDEX_FILE, config["index"]["factory"])
        expected = tuple(config["memory_bank"]["shape"])
        if bank.shape != expected or index.ntotal != bank.shape[0] or index.dim != bank.shape[1]:
            raise ValueError(
                f"model folder {directory} is inconsistent: config.json expects a memory bank of shape {expected}, "
                f"{BANK_FILE} has {bank.shape} and {INDEX_FILE} holds {index.ntotal} vectors of dimension {index.dim}"
            )
        if bank.shape[1] != model.feature_extractor_.embedding_dim:
            raise ValueError(
                f"memory bank dimension {bank.shape[1]} does not match the backbone's embedding dimension "
                f"{model.feature_extractor_.embedding_dim}"
            )

        training = _read_training(config, directory / CONFIG_FILE)
        model.memory_bank_ = np.ascontiguousarray(bank, dtype=np.float32)
        # The index reads the bank to return exact distances from lossy codes (PQ, SQ).
        index.bank_ = model.memory_bank_
        try:
            index.set_search_params(nprobe=model.nprobe, ef_search=model.ef_search)
        except ValueError as error:
            raise ValueError(f"invalid parameter in {directory / CONFIG_FILE}: {error}") from None
        model.index_ = index
        model.n_train_images_ = training.get("n_images")
        model.n_train_patches_ = training.get("n_patches")
        model.feature_grid_ = tuple(training["feature_grid"]) if training.get("feature_grid") else None
        model.skipped_images_ = [tuple(item) for item in training.get("skipped_images", [])]
        model.training_patch_score_p99_ = training.get("patch_score_p99")
        # Models saved before calibration existed have no such section and load uncalibrated.
        section = config.get("calibration")
        model.calibration_ = None if section is None else Calibration.from_config(section, directory / CONFIG_FILE)
        logger.info("loaded model from %s: memory bank %s, %s index", directory, bank.shape, index.spec_)
        return model

    def _check_backbone(self, stored: dict, directory: Path) -> None:
        """Raise ValueError unless the backbone built now is the one the model was fitted with."""
        extractor = self.feature_extractor_
        if stored["name"] != extractor.backbone or list(stored["out_indices"]) != list(extractor.out_indices):
            raise ValueError(
                f"backbone mismatch in {directory}: the model was fitted with {stored['name']} stages "
                f"{stored['out_indices']}, but {extractor.backbone} stages {list(extractor.out_indices)} was built"
            )
        if stored["weights_sha256"] != extractor.weights_sha256:
            raise ValueError(
                f"backbone mismatch in {directory}: the model was fitted with {stored['name']} weights from "
                f"{stored['weights_source']} (SHA-256 {stored['weights_sha256'][:12]}...), but the weights loaded now "
                f"from {extractor.weights_source} differ (SHA-256 {extractor.weights_sha256[:12]}...); "
                "pass weights= the original weights"
            )
