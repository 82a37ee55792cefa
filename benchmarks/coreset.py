"""Coreset selection at scale: plain against pruned exact and approximate k-center greedy.

On the same projected embeddings (128 dimensions, seed 0), in one run:

- bottle: the real MVTec AD bottle training embeddings (163,856 patches), ratio 0.1;
- synthetic: clustered 152-dimensional embeddings of 1M rows, ratio 0.01;
- fit: a 10M-row synthetic HDF5 store fitted to a saved model through the Python API, ratio 0.001.

Each method runs in a fresh child process, so that its peak RSS is its own. The plain greedy is
the textbook loop that evaluates every row for every center with the sum of squared
differences, as anomalib's does. patchcore-inspection's inner-product form is timed on bottle
as a second reference. On 1M rows the plain greedy runs only its first iterations (each costs
the same) and its total time is extrapolated; its indices are compared over those iterations.

Synthetic rows: 2048 Gaussian clusters (64 groups of 32) in a 24-dimensional latent space with
decaying scales, mapped linearly into 152 dimensions, plus isotropic noise. Like real patch
embeddings they have a low intrinsic dimension: 90% of the variance lies in 11 principal
components (13 for bottle) and 95% in 14 (21 for bottle).

    python benchmarks/coreset.py                      # all three parts
    python benchmarks/coreset.py --parts bottle       # a subset
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PLAIN_PREFIX = 200  # plain iterations timed on 1M rows


def clustered_embeddings(n_rows: int, seed: int = 0, first_row: int = 0, dim: int = 152, latent: int = 24) -> np.ndarray:
    """Rows first_row .. first_row + n_rows of the synthetic set, (n_rows, dim) float32.

    Any range can be generated on its own, so large sets are written piece by piece.
    """
    rng = np.random.default_rng(seed)
    scale = 4.0 * 0.9 ** np.arange(latent)
    groups = rng.normal(0, 1, (64, latent)) * scale
    clusters = np.repeat(groups, 32, axis=0) + rng.normal(0, 1, (2048, latent)) * scale * 0.35
    mixing = (np.linalg.qr(rng.normal(size=(dim, latent)))[0].T * np.sqrt(dim / latent)).astype(np.float32)

    pieces = []
    step = 1 << 18
    for start in range(first_row, first_row + n_rows, step):
        count = min(step, first_row + n_rows - start)
        piece = np.random.default_rng([seed, start])
        latent_rows = clusters[piece.integers(0, 2048, count)] + piece.normal(0, 1, (count, latent)) * scale * 0.12
        noise = piece.standard_normal((count, dim), dtype=np.float32) * 0.2
        pieces.append(latent_rows.astype(np.float32) @ mixing + noise)
    return np.concatenate(pieces)


def project(embeddings: np.ndarray) -> np.ndarray:
    from patchindex.coreset import SparseRandomProjection

    projection = SparseRandomProjection(embeddings.shape[1], 128, random_state=0)
    parts = [projection.transform(torch.from_numpy(part)).numpy() for part in np.array_split(embeddings, 16)]
    return np.concatenate(parts)


# -------------------------------------------------------------------------------------------
# Child processes


def _child_greedy(arguments: argparse.Namespace) -> dict:
    """Run one method on a projected matrix; write the indices; return the figures."""
    from patchindex.coreset import approximate_k_center_greedy, k_center_greedy

    features = torch.from_numpy(np.load(arguments.features))
    started = time.perf_counter()
    if arguments.method in ("plain", "pruned"):
        selected, info = k_center_greedy(
            features, arguments.centers, arguments.start, method=arguments.method, return_info=True
        )
        evaluations, radius = info.distance_evaluations, info.covering_radius
    elif arguments.method == "inner-product":
        selected = _inner_product_greedy(features, arguments.centers, arguments.start)
        evaluations, radius = len(features) * arguments.centers, float("nan")
    else:
        parts = ((start, features[start : start + arguments.part_rows]) for start in range(0, len(features), arguments.part_rows))
        selected, info = approximate_k_center_greedy(
            parts, len(features), arguments.total_centers, random_state=0, return_info=True
        )
        evaluations, radius = info.distance_evaluations, info.covering_radius
    seconds = time.perf_counter() - started

    np.save(arguments.output, selected)
    return {"seconds": seconds, "evaluations": int(evaluations), "radius": radius, "peak_rss_mib": peak_rss_mib()}


def _inner_product_greedy(features: torch.Tensor, n_centers: int, start: int) -> np.ndarray:
    """Run the plain greedy with |x|^2 - 2 x.c + |c|^2 distances, as patchcore-inspection computes them."""
    norms = features.square().sum(dim=1)
    nearest = torch.full((len(features),), float("inf"))
    selected = [start]
    for step in range(n_centers):
        center = features[selected[-1]]
        distances = norms - 2 * torch.mv(features, center) + norms[selected[-1]]
        torch.minimum(nearest, distances, out=nearest)
        if step + 1 < n_centers:
            selected.append(int(torch.argmax(nearest)))
    return np.array(selected)


def _child_fit(arguments: argparse.Namespace) -> dict:
    """Fit a store to a saved model through the public API; return the figures."""
    from patchindex import PatchCore
    from patchindex.store import ShardStore

    started = time.perf_counter()
    model = PatchCore(coreset_ratio=arguments.ratio, progress=False).fit(ShardStore(arguments.store))
    model.save(arguments.output)
    seconds = time.perf_counter() - started
    info = model.coreset_info_
    return {
        "seconds": seconds, "peak_rss_mib": peak_rss_mib(), "bank": len(model.memory_bank_), "method": info.method,
        "radius_bound": info.covering_radius, "evaluations": info.distance_evaluations,
    }


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB.

    Linux's VmHWM belongs to the process's own address space. ru_maxrss, in contrast, keeps
    the parent's peak across fork and exec, so a child started from a large parent would
    report the parent's memory.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(*arguments: str) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--child", *arguments], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"child {' '.join(arguments)} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------
# Parent


def covering_radius(features: np.ndarray, selected: np.ndarray) -> float:
    """Largest distance from a row to its nearest selected row, with FAISS's exact search."""
    import faiss

    index = faiss.IndexFlatL2(features.shape[1])
    index.add(np.ascontiguousarray(features[selected]))
    largest = 0.0
    for start in range(0, len(features), 1 << 16):
        distances, _ = index.search(np.ascontiguousarray(features[start : start + (1 << 16)]), 1)
        largest = max(largest, float(distances.max()))
    return largest**0.5


