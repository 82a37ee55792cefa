"""Check that a backbone's weights are real ImageNet weights, offline.

Classifies scikit-image's cat photo ``chelsea`` with the full timm classifier and prints the
top-5 ImageNet classes. Real weights put tabby (281), tiger cat (282) or Egyptian cat (285)
first. Examples::

    python scripts/verify_weights.py
    python scripts/verify_weights.py --backbone wide_resnet50_2 --weights wide_resnet50_2-95faca4d.pth
"""

import argparse

import torch
from skimage import data as skimage_data

from patchindex._weights import create_classifier
from patchindex.data import Preprocessor
from patchindex.features import default_normalization

CAT_CLASSES = {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm model name")
    parser.add_argument("--weights", default="imagenet", help="'imagenet' or a state-dict file")
    parser.add_argument("--size", type=int, default=224, help="input crop size in pixels (default 224)")
    args = parser.parse_args()

    model, source = create_classifier(args.backbone, args.weights)
    mean, std = default_normalization(args.backbone)
    tensor, _ = Preprocessor(int(args.size * 256 / 224), args.size, mean, std)(skimage_data.chelsea())
    with torch.no_grad():
        probabilities = model(tensor[None]).softmax(dim=1)[0]

    top = probabilities.topk(5)
    print(f"{args.backbone} weights from {source}; top-5 ImageNet classes for a cat photo:")
    for probability, index in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  {index:4d} {CAT_CLASSES.get(index, ''):13s} {probability:.3f}")
    real = top.indices[0].item() in CAT_CLASSES
    print("looks like real ImageNet weights" if real else "top class is not a cat: the weights are not ImageNet weights")
    return 0 if real else 1


if __name__ == "__main__":
    raise SystemExit(main())
