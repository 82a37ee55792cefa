import logging

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_bad_images
from patchindex.data import (
    ImageLoadError,
    Preprocessor,
    load_image,
    load_test_split,
    resolve_images,
    resolve_training_images,
    to_rgb,
)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_training_images_from_mvtec_layout(demo_data):
    paths = resolve_training_images(demo_data)
    assert len(paths) == 12
    assert all(path.parent == demo_data / "train" / "good" for path in paths)
    assert paths == sorted(paths)


def test_resolve_folder_glob_and_list(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    a = _save(tmp_path / "a.png", image)
    b = _save(tmp_path / "sub" / "b.jpg", image)
    (tmp_path / "readme.txt.md").write_text("not an image")

    assert resolve_images(tmp_path) == [a, b]
    assert resolve_images(str(tmp_path / "*.png")) == [a]
    assert resolve_images(str(tmp_path / "**" / "*.jpg")) == [b]

    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n\nsub/b.jpg\n{a}\n")
    assert resolve_images(listing) == [b, a]
    assert resolve_images([a, str(tmp_path / "sub")]) == [a, b]


def test_resolve_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        resolve_images(tmp_path / "empty")


def test_test_split_labels_and_masks(demo_data):
    samples = load_test_split(demo_data)
    assert len(samples) == 4 + 9
    good = [sample for sample in samples if sample.defect_type == "good"]
    bad = [sample for sample in samples if sample.label == 1]
    assert all(sample.label == 0 and sample.mask_path is None for sample in good)
    assert len(bad) == 9
    for sample in bad:
        assert sample.mask_path == demo_data / "ground_truth" / sample.defect_type / f"{sample.path.stem}_mask.png"


def test_test_split_missing_mask_warns(tmp_path, caplog):
    image = np.zeros((8, 8, 3), np.uint8)
    _save(tmp_path / "test" / "good" / "0.png", image)
    _save(tmp_path / "test" / "crack" / "0.png", image)
    _save(tmp_path / "test" / "crack" / "1.png", image)
    _save(tmp_path / "ground_truth" / "crack" / "0_mask.png", np.zeros((8, 8), np.uint8))

    with caplog.at_level(logging.WARNING):
        samples = load_test_split(tmp_path)

    assert [sample.mask_path is None for sample in samples if sample.label == 1] == [False, True]
    assert "1.png" in caplog.text


def test_test_split_needs_test_folder(tmp_path):
    with pytest.raises(ValueError, match="no 'test' folder"):
        load_test_split(tmp_path)


@pytest.mark.parametrize(
    "mode, array, expected_pixel",
    [
        ("L", np.full((5, 7), 200, np.uint8), (200, 200, 200)),
        ("I;16", np.full((5, 7), 65535, np.uint16), (255, 255, 255)),
        ("I;16", np.full((5, 7), 32896, np.uint16), (128, 128, 128)),
        ("RGB", np.full((5, 7, 3), (10, 20, 30), np.uint8), (10, 20, 30)),
        ("RGBA", np.full((5, 7, 4), (200, 100, 50, 255), np.uint8), (200, 100, 50)),
        ("RGBA", np.full((5, 7, 4), (200, 100, 50, 0), np.uint8), (0, 0, 0)),
        ("LA", np.full((5, 7, 2), (100, 255), np.uint8), (100, 100, 100)),
    ],
)
def test_image_modes_become_rgb(tmp_path, mode, array, expected_pixel):
    path = tmp_path / "image.png"
    image = Image.fromarray(array)
    assert image.mode == mode
    image.save(path)

    rgb = load_image(path)

    assert rgb.shape == (5, 7, 3)
    assert rgb.dtype == np.uint8
    assert tuple(rgb[2, 3]) == expected_pixel


def test_sixteen_bit_png_keeps_range(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)

    rgb = load_image(path)

    assert rgb[0, 0, 0] == 0
    assert rgb[-1, -1, 0] == 255
    assert len(np.unique(rgb[..., 0])) > 200


def test_palette_images_become_rgb(tmp_path):
    palette_image = Image.new("P", (6, 4))
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette_image.putpixel((1, 1), 1)
    path = tmp_path / "palette.png"
    palette_image.save(path)
    transparent = tmp_path / "palette_transparent.png"
    palette_image.save(transparent, transparency=0)

    assert tuple(load_image(path)[1, 1]) == (255, 0, 0)
    assert tuple(load_image(transparent)[1, 1]) == (255, 0, 0)
    assert tuple(load_image(transparent)[0, 0]) == (0, 0, 0)


def test_to_rgb_arrays():
    assert to_rgb(np.ones((3, 4), np.float32)).max() == 255
    assert to_rgb(np.zeros((3, 4, 1), np.uint8)).shape == (3, 4, 3)
    assert to_rgb(np.full((3, 4), True)).min() == 255
    with pytest.raises(ValueError, match="shape"):
        to_rgb(np.zeros((3, 4, 5), np.uint8))


def test_bad_files_raise_with_path(tmp_path):
    for path in write_bad_images(tmp_path):
        with pytest.raises(ImageLoadError) as info:
            load_image(path)
        assert str(path) in str(info.value)
        assert info.value.path == str(path)
    with pytest.raises(ImageLoadError, match="missing.png"):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize(
    "size, resize, crop, resized, box",
    [
        ((256, 256), 256, 224, (256, 256), (16, 16, 224, 224)),
        ((100, 300), 256, 224, (256, 768), (16, 272, 224, 224)),
        ((900, 450), 256, 224, (512, 256), (144, 16, 224, 224)),
        ((100, 300), (128, 160), None, (128, 160), (0, 0, 128, 160)),
        ((100, 300), None, (64, 96), (100, 300), (18, 102, 64, 96)),
    ],
)
def test_preprocessor_geometry(size, resize, crop, resized, box):
    preprocessor = Preprocessor(resize, crop)
    tensor, geometry = preprocessor(np.zeros((*size, 3), np.uint8))

    assert geometry.original_size == size
    assert geometry.resized_size == resized
    assert (geometry.crop_top, geometry.crop_left, geometry.crop_height, geometry.crop_width) == box
    assert tuple(tensor.shape) == (3, box[2], box[3])


def test_preprocessor_crop_keeps_center():
    image = np.zeros((256, 512, 3), np.uint8)
    image[:, 256:] = 255  # right half white

    tensor, _ = Preprocessor(256, 224, mean=(0.5,) * 3, std=(0.5,) * 3)(image)

    assert torch.allclose(tensor[:, :, :100], torch.tensor(-1.0))
    assert torch.allclose(tensor[:, :, 124:], torch.tensor(1.0))


def test_preprocessor_rejects_oversized_crop():
    with pytest.raises(ValueError, match="crop 224x224 is larger"):
        Preprocessor(None, 224)(np.zeros((100, 300, 3), np.uint8))
    with pytest.raises(ValueError, match="resize"):
        Preprocessor((1, 2, 3), 224)


def test_integer_and_float_arrays_scaled_by_range():
    image = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
    expected = to_rgb(image)

    np.testing.assert_array_equal(to_rgb(image.astype(np.int64)), expected)
    np.testing.assert_array_equal(to_rgb(image.astype(np.float64)), expected)
    np.testing.assert_array_equal(to_rgb(image.astype(np.float32) / 255.0), expected)
    np.testing.assert_array_equal(to_rgb(image.astype(np.int32) * 257), expected)
    np.testing.assert_array_equal(to_rgb(image.astype(np.uint16) * 257), expected)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((4, 4), -1, np.int64), r"\[0, 255\] or \[0, 65535\]"),
        (np.full((4, 4), 70000, np.int64), r"\[0, 255\] or \[0, 65535\]"),
        (np.full((4, 4), 300.0), r"\[0, 1\] or \[0, 255\]"),
        (np.full((4, 4), np.nan), "NaN"),
        (np.zeros((0, 5, 3), np.uint8), "empty image"),
        ("not an image", "got str"),
    ],
)
def test_to_rgb_rejects_out_of_range(array, message):
    with pytest.raises(ValueError, match=message):
        to_rgb(array)


