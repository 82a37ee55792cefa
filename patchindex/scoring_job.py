"""Batch scoring jobs: score many image files into an output folder that a rerun resumes.

An output folder holds:

    scores.csv, scores.parquet  one row per image, see COLUMNS (Parquet only when pyarrow imports);
                                `overlay` is relative to the output folder
    anomaly_maps.h5             maps/<map_key>: (H, W) float32 anomaly map, gzip-compressed
    overlays/*.png              heatmap over the image, on one color scale for the model
    job.json                    model fingerprint, threshold, and counts and timings of each run
    .journal.jsonl              the source of truth: one JSON record per finished image

A batch is committed by writing its maps to a part file (under a temporary name, then renamed),
then appending its records to the journal with one fsynced write. Tables and the final map
file are rebuilt from the journal under temporary names and renamed, so a killed job leaves no
half-written row, map or table. A rerun skips every image whose path, size and modification
time match a scored record. Failed images are tried again on every run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ._journal import Journal, atomic_path, lock_file
from ._maps import MAPS_FILE, MapStore, map_key
from .calibration import DEFAULT_FPR, check_fpr
from .data import ImageLoadError, UnreadableSource, expand_score_inputs, load_image
from .visualize import save_overlay

__all__ = ["COLUMNS", "DEFAULT_MAX_PIXELS", "JobSummary", "resolve_threshold", "run_scoring_job"]

logger = logging.getLogger(__name__)

COLUMNS = ["path", "size_bytes", "mtime_ns", "raw_score", "normalized_score", "decision", "error", "map_key", "overlay"]
DEFAULT_MAX_PIXELS = 50_000_000
STAGES = ("decode", "backbone", "search", "postprocess", "write")

JOURNAL_FILE = ".journal.jsonl"
CSV_FILE = "scores.csv"
PARQUET_FILE = "scores.parquet"
JOB_FILE = "job.json"
LOCK_FILE = ".lock"
OVERLAY_DIR = "overlays"
# Parameters that change scores or maps; the others (device, batch size, progress) do not.
_SCORING_PARAMS = ("backbone", "out_indices", "resize", "crop", "embedding_dim", "num_neighbors", "blur_sigma")


@dataclass
class JobSummary:
    """Counts and timings of one run of a scoring job."""

    out: Path
    n_inputs: int
    n_skipped: int
    n_scored: int
    n_failed: int
    n_anomalous: int | None
    threshold: float | None
    threshold_source: str
    seconds: float
    stage_seconds: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.n_scored / self.seconds if self.seconds > 0 else 0.0

    def report(self) -> str:
        """Return a few lines for a person: counts, where results are, timings per stage."""
        lines = [
            f"{self.n_inputs} inputs: {self.n_scored} scored, {self.n_failed} failed, "
            f"{self.n_skipped} already scored by an earlier run; results in {self.out / CSV_FILE}",
        ]
        if self.threshold is None:
            lines.append(
                "note: the model has no calibration, so scores have no decision or normalized score; "
                "fit with --calibration-fraction or --calibration-data, or pass --threshold"
            )
        else:
            lines.append(
                f"threshold {self.threshold:.6g} ({self.threshold_source}): "
                f"{self.n_anomalous} of the images scored in this run are anomalous"
            )
        stages = ", ".join(f"{stage} {self.stage_seconds.get(stage, 0.0):.1f} s" for stage in STAGES)
        lines.append(f"{self.seconds:.1f} s, {self.images_per_second:.2f} images/s; stages: {stages}")
        return "\n".join(lines)


@dataclass
class _Entry:
    """An input of the job: its absolute path (or source text) and its file size and mtime."""

    path: str
    item: object
    size: int | None
    mtime_ns: int | None


@dataclass
class _Decoded:
    tensor: object = None
    geometry: object = None
    rgb: np.ndarray | None = None
    error: str | None = None
    seconds: float = 0.0


def resolve_threshold(model, fpr: float = DEFAULT_FPR, threshold: float | None = None) -> tuple[float | None, str]:
    """Return (threshold, description): the explicit one, or the calibration's at `fpr`.

    The threshold is None when the model has no calibration and none is given.
    """
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold <= 0:
            raise ValueError(f"threshold must be a positive finite image score, got {threshold!r}")
        return float(threshold), "set by --threshold"
    fpr = check_fpr(fpr)
    calibration = getattr(model, "calibration_", None)
    if calibration is None:
        return None, "no calibration"
    calibration.warn_if_coarse(fpr)
    return calibration.threshold(fpr), f"false-positive rate {fpr:g} on {calibration.source}"


def _model_fingerprint(model) -> str:
    """Return a digest of what makes scores comparable: memory bank, weights and parameters."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(model.memory_bank_, dtype=np.float32).tobytes())
    digest.update(model.feature_extractor_.weights_sha256.encode())
    params = model.get_params()
    digest.update(json.dumps({name: params[name] for name in _SCORING_PARAMS}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _list_entries(inputs, out: Path | None = None) -> list[_Entry]:
    """Expand the inputs into entries with absolute paths, dropping repeated paths.

    Files inside the output folder `out` (overlays of an earlier run) are left out.
    """
    entries, seen = [], set()
    own = None if out is None else os.path.abspath(out) + os.sep
    for item in expand_score_inputs(inputs):
        if isinstance(item, UnreadableSource):
            path = item.text
        elif isinstance(item, (str, os.PathLike)):
            path = os.path.abspath(item)
        else:
            raise ValueError(
                f"a scoring job takes image paths, folders, globs or list files, got a {type(item).__name__}; "
                "use PatchCore.predict for in-memory images"
            )
        if path in seen or (own is not None and path.startswith(own)):
            continue
        seen.add(path)
        try:
            stat = os.stat(path)
            size, mtime_ns = stat.st_size, stat.st_mtime_ns
        except (OSError, ValueError):
            size = mtime_ns = None
        entries.append(_Entry(path, item, size, mtime_ns))
    return entries


def _is_done(entry: _Entry, record: dict | None) -> bool:
    return (
        record is not None
        and record.get("error") is None
        and record.get("size_bytes") == entry.size
        and record.get("mtime_ns") == entry.mtime_ns
    )


def _table_rows(latest: dict[str, dict], threshold: float | None) -> list[dict]:
    """Turn the latest journal record of each path into table rows, deciding at `threshold`."""
    rows = []
    for record in latest.values():
        raw = record.get("raw_score")
        normalized = decision = None
        if raw is not None and threshold is not None:
            normalized = raw / threshold
            decision = "anomalous" if raw > threshold else "normal"
        rows.append({
            "path": record["path"],
            "size_bytes": record.get("size_bytes"),
            "mtime_ns": record.get("mtime_ns"),
            "raw_score": raw,
            "normalized_score": normalized,
            "decision": decision,
            "error": record.get("error"),
            "map_key": record.get("map_key"),
            "overlay": record.get("overlay"),
        })
    return rows


def _write_tables(out: Path, rows: list[dict]) -> None:
    """Write scores.csv, and scores.parquet when pyarrow imports, each under a temporary name."""
    with atomic_path(out / CSV_FILE) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            for row in rows:
                values = []
                for column in COLUMNS:
                    value = row[column]
                    if value is None:
                        value = ""
                    elif column in ("raw_score", "normalized_score"):
                        value = f"{value:.6f}"
                    values.append(value)
                writer.writerow(values)

    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return
    schema = pa.schema([
        ("path", pa.string()), ("size_bytes", pa.int64()), ("mtime_ns", pa.int64()), ("raw_score", pa.float64()),
        ("normalized_score", pa.float64()), ("decision", pa.string()), ("error", pa.string()),
        ("map_key", pa.string()), ("overlay", pa.string()),
    ])
    with atomic_path(out / PARQUET_FILE) as temporary:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), temporary)


