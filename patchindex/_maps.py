"""Anomaly maps of a scoring job in one compressed HDF5 file, written so that a kill loses none.

An HDF5 file that is killed while open for writing can be left unreadable, so the job never
appends to the final file in place. Each batch writes its maps to a small part file under a
temporary name and renames it. At the end of a run, the parts are merged into a copy of the
final file, and the copy is renamed over it. A crash at any point leaves the previous final
file and all committed parts intact, and the next run merges them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np

from ._journal import atomic_path

__all__ = ["MAPS_FILE", "MapStore", "map_key", "read_map"]

logger = logging.getLogger(__name__)

MAPS_FILE = "anomaly_maps.h5"
PARTS_DIR = ".anomaly_maps.parts"
GROUP = "maps"


def map_key(path: str) -> str:
    """Return the dataset name of an image's map: 16 hex digits of the SHA-1 of its path."""
    return hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


class MapStore:
    """The maps of one output folder: `anomaly_maps.h5` plus part files not merged yet.

    In the final file, ``maps/<key>`` is an (H, W) float32 dataset, gzip-compressed, with the
    image path in its ``path`` attribute and the raw image score in ``score``.
    """

    def __init__(self, out: Path):
        self.final = out / MAPS_FILE
        self.parts = out / PARTS_DIR

    def part_names(self) -> set[str]:
        if not self.parts.is_dir():
            return set()
        return {path.name for path in self.parts.glob("*.h5")}

    def remove_unreferenced(self, referenced: set[str]) -> None:
        """Delete part files that no journal record names and temporary files of a crash."""
        for name in self.part_names() - referenced:
            (self.parts / name).unlink()
            logger.info("removed %s, written by a run that stopped before recording it", self.parts / name)
        if self.parts.is_dir():
            for leftover in self.parts.glob(".*.tmp.h5"):
                leftover.unlink()
        self.final.with_name(f".{self.final.stem}.tmp{self.final.suffix}").unlink(missing_ok=True)

    def write_part(self, name: str, maps: list[tuple[str, str, float, np.ndarray]]) -> None:
        """Write (key, path, score, (H, W) float32 map) entries to the part file `name`."""
        self.parts.mkdir(exist_ok=True)
        with atomic_path(self.parts / name) as temporary:
            with h5py.File(temporary, "w") as handle:
                group = handle.create_group(GROUP)
                for key, path, score, amap in maps:
                    dataset = group.create_dataset(
                        key, data=np.asarray(amap, dtype=np.float32), compression="gzip", compression_opts=4, shuffle=True
                    )
                    dataset.attrs["path"] = path
                    dataset.attrs["score"] = score

    def merge(self, keys_by_part: dict[str, set[str]]) -> int:
        """Merge maps from part files into the final file, then delete all part files.

        `keys_by_part` maps a part file name to the keys whose current table row points to it.
        Maps of rows that a later run replaced are not merged. A map already in the final file
        is replaced. Returns the number of maps copied.
        """
        parts = {name: keys for name, keys in keys_by_part.items() if (self.parts / name).is_file()}
        if not parts:
            self._remove_parts()
            return 0

        started = time.perf_counter()
        copied = 0
        # NOTE: the final file is copied once per run that adds maps, so a rerun costs a read and
        # a write of all earlier maps. The copy is what keeps a kill during the merge harmless.
        with atomic_path(self.final) as temporary:
            if self.final.exists():
                shutil.copyfile(self.final, temporary)
            with h5py.File(temporary, "a") as handle:
                group = handle.require_group(GROUP)
                for name in sorted(parts):
                    with h5py.File(self.parts / name, "r") as part:
                        for key in sorted(parts[name] & set(part[GROUP].keys())):
                            if key in group:
                                del group[key]
                            part.copy(part[GROUP][key], group, name=key)
                            copied += 1

        self._remove_parts()
        logger.info("merged %d anomaly maps into %s in %.1f s", copied, self.final, time.perf_counter() - started)
        return copied


    def _remove_parts(self) -> None:
        for name in self.part_names():
            (self.parts / name).unlink()
        if self.parts.is_dir() and not any(self.parts.iterdir()):
            self.parts.rmdir()


def read_map(out: str | os.PathLike, path: str | os.PathLike) -> np.ndarray:
    """Read the (H, W) float32 anomaly map of image `path` from a scoring job's output folder."""
    key = map_key(os.path.abspath(path))
    with h5py.File(Path(out) / MAPS_FILE, "r") as handle:
        if key not in handle[GROUP]:
            raise KeyError(f"no anomaly map for {path} in {Path(out) / MAPS_FILE}")
        return handle[GROUP][key][()]
