"""Patch embeddings streamed into HDF5 shard files, resumable after an interruption.

A store is a folder of shards ``shard-00000.h5``, ``shard-00001.h5``, ... and a
``manifest.json``. Each shard holds the patches of whole images, about ``rows_per_shard`` rows
(a shard is finished after the image that reaches that count), in three datasets:

- ``embeddings``: (n, d) float16 or float32, one row per patch;
- ``image_index``: (n,) int32, the position of the patch's image in the manifest's image list;
- ``patch_position``: (n, 2) int16, the patch's (row, column) on the feature grid.

Rows go straight to disk, so memory does not grow with the number of images. Each finished
shard is recorded in ``progress.json``; a writer opened on a folder with a progress file and the
same fingerprint (the caller's record of inputs and settings) keeps the finished shards,
discards the unfinished one and continues after the last input of the finished shards.
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

from ._journal import lock_file

__all__ = ["ShardStore", "ShardWriter", "STORE_FORMAT_VERSION"]

logger = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
# Held by the one writer of a store folder; a finished store is read without it.
LOCK_FILE = ".lock"
_DTYPES = {"float16": np.float16, "float32": np.float32}


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.h5"


def _write_json(path: Path, content: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(content, indent=1), encoding="utf-8")
    os.replace(temporary, path)


def _check_shard(path: Path, rows: int, dim: int) -> None:
    """Raise ValueError naming `path` unless it is a readable shard of at least `rows` rows."""
    try:
        with h5py.File(path, "r") as handle:
            shape = handle["embeddings"].shape
    except (OSError, KeyError) as error:
        raise ValueError(
            f"embedding store shard {path} is missing or damaged ({error}); delete the store folder and fit again"
        ) from None
    if shape[0] < rows or shape[1] != dim:
        raise ValueError(
            f"embedding store shard {path} has {shape[0]} x {shape[1]} embeddings, expected {rows} x {dim}; "
            "delete the store folder and fit again"
        )


def _differences(stored: dict | None, expected: dict | None) -> list[str]:
    stored, expected = stored or {}, expected or {}
    return sorted(key for key in set(stored) | set(expected) if stored.get(key) != expected.get(key))


class ShardWriter:
    """Write patch embeddings, image by image, to a store in `directory`.

    Parameters
    ----------
    directory : path
        Folder of the store; created if missing. It must be empty, or hold the progress file
        of an interrupted writer with the same `fingerprint`, which is then resumed.
    dim : int
        Embedding width d.
    dtype : "float16" or "float32"
        Storage type of the embeddings; float16 halves the disk and I/O.
    rows_per_shard : int
        A shard is finished after the image that brings it to this many rows.
    fingerprint : dict or None
        JSON-serializable description of the inputs and settings; a resume needs an equal one.

    After a resume, `inputs_done` is the number of inputs that the finished shards cover,
    `images` and `skipped` hold their image names and skipped inputs; the caller continues with
    input number `inputs_done`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        dim: int,
        dtype: str = "float16",
        rows_per_shard: int = 1 << 20,
        fingerprint: dict | None = None,
    ):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = lock_file(self.directory / LOCK_FILE)
        if self._lock is None:
            raise ValueError(
                f"another process is writing an embedding store in {self.directory}; wait for it to finish or use another folder"
            )
        self.dim = int(dim)
        self.dtype = dtype
        self.rows_per_shard = int(rows_per_shard)
        self.fingerprint = fingerprint
        self.shard_rows: list[int] = []
        self.images: list[str] = []
        self.skipped: list[tuple[int, str, str]] = []  # (input number, name, reason)
        self.inputs_done = 0
        self.n_rows = 0
        self._file: h5py.File | None = None
        self._started = time.perf_counter()

        try:
            if (self.directory / MANIFEST).exists():
                raise ValueError(f"{self.directory} already contains a finished embedding store; use an empty folder")
            if (self.directory / PROGRESS).exists():
                self._resume()
            elif any(self.directory.glob("shard-*.h5")):
                raise ValueError(f"{self.directory} contains shard files but no {PROGRESS}; use an empty folder")
        except BaseException:
            self._lock.close()
            raise

    def _resume(self) -> None:
        path = self.directory / PROGRESS
        try:
            progress = json.loads(path.read_text(encoding="utf-8"))
            settings = {key: progress[key] for key in ("format_version", "dim", "dtype", "rows_per_shard")}
            shards, images = progress["shards"], progress["images"]
            skipped, inputs_done = [tuple(item) for item in progress["skipped"]], int(progress["inputs_done"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"cannot resume from {path} ({error}); delete the folder or use an empty one") from None
        mine = {"format_version": STORE_FORMAT_VERSION, "dim": self.dim, "dtype": self.dtype, "rows_per_shard": self.rows_per_shard}
        changed = _differences(settings, mine) + _differences(progress.get("fingerprint"), self.fingerprint)
        if changed:
            raise ValueError(
                f"{self.directory} contains an interrupted store of other inputs or settings "
                f"(differs in: {', '.join(changed)}); use an empty folder or the same inputs and settings"
            )

        # Keep the finished shards; the one being written when the run stopped is redone.
        finished = {shard["file"] for shard in shards}
        for leftover in self.directory.glob("shard-*.h5"):
            if leftover.name not in finished:
                leftover.unlink()
        for shard in shards:
            _check_shard(self.directory / shard["file"], int(shard["rows"]), self.dim)
        self.shard_rows = [int(shard["rows"]) for shard in shards]
        self.n_rows = sum(self.shard_rows)
        self.images = list(images)
        self.skipped = skipped
        self.inputs_done = inputs_done
        logger.info(
            "resuming embedding store %s: %d finished shards, %d patches of %d images, %d inputs done",
            self.directory, len(self.shard_rows), self.n_rows, len(self.images), self.inputs_done,
        )

    def _open_shard(self) -> h5py.File:
        path = self.directory / _shard_name(len(self.shard_rows))
        handle = h5py.File(path, "w")
        chunk = min(self.rows_per_shard, 4096)
        handle.create_dataset(
            "embeddings", shape=(0, self.dim), maxshape=(None, self.dim), dtype=_DTYPES[self.dtype], chunks=(chunk, self.dim)
        )
        handle.create_dataset("image_index", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(chunk,))
        handle.create_dataset("patch_position", shape=(0, 2), maxshape=(None, 2), dtype=np.int16, chunks=(chunk, 2))
        self.shard_rows.append(0)
        return handle

    def add_image(self, name: str, embeddings: np.ndarray, patch_position: np.ndarray, inputs_done: int | None = None) -> None:
        """Append one image's patches: embeddings (n, d) and patch_position (n, 2).

        `inputs_done` is the number of inputs handled once this image is stored (by default,
        one more than before); it is what a resume continues from.
        """
        embeddings = np.asarray(embeddings)
        n = embeddings.shape[0]
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"expected embeddings of shape (n, {self.dim}), got {embeddings.shape}")
        if np.shape(patch_position) != (n, 2):
            raise ValueError(f"patch_position must be ({n}, 2), got {np.shape(patch_position)}")
        if not np.isfinite(embeddings).all() or (self.dtype == "float16" and np.abs(embeddings).max(initial=0) > 65504):
            raise ValueError(
                f"embeddings of image {name} have NaN or infinite values, or values beyond float16's "
                "range of 65504; check the backbone output, or use dtype float32 for large values"
            )

        if self._file is None:
            self._file = self._open_shard()
        used = self.shard_rows[-1]
        image_index = np.full(n, len(self.images), dtype=np.int32)
        for field, values in (("embeddings", embeddings), ("image_index", image_index), ("patch_position", patch_position)):
            dataset = self._file[field]
            dataset.resize(used + n, axis=0)
            dataset[used:] = values
        self.shard_rows[-1] += n
        self.n_rows += n
        self.images.append(str(name))
        self.inputs_done = self.inputs_done + 1 if inputs_done is None else int(inputs_done)

        if self.shard_rows[-1] >= self.rows_per_shard:
            self._finish_shard()

    def add_skipped(self, input_number: int, name: str, reason: str) -> None:
        """Record input number `input_number` as unreadable."""
        self.skipped.append((int(input_number), str(name), str(reason)))

    def _finish_shard(self) -> None:
        self._file.close()
        self._file = None
        _write_json(self.directory / PROGRESS, self._describe(
            inputs_done=self.inputs_done,
            skipped=[item for item in self.skipped if item[0] < self.inputs_done],
        ))

    def _describe(self, **extra) -> dict:
        return {
            "format_version": STORE_FORMAT_VERSION,
            "dim": self.dim,
            "dtype": self.dtype,
            "rows_per_shard": self.rows_per_shard,
            "fingerprint": self.fingerprint,
            "n_rows": self.n_rows,
            "shards": [{"file": _shard_name(i), "rows": rows} for i, rows in enumerate(self.shard_rows)],
            "images": self.images,
            **extra,
        }

    def abort(self) -> None:
        """Close the open shard after a failure; finished shards stay resumable."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._lock.close()

    def close(self) -> "ShardStore":
        """Finish the store and return it for reading."""
        if self._file is not None:
            self._file.close()
            self._file = None
        _write_json(self.directory / MANIFEST, self._describe(skipped=[list(item) for item in self.skipped]))
        (self.directory / PROGRESS).unlink(missing_ok=True)
        self._lock.close()

        elapsed = time.perf_counter() - self._started
        logger.info(
            "stored %d patches of %d images in %d shards (%s) in %.1f s",
            self.n_rows, len(self.images), len(self.shard_rows), self.dtype, elapsed,
        )
        return ShardStore(self.directory)


class ShardStore:
    """Read a store written by `ShardWriter`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no embedding store at {self.directory}: {MANIFEST} is missing")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            version = manifest.get("format_version")
            self.dim = int(manifest["dim"])
            self.dtype = manifest["dtype"]
            self.n_rows = int(manifest["n_rows"])
            self.shards = [(self.directory / shard["file"], int(shard["rows"])) for shard in manifest["shards"]]
            self.images = list(manifest["images"])
            self.fingerprint = manifest.get("fingerprint")
            self.skipped = [tuple(item) for item in manifest.get("skipped", [])]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{manifest_path} is damaged ({type(error).__name__}: {error}); delete the store folder and fit again") from None
        if version != STORE_FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path} has store format version {version}, this patchindex reads version {STORE_FORMAT_VERSION}"
            )
        if sum(rows for _, rows in self.shards) != self.n_rows:
            raise ValueError(f"{manifest_path} is damaged: its shards hold {sum(rows for _, rows in self.shards)} rows, not {self.n_rows}")
        for path, rows in self.shards:
            _check_shard(path, rows, self.dim)

    def differences(self, fingerprint: dict | None) -> list[str]:
        """Keys of `fingerprint` whose values differ from the store's, sorted."""
        return _differences(self.fingerprint, fingerprint)

    def __len__(self) -> int:
        return self.n_rows

    def iter_chunks(
        self, chunk_rows: int = 16384, fields: Sequence[str] = ("embeddings",), shard: int | None = None
    ) -> Iterator[tuple]:
        """Yield (start_row, arrays...) over all rows in order, at most `chunk_rows` at a time.

        Embeddings come back as (m, d) float32 whatever the storage type. With `shard`, only
        that shard's rows are read (start_row still counts from the first row of the store).
        """
        start = 0
        for number, (path, rows) in enumerate(self.shards):
            if shard is not None and number != shard:
                start += rows
                continue
            with h5py.File(path, "r") as handle:
                for offset in range(0, rows, chunk_rows):
                    stop = min(offset + chunk_rows, rows)
                    arrays = []
                    for field in fields:
                        values = handle[field][offset:stop]
                        arrays.append(values.astype(np.float32) if field == "embeddings" else values)
                    yield (start + offset, *arrays)
            start += rows

    def take(self, rows: np.ndarray, chunk_rows: int = 16384) -> np.ndarray:
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