def compare_methods(name: str, features: np.ndarray, ratio: float, work: Path, part_rows: int, plain_centers: int | None) -> list[dict]:
    """Run every method on one projected matrix; return one row of figures per method."""
    n = len(features)
    centers = int(round(n * ratio))
    start = int(np.random.default_rng(0).integers(n))
    path = work / f"{name}-projected.npy"
    np.save(path, features)

    def greedy(method: str, count: int, **extra) -> tuple[dict, np.ndarray]:
        output = work / f"{name}-{method}.npy"
        options = [f"--{key.replace('_', '-')}={value}" for key, value in extra.items()]
        figures = run_child(
            "greedy", f"--method={method}", f"--features={path}", f"--centers={count}", f"--start={start}",
            f"--output={output}", *options,
        )
        print(f"  {name} {method}: {figures}", flush=True)
        return figures, np.load(output)

    rows = []
    pruned, pruned_selected = greedy("pruned", centers)
    plain_count = plain_centers or centers
    plain, plain_selected = greedy("plain", plain_count)
    identical = bool(np.array_equal(plain_selected, pruned_selected[:plain_count]))
    plain_seconds = plain["seconds"] * centers / plain_count
    rows.append({
        "method": "plain" if plain_count == centers else f"plain ({plain_count} of {centers} iterations, time extrapolated)",
        "seconds": plain_seconds, "evaluations": n * centers, "radius": plain["radius"] if plain_count == centers else None,
        "peak_rss_mib": plain["peak_rss_mib"], "identical": "reference",
    })
    if name == "bottle":
        inner, _ = greedy("inner-product", centers)
        rows.append({**inner, "method": "plain, inner-product form (patchcore-inspection)", "radius": None, "identical": "-"})
    rows.append({**pruned, "method": "pruned exact", "identical": "yes" if identical else "NO"})
    approximate, approximate_selected = greedy("approximate", centers, part_rows=part_rows, total_centers=centers)
    rows.append({
        **approximate, "method": f"approximate ({-(-n // part_rows)} parts)", "identical": "-",
        "radius": covering_radius(features, approximate_selected), "radius_bound": approximate["radius"],
    })
    for row in rows:
        row["speedup"] = plain_seconds / row["seconds"]
    return rows


def bottle_features(work: Path) -> np.ndarray:
    from patchindex import PatchCore
    from patchindex.store import ShardStore

    store_dir = work / "bottle-store"
    if not (store_dir / "manifest.json").exists():
        model = PatchCore(store_dir=store_dir, coreset_ratio=1.0, progress=False)
        model.fit(DATA / "mvtec_ad" / "bottle")
    store = ShardStore(store_dir)
    return project(np.concatenate([chunk for _, chunk in store.iter_chunks()]))


