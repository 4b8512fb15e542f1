"""Labeling priority: how fast the ranking is, how well its first picks cover the data, and how many
duplicate copies an annotator meets with it.

Why this script exists: the ranking's promises (an exact farthest-first head "in seconds" at 100k, an
approximate tail as good as the exact order, fewer copies in front of annotators) are claims about time
and quality that only a measurement on the same data against a baseline can back.

1. **Time** (``--sizes``): synthetic 384-d unit vectors in ``n / 100`` clusters of Zipf-like sizes
   (cosine ~0.8 within one), the first 20 in import order labeled. ``indexer.priority.rank`` with its default exact
   head (``exact_head_for(n)``: 5000 up to 20k tasks, 1000 from 100k on), the full exact order
   (``exact_head=None``) up to ``--exact-max``, and the naive O(N^2) farthest-first (every pick updates
   every remaining vector with one matrix-vector product, float32) up to ``--naive-max``; the naive
   order is checked against ours (share of equal ranks, and the worst score gap of our picks under the
   naive state).
2. **Coverage** (``--coverage-sizes``): mean cosine distance of every unlabeled vector to its nearest
   pick or labeled vector after k picks, for our ranking (default exact head + approximate tail), the same
   with the exact heads of ``--coverage-heads``, the fully exact order (up to ``--exact-max``), random
   order and import order, on the same data.
3. **Duplicates** (``--generated``): the offline duplicate benchmark's images
   (bench/near_duplicates_eval.py: scikit-image's pictures and generated scenes as bases, each keeping 0-4
   of its 14 edited copies at random), shuffled into a random import order. The project's passes as
   the product runs them (``find_duplicates``: bytes, pixels, pHash, embedding >= 0.9 over a
   ``VectorIndex``) feed ``rank``; counted: copies an annotator meets in the first K tasks (a task
   whose base already came earlier), ranked against import order. The embedder is the random-weight
   ViT-S/14 unless ``--model`` names real weights.

Run from the repository root::

    .venv/bin/python bench/priority.py [--sizes 10000,100000,1000000] [--naive-max 10000]
        [--exact-max 10000] [--coverage-sizes 10000,100000] [--coverage-heads 100,1000,5000]
        [--generated 40] [--out bench/out/priority.json]
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

import numpy as np

from bench.common import OtherLoad, busy, machine_info, positive_ints, process_cpu_seconds, write_report
from indexer.priority import DEFAULT_EXACT_HEAD, exact_head_for, rank

DIM = 384


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``n`` 384-d unit vectors around ``n / 100`` centres with Zipf-like cluster sizes (the largest ~100x
    the 100th: a few common kinds of image and a long tail of rare ones), in a random import order; the
    first 20 imported are labeled."""
    rng = np.random.default_rng(seed)
    clusters = max(10, n // 100)
    weights = 1.0 / np.arange(1, clusters + 1)
    centres = rng.standard_normal((clusters, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        members = rng.choice(clusters, size=stop - start, p=weights / weights.sum())
        block = centres[members] + rng.standard_normal((stop - start, DIM), dtype=np.float32) * (0.5 / np.sqrt(DIM))
        vectors[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return np.arange(n, dtype=np.int64), vectors, list(range(20))


def coverage_curve(vectors: np.ndarray, order: np.ndarray, seeds: np.ndarray, ks: list[int]) -> list[float]:
    """``coverage(vectors, order[:k], seeds)`` for every k, in one pass over the picks."""
    best = np.full(len(vectors), -1.0, dtype=np.float32)
    out, done = [], 0
    np.maximum(best, (vectors @ vectors[seeds].T).max(axis=1), out=best)
    for k in ks:
        if k > len(order):
            break
        for first in range(done, k, 1024):
            block = order[first : min(k, first + 1024)]
            np.maximum(best, (vectors @ vectors[block].T).max(axis=1), out=best)
        done = k
        out.append(round(float(np.mean(1.0 - best)), 4))
    return out


def naive_farthest_first(vectors: np.ndarray, labeled: list[int]) -> np.ndarray:
    """The textbook loop: after each pick, one product with every vector (float32)."""
    best = np.full(len(vectors), -1.0, dtype=np.float32)
    for row in labeled:
        np.maximum(best, vectors @ vectors[row], out=best)
    left = np.ones(len(vectors), dtype=bool)
    left[labeled] = False
    order = []
    distance = np.where(left, 1.0 - best, -np.inf)
    for _ in range(int(left.sum())):
        pick = int(np.argmax(distance))
        order.append(pick)
        left[pick] = False
        np.maximum(best, vectors @ vectors[pick], out=best)
        distance = np.where(left, 1.0 - best, -np.inf)
    return np.array(order)


def worst_gap(order: np.ndarray, vectors: np.ndarray, labeled: list[int], count: int) -> float:
    """Largest amount by which one of our first ``count`` picks is below the farthest vector left."""
    best = np.full(len(vectors), -1.0, dtype=np.float32)
    for row in labeled:
        np.maximum(best, vectors @ vectors[row], out=best)
    left = np.ones(len(vectors), dtype=bool)
    left[labeled] = False
    worst = 0.0
    for pick in order[:count].tolist():
        worst = max(worst, float((1.0 - best[left]).max() - (1.0 - best[pick])))
        left[pick] = False
        np.maximum(best, vectors @ vectors[pick], out=best)
    return worst


def timed(fn, *args, **kwargs) -> tuple[Any, float, float | None]:
    """Result, wall seconds and the cores other processes used meanwhile; the CPU seconds this process
    spent are kept in ``LAST_CPU_S`` (on a shared machine they say more than the wall time)."""
    global LAST_CPU_S
    load = OtherLoad(process_cpu_seconds)
    started, cpu = time.perf_counter(), process_cpu_seconds()
    result = fn(*args, **kwargs)
    LAST_CPU_S = round(process_cpu_seconds() - cpu, 2)
    return result, time.perf_counter() - started, load.cores()


LAST_CPU_S = 0.0


def timing(sizes: list[int], naive_max: int, exact_max: int, exact_head: int | str) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        ids, vectors, labeled = synthetic(n)
        ranking, seconds, others = timed(rank, ids, vectors, labeled, exact_head=exact_head)
        row: dict[str, Any] = {
            "n": n,
            "labeled": len(labeled),
            "exact_head": ranking.exact_head,
            "ranked_s": round(seconds, 2),
            "ranked_cpu_s": LAST_CPU_S,
            "ranked_others": others,
        }
        print(
            f"n={n}: rank (exact head {ranking.exact_head}) {seconds:.2f} s, CPU {LAST_CPU_S} s; {busy(others)}",
            flush=True,
        )
        if n <= exact_max:
            exact, seconds, others = timed(rank, ids, vectors, labeled, exact_head=None)
            row.update(exact_s=round(seconds, 2), exact_cpu_s=LAST_CPU_S, exact_others=others)
            print(f"n={n}: rank, whole order exact {seconds:.2f} s, CPU {LAST_CPU_S} s; {busy(others)}", flush=True)
        if n <= naive_max:
            order, seconds, others = timed(naive_farthest_first, vectors, labeled)
            ours = exact.task_ids if n <= exact_max else ranking.task_ids
            same = float(np.mean(order[: ranking.exact_head] == ours[: ranking.exact_head]))
            gap = worst_gap(ours, vectors, labeled, min(len(ours), 2000))
            row.update(
                naive_s=round(seconds, 2),
                naive_cpu_s=LAST_CPU_S,
                naive_others=others,
                same_rank_share=round(same, 4),
                worst_gap=gap,
            )
            print(
                f"n={n}: naive O(N^2) {seconds:.2f} s, CPU {LAST_CPU_S} s; same task at the same rank {same:.1%}, "
                f"worst score gap of our first 2000 picks {gap:.1e}; {busy(others)}",
                flush=True,
            )
        rows.append(row)
        del vectors
    return rows


def coverage_table(n: int, exact_max: int, ks: list[int], heads: list[int]) -> dict[str, Any]:
    ids, vectors, labeled = synthetic(n, seed=1)
    seeds = np.array(labeled)
    unlabeled = np.setdiff1d(ids, seeds)
    default = exact_head_for(len(unlabeled))
    orders = {f"ranked (exact head {default})": rank(ids, vectors, labeled).task_ids}
    for head in heads:
        if head != default and head < len(unlabeled):
            orders[f"exact head {head}"] = rank(ids, vectors, labeled, exact_head=head).task_ids
    orders["import order"] = unlabeled
    orders["random order"] = np.random.default_rng(0).permutation(unlabeled)
    if n <= exact_max:
        orders["exact throughout"] = rank(ids, vectors, labeled, exact_head=None).task_ids
    out: dict[str, Any] = {"n": n, "exact_head": default, "k": ks, "mean_distance": {}}
    for name, order in orders.items():
        values = coverage_curve(vectors, order, seeds, ks)
        out["mean_distance"][name] = values
        print(f"coverage n={n} {name}: " + ", ".join(f"k={k} {v:.4f}" for k, v in zip(ks, values, strict=False)))
    return out


def duplicates_run(generated: int, model: str | None, image_size: int, first: list[int], seed: int) -> dict[str, Any]:
    from bench.common import ensure_random_dinov2
    from bench.near_duplicates_eval import MAX_PIXELS, base_images, build_set
    from indexer.duplicates import find_duplicates
    from indexer.hashes import image_hashes
    from indexer.index import VectorIndex
    from indexer.store import HashTable
    from model import create_embedder
    from model.images import decode_image

    embedder = create_embedder(
        model or str(ensure_random_dinov2(Path("bench/out/cache"))), device="cpu", image_size=image_size
    )
    files, source, kind = build_set(base_images(None, generated), seed)
    # Not every image has 14 copies: each base keeps 0-4 of its copies (seeded), in a random import order.
    rng = np.random.default_rng(seed)
    keep = [i for i, k in enumerate(kind) if k == "base"]
    for base in np.unique(source):
        copies = [i for i in np.flatnonzero(source == base) if kind[i] != "base"]
        keep += rng.choice(copies, size=int(rng.integers(0, 5)), replace=False).tolist()
    keep = rng.permutation(np.array(keep))
    files, source, kind = [files[i] for i in keep], source[keep], [kind[i] for i in keep]
    ids = np.arange(len(files), dtype=np.int64) + 1
    print(f"duplicates: {len(files)} images from {source.max() + 1} bases, embedding ...", flush=True)
    started = time.perf_counter()
    hashes, vectors, batch = [], [], []
    for data in files:
        image = decode_image(data, max_pixels=MAX_PIXELS)
        hashes.append(image_hashes(data, image))
        batch.append(image)
        if len(batch) == 32:
            vectors.append(embedder.embed(batch))
            batch = []
    if batch:
        vectors.append(embedder.embed(batch))
    data = np.concatenate(vectors)
    embed_s = time.perf_counter() - started
    table = HashTable(
        ids,
        [h.sha256 for h in hashes],
        [h.pixel_hash for h in hashes],
        np.array([h.phash for h in hashes], dtype=np.uint64),
        np.array([h.width for h in hashes], dtype=np.int64),
        np.array([h.height for h in hashes], dtype=np.int64),
    )
    index = VectorIndex.build(ids, data, embedder=embedder.version, device="cpu")
    report = find_duplicates(table, index=index, vector_blocks=[(ids, data)])
    ranking, rank_s, _ = timed(rank, ids, data, [], duplicates=report)
    # The same without any embedding similarity for duplicates: only the weight-free passes (bytes, pixels,
    # pHash) push copies back; the vectors only order the rest.
    hash_report = find_duplicates(table)
    hash_only = rank(ids, data, [], duplicates=hash_report, near_duplicate=None)

    def copies_met(order: np.ndarray, k: int) -> int:
        seen: set[int] = set()
        met = 0
        for task in order[:k].tolist():
            base = int(source[task - 1])
            met += base in seen
            seen.add(base)
        return met

    rows = {}
    for k in first:
        rows[str(k)] = {
            "ranked": copies_met(ranking.task_ids, k),
            "ranked, hash passes only": copies_met(hash_only.task_ids, k),
            "import order": copies_met(ids, k),
        }
        print(f"duplicates: first {k} tasks, copies met: {rows[str(k)]}", flush=True)

    return {
        "images": len(files),
        "bases": int(source.max() + 1),
        "embedder": embedder.version,
        "random_weights": model is None,
        "embed_s": round(embed_s, 1),
        "rank_s": round(rank_s, 2),
        "pushed_back_as_duplicates": int(np.sum(ranking.reason == "duplicate")),
        "pushed_back_hash_only": int(np.sum(hash_only.reason == "duplicate")),
        "pushed_back_true_copies": int(np.sum(_is_copy(source, ranking.task_ids)[ranking.reason == "duplicate"])),
        "true_copies": int(len(files) - (source.max() + 1)),
        "copies_met": rows,
    }


def _is_copy(source: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per task of ``order``: does a task of the same base come before it in ``order``?"""
    seen: set[int] = set()
    out = np.zeros(len(order), dtype=bool)
    for i, task in enumerate(order.tolist()):
        base = int(source[task - 1])
        out[i] = base in seen
        seen.add(base)
    return out


def _head(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=positive_ints, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--naive-max", type=int, default=10_000, help="largest n for the naive loop (10000)")
    parser.add_argument("--exact-max", type=int, default=10_000, help="largest n for the whole order exact")
    parser.add_argument(
        "--exact-head", type=_head, default="auto", help="exact picks in the timed rank (auto: the default for n)"
    )
    parser.add_argument("--skip-coverage", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--coverage-sizes", type=positive_ints, default=[10_000, 100_000], help="n of coverage tables")
    parser.add_argument("--coverage-k", type=positive_ints, default=[100, 1000, 3000, 5000, 7000, 9000])
    parser.add_argument(
        "--coverage-heads", type=positive_ints, default=[100, 1000, 5000], help="exact heads compared with the default"
    )
    parser.add_argument("--generated", type=int, default=40, help="generated scenes in the duplicate set (-1: skip)")
    parser.add_argument("--first", type=positive_ints, default=[100, 200, 500, 1000])
    parser.add_argument("--model", help="embedder for the duplicate set (default: random ViT-S/14)")
    parser.add_argument("--image-size", type=int, default=224, help="embedder input size (224)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/priority.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine_info(), "dim": DIM, "max_exact_head": DEFAULT_EXACT_HEAD}
    if not args.skip_timing:
        report["timing"] = timing(args.sizes, args.naive_max, args.exact_max, args.exact_head)
    if not args.skip_coverage:
        report["coverage"] = [
            coverage_table(n, args.exact_max, args.coverage_k, args.coverage_heads) for n in args.coverage_sizes
        ]
    if args.generated >= 0:
        report["duplicates"] = duplicates_run(args.generated, args.model, args.image_size, args.first, args.seed)
    report["wall_s"] = time.perf_counter() - started
    write_report(args.out, report)


if __name__ == "__main__":
    main()
