"""Image sources, decoding and preprocessing.

Sources are image files, folders (searched recursively), glob patterns, text files that list
one path per line, and datasets in the MVTec AD layout::

    <category>/train/good/*                          normal training images
    <category>/test/<defect>/*                       test images, "good" for normal ones
    <category>/ground_truth/<defect>/<stem>_mask.png masks of the defective test images

Every image is decoded to 8-bit RGB whatever its mode (grayscale, RGBA, palette, 16-bit), then
resized and center-cropped. `Geometry` records both steps so that anomaly maps can be drawn in
the input image's own coordinates.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable, Mapping
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Geometry",
    "ImageLoadError",
    "Preprocessor",
    "TestSample",
    "UnreadableSource",
    "describe_input",
    "expand_score_inputs",
    "expand_training_inputs",
    "find_mask",
    "is_mvtec_category",
    "iter_batches",
    "load_image",
    "load_mask",
    "load_test_split",
    "resolve_images",
    "resolve_training_images",
    "to_rgb",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
LIST_EXTENSIONS = (".txt", ".lst", ".list")

ImageSource = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


class ImageLoadError(ValueError):
    """An image file that could not be read or decoded."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


# ---------------------------------------------------------------------------------------------
# Finding images


def _is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def _images_in_folder(folder: Path) -> list[Path]:
    """List image files below `folder`, following symbolic links but not link cycles."""
    paths = []
    visited = set()
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited:
            subdirectories[:] = []
            continue
        visited.add(real)
        for name in files:
            path = Path(directory) / name
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                paths.append(path)
    return sorted(paths)


def _images_in_list_file(list_file: Path) -> list[Path]:
    """Expand each line of a list file; relative paths start at the list file's folder.

    Folders and globs are expanded. Other paths are kept even when missing, so that the image
    loader reports them.
    """
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"list file {list_file} is not UTF-8 text ({error.reason}); save it as UTF-8") from None
    paths = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line).expanduser()
        if not path.is_absolute():
            path = list_file.parent / path
        if path.is_dir():
            paths.extend(_images_in_folder(path))
        elif not path.exists() and _is_glob(line):
            paths.extend(Path(match) for match in sorted(glob.glob(str(path), recursive=True)) if Path(match).is_file())
        else:
            paths.append(path)
    return paths


