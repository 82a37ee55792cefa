"""Locally aware patch embeddings from a pretrained timm backbone.

Two mid-level stages are taken (``features_only`` with ``out_indices``). Each stage's map is
averaged over a 3x3 neighbourhood (stride 1, zero padding counted), the deeper map is upsampled
bilinearly to the first one's grid, and the two are concatenated along channels. An optional
adaptive average over channels reduces the result to ``embedding_dim``.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import timm
import torch
import torch.nn.functional as F

from ._weights import BACKBONES, create_classifier, fingerprint

__all__ = ["FeatureExtractor", "default_out_indices", "default_normalization"]

logger = logging.getLogger(__name__)


def default_out_indices(backbone: str) -> tuple[int, ...]:
    """Return the stages used by default: (2, 3) for the supported backbones."""
    spec = BACKBONES.get(backbone)
    return spec.out_indices if spec is not None else (2, 3)


def default_normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the (mean, std) that the backbone's pretrained weights expect."""
    spec = BACKBONES.get(backbone)
    if spec is not None:
        return spec.mean, spec.std
    config = timm.get_pretrained_cfg(backbone)
    if config is None:
        from ._weights import IMAGENET_MEAN, IMAGENET_STD

        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(config.mean), tuple(config.std)


class FeatureExtractor(torch.nn.Module):
    """Patch embedding network: images (B, 3, H, W) float32 to embeddings (B, D, h, w) float32.

    Parameters
    ----------
    backbone : str
        A timm model name; ``tf_efficientnet_lite0`` (default), ``tf_efficientnet_lite1``,
        ``tf_efficientnet_lite2`` and ``wide_resnet50_2`` have offline-tested defaults.
    out_indices : two ints or None
        Backbone stages to combine; None takes the backbone's default, (2, 3).
    weights : str or path
        ``"imagenet"``, a path to a state-dict file, or ``"random"`` (explicit opt-in).
    embedding_dim : int or None
        Reduce the concatenated channels to this many by adaptive averaging; None keeps all.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        out_indices: Sequence[int] | None = None,
        weights: str | os.PathLike = "imagenet",
        embedding_dim: int | None = None,
    ):
        super().__init__()
        out_indices = tuple(out_indices) if out_indices is not None else default_out_indices(backbone)
        if len(out_indices) < 1:
            raise ValueError(f"out_indices must name at least one stage, got {out_indices!r}")

        classifier, self.weights_source = create_classifier(backbone, weights)
        try:
            body = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=out_indices)
        except (IndexError, ValueError, AssertionError) as error:
            raise ValueError(f"invalid out_indices {out_indices} for {backbone}: {error}") from None
        # The feature model is a subset of the classifier: copy its tensors and demand all of them.
        source = classifier.state_dict()
        body.load_state_dict({key: source[key] for key in body.state_dict()}, strict=True)
        self.body = body.eval()

        self.backbone = backbone
        self.out_indices = out_indices
        self.feature_info = body.feature_info
        self.stage_channels = tuple(body.feature_info.channels())
        self.stride = body.feature_info.reduction()[0]
        total = sum(self.stage_channels)
        if embedding_dim is not None and not 1 <= embedding_dim <= total:
            raise ValueError(f"embedding_dim must be between 1 and {total} for {backbone}, got {embedding_dim}")
        self.embedding_dim = embedding_dim or total
        self.weights_sha256 = fingerprint(body)
        logger.info(
            "backbone %s stages %s: channels %s, stride %d, embedding dim %d",
            backbone,
            out_indices,
            self.stage_channels,
            self.stride,
            self.embedding_dim,
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        stages = self.body(images)

        pooled = [F.avg_pool2d(stage, kernel_size=3, stride=1, padding=1) for stage in stages]
        grid = pooled[0].shape[-2:]
        resized = [pooled[0]] + [
            F.interpolate(stage, size=grid, mode="bilinear", align_corners=False) for stage in pooled[1:]
        ]
        embeddings = torch.cat(resized, dim=1)

        if self.embedding_dim != embeddings.shape[1]:
            batch, channels, height, width = embeddings.shape
            flat = embeddings.permute(0, 2, 3, 1).reshape(-1, 1, channels)
            flat = F.adaptive_avg_pool1d(flat, self.embedding_dim)
            embeddings = flat.reshape(batch, height, width, self.embedding_dim).permute(0, 3, 1, 2)
        return embeddings.contiguous()
