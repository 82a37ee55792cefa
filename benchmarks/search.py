"""Compare exact (Flat) and approximate (IVF, IVF-PQ, HNSW, auto) memory-bank search.

On real banks (PatchCore fitted on ../shared/data at several coreset ratios) and on synthetic
banks of 152-d vectors, each index is built once and searched at several nprobe or efSearch
values: recall@1 and recall@k against Flat, queries per second, build time and index size,
and, on real data, the image AUROC and pixel AUROC change against Flat. Flat search speed is
also given as a fraction of the machine's float32 matrix-product rate, measured in the same run.
Appends a section to benchmarks/RESULTS.md and writes its plot to
benchmarks/search_recall_qps_<UTC date and time>.png.

    python benchmarks/search.py                                   # the default banks
    python benchmarks/search.py --real mvtec_ad/bottle:0.1 --synthetic 1000000
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from patchindex import PatchCore  # noqa: E402
from patchindex._exact_search import BANK_BLOCK, QUERY_BLOCK  # noqa: E402
from patchindex._index_auto import ivf_nlist  # noqa: E402
from patchindex.data import load_mask, load_test_split  # noqa: E402
from patchindex.index import MemoryBankIndex  # noqa: E402
from patchindex.metrics import image_auroc, pixel_auroc  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
DEFAULT_REAL = (
    "mvtec_ad/bottle:0.1", "mvtec_ad/bottle:1.0", "magnetic_tile/magnetic_tile:0.1", "magnetic_tile/magnetic_tile:1.0",
)
RECALL_K = 9  # the default support set of the image-score reweighting
TIMED_QUERIES = 20000
RECALL_AT_K_QUERIES = 5000
FAISS_FLAT_QUERIES = 2000
FLAT_REPEATS = 3
# IVF training cost grows with nlist; larger lists keep the benchmark within an hour on 2 cores.
MAX_NLIST = 1024
# Training PQ38 took about 2 minutes on a 60k bank on a shared 2-core machine, so larger banks
# skip it to keep the run short.
MAX_PQ_BANK = 500_000
# HNSW32 on 10M vectors would take hours to build on 2 cores and about 8 GiB beside the bank.
MAX_HNSW_BANK = 2_000_000
# FAISS's own IVF build is compared on banks up to this size: at 10M vectors its copy of the
# bank would not fit in memory beside the bank and the index built here.
MAX_FAISS_IVF_BANK = 2_000_000
FAISS_IVF_NPROBE = 8

logger = logging.getLogger("search-benchmark")


@dataclass
class Row:
    """One index at one search setting on one bank."""

    config: str
    params: dict
    build_s: float
    index_mib: float
    recall_1: float
    recall_k: float
    qps: float
    speedup: float = 1.0
    image_auroc_delta: float | None = None
    pixel_auroc_delta: float | None = None


@dataclass
class Bank:
    name: str
    vectors: np.ndarray
    queries: np.ndarray  # timed queries, (m, d) float32
    flat_gflops: float = 0.0
    faiss_flat_gflops: float = 0.0
    bound_gflops: float = 0.0
    flat_runs: list[float] = field(default_factory=list)  # GFLOP/s of each timed Flat search
    bound_runs: list[float] = field(default_factory=list)
    flat_auroc: tuple | None = None
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Measurements


def matmul_gflops(size: int = 4096, repeats: int = 3) -> float:
    """Return the best float32 FLOP rate (GFLOP/s) of a (size x size) @ (size x size) product.

    numpy and torch are both tried, and the faster is the bound. torch goes last, because
    numpy's OpenBLAS threads keep spinning for a while after a product and would slow the
    torch search that follows.
    """
    best = 0.0
    a = torch.randn(size, size, dtype=torch.float32)
    b = torch.randn(size, size, dtype=torch.float32)
    a_np, b_np = a.numpy(), b.numpy()
    for multiply in (lambda: a_np @ b_np, lambda: a @ b):
        multiply()
        for _ in range(repeats):
            started = time.perf_counter()
            multiply()
            best = max(best, 2 * size**3 / (time.perf_counter() - started) / 1e9)
    return best


def blas_summary() -> str:
    """Name the loaded BLAS libraries and the CPU kernels that threadpoolctl reports for each."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    described = []
    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            described.append(f"{Path(pool['filepath']).name} {pool.get('version')} ({pool.get('architecture', '?')} kernels)")
    # torch's MKL is linked statically, so threadpoolctl does not list it.
    return ", ".join(described) + f"; torch {'with' if torch.backends.mkl.is_available() else 'without'} MKL"