def test_float_tiff_in_8bit_range(tmp_path):
    values = np.linspace(0, 255, 30 * 20, dtype=np.float32).reshape(20, 30)
    Image.fromarray(values).save(tmp_path / "float.tiff")
    rgb = load_image(tmp_path / "float.tiff")
    assert rgb[0, 0, 0] == 0
    assert rgb[-1, -1, 0] == 255


def test_folder_follows_symlinks_without_cycles(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    real = tmp_path / "real"
    _save(real / "a.png", image)
    _save(real / "b.png", image)
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(real, target_is_directory=True)
    (root / "linked_again").symlink_to(root, target_is_directory=True)  # a cycle

    found = resolve_images(root)

    assert [path.name for path in found] == ["a.png", "b.png"]


def test_list_file_expands_folders_and_keeps_missing(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    a = _save(tmp_path / "imgs" / "a.png", image)
    b = _save(tmp_path / "imgs" / "b.gif", image)
    listing = tmp_path / "list.lst"
    listing.write_bytes("\ufeffimgs\nmissing.png\n".encode("utf-8"))

    assert resolve_images(listing) == [a, b, tmp_path / "missing.png"]
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="is a folder"):
        load_image(tmp_path / "imgs")


def test_preprocessor_long_thin_image():
    strip = np.random.default_rng(0).integers(0, 255, (8, 20000, 3), dtype=np.uint8)
    tensor, geometry = Preprocessor(256, 224)(strip)
    assert geometry.resized_size == (256, 640000)
    assert tuple(tensor.shape) == (3, 224, 224)


def test_preprocessor_rejects_resize_below_crop():
    with pytest.raises(ValueError, match="resize 100 is smaller than crop 224"):
        Preprocessor(100, 224)
    with pytest.raises(ValueError, match="empty image"):
        Preprocessor(256, 224).geometry(0, 10)


def test_pil_int32_mode_read_by_range():
    eight_bit = Image.fromarray(np.full((4, 4), 200, np.int32))
    too_large = Image.fromarray(np.full((4, 4), 70000, np.int32))
    assert eight_bit.mode == "I"
    assert to_rgb(eight_bit)[0, 0, 0] == 200
    with pytest.raises(ValueError, match="65535"):
        to_rgb(too_large)


def test_list_file_not_utf8(tmp_path):
    listing = tmp_path / "utf16.txt"
    listing.write_bytes("a.png\n".encode("utf-16"))
    with pytest.raises(ValueError, match="utf16.txt is not UTF-8"):
        resolve_images(listing)