def resolve_images(source: ImageSource) -> list[Path]:
    """Expand a source into a list of image paths.

    A folder gives its image files (recursive, sorted), a glob pattern its matches (sorted), a
    ``.txt``/``.lst``/``.list`` file the paths it lists (relative ones are taken from the list
    file's folder), and any other file itself. A sequence is expanded item by item, in order.
    Raises FileNotFoundError for a path that does not exist and ValueError when nothing is found.
    """
    if isinstance(source, (str, os.PathLike)):
        items = [source]
    else:
        items = list(source)

    paths: list[Path] = []
    for item in items:
        text = os.fspath(item)
        path = Path(text).expanduser()
        if path.is_dir():
            paths.extend(_images_in_folder(path))
        elif path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
            paths.extend(_images_in_list_file(path))
        elif path.is_file():
            paths.append(path)
        elif _is_glob(text):
            matches = sorted(Path(match) for match in glob.glob(os.path.expanduser(text), recursive=True))
            paths.extend(match for match in matches if match.is_file())
        else:
            raise FileNotFoundError(f"image source not found: {text}")

    if not paths:
        raise ValueError(f"no images found in {source!r}; expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
    return paths


def is_mvtec_category(path: str | os.PathLike) -> bool:
    """Return True when `path` is a folder with the MVTec AD ``train/good`` subfolder."""
    return (Path(path) / "train" / "good").is_dir()


def resolve_training_images(source: ImageSource) -> list[Path]:
    """Expand a training source: an MVTec AD category gives its ``train/good`` images."""
    if isinstance(source, (str, os.PathLike)) and is_mvtec_category(source):
        return resolve_images(Path(source) / "train" / "good")
    return resolve_images(source)


@dataclass(frozen=True)
class TestSample:
    """One test image of an MVTec AD category: label 0 is normal, 1 anomalous."""

    __test__ = False  # not a pytest test class

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None


def find_mask(root: Path, defect_type: str, image_path: Path) -> Path | None:
    """Return the ground-truth mask of a defective test image, or None when there is none."""
    folder = root / "ground_truth" / defect_type
    for extension in (".png", image_path.suffix):
        candidate = folder / f"{image_path.stem}_mask{extension}"
        if candidate.is_file():
            return candidate
    return None


def load_test_split(root: str | os.PathLike) -> list[TestSample]:
    """List the test images of an MVTec AD category with their labels and masks.

    Images under ``test/good`` are normal; every other subfolder of ``test`` is a defect type.
    A defective image without a mask gets ``mask_path=None`` and a warning.
    """
    root = Path(root)
    test_dir = root / "test"
    if not test_dir.is_dir():
        raise ValueError(
            f"{root} has no 'test' folder; evaluation expects the MVTec AD layout "
            "test/<defect>/*.png with ground_truth/<defect>/<stem>_mask.png"
        )

    samples = []
    missing_masks = []
    for defect_dir in sorted(path for path in test_dir.iterdir() if path.is_dir()):
        defect_type = defect_dir.name
        for image_path in _images_in_folder(defect_dir):
            if defect_type == "good":
                samples.append(TestSample(image_path, 0, defect_type, None))
                continue
            mask_path = find_mask(root, defect_type, image_path)
            if mask_path is None:
                missing_masks.append(str(image_path))
            samples.append(TestSample(image_path, 1, defect_type, mask_path))

    if not samples:
        raise ValueError(f"no test images found under {test_dir}")
    if missing_masks and len(missing_masks) < sum(sample.label for sample in samples):
        logger.warning(
            "%d defective test images have no mask and are left out of pixel metrics: %s",
            len(missing_masks),
            ", ".join(missing_masks[:10]) + (" ..." if len(missing_masks) > 10 else ""),
        )
    return samples


@dataclass(frozen=True)
class UnreadableSource:
    """An input to score that names no image: an empty folder or a glob without matches."""

    text: str
    reason: str


def describe_input(item) -> str | None:
    """Return the path or source text of an input, or None for arrays and PIL images."""
    if isinstance(item, UnreadableSource):
        return item.text
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else None


def _as_list(images) -> list:
    if isinstance(images, bytes):
        images = os.fsdecode(images)
    if isinstance(images, (str, os.PathLike, np.ndarray, Image.Image)):
        return [images]
    if isinstance(images, Mapping) or not isinstance(images, Iterable):
        raise ValueError(
            f"expected a path, a numpy array, a PIL image or a list of them, got {type(images).__name__}"
        )
    return [os.fsdecode(item) if isinstance(item, bytes) else item for item in images]


def expand_score_inputs(images) -> list:
    """Turn inputs to score into a flat list of paths, arrays and PIL images.

    A missing path or a source without images stays in the list, so that it gets an error
    result of its own instead of stopping the job.
    """
    items = []
    for item in _as_list(images):
        if not isinstance(item, (str, os.PathLike)):
            items.append(item)
            continue
        try:
            items.extend(resolve_images(item))
        except FileNotFoundError:
            items.append(Path(item))
        except ValueError as error:
            items.append(UnreadableSource(os.fspath(item), str(error)))
    return items


def expand_training_inputs(source) -> list:
    """Expand a training source; unlike scoring, a missing path or empty folder raises."""
    if isinstance(source, (str, os.PathLike)):
        return list(resolve_training_images(source))
    items = []
    for item in _as_list(source):
        if isinstance(item, (str, os.PathLike)):
            items.extend(resolve_images(item))
        else:
            items.append(item)
    if not items:
        raise ValueError("no training images given")
    return items


# ---------------------------------------------------------------------------------------------
# Decoding


def _sixteen_bit_to_uint8(array: np.ndarray) -> np.ndarray:
    scaled = np.clip(array.astype(np.float32), 0, 65535) * (255.0 / 65535.0)
    return np.rint(scaled).astype(np.uint8)


def _integers_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale an integer array: values up to 255 are 8-bit, up to 65535 are 16-bit."""
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 65535:
        raise ValueError(
            f"integer image values must lie in [0, 255] or [0, 65535], got [{low}, {high}]; rescale the image"
        )
    if high <= 255:
        return array.astype(np.uint8)
    return _sixteen_bit_to_uint8(array)


def _floats_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a float array: values in [0, 1] are multiplied by 255, values in [0, 255] kept."""
    if not np.isfinite(array).all():
        raise ValueError("float image contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise ValueError(
            f"float image values must lie in [0, 1] or [0, 255], got [{low:g}, {high:g}]; rescale the image"
        )
    scale = 255.0 if high <= 1.0 else 1.0
    return np.rint(array.astype(np.float32) * scale).astype(np.uint8)


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    return np.rint(rgba[..., :3].astype(np.float32) * alpha).astype(np.uint8)


def to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """Convert a PIL image or an array to 8-bit RGB, (H, W, 3) uint8.

    PIL ``I;16`` modes and uint16 arrays are scaled from [0, 65535]. Other integer arrays are read
    as 8-bit when their maximum is at most 255, else as 16-bit. Float images are read as [0, 1]
    when their maximum is at most 1, else as [0, 255]. Values outside these ranges raise
    ValueError. Grayscale is replicated to three channels, and transparent pixels are
    composited on black.
    """
    sixteen_bit = False
    if isinstance(image, Image.Image):
        sixteen_bit = image.mode.startswith("I;16")
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif image.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("L" if image.mode == "1" else "RGB")
        elif image.mode in ("LA", "La", "RGBa", "PA"):
            image = image.convert("RGBA")
        array = np.asarray(image)
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise ValueError(f"expected a path, a numpy array or a PIL image, got {type(image).__name__}")

    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"expected an image of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")

    if array.size == 0:
        raise ValueError(f"empty image of shape {array.shape}")

    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif sixteen_bit or array.dtype == np.uint16:
        array = _sixteen_bit_to_uint8(array)
    elif np.issubdtype(array.dtype, np.integer):
        array = _integers_to_uint8(array)
    elif np.issubdtype(array.dtype, np.floating):
        array = _floats_to_uint8(array)
    else:
        raise ValueError(f"unsupported image dtype {array.dtype}")

    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    elif array.shape[2] == 4:
        array = _composite_on_black(array)
    return np.ascontiguousarray(array)


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as 8-bit RGB, (H, W, 3) uint8, turned upright by its EXIF orientation.

    Raises ImageLoadError, naming the file, when it is missing, empty, not an image or corrupt,
    or when its width times height exceeds `max_pixels`. That size is read from the file header,
    before the pixels are decoded.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise ImageLoadError(path, "is a folder, not an image file")
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "the file is empty (0 bytes)")
        with Image.open(path) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageLoadError(
                    path,
                    f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
                    "pixels; raise the pixel limit (--max-pixels) to score it",
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not a recognized image format") from None
    except Image.DecompressionBombError as error:
        raise ImageLoadError(path, f"image too large: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(path, f"corrupt or unreadable image ({error})") from None


def load_mask(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """Read a ground-truth mask as (H, W) bool; it must have the image's `shape` (H, W)."""
    with Image.open(path) as image:
        mask = np.asarray(image.convert("L")) > 0
    if mask.shape != tuple(shape):
        raise ValueError(
            f"mask {path} has size {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{shape[1]}x{shape[0]} (width x height); masks must match their images"
        )
    return mask


# ---------------------------------------------------------------------------------------------
# Preprocessing


@dataclass(frozen=True)
class Geometry:
    """Resize and crop that turned an input image into the network input, in pixels.

    Sizes are (height, width). The image of `original_size` was resized to `resized_size`, then
    the crop of size (crop_height, crop_width) with top-left corner (crop_top, crop_left) taken.
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_top: int
    crop_left: int
    crop_height: int
    crop_width: int

    @property
    def coverage(self) -> float:
        """Fraction of the image area that the crop keeps, in (0, 1]."""
        return (self.crop_height * self.crop_width) / (self.resized_size[0] * self.resized_size[1])


def _pair(value: int | Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        pair = (int(value), int(value))
    else:
        pair = tuple(int(item) for item in value)
        if len(pair) != 2:
            raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


class Preprocessor:
    """Resize, center-crop and normalize RGB images for the backbone.

    Parameters
    ----------
    resize : int, (height, width) or None
        An int sets the shorter side and keeps the aspect ratio (as torchvision's ``Resize``);
        a pair sets both sides; None keeps the image size.
    crop : int, (height, width) or None
        Size of the center crop taken after resizing; None keeps the whole resized image.
    mean, std : three floats
        Per-channel normalization of pixel values scaled to [0, 1].
    """

    def __init__(
        self,
        resize: int | Sequence[int] | None = 256,
        crop: int | Sequence[int] | None = 224,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ):
        self.resize = resize
        self.crop = crop
        self.mean = tuple(float(value) for value in mean)
        self.std = tuple(float(value) for value in std)
        self._resize = _pair(resize, "resize")
        self._crop = _pair(crop, "crop")
        if self._crop is not None and self._resize is not None:
            # Reject sizes that fail for every image. An int resize sets the shorter side.
            if isinstance(resize, (int, np.integer)):
                too_small = self._resize[0] < min(self._crop)
            else:
                too_small = self._resize[0] < self._crop[0] or self._resize[1] < self._crop[1]
            if too_small:
                raise ValueError(f"resize {resize!r} is smaller than crop {crop!r}; use a resize at least as large as the crop")

    def geometry(self, height: int, width: int) -> Geometry:
        """Compute the resize and crop for an image of the given size."""
        if height < 1 or width < 1:
            raise ValueError(f"empty image of size {width}x{height}")
        if self._resize is None:
            resized = (height, width)
        elif isinstance(self.resize, (int, np.integer)):
            short = self._resize[0]
            if height <= width:
                resized = (short, max(1, int(short * width / height)))
            else:
                resized = (max(1, int(short * height / width)), short)
        else:
            resized = self._resize

        crop = self._crop or resized
        if crop[0] > resized[0] or crop[1] > resized[1]:
            raise ValueError(
                f"crop {crop[1]}x{crop[0]} is larger than the resized image {resized[1]}x{resized[0]} "
                f"(original {width}x{height}); use a smaller crop or a larger resize"
            )
        top = int(round((resized[0] - crop[0]) / 2.0))
        left = int(round((resized[1] - crop[1]) / 2.0))
        return Geometry((height, width), resized, top, left, crop[0], crop[1])

    def __call__(self, rgb: np.ndarray) -> tuple[torch.Tensor, Geometry]:
        """Turn an (H, W, 3) uint8 image into a normalized (3, h, w) float32 tensor."""
        geometry = self.geometry(rgb.shape[0], rgb.shape[1])

        # Resample only the cropped region: the same pixels as resizing the whole image and then
        # cropping, without building the resized image (huge for long, thin images).
        image = Image.fromarray(rgb)
        scale_y = geometry.original_size[0] / geometry.resized_size[0]
        scale_x = geometry.original_size[1] / geometry.resized_size[1]
        box = (
            geometry.crop_left * scale_x,
            geometry.crop_top * scale_y,
            (geometry.crop_left + geometry.crop_width) * scale_x,
            (geometry.crop_top + geometry.crop_height) * scale_y,
        )
        image = image.resize((geometry.crop_width, geometry.crop_height), Image.BILINEAR, box=box)

        tensor = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (tensor - mean) / std, geometry


def iter_batches(items: Iterable, batch_size: int):
    """Yield lists of up to `batch_size` items."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