def index_mib(index: MemoryBankIndex) -> float:
    """Return the serialized size of the FAISS index in MiB, counted without holding a copy."""
    total = 0

    def count(chunk: bytes) -> None:
        nonlocal total
        total += len(chunk)

    # serialize_index would hold the whole serialized index, 6 GiB for a 10M bank, in memory.
    writer = faiss.PyCallbackIOWriter(count)
    faiss.write_index(index.index_, writer)
    del writer
    return total / 2**20


def timed_search(index: MemoryBankIndex, queries: np.ndarray, k: int = 1):
    started = time.perf_counter()
    distances, labels = index.search(queries, k)
    return distances, labels, time.perf_counter() - started


def distances_to(queries: np.ndarray, vectors: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return float64 distances (m, k) of queries to vectors[labels], inf where a label is -1.

    Both Flat's and the approximate results are recomputed like this, so that the float32
    rounding of Flat's |x|^2 + |y|^2 - 2 x.y does not count as a miss.
    """
    differences = queries[:, None, :].astype(np.float64) - vectors[np.maximum(labels, 0)].astype(np.float64)
    return np.where(labels >= 0, np.linalg.norm(differences, axis=2), np.inf)


def recall_at_1(distances: np.ndarray, exact: np.ndarray) -> float:
    """Fraction of queries whose nearest result is as near as the exact nearest neighbour."""
    return float(np.mean(distances[:, 0] <= exact[:, 0] * (1 + 1e-6)))


def recall_at_k(distances: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the k results within the exact k-th distance, so that ties count."""
    limit = np.max(exact, axis=1, keepdims=True) * (1 + 1e-6)
    return float(np.mean(np.minimum((distances <= limit).sum(axis=1), exact.shape[1]) / exact.shape[1]))


# ---------------------------------------------------------------------------------------------
# Real data: a fitted model and its test embeddings, extracted once per dataset


@dataclass
class TestSet:
    embeddings: list
    geometries: list
    labels: np.ndarray
    masks: list  # (H, W) bool or None for anomalous images without a mask


def extract_test_set(model: PatchCore, root: Path, stride: int) -> TestSet:
    samples = load_test_split(root)[::stride]
    embeddings, geometries, labels, masks = [], [], [], []
    for start in range(0, len(samples), 8):
        batch = samples[start : start + 8]
        prepared = [model._prepare(sample.path, str(sample.path)) for sample in batch]
        embeddings.extend(model._embed([tensor for tensor, _ in prepared]))
        geometries.extend(geometry for _, geometry in prepared)
        for sample, (_, geometry) in zip(batch, prepared):
            labels.append(sample.label)
            if sample.mask_path is not None:
                masks.append(load_mask(sample.mask_path, geometry.original_size))
            elif sample.label == 0:
                masks.append(np.zeros(geometry.original_size, dtype=bool))
            else:
                masks.append(None)
    return TestSet(embeddings, geometries, np.asarray(labels), masks)


def accuracy(model: PatchCore, index: MemoryBankIndex, test: TestSet) -> tuple[float, float]:
    """Return image AUROC and pixel AUROC of `model` searching with `index`."""
    model.index_ = index
    scores, maps = [], []
    for start in range(0, len(test.embeddings), 64):
        batch_scores, batch_maps = model._score_embeddings(
            test.embeddings[start : start + 64], test.geometries[start : start + 64]
        )
        scores.extend(batch_scores)
        maps.extend(batch_maps)
    pairs = [(mask, amap) for mask, amap in zip(test.masks, maps) if mask is not None]
    return (
        image_auroc(test.labels, np.asarray(scores)),
        pixel_auroc([mask for mask, _ in pairs], [amap for _, amap in pairs]),
    )


# ---------------------------------------------------------------------------------------------
# Synthetic banks


def synthetic_vectors(n: int, seed: int, dim: int = 152) -> np.ndarray:
    """Draw (n, dim) float32 vectors from a fixed mixture shaped like CNN patch embeddings.

    4096 cluster centers lie on a random 24-d subspace. Each cluster spreads along its own
    random 8-d subspace (std 0.25 per direction) plus isotropic noise (std 0.05), and values
    are clipped at 0 as after a ReLU. The mixture is the same for every seed; `seed` draws
    the points.
    """
    mixture = np.random.default_rng(12345)
    centers = mixture.standard_normal((4096, 24)).astype(np.float32) @ (
        mixture.standard_normal((24, dim)).astype(np.float32) / np.sqrt(24)
    )
    spreads = mixture.standard_normal((4096, 8, dim)).astype(np.float32) * (0.25 / np.sqrt(8))
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        cluster = rng.integers(4096, size=m)
        local = np.einsum("mk,mkd->md", rng.standard_normal((m, 8)).astype(np.float32), spreads[cluster])
        noise = 0.05 * rng.standard_normal((m, dim)).astype(np.float32)
        np.maximum(centers[cluster] + local + noise, 0.0, out=out[start : start + m])
    return out


# ---------------------------------------------------------------------------------------------
# One bank


def configurations(n: int) -> list[tuple[str, str, list[int]]]:
    """Return (factory string, search parameter, values) to benchmark on a bank of `n`."""
    nlist = min(MAX_NLIST, ivf_nlist(n))
    configs = [(f"IVF{nlist},Flat", "nprobe", [1, 2, 4, 8, 16, 32])]
    if n <= MAX_HNSW_BANK:
        configs.insert(0, ("HNSW32", "ef_search", [16, 32, 64, 128, 256]))
    if n <= MAX_PQ_BANK:
        configs.append((f"IVF{nlist},PQ38", "nprobe", [8, 16, 32]))
    return configs


def compare_faiss_ivf(spec: str, vectors: np.ndarray, queries: np.ndarray) -> str:
    """Build and search `spec` with MemoryBankIndex and with FAISS's own train, add and search."""
    started = time.perf_counter()
    ours = MemoryBankIndex(spec).build(vectors)
    ours_build_s = time.perf_counter() - started

    started = time.perf_counter()
    index = faiss.index_factory(vectors.shape[1], spec)
    index.train(vectors)
    index.add(vectors)
    build_s = time.perf_counter() - started
    faiss.extract_index_ivf(index).nprobe = FAISS_IVF_NPROBE
    ours.set_search_params(nprobe=FAISS_IVF_NPROBE)

    index.search(queries[:256], 1)
    started = time.perf_counter()
    index.search(queries, 1)
    faiss_s = time.perf_counter() - started
    ours.search(queries[:256], 1)
    _, _, ours_s = timed_search(ours, queries, 1)
    return (
        f"FAISS's own {spec} (its own k-means, assignment and search): built in {build_s:.1f} s against {ours_build_s:.1f} s "
        f"here ({build_s / ours_build_s:.1f}x as long); at nprobe {FAISS_IVF_NPROBE} it searched {len(queries) / faiss_s:.0f} "
        f"queries/s against {len(queries) / ours_s:.0f} here ({faiss_s / ours_s:.2f} times FAISS's rate)."
    )


def run_bank(bank: Bank, model: PatchCore | None, test: TestSet | None, recall_target: float, sweep: bool = True) -> None:
    vectors, queries = bank.vectors, bank.queries
    n, dim = vectors.shape
    logger.info("bank %s: %d x %d, %d timed queries", bank.name, n, dim, len(queries))

    started = time.perf_counter()
    flat = MemoryBankIndex("Flat").build(vectors)
    flat_build = time.perf_counter() - started
    # The machine is shared and its speed varies by tens of percent from minute to minute, so
    # Flat and the bound are each the best of three measurements, taken in turns.
    bounds, flat_times = [matmul_gflops()], []
    for _ in range(FLAT_REPEATS):
        flat.search(queries[:256], 1)
        _, exact_labels, seconds = timed_search(flat, queries, 1)
        flat_times.append(seconds)
        bounds.append(matmul_gflops())
    bank.bound_gflops, flat_seconds = max(bounds), min(flat_times)
    bank.bound_runs = bounds
    bank.flat_runs = [2 * len(queries) * n * dim / seconds / 1e9 for seconds in flat_times]
    bank.flat_gflops = 2 * len(queries) * n * dim / flat_seconds / 1e9
    # FAISS's own exact search, which MemoryBankIndex no longer uses for Flat on the CPU, on
    # the same index for comparison.
    faiss_queries = queries[:FAISS_FLAT_QUERIES]
    started = time.perf_counter()
    flat.index_.search(faiss_queries, 1)
    bank.faiss_flat_gflops = 2 * len(faiss_queries) * n * dim / (time.perf_counter() - started) / 1e9
    exact = distances_to(queries, vectors, exact_labels)
    k_queries = queries[:RECALL_AT_K_QUERIES]
    exact_k = distances_to(k_queries, vectors, flat.search(k_queries, RECALL_K)[1])
    flat_qps = len(queries) / flat_seconds
    flat_row = Row("Flat", {}, flat_build, index_mib(flat), 1.0, 1.0, flat_qps)
    if model is not None:
        bank.flat_auroc = accuracy(model, flat, test)
        flat_row.image_auroc_delta = flat_row.pixel_auroc_delta = 0.0
    bank.rows.append(flat_row)
    logger.info("%s Flat: %.0f queries/s, %.1f GFLOP/s, bound %.1f GFLOP/s", bank.name, flat_qps, bank.flat_gflops, bank.bound_gflops)
    del flat
    gc.collect()

    def measure(index: MemoryBankIndex, config: str, build_s: float) -> Row:
        _, labels, seconds = timed_search(index, queries, 1)
        distances = distances_to(queries, vectors, labels)
        distances_k = distances_to(k_queries, vectors, index.search(k_queries, RECALL_K)[1])
        qps = len(queries) / seconds
        row = Row(
            config, dict(index.search_params), build_s, index_mib(index),
            recall_at_1(distances, exact), recall_at_k(distances_k, exact_k), qps, qps / flat_qps,
        )
        # AUROC takes a full scoring pass, so it is skipped where recall already rules a setting out.
        if model is not None and row.recall_1 >= 0.95:
            image, pixel = accuracy(model, index, test)
            row.image_auroc_delta = image - bank.flat_auroc[0]
            row.pixel_auroc_delta = pixel - bank.flat_auroc[1]
        logger.info("%s %s %s: %s", bank.name, config, row.params, row)
        return row

    # auto goes first, and a configuration of the same spec sweeps that index instead of
    # building it again (HNSW on a million vectors takes minutes).
    started = time.perf_counter()
    auto = MemoryBankIndex("auto", recall_target=recall_target).build(vectors)
    auto_build_s = time.perf_counter() - started
    auto_row = measure(auto, f"auto -> {auto.spec_}", auto_build_s)
    sweep_specs = [spec for spec, _, _ in configurations(n)] if sweep else []
    if auto.spec_ not in sweep_specs:
        # Each index contains a copy of the bank, 6 GiB at 10M vectors.
        auto = None
        gc.collect()

    for spec, name, values in configurations(n) if sweep else []:
        if auto is not None and auto.spec_ == spec:
            index, build_s = auto, auto_build_s
        else:
            started = time.perf_counter()
            index = MemoryBankIndex(spec).build(vectors)
            build_s = time.perf_counter() - started
        if index.spec_ != spec:
            bank.notes.append(f"{spec} fell back to {index.spec_} (bank too small)")
            continue
        for value in values:
            try:
                index.set_search_params(**{name: value})
            except ValueError as error:
                logger.info("skipped %s %s=%d: %s", spec, name, value, error)
                continue
            bank.rows.append(measure(index, spec, build_s))
        if spec.startswith("IVF") and spec.endswith(",Flat") and n <= MAX_FAISS_IVF_BANK:
            bank.notes.append(compare_faiss_ivf(spec, vectors, queries))
        del index
        gc.collect()
    bank.rows.append(auto_row)


# ---------------------------------------------------------------------------------------------
# Report


def format_params(params: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in params.items()) or "-"


def best_fast_config(bank: Bank, min_recall: float = 0.99) -> Row | None:
    """Return the fastest non-auto configuration with recall@1 >= `min_recall`."""
    candidates = [row for row in bank.rows if row.config != "Flat" and not row.config.startswith("auto") and row.recall_1 >= min_recall]
    return max(candidates, key=lambda row: row.qps, default=None)


def git_revision() -> str:
    """Return the short commit of the checkout, with "+changes" when files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout
    return (head or "unknown") + ("+changes" if changed.strip() else "")


def report(banks: list[Bank], args, started: float, revision: str) -> str:
    command = "python " + " ".join(shlex.quote(part) for part in sys.argv)
    lines = [
        "",
        f"## search.py, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Command: `{command}` at commit {revision} ({(time.perf_counter() - started) / 60:.0f} min)",
        f"Machine: {platform.machine()}, {faiss.omp_get_max_threads()} FAISS threads, {torch.get_num_threads()} torch threads, "
        f"FAISS {faiss.__version__}, torch {torch.__version__}; searches on the CPU.",
        f"Queries: {TIMED_QUERIES} per bank at most (real banks: random test-image patches; synthetic: fresh draws "
        "from the bank's mixture), searched for k=1 in one call (the index searches 65536 rows at a time). "
        f"recall@{RECALL_K} on the first {RECALL_AT_K_QUERIES}. Recall counts a result as found when it is as near as "
        "Flat's, so ties count. Build time includes training and, for auto, tuning (rows of the spec that auto chose sweep "
        "the auto index, so they show its build time). Index size is the serialized FAISS "
        "index; PQ indexes also read the memory bank for exact reranking, which PatchCore keeps anyway. "
        f"AUROC deltas are against Flat on the same test images, for settings with recall@1 >= 0.95; "
        f"IVF nlist is capped at {MAX_NLIST}; IVF-PQ runs only on banks of at most {MAX_PQ_BANK} vectors "
        f"and HNSW on banks of at most {MAX_HNSW_BANK}.",
        f"BLAS: {blas_summary()}.",
        "",
    ]
    for bank in banks:
        lines.append(f"### {bank.name}: {bank.vectors.shape[0]} x {bank.vectors.shape[1]}, {len(bank.queries)} timed queries")
        lines.append("")
        lines.append(
            f"Flat: {bank.flat_gflops:.1f} GFLOP/s of distance products against a float32 matrix-product bound of "
            f"{bank.bound_gflops:.1f} GFLOP/s (best of torch and numpy 4096^3; best of {FLAT_REPEATS} Flat searches and of the "
            f"bound measured before, between and after them: Flat {', '.join(f'{rate:.0f}' for rate in bank.flat_runs)}, "
            f"bound {', '.join(f'{rate:.0f}' for rate in bank.bound_runs)}): "
            f"{bank.flat_gflops / bank.bound_gflops:.2f} of the bound, with torch matrix products of {QUERY_BLOCK} queries x "
            f"{BANK_BLOCK} bank rows. FAISS's own IndexFlatL2 search on the first {FAISS_FLAT_QUERIES} queries: "
            f"{bank.faiss_flat_gflops:.1f} GFLOP/s ({bank.faiss_flat_gflops / bank.bound_gflops:.2f} of the bound)."
        )
        if bank.flat_auroc:
            lines.append(f"Flat image AUROC {bank.flat_auroc[0]:.4f}, pixel AUROC {bank.flat_auroc[1]:.4f}.")
        lines.extend(bank.notes)
        lines.append("")
        lines.append(f"| index | search | build s | MiB | recall@1 | recall@{RECALL_K} | queries/s | x Flat | d image AUROC | d pixel AUROC |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for row in bank.rows:
            image = "" if row.image_auroc_delta is None else f"{row.image_auroc_delta:+.4f}"
            pixel = "" if row.pixel_auroc_delta is None else f"{row.pixel_auroc_delta:+.4f}"
            lines.append(
                f"| {row.config} | {format_params(row.params)} | {row.build_s:.1f} | {row.index_mib:.0f} | {row.recall_1:.4f} | "
                f"{row.recall_k:.4f} | {row.qps:.0f} | {row.speedup:.1f} | {image} | {pixel} |"
            )
        lines.append("")

    lines.append("Targets in this run:")
    for bank in banks:
        best = best_fast_config(bank)
        auto = next(row for row in bank.rows if row.config.startswith("auto"))
        text = f"- {bank.name}: Flat at {bank.flat_gflops / bank.bound_gflops:.2f} of the bound; "
        swept = any(row.config != "Flat" and not row.config.startswith("auto") for row in bank.rows)
        if not swept:
            text += "fixed indexes not run (--auto-only)"
        elif best is None:
            text += "no fixed index reaches recall@1 0.99"
        else:
            text += f"fastest with recall@1 >= 0.99: {best.config} {format_params(best.params)} at {best.speedup:.1f}x Flat"
        if best is not None and best.image_auroc_delta is not None:
            text += f" (image AUROC {best.image_auroc_delta:+.4f}, pixel AUROC {best.pixel_auroc_delta:+.4f})"
        text += f"; auto ({auto.config} {format_params(auto.params)}) recall@1 {auto.recall_1:.4f} for target {args.recall_target}"
        lines.append(text + ".")
    return "\n".join(lines) + "\n"


def plot(banks: list[Bank], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(banks), figsize=(4.5 * len(banks), 4), squeeze=False)
    for axis, bank in zip(axes[0], banks):
        by_config: dict[str, list[Row]] = {}
        for row in bank.rows:
            by_config.setdefault(row.config, []).append(row)
        for config, rows in by_config.items():
            marker = "o"
            if config == "Flat":
                marker = "*"
            elif config.startswith("auto"):
                marker = "s"
            axis.plot([row.qps for row in rows], [row.recall_1 for row in rows], marker=marker, label=config)
        axis.set_xscale("log")
        axis.set_xlabel("queries per second (k=1)")
        axis.set_ylabel("recall@1 against Flat")
        axis.set_title(f"{bank.name} ({bank.vectors.shape[0]} vectors)", fontsize=9)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", nargs="*", default=list(DEFAULT_REAL), help="DATASET:CORESET_RATIO under ../shared/data")
    parser.add_argument("--synthetic", nargs="*", type=int, default=[1_000_000], help="synthetic bank sizes")
    parser.add_argument("--test-stride", type=int, nargs="*", default=["magnetic_tile/magnetic_tile:3"],
                        help="DATASET:N uses every Nth test image of DATASET (default: every 3rd of magnetic_tile)")
    parser.add_argument("--recall-target", type=float, default=0.99, help="recall@1 target of the auto index")
    parser.add_argument("--auto-only", action="store_true", help="measure Flat and auto only, without the sweep of fixed indexes")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("patchindex").setLevel(logging.WARNING)
    started = time.perf_counter()
    # The code that runs is the code at start: later commits must not be credited with it.
    revision = git_revision()
    strides = {item.rsplit(":", 1)[0]: int(item.rsplit(":", 1)[1]) for item in args.test_stride}

    banks: list[Bank] = []
    tests: dict[str, TestSet] = {}
    # Banks of one dataset at several coreset ratios share one embedding store, extracted once.
    stores = tempfile.TemporaryDirectory(prefix="search-benchmark-")
    for item in args.real:
        dataset, ratio = item.rsplit(":", 1)
        store_dir = Path(stores.name) / dataset.replace("/", "_")
        reused = store_dir.exists()
        model = PatchCore(coreset_ratio=float(ratio), store_dir=store_dir, progress=False).fit(DATA / dataset)
        if dataset not in tests:
            tests[dataset] = extract_test_set(model, DATA / dataset, strides.get(dataset, 1))
        test = tests[dataset]
        patches = np.concatenate([e.permute(1, 2, 0).reshape(-1, e.shape[0]).numpy() for e in test.embeddings])
        rng = np.random.default_rng(0)
        queries = patches[rng.choice(len(patches), size=min(TIMED_QUERIES, len(patches)), replace=False)]
        stride = strides.get(dataset, 1)
        bank = Bank(f"{dataset} ratio {ratio}", model.memory_bank_, np.ascontiguousarray(queries))
        bank.notes.append(
            f"Test images: {len(test.labels)}" + (f" (every {stride}th)" if stride > 1 else "")
            + f"; {len(patches)} test patches; fit took {model.fit_seconds_:.0f} s"
            + (" (embeddings extracted by an earlier ratio's fit)." if reused else ".")
        )
        run_bank(bank, model, test, args.recall_target, sweep=not args.auto_only)
        banks.append(bank)
        print(json.dumps({"bank": bank.name, "rows": [row.__dict__ for row in bank.rows]}), flush=True)
        del model, patches
        gc.collect()

    for size in args.synthetic:
        bank = Bank(f"synthetic {size // 1000}k", synthetic_vectors(size, seed=1), synthetic_vectors(min(TIMED_QUERIES, 5000), seed=2))
        bank.notes.append("Mixture of 4096 clusters with low intrinsic dimension (see synthetic_vectors in search.py).")
        run_bank(bank, None, None, args.recall_target, sweep=not args.auto_only)
        banks.append(bank)
        print(json.dumps({"bank": bank.name, "rows": [row.__dict__ for row in bank.rows]}), flush=True)

    text = report(banks, args, started, revision)
    print(text)
    plot_path = RESULTS.parent / f"search_recall_qps_{datetime.now(timezone.utc):%Y%m%d_%H%M}.png"
    plot(banks, plot_path)
    if not args.no_record:
        with open(RESULTS, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.write(f"\nPlot: [{plot_path.name}]({plot_path.name})\n")


if __name__ == "__main__":
    main()