def _read_job(out: Path, fingerprint: str) -> dict:
    """Read job.json, raising ValueError when the folder contains scores of another model."""
    path = out / JOB_FILE
    if not path.exists():
        if (out / JOURNAL_FILE).exists():
            raise ValueError(f"{out} has a journal but no {JOB_FILE}; the folder is damaged, so choose a new --out")
        return {"format_version": 1, "model_fingerprint": fingerprint, "threshold": None, "runs": []}
    try:
        job = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); choose a new --out") from None
    if not isinstance(job, dict) or not isinstance(job.get("runs"), list):
        raise ValueError(f"{path} is not a scoring job file; choose a new --out")
    if job.get("model_fingerprint") != fingerprint:
        raise ValueError(
            f"{out} contains scores of another model (fingerprint {job.get('model_fingerprint')}, this model has "
            f"{fingerprint}); score into a new --out folder"
        )
    return job


def _write_job(out: Path, job: dict) -> None:
    with atomic_path(out / JOB_FILE) as temporary:
        temporary.write_text(json.dumps(job, indent=2), encoding="utf-8")


class _Run:
    """One run of a scoring job into one output folder."""

    def __init__(self, model, out: Path, overlays: str, threshold: float | None, max_pixels: int | None):
        self.model = model
        self.out = out
        self.overlays = overlays
        self.threshold = threshold
        self.max_pixels = max_pixels
        self.journal = Journal(out / JOURNAL_FILE)
        self.maps = MapStore(out)
        self.timings = {stage: 0.0 for stage in STAGES}
        self.run_id = f"{time.time_ns():x}"
        self.n_parts = 0

        # One color scale for every image of the model: from the typical training patch score
        # (99th percentile) to three times that value.
        reference = getattr(model, "training_patch_score_p99_", None)
        self.color_range = (reference, 3.0 * reference) if reference else (0.0, None)

    def decode(self, entry: _Entry) -> _Decoded:
        """Read and preprocess one image in a worker thread; failures become an error reason."""
        started = time.perf_counter()
        result = _Decoded()
        try:
            if isinstance(entry.item, UnreadableSource):
                raise ImageLoadError(entry.item.text, entry.item.reason)
            rgb = load_image(entry.path, self.max_pixels)
            result.tensor, result.geometry = self.model.preprocessor_(rgb)
            if self.overlays != "none":
                result.rgb = rgb
        except ImageLoadError as error:
            result.error = error.reason
        except ValueError as error:
            result.error = str(error)
        except Exception as error:  # noqa: BLE001 - one odd file must not stop the job
            logger.exception("unexpected error while decoding %s", entry.path)
            result.error = f"decoding failed ({type(error).__name__}: {error})"
        result.seconds = time.perf_counter() - started
        return result

    def process(self, batch: list[_Entry], decoded: list[_Decoded]) -> list[dict]:
        """Score a decoded batch, write its maps and overlays, and commit it to the journal."""
        good = [position for position, item in enumerate(decoded) if item.error is None]
        scores: dict[int, float] = {}
        maps: dict[int, np.ndarray] = {}
        if good:
            values, amaps = self.model._score_tensors(
                [decoded[p].tensor for p in good], [decoded[p].geometry for p in good], self.timings
            )
            for position, value, amap in zip(good, values, amaps):
                scores[position] = float(value)
                maps[position] = amap

        started = time.perf_counter()
        part = f"{self.run_id}-{self.n_parts:07d}.h5" if good else None
        records, part_maps = [], []
        for position, (entry, item) in enumerate(zip(batch, decoded)):
            record = {"path": entry.path, "size_bytes": entry.size, "mtime_ns": entry.mtime_ns}
            if item.error is not None:
                logger.warning("cannot score %s: %s", entry.path, item.error)
                record.update(raw_score=None, error=item.error, map_key=None, overlay=None, part=None)
                records.append(record)
                continue
            key = map_key(entry.path)
            part_maps.append((key, entry.path, scores[position], maps[position]))
            overlay = self._write_overlay(entry.path, key, item.rgb, maps[position], scores[position])
            record.update(raw_score=scores[position], error=None, map_key=key, overlay=overlay, part=part)
            records.append(record)

        if part_maps:
            self.maps.write_part(part, part_maps)
            self.n_parts += 1
        self.journal.append(records)
        self.timings["write"] += time.perf_counter() - started
        return records

    def _write_overlay(self, path: str, key: str, rgb, amap: np.ndarray, score: float) -> str | None:
        requested = self.overlays == "all" or (
            self.overlays == "anomalous" and self.threshold is not None and score > self.threshold
        )
        if not requested:
            return None
        folder = self.out / OVERLAY_DIR
        folder.mkdir(exist_ok=True)
        # The stem is shortened so that the name stays under 255 bytes; the key keeps it unique.
        target = folder / f"{Path(path).stem[:100]}_{key[:8]}.png"
        vmin, vmax = self.color_range
        try:
            with atomic_path(target) as temporary:
                save_overlay(temporary, rgb, amap, score, vmin=vmin, vmax=vmax, title=path)
        except OSError as error:
            logger.warning("cannot write the overlay of %s: %s", path, error)
            return None
        return f"{OVERLAY_DIR}/{target.name}"


