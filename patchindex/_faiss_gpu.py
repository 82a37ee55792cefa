"""GPU FAISS detection and one shared GPU resources object.

faiss-cpu wheels have no GPU classes, so every entry point checks for them first.

NOTE: only the detection (no GPU FAISS) runs on the machines the tests run on. The copy to a
GPU and the nprobe setting there follow the FAISS 1.x Python API and are untested.
"""

from __future__ import annotations

import logging

import faiss

__all__ = ["available", "resources", "set_nprobe", "to_gpu"]

logger = logging.getLogger(__name__)

_resources = None

# GPU FAISS has Flat and IVF indexes, but no HNSW and no refinement wrappers.
_GPU_TYPES = ("IndexFlat", "IndexIVFFlat", "IndexIVFPQ", "IndexIVFScalarQuantizer")


def available() -> bool:
    """Return whether this FAISS build has GPU support and finds at least one GPU."""
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        return False
    return faiss.get_num_gpus() > 0


def resources():
    """Return the process's one ``StandardGpuResources``, created on first use.

    Sharing it keeps one set of temporary GPU memory and CUDA streams for all indexes.
    """
    global _resources
    if _resources is None:
        _resources = faiss.StandardGpuResources()
    return _resources


def to_gpu(index: faiss.Index):
    """Copy a CPU index to GPU 0, or return None when GPU FAISS cannot hold its type."""
    kind = type(faiss.downcast_index(index)).__name__
    if kind not in _GPU_TYPES:
        logger.info("GPU FAISS has no %s; searching on the CPU", kind)
        return None
    return faiss.index_cpu_to_gpu(resources(), 0, index)


def set_nprobe(gpu_index, nprobe: int) -> None:
    """Set nprobe on a GPU IVF index."""
    faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", nprobe)
