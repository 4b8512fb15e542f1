"""Index build and search, the near-duplicate pass, and embedding throughput, each against a baseline.

Why this script exists: the indexer promises millisecond searches and a near-duplicate pass over a
million images on a small CPU, and both must be checked against the plainest alternative on the same
data in the same run.

Data: synthetic 384-d unit vectors shaped like a project's embeddings: clusters of loosely related
images (cosine ~0.5 within a cluster) plus 1% planted near duplicates (a perturbed copy of another
vector, cosine ~0.97). Queries are fresh points from the same clusters, not in the index.

Per size (100k and 1M by default):

* **numpy** baseline: ``vectors @ q`` + ``argpartition`` per query, and one matrix product per batch.
* **exact** (``VectorIndex`` forced flat) and **ivf** (``VectorIndex.build``: nlist ~ 4 sqrt(n), nprobe
  chosen for recall@10 >= 0.95 on held-out queries): build time, one-query p50/p99 (queries one at a
  time), batched per-query time (batches of 100), recall@10 against numpy's exact top 10.
* **near-duplicate pass**: ``indexer.duplicates.embedding_pairs`` over every vector (IVF range search,
  cosine >= 0.9, 50 neighbours at most), then the complete-linkage grouping; wall time, peak RSS, and
  pair recall against the exact pairs of 2000 sampled rows (numpy).
* **perceptual pass**: ``hamming_pairs`` (multi-index hashing, 6 bits) over n random 64-bit pHashes with
  0.5% planted near copies: time, pairs found, peak RSS.
* **flat sizes**: one-query p50 of an exact index at 10k-100k vectors (where ``EXACT_BELOW`` comes from).
* **embedding**: images/s of a random-weight ViT-S/14 DINOv2 (same cost as the real one) at 224 px, one
  image at a time in fp32 (baseline) against batches of 16 in fp32 and in bf16, with the cosine to the
  baseline. bf16 pays only on CPUs with bf16 instructions (``avx512_bf16``/``amx_bf16``, recorded).

Run from the repository root (1M needs ~6 GB of RAM and ~10 minutes on 2 cores)::

    .venv/bin/python bench/index_search.py [--sizes 100000,1000000] [--no-embedding]
        [--out bench/out/index_search.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss
import numpy as np

from bench.common import (
    OtherLoad,
    busy,
    ensure_random_dinov2,
    machine_info,
    positive_ints,
    process_cpu_seconds,
    write_report,
)
from indexer.duplicates import DEFAULT_PHASH_DISTANCE, Items, embedding_pairs, group_pairs, hamming_pairs
from indexer.index import VectorIndex
from tests.indexer.vectors import clustered, near_copies

DIM = 384
THRESHOLD = 0.9


def make_data(n: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` indexed vectors (1% planted near duplicates) and ``queries`` fresh ones from the same clusters."""
    copies = n // 100
    points = clustered(n - copies + queries, DIM, clusters=max(100, n // 1000), spread=1.0, seed=seed)
    base, fresh = points[: n - copies], points[n - copies :]
    duplicates, _ = near_copies(base, count=copies, noise=0.25, seed=seed + 1)
    return np.concatenate([base, duplicates]), np.ascontiguousarray(fresh)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def numpy_top10(data: np.ndarray, queries: np.ndarray) -> np.ndarray:
    scores = queries @ data.T
    top = np.argpartition(-scores, 10, axis=1)[:, :10]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def time_numpy(data: np.ndarray, queries: np.ndarray, singles: int) -> dict[str, Any]:
    one = []
    for q in queries[:singles]:
        t = time.perf_counter()
        scores = data @ q
        top = np.argpartition(-scores, 10)[:10]
        top[np.argsort(-scores[top])]
        one.append(time.perf_counter() - t)
    batched = []
    for start in range(0, len(queries), 100):
        t = time.perf_counter()
        numpy_top10(data, queries[start : start + 100])
        batched.append((time.perf_counter() - t) / len(queries[start : start + 100]))
    return {"one_query": percentiles(one), "batched_per_query": percentiles(batched)}


def time_index(index: VectorIndex, queries: np.ndarray, singles: int) -> dict[str, Any]:
    one = []
    for q in queries[:singles]:
        t = time.perf_counter()
        index.search(q, 10)
        one.append(time.perf_counter() - t)
    batched = []
    for start in range(0, len(queries), 100):
        t = time.perf_counter()
        index.search(queries[start : start + 100], 10)
        batched.append((time.perf_counter() - t) / len(queries[start : start + 100]))
    return {"one_query": percentiles(one), "batched_per_query": percentiles(batched)}


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return round(float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])), 4)