def _pending_batches(entries: list[_Entry], latest: dict[str, dict], batch_size: int):
    """Yield the entries still to score, in batches cut at fixed positions of the input list.

    Runs commit whole batches, so a rerun forms exactly the batches an uninterrupted run would
    have formed, and scores do not change with where a run stopped.
    """
    for start in range(0, len(entries), batch_size):
        batch = [entry for entry in entries[start : start + batch_size] if not _is_done(entry, latest.get(entry.path))]
        if batch:
            yield batch


@contextmanager
def _exclusive_lock(out: Path):
    """Hold an exclusive lock on `out`, raising ValueError when another job holds it."""
    handle = lock_file(out / LOCK_FILE)
    if handle is None:
        raise ValueError(f"another scoring job is writing into {out}; wait for it or choose another --out")
    with handle:
        yield


def run_scoring_job(
    model,
    inputs,
    out: str | os.PathLike,
    *,
    overlays: str | None = None,
    fpr: float = DEFAULT_FPR,
    threshold: float | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int = 2,
    batch_size: int | None = None,
    table_interval: float = 60.0,
    progress: bool = True,
) -> JobSummary:
    """Score image files with a fitted `model` into the output folder `out`, resuming earlier runs.

    Parameters
    ----------
    inputs : path, folder, glob, list file, or a list of them
        Missing paths and sources without images get error rows.
    overlays : "all", "anomalous", "none" or None
        Images that get a PNG overlay; None means "anomalous" when there is a threshold, else "none".
    fpr, threshold : float
        The decision threshold is `threshold` when given, else the model calibration's threshold
        at the target false-positive rate `fpr`.
    max_pixels : int or None
        Images with more pixels (width x height) get an error row without being decoded.
    workers : int
        Background threads that decode and preprocess images.
    table_interval : float
        Seconds between rewrites of the tables during a run; they are always written at its end.
    """
    model._check_fitted()
    out = Path(out)
    if overlays not in (None, "all", "anomalous", "none"):
        raise ValueError(f"overlays must be 'all', 'anomalous' or 'none', got {overlays!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    batch_size = model.batch_size if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    threshold, threshold_source = resolve_threshold(model, fpr, threshold)
    if overlays is None:
        overlays = "none" if threshold is None else "anomalous"
    if overlays == "anomalous" and threshold is None:
        raise ValueError(
            "overlays 'anomalous' need a decision threshold, but the model has no calibration; "
            "pass --threshold, fit with calibration, or use --overlays all"
        )

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder; choose a folder for the results")
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out):
        return _score_into(
            model, inputs, out, overlays, threshold, threshold_source, max_pixels, workers, batch_size,
            table_interval, progress,
        )


