import time

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from skimage import data as skimage_data

from patchindex._weights import IMAGENET_MEAN, IMAGENET_STD, create_classifier
from patchindex.data import Preprocessor
from patchindex.features import FeatureExtractor

# ImageNet classes 281 tabby, 282 tiger cat, 285 Egyptian cat.
CAT_CLASSES = {281, 282, 285}


def _chelsea_top5(model, mean, std, size=224) -> list[int]:
    tensor, _ = Preprocessor(int(size * 256 / 224), size, mean, std)(skimage_data.chelsea())
    with torch.no_grad():
        logits = model(tensor[None])
    return logits[0].topk(5).indices.tolist()


@pytest.mark.parametrize("name, size", [("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite1", 240), ("tf_efficientnet_lite2", 260)])
def test_packaged_weights_classify_cat(name, size):
    model, source = create_classifier(name, "imagenet")

    top5 = _chelsea_top5(model, (0.5,) * 3, (0.5,) * 3, size)

    assert source.startswith("package:")
    assert top5[0] in CAT_CLASSES
    assert len(CAT_CLASSES & set(top5)) >= 2


def test_random_weights_do_not_classify_cat():
    with pytest.warns(UserWarning, match="random weights"):
        model, source = create_classifier("tf_efficientnet_lite0", "random")
    assert source == "random"
    assert _chelsea_top5(model, (0.5,) * 3, (0.5,) * 3)[0] not in CAT_CLASSES


def test_default_extractor_shapes():
    extractor = FeatureExtractor()

    embeddings = extractor(torch.zeros(2, 3, 224, 224))

    assert extractor.stage_channels == (40, 112)
    assert extractor.stride == 8
    assert extractor.feature_info.reduction() == [8, 16]
    assert extractor.embedding_dim == 152
    assert tuple(embeddings.shape) == (2, 152, 28, 28)


def test_embedding_matches_definition():
    extractor = FeatureExtractor()
    images = torch.randn(1, 3, 224, 160)

    with torch.no_grad():
        low, high = extractor.body(images)
    low = F.avg_pool2d(low, 3, 1, 1)
    high = F.interpolate(F.avg_pool2d(high, 3, 1, 1), size=low.shape[-2:], mode="bilinear", align_corners=False)
    expected = torch.cat([low, high], dim=1)

    assert torch.allclose(extractor(images), expected, atol=1e-6)
    # 3x3 averaging counts the zero padding, so a corner averages 4 real cells over 9.
    with torch.no_grad():
        raw_low = extractor.body(images)[0]
    assert torch.allclose(low[0, :, 0, 0], raw_low[0, :, :2, :2].sum(dim=(1, 2)) / 9, atol=1e-6)


def test_embedding_dim_reduction():
    full = FeatureExtractor()
    reduced = FeatureExtractor(embedding_dim=64)
    images = torch.randn(1, 3, 224, 224)

    result = reduced(images)
    expected = F.adaptive_avg_pool1d(full(images).permute(0, 2, 3, 1).reshape(-1, 1, 152), 64)

    assert tuple(result.shape) == (1, 64, 28, 28)
    assert torch.allclose(result.permute(0, 2, 3, 1).reshape(-1, 64), expected[:, 0], atol=1e-6)
    with pytest.raises(ValueError, match="embedding_dim"):
        FeatureExtractor(embedding_dim=500)


def test_wide_resnet_without_weights_fails_clearly():
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="weights=PATH") as info:
        FeatureExtractor("wide_resnet50_2")
    assert "wide_resnet50_2" in str(info.value)
    assert time.perf_counter() - started < 60


def test_wide_resnet_from_local_file(tmp_path):
    source = timm.create_model("wide_resnet50_2", pretrained=False)
    path = tmp_path / "wide_resnet50_2.pth"
    torch.save(source.state_dict(), path)

    extractor = FeatureExtractor("wide_resnet50_2", weights=path)

    assert extractor.stage_channels == (512, 1024)
    assert extractor.weights_source == f"file:{path.resolve()}"
    assert torch.equal(extractor.body.state_dict()["layer2.0.conv1.weight"], source.state_dict()["layer2.0.conv1.weight"])
    assert tuple(extractor(torch.zeros(1, 3, 64, 64)).shape) == (1, 1536, 8, 8)


def test_wrong_weights_file_rejected(tmp_path):
    path = tmp_path / "lite0.pth"
    torch.save(timm.create_model("tf_efficientnet_lite0").state_dict(), path)
    with pytest.raises(ValueError, match="does not fit wide_resnet50_2"):
        FeatureExtractor("wide_resnet50_2", weights=path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        FeatureExtractor("wide_resnet50_2", weights=tmp_path / "missing.pth")


def test_unknown_backbone_rejected():
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'"):
        FeatureExtractor("resnet9000")


def test_wide_resnet_normalization_is_imagenet():
    from patchindex.features import default_normalization

    assert default_normalization("wide_resnet50_2") == (IMAGENET_MEAN, IMAGENET_STD)
    assert default_normalization("tf_efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)


def test_fingerprint_tracks_weights():
    first = FeatureExtractor()
    second = FeatureExtractor()
    assert first.weights_sha256 == second.weights_sha256
    with torch.no_grad():
        second.body.conv_stem.weight[0, 0, 0, 0] += 1.0
    from patchindex._weights import fingerprint

    assert fingerprint(second.body) != first.weights_sha256
    assert np.isfinite(first(torch.zeros(1, 3, 64, 64)).numpy()).all()
