"""patchindex: PatchCore industrial anomaly detection built to scale.

Patch embeddings from a pretrained timm backbone are streamed into HDF5 shards, a k-center
greedy coreset picks the memory bank, and FAISS searches it.
"""

__version__ = "0.1.0"

from .estimator import ImageResult, PatchCore, Prediction  # noqa: E402

__all__ = ["ImageResult", "PatchCore", "Prediction", "__version__"]