def _score_into(
    model, inputs, out: Path, overlays: str, threshold: float | None, threshold_source: str,
    max_pixels: int | None, workers: int, batch_size: int, table_interval: float, progress: bool,
) -> JobSummary:
    """Run the job once `run_scoring_job` has checked its arguments and locked `out`."""
    job = _read_job(out, _model_fingerprint(model))
    if job["runs"] and job.get("threshold") != threshold:
        logger.warning(
            "%s was scored with threshold %s and is now scored with %s: every row is decided at the new one, "
            "but overlays of earlier runs followed the old one", out, job.get("threshold"), threshold,
        )
    job.update(threshold=threshold, threshold_source=threshold_source)
    _write_job(out, job)

    run = _Run(model, out, overlays, threshold, max_pixels)
    latest: dict[str, dict] = {}
    records = run.journal.read()
    for record in records:
        latest[record["path"]] = record
    run.maps.remove_unreferenced({record["part"] for record in records if record.get("part")})
    del records
    if (out / OVERLAY_DIR).is_dir():
        for leftover in (out / OVERLAY_DIR).glob(".*.tmp.png"):
            leftover.unlink()

    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entries = _list_entries(inputs, out)
    n_pending = sum(not _is_done(entry, latest.get(entry.path)) for entry in entries)
    n_skipped = len(entries) - n_pending
    if n_skipped:
        logger.info("%d of %d inputs were scored by an earlier run into %s and are skipped", n_skipped, len(entries), out)

    n_scored = n_failed = n_anomalous = 0
    last_table = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="patchindex-decode") as pool, tqdm(
            total=n_pending, desc="score", unit="image", disable=not progress
        ) as bar:
            batches = _pending_batches(entries, latest, batch_size)
            queue: deque = deque()

            def submit_next() -> None:
                # Two batches decode ahead, so workers decode while the backbone runs.
                while len(queue) < 2:
                    batch = next(batches, None)
                    if batch is None:
                        return
                    queue.append((batch, [pool.submit(run.decode, entry) for entry in batch]))

            submit_next()
            while queue:
                batch, futures = queue.popleft()
                decoded = [future.result() for future in futures]
                run.timings["decode"] += sum(item.seconds for item in decoded)
                submit_next()

                for record in run.process(batch, decoded):
                    latest[record["path"]] = record
                    if record["error"] is not None:
                        n_failed += 1
                        continue
                    n_scored += 1
                    n_anomalous += threshold is not None and record["raw_score"] > threshold
                bar.update(len(batch))

                if time.perf_counter() - last_table > table_interval:
                    _write_tables(out, _table_rows(latest, threshold))
                    last_table = time.perf_counter()
    finally:
        run.journal.close()
        _finish(run, latest, threshold)

    seconds = time.perf_counter() - started
    summary = JobSummary(
        out, len(entries), n_skipped, n_scored, n_failed, n_anomalous if threshold is not None else None,
        threshold, threshold_source, seconds, dict(run.timings),
    )
    job["runs"].append({
        "started": started_at,
        "seconds": round(seconds, 3),
        "n_inputs": len(entries),
        "n_skipped": n_skipped,
        "n_scored": n_scored,
        "n_failed": n_failed,
        "images_per_second": round(summary.images_per_second, 3),
        "stage_seconds": {stage: round(value, 3) for stage, value in run.timings.items()},
        "workers": workers,
        "batch_size": batch_size,
    })
    _write_job(out, job)
    logger.info("scoring job into %s: %s", out, summary.report().replace("\n", "; "))
    return summary


def _finish(run: _Run, latest: dict[str, dict], threshold: float | None) -> None:
    """Merge this run's maps into the final map file and rewrite the tables."""
    keys_by_part: dict[str, set[str]] = {}
    for record in latest.values():
        if record.get("part"):
            keys_by_part.setdefault(record["part"], set()).add(record["map_key"])
    run.maps.merge(keys_by_part)
    _write_tables(run.out, _table_rows(latest, threshold))
    logger.info("wrote %d rows to %s and maps to %s", len(latest), run.out / CSV_FILE, run.out / MAPS_FILE)