def reset_peak_rss() -> None:
    """Linux: make VmHWM start again from the current RSS (``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def near_duplicate_pass(index: VectorIndex, data: np.ndarray, ids: np.ndarray, seed: int) -> dict[str, Any]:
    reset_peak_rss()
    before = rss_mb("VmRSS")
    load = OtherLoad()
    t = time.perf_counter()
    blocks = ((ids[s : s + 65536], data[s : s + 65536]) for s in range(0, len(ids), 65536))
    a, b, sim = embedding_pairs(index, blocks, THRESHOLD, max_neighbors=50)
    pairs_s = time.perf_counter() - t
    items = Items(ids, np.full(len(ids), 1000, dtype=np.int64), np.zeros(len(ids), dtype=bool))
    t = time.perf_counter()
    groups = group_pairs(items, items.rank(), a, b, sim)
    group_s = time.perf_counter() - t
    peak = rss_mb("VmHWM")
    cores = load.cores()
    # Exact pairs of a sample of rows, with numpy, for the pair recall.
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(ids), size=min(2000, len(ids)), replace=False))
    truth = set()
    for start in range(0, len(sample), 100):
        rows = sample[start : start + 100]
        hits = np.nonzero((data[rows] @ data.T) >= THRESHOLD)
        for r, c in zip(*hits, strict=True):
            if rows[r] != c:
                truth.add((min(int(rows[r]), int(c)), max(int(rows[r]), int(c))))
    sampled = set(sample.tolist())
    found = {(x, y) for x, y in zip(a.tolist(), b.tolist(), strict=True) if x in sampled or y in sampled}
    return {
        "threshold": THRESHOLD,
        "pairs_s": round(pairs_s, 1),
        "grouping_s": round(group_s, 2),
        "total_s": round(pairs_s + group_s, 1),
        "pairs": len(a),
        "groups": len(groups),
        "peak_rss_mb_over_start": round(peak - before, 0),
        "pair_recall_vs_exact": round(len(found & truth) / max(len(truth), 1), 4),
        "exact_pairs_in_sample": len(truth),
        "other_cores": cores,
    }


def perceptual_pass(n: int, seed: int) -> dict[str, Any]:
    """Multi-index hashing over ``n`` random 64-bit pHashes, 1% of them planted 1-6 bits from another."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    planted = rng.choice(n, size=n // 100, replace=False)
    for row, source in zip(planted[: len(planted) // 2], planted[len(planted) // 2 :], strict=True):
        flips = rng.choice(64, size=int(rng.integers(1, DEFAULT_PHASH_DISTANCE + 1)), replace=False)
        hashes[row] = hashes[source] ^ np.uint64(sum(1 << int(bit) for bit in flips))
    hashes = np.unique(hashes)
    reset_peak_rss()
    before = rss_mb("VmRSS")
    load = OtherLoad()
    t = time.perf_counter()
    a, _, _ = hamming_pairs(hashes, DEFAULT_PHASH_DISTANCE)
    return {
        "hashes": len(hashes),
        "max_distance": DEFAULT_PHASH_DISTANCE,
        "seconds": round(time.perf_counter() - t, 1),
        "pairs": len(a),
        "planted": len(planted) // 2,
        "peak_rss_mb_over_start": round(rss_mb("VmHWM") - before, 0),
        "other_cores": load.cores(),
    }


def run_size(n: int, queries: int, singles: int, seed: int) -> dict[str, Any]:
    t = time.perf_counter()
    data, fresh = make_data(n, queries, seed)
    ids = np.arange(n, dtype=np.int64)
    print(f"[{n}] data in {time.perf_counter() - t:.1f} s ({data.nbytes / 2**20:.0f} MiB of vectors)", flush=True)
    truth = np.concatenate([numpy_top10(data, fresh[s : s + 100]) for s in range(0, len(fresh), 100)])
    out: dict[str, Any] = {"n": n, "memory_mib": round(n * DIM * 4 / 2**20, 1)}
    out["perceptual"] = perceptual_pass(n, seed)
    print(f"[{n}] perceptual: {out['perceptual']} {busy(out['perceptual']['other_cores'])}", flush=True)

    load = OtherLoad()
    out["numpy"] = time_numpy(data, fresh, singles)
    out["numpy"]["other_cores"] = load.cores()
    print(f"[{n}] numpy: {out['numpy']} {busy(out['numpy']['other_cores'])}", flush=True)

    for kind, exact_below in (("exact", n + 1), ("ivf", 0)):
        load = OtherLoad()
        t = time.perf_counter()
        index = VectorIndex.build(ids, data, embedder="bench", exact_below=exact_below, device="cpu")
        build_s = time.perf_counter() - t
        result = {"build_s": round(build_s, 1), **time_index(index, fresh, singles)}
        found = np.concatenate([index.search(fresh[s : s + 100], 10)[1] for s in range(0, len(fresh), 100)])
        result["recall_at_10"] = recall_at_10(found, truth)
        if kind == "ivf":
            result.update(nlist=index.info.nlist, nprobe=index.info.nprobe, build_recall=index.info.recall_at_10)
            t = time.perf_counter()
            folder = Path("bench/out/cache/index-bench")
            index.save(folder)
            save_s = time.perf_counter() - t
            t = time.perf_counter()
            VectorIndex.load(folder, device="cpu")
            result.update(save_s=round(save_s, 1), load_s=round(time.perf_counter() - t, 1))
            result["near_duplicates"] = near_duplicate_pass(index, data, ids, seed)
        result["other_cores"] = load.cores()
        base = out["numpy"]["one_query"]["p50_ms"]
        result["one_query_vs_numpy"] = round(result["one_query"]["p50_ms"] / base, 2)
        out[kind] = result
        print(f"[{n}] {kind}: {result} {busy(result['other_cores'])}", flush=True)
        del index
    return out


def flat_sizes(sizes: list[int], seed: int) -> list[dict[str, Any]]:
    data, fresh = make_data(max(sizes), 200, seed)
    rows = []
    for n in sizes:
        index = VectorIndex.build(np.arange(n), data[:n], embedder="bench", exact_below=n + 1, device="cpu")
        timing = time_index(index, fresh, 200)
        numpy_timing = time_numpy(data[:n], fresh, 200)
        rows.append({"n": n, "exact": timing["one_query"], "numpy": numpy_timing["one_query"]})
        print(f"flat {n}: exact {timing['one_query']} numpy {numpy_timing['one_query']}", flush=True)
    return rows


def embedding_throughput(cache: Path, images: int) -> dict[str, Any]:
    """One image at a time in fp32 (the baseline) against batches of 16 in fp32 and in bf16, same images."""
    import torch

    from model import create_embedder
    from tests.images import scene

    folder = ensure_random_dinov2(cache)
    pictures = [scene(640, 480, seed) for seed in range(images)]
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    result: dict[str, Any] = {
        "model": "vit_small_patch14_dinov2 (random weights, LayerScale 1.0)",
        "image_size": 224,
        "images": images,
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": [flag for flag in ("avx512_bf16", "amx_bf16") if f" {flag}" in flags],
    }
    reference = None
    for name, precision, batch in (
        ("fp32_one_at_a_time", "fp32", 1),
        ("fp32_batch16", "fp32", 16),
        ("bf16_batch16", "bf16", 16),
    ):
        embedder = create_embedder(str(folder), device="cpu", precision=precision, batch_size=batch)
        embedder.embed(pictures[:batch])  # warm-up
        load = OtherLoad(process_cpu_seconds)
        t = time.perf_counter()
        vectors = np.concatenate([embedder.embed(pictures[i : i + batch]) for i in range(0, images, batch)])
        seconds = time.perf_counter() - t
        if reference is None:
            reference = vectors
        cosine = np.sum(reference * vectors, axis=1)
        result[name] = {
            "images_per_s": round(images / seconds, 2),
            "speedup_vs_fp32_one_at_a_time": round(
                result.get("fp32_one_at_a_time", {}).get("seconds", seconds) / seconds, 2
            ),
            "seconds": round(seconds, 2),
            "cosine_vs_fp32_min": round(float(cosine.min()), 5),
            "other_cores": load.cores(),
        }
        print(f"embedding {name}: {result[name]} {busy(result[name]['other_cores'])}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=positive_ints, default=[100_000, 1_000_000])
    parser.add_argument("--flat-sizes", type=positive_ints, default=[10_000, 25_000, 50_000, 100_000])
    parser.add_argument("--queries", type=int, default=1000, help="fresh queries for recall and batches (1000)")
    parser.add_argument("--singles", type=int, default=300, help="queries timed one at a time (300)")
    parser.add_argument("--images", type=int, default=32, help="images for the embedding throughput (32)")
    parser.add_argument("--no-embedding", action="store_true")
    parser.add_argument("--no-flat-sizes", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path("bench/out/cache"))
    parser.add_argument("--out", type=Path, default=Path("bench/out/index_search.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    report: dict[str, Any] = {
        "machine": {**machine_info(), "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads()},
        "dim": DIM,
    }
    if not args.no_embedding:
        report["embedding"] = embedding_throughput(args.cache, args.images)
    if not args.no_flat_sizes:
        report["flat_sizes"] = flat_sizes(args.flat_sizes, args.seed)
    report["sizes"] = [run_size(n, args.queries, args.singles, args.seed) for n in args.sizes]
    report["wall_s"] = time.perf_counter() - started
    write_report(args.out, report)


if __name__ == "__main__":
    main()
