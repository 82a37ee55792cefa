"""Patch embeddings streamed into HDF5 shard files.

A store is a folder of shards ``shard-00000.h5``, ``shard-00001.h5``, ... and a
``manifest.json``. Each shard contains at most ``rows_per_shard`` rows in three datasets:

- ``embeddings``: (n, d) float16 or float32, one row per patch;
- ``image_index``: (n,) int32, the position of the patch's image in the manifest's image list;
- ``patch_position``: (n, 2) int16, the patch's (row, column) on the feature grid.

Rows are appended batch by batch and go straight to disk, so memory does not grow with the
number of images. Readers go through the rows in chunks.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

__all__ = ["ShardStore", "ShardWriter", "STORE_FORMAT_VERSION"]

logger = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_DTYPES = {"float16": np.float16, "float32": np.float32}


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.h5"


class ShardWriter:
    """Append patch embeddings to a new store in `directory`.

    Parameters
    ----------
    directory : path
        Folder of the store; created if missing, and it must not hold a store already.
    dim : int
        Embedding width d.
    dtype : "float16" or "float32"
        Storage type of the embeddings; float16 halves the disk and I/O.
    rows_per_shard : int
        Maximum number of rows per shard file.
    """

    def __init__(self, directory: str | os.PathLike, dim: int, dtype: str = "float16", rows_per_shard: int = 1 << 20):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if (self.directory / MANIFEST).exists() or any(self.directory.glob("shard-*.h5")):
            raise ValueError(f"{self.directory} already contains an embedding store; use an empty folder")

        self.dim = int(dim)
        self.dtype = dtype
        self.rows_per_shard = int(rows_per_shard)
        self.shard_rows: list[int] = []
        self.n_rows = 0
        self._file: h5py.File | None = None
        self._started = time.perf_counter()

    def _open_shard(self) -> h5py.File:
        path = self.directory / _shard_name(len(self.shard_rows))
        handle = h5py.File(path, "w")
        chunk = min(self.rows_per_shard, 4096)
        handle.create_dataset(
            "embeddings", shape=(0, self.dim), maxshape=(self.rows_per_shard, self.dim),
            dtype=_DTYPES[self.dtype], chunks=(chunk, self.dim),
        )
        handle.create_dataset("image_index", shape=(0,), maxshape=(self.rows_per_shard,), dtype=np.int32, chunks=(chunk,))
        handle.create_dataset(
            "patch_position", shape=(0, 2), maxshape=(self.rows_per_shard, 2), dtype=np.int16, chunks=(chunk, 2)
        )
        self.shard_rows.append(0)
        return handle

    def append(self, embeddings: np.ndarray, image_index: np.ndarray, patch_position: np.ndarray) -> None:
        """Append rows: embeddings (n, d), image_index (n,) and patch_position (n, 2)."""
        embeddings = np.asarray(embeddings)
        n = embeddings.shape[0]
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"expected embeddings of shape (n, {self.dim}), got {embeddings.shape}")
        if np.shape(image_index) != (n,) or np.shape(patch_position) != (n, 2):
            raise ValueError(
                f"image_index must be ({n},) and patch_position ({n}, 2), "
                f"got {np.shape(image_index)} and {np.shape(patch_position)}"
            )

        start = 0
        while start < n:
            if self._file is None or self.shard_rows[-1] == self.rows_per_shard:
                self._close_shard()
                self._file = self._open_shard()
            used = self.shard_rows[-1]
            take = min(n - start, self.rows_per_shard - used)
            stop = start + take
            for name, values in (
                ("embeddings", embeddings[start:stop]),
                ("image_index", np.asarray(image_index[start:stop])),
                ("patch_position", np.asarray(patch_position[start:stop])),
            ):
                dataset = self._file[name]
                dataset.resize(used + take, axis=0)
                dataset[used : used + take] = values
            self.shard_rows[-1] += take
            self.n_rows += take
            start = stop

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self, images: Sequence[str]) -> "ShardStore":
        """Finish the store, recording the image list that image_index points into."""
        self._close_shard()
        manifest = {
            "format_version": STORE_FORMAT_VERSION,
            "dim": self.dim,
            "dtype": self.dtype,
            "rows_per_shard": self.rows_per_shard,
            "n_rows": self.n_rows,
            "shards": [{"file": _shard_name(i), "rows": rows} for i, rows in enumerate(self.shard_rows)],
            "images": [str(image) for image in images],
        }
        temporary = self.directory / (MANIFEST + ".tmp")
        temporary.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        os.replace(temporary, self.directory / MANIFEST)

        elapsed = time.perf_counter() - self._started
        logger.info(
            "stored %d patches of %d images in %d shards (%s) in %.1f s",
            self.n_rows, len(images), len(self.shard_rows), self.dtype, elapsed,
        )
        return ShardStore(self.directory)


class ShardStore:
    """Read a store written by `ShardWriter`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no embedding store at {self.directory}: {MANIFEST} is missing")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format_version") != STORE_FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path} has store format version {manifest.get('format_version')}, "
                f"this patchindex reads version {STORE_FORMAT_VERSION}"
            )
        self.dim = int(manifest["dim"])
        self.dtype = manifest["dtype"]
        self.n_rows = int(manifest["n_rows"])
        self.shards = [(self.directory / shard["file"], int(shard["rows"])) for shard in manifest["shards"]]
        self.images = list(manifest["images"])

    def __len__(self) -> int:
        return self.n_rows

    def iter_chunks(self, chunk_rows: int = 65536, fields: Sequence[str] = ("embeddings",)) -> Iterator[tuple]:
        """Yield (start_row, arrays...) over all rows in order, at most `chunk_rows` at a time.

        Embeddings come back as (m, d) float32 whatever the storage type.
        """
        start = 0
        for path, rows in self.shards:
            with h5py.File(path, "r") as handle:
                for offset in range(0, rows, chunk_rows):
                    stop = min(offset + chunk_rows, rows)
                    arrays = []
                    for field in fields:
                        values = handle[field][offset:stop]
                        arrays.append(values.astype(np.float32) if field == "embeddings" else values)
                    yield (start + offset, *arrays)
            start += rows

    def take(self, rows: np.ndarray, chunk_rows: int = 65536) -> np.ndarray:
        """Gather embeddings of the given row numbers (k,) as (k, d) float32, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"row numbers must be in [0, {self.n_rows}), got {rows.min()}..{rows.max()}")

        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        result = np.empty((rows.size, self.dim), dtype=np.float32)
        for start, embeddings in self.iter_chunks(chunk_rows):
            lo, hi = np.searchsorted(sorted_rows, [start, start + len(embeddings)])
            if hi > lo:
                result[order[lo:hi]] = embeddings[sorted_rows[lo:hi] - start]
        return result
