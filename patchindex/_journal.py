"""Crash-safe files for batch jobs: an append-only JSON-lines journal and atomic writes."""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

__all__ = ["Journal", "atomic_path", "lock_file"]

logger = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` and rename it to `path` when the block succeeds.

    Readers of `path` see either the old file or the complete new one. The temporary file is
    removed when the block raises.
    """
    path = Path(path)
    # The temporary name keeps the suffix, so writers that pick a format from it still work.
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def lock_file(path: str | os.PathLike) -> IO | None:
    """Open `path` for writing and take an exclusive lock on it, without waiting.

    Returns the open file, which holds the lock until it is closed or its process ends, or
    None when another process holds the lock.
    """
    handle = open(path, "w")
    try:
        import fcntl
    except ImportError:
        # NOTE: without fcntl (Windows) no lock is taken, so two writers of one folder are not detected.
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


class Journal:
    """An append-only file of JSON records, one per line, that survives a killed writer.

    `append` writes whole records with one write call, then flushes and fsyncs them. A writer
    killed during a write leaves at most one incomplete last line, which `read` drops and
    truncates away, so every record read back was written completely.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handle = None

    def read(self) -> list[dict]:
        """Return all complete records, truncating an incomplete last line left by a crash."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            logger.warning("dropping an incomplete last record (%d bytes) from %s", len(data) - end, self.path)
            with open(self.path, "r+b") as handle:
                handle.truncate(end)
        records = []
        for number, line in enumerate(data[:end].splitlines(), start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{self.path} line {number} is not valid JSON ({error.msg}); the output folder is damaged, "
                    "so choose a new output folder"
                ) from None
        return records

    def append(self, records: list[dict]) -> None:
        """Write `records` durably at the end of the journal."""
        if not records:
            return
        if self._handle is None:
            self._handle = open(self.path, "ab")
        text = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records)
        self._handle.write(text.encode("utf-8"))
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