def write_synthetic_store(directory: Path, n_rows: int) -> None:
    from patchindex.store import ShardWriter

    if (directory / "manifest.json").exists():
        return
    started = time.perf_counter()
    writer = ShardWriter(directory, 152, dtype="float16")
    position = np.zeros((784, 2), np.int16)
    step = 784 * 64
    for first in range(0, n_rows, step):
        rows = clustered_embeddings(min(step, n_rows - first), first_row=first)
        for offset in range(0, len(rows), 784):
            writer.add_image(f"synthetic-{(first + offset) // 784:06d}", rows[offset : offset + 784], position[: len(rows[offset : offset + 784])])
    writer.close()
    print(f"  wrote {n_rows} synthetic rows to {directory} in {time.perf_counter() - started:.0f} s", flush=True)


def format_table(rows: list[dict]) -> list[str]:
    lines = [
        "| method | seconds | speedup vs plain | distance evaluations | covering radius | peak RSS (MiB) | same indices as plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        radius = "-" if row.get("radius") is None else f"{row['radius']:.4f}"
        if row.get("radius_bound") is not None:
            radius += f" (bound {row['radius_bound']:.4f})"
        lines.append(
            f"| {row['method']} | {row['seconds']:.1f} | {row['speedup']:.1f}x | {row['evaluations']:.3g} | {radius} "
            f"| {row['peak_rss_mib']:.0f} | {row['identical']} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="bottle,synthetic,fit", help="comma-separated: bottle, synthetic, fit")
    parser.add_argument("--synthetic-rows", type=float, default=1e6)
    parser.add_argument("--fit-rows", type=float, default=1e7)
    parser.add_argument("--work", default=None, help="folder for stores and matrices, kept between runs (default: temporary)")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    arguments = parser.parse_args()
    parts = arguments.parts.split(",")
    work = Path(arguments.work) if arguments.work else Path(tempfile.mkdtemp(prefix="patchindex-coreset-"))
    work.mkdir(parents=True, exist_ok=True)

    sections = []
    if "bottle" in parts:
        print("bottle: 163,856 real patches, ratio 0.1", flush=True)
        rows = compare_methods("bottle", bottle_features(work), 0.1, work, part_rows=1 << 15, plain_centers=None)
        sections.append(("MVTec AD bottle, 163,856 x 128 projected, ratio 0.1 (16,386 centers)", format_table(rows)))
    if "synthetic" in parts:
        n = int(arguments.synthetic_rows)
        print(f"synthetic: {n} clustered rows, ratio 0.01", flush=True)
        features = project(clustered_embeddings(n))
        rows = compare_methods("synthetic", features, 0.01, work, part_rows=1 << 17, plain_centers=PLAIN_PREFIX)
        del features
        sections.append((f"Synthetic clustered, {n:,} x 152 projected to 128, ratio 0.01 ({round(n * 0.01):,} centers)", format_table(rows)))
    if "fit" in parts:
        n = int(arguments.fit_rows)
        print(f"fit: {n} synthetic rows from HDF5 shards, ratio 0.001", flush=True)
        store = work / f"synthetic-store-{n}"
        write_synthetic_store(store, n)
        figures = run_child("fit", f"--store={store}", f"--output={work / 'fit-model'}", "--ratio=0.001")
        print(f"  fit: {figures}", flush=True)
        sections.append((f"Fit from a {n:,}-row float16 HDF5 store (1M-row shards) to a saved model, ratio 0.001", [
            "| coreset method | bank | fit + save seconds | target | peak RSS (MiB) | target | covering radius bound |",
            "|---|---|---|---|---|---|---|",
            f"| {figures['method']} | {figures['bank']:,} | {figures['seconds']:.0f} | <= 900 | {figures['peak_rss_mib']:.0f} "
            f"| <= 4096 | {figures['radius_bound']:.4f} |",
        ]))

    command = "python " + " ".join(shlex.quote(part) for part in ["benchmarks/coreset.py", *sys.argv[1:]])
    header = [
        f"## Coreset selection ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"`{command}` on {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}.",
        "Each method ran in its own process; speedups are against the plain greedy in the same run.",
    ]
    body = []
    for title, table in sections:
        body += ["", f"### {title}", "", *table]
    text = "\n".join(header + body) + "\n"
    print(text)
    if not arguments.no_record:
        with open(RESULTS, "a", encoding="utf-8") as handle:
            handle.write("\n" + text)


def child_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=("greedy", "fit"))
    parser.add_argument("--method")
    parser.add_argument("--features")
    parser.add_argument("--centers", type=int)
    parser.add_argument("--total-centers", type=int)
    parser.add_argument("--start", type=int)
    parser.add_argument("--part-rows", type=int)
    parser.add_argument("--store")
    parser.add_argument("--ratio", type=float)
    parser.add_argument("--output")
    arguments = parser.parse_args()
    figures = _child_greedy(arguments) if arguments.child == "greedy" else _child_fit(arguments)
    print(json.dumps(figures))


if __name__ == "__main__":
    if "--child" in sys.argv:
        child_main()
    else:
        main()
