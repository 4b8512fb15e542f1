"""Duplicate passes: exact, perceptual (multi-index hashing) and embedding, and groups that never chain."""

from __future__ import annotations

import io
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.duplicates import (
    DuplicateReport,
    Items,
    embedding_pairs,
    find_duplicates,
    group_pairs,
    hamming_pairs,
)
from indexer.hashes import image_hashes
from indexer.index import VectorIndex
from indexer.store import StoredVector, VectorStore
from tests.images import scene
from tests.indexer.vectors import clustered, near_copies


def _items(n: int, *, pixels: list[int] | None = None, labeled: list[int] = ()) -> Items:
    ids = np.arange(n, dtype=np.int64) + 100
    return Items(
        task_ids=ids,
        pixels=np.array(pixels or [1000] * n, dtype=np.int64),
        labeled=np.isin(ids, np.array(labeled, dtype=np.int64)),
    )


def _assert_complete_linkage(groups, similarity: np.ndarray, ids: np.ndarray, threshold: float) -> None:
    """Every pair in every group is above the threshold, and min_similarity is the weakest pair."""
    position = {int(task): i for i, task in enumerate(ids)}
    seen: set[int] = set()
    for group in groups:
        members = [position[t] for t in group.members]
        assert not seen & set(members), "an image is in two groups"
        seen |= set(members)
        pair_sims = [similarity[x, y] for x, y in combinations(members, 2)]
        assert min(pair_sims) >= threshold - 1e-5
        assert group.min_similarity == pytest.approx(min(pair_sims), abs=1e-5)
        for task, sim in zip(group.members, group.similarities, strict=True):
            assert sim == pytest.approx(similarity[members[0], position[task]], abs=1e-5)


def test_a_chain_of_similar_pairs_is_not_one_group() -> None:
    # A~B and B~C above 0.9, but A and C are not: complete linkage never puts A and C together.
    items = _items(4)
    rank = items.rank()
    a = np.array([0, 1, 2])
    b = np.array([1, 2, 3])
    sim = np.array([0.95, 0.97, 0.99])
    groups = group_pairs(items, rank, a, b, sim)
    assert [g.members for g in groups] == [(100, 101), (102, 103)]
    assert [g.min_similarity for g in groups] == [pytest.approx(0.95), pytest.approx(0.99)]
    # A triangle is one group, its weakest pair reported.
    groups = group_pairs(items, rank, np.array([0, 0, 1]), np.array([1, 2, 2]), np.array([0.99, 0.93, 0.96]))
    assert [g.members for g in groups] == [(100, 101, 102)]
    assert groups[0].min_similarity == pytest.approx(0.93)
    assert groups[0].similarities == (1.0, pytest.approx(0.99), pytest.approx(0.93))


def test_keeper_is_labeled_first_then_larger_then_lower_id() -> None:
    triangle = (np.array([0, 0, 1]), np.array([1, 2, 2]), np.array([0.95, 0.95, 0.95]))
    assert group_pairs(_items(3), _items(3).rank(), *triangle)[0].keeper == 100
    bigger = _items(3, pixels=[10, 50, 20])
    assert group_pairs(bigger, bigger.rank(), *triangle)[0].keeper == 101
    labeled = _items(3, pixels=[10, 50, 20], labeled=[102])
    # Equal similarities: the others follow in keeper order too.
    assert group_pairs(labeled, labeled.rank(), *triangle)[0].members == (102, 101, 100)


def test_grouping_random_clusters_keeps_every_pair_above_the_threshold() -> None:
    vectors = clustered(600, 24, clusters=30, spread=0.6, seed=5)
    ids = np.arange(600, dtype=np.int64) * 3
    similarity = vectors @ vectors.T
    index = VectorIndex.build(ids, vectors, embedder="v", device="cpu")
    items = Items(ids, np.full(600, 100, dtype=np.int64), np.zeros(600, dtype=bool))
    for threshold in (0.8, 0.85, 0.9):
        a, b, sim = embedding_pairs(index, [(ids, vectors)], threshold, max_neighbors=600)
        # The pairs are exactly numpy's pairs above the threshold, each once.
        want = {
            (int(ids[i]), int(ids[j])) for i, j in zip(*np.nonzero(np.triu(similarity >= threshold, k=1)), strict=True)
        }
        got = set(zip(a.tolist(), b.tolist(), strict=True))
        boundary = {p for p in want ^ got if abs(similarity[p[0] // 3, p[1] // 3] - threshold) < 1e-5}
        assert want ^ got == boundary
        assert np.allclose(sim, similarity[a // 3, b // 3], atol=1e-5)
        groups = group_pairs(items, items.rank(), a // 3, b // 3, sim)
        assert groups, "the clusters should give groups"
        _assert_complete_linkage(groups, similarity, ids, threshold)
        # Not vacuous: connected components of these pairs would chain dissimilar images.
        weakest_component_pair = min(
            similarity[np.ix_(c, c)].min() for c in _components(600, a // 3, b // 3) if len(c) > 1
        )
        assert weakest_component_pair < threshold


def _components(n: int, a: np.ndarray, b: np.ndarray) -> list[list[int]]:
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        parent[root(x)] = root(y)
    members: dict[int, list[int]] = {}
    for x in range(n):
        members.setdefault(root(x), []).append(x)
    return list(members.values())


def test_knn_filtering_finds_the_same_pairs_as_range_search() -> None:
    base = clustered(2000, 32, clusters=50, spread=1.0, seed=6)
    copies, originals = near_copies(base, count=200, noise=0.15, seed=6)
    vectors = np.concatenate([base, copies])
    ids = np.arange(len(vectors), dtype=np.int64)
    index = VectorIndex.build(ids, vectors, embedder="v", device="cpu")
    by_range = embedding_pairs(index, [(ids, vectors)], 0.95, use_knn=False)
    by_knn = embedding_pairs(index, [(ids, vectors)], 0.95, use_knn=True)
    assert np.array_equal(by_range[0], by_knn[0]) and np.array_equal(by_range[1], by_knn[1])
    assert np.allclose(by_range[2], by_knn[2], atol=1e-6)
    planted = {(int(o), 2000 + i) for i, o in enumerate(originals)}
    assert planted <= set(zip(by_range[0].tolist(), by_range[1].tolist(), strict=True))


def test_hamming_pairs_equal_brute_force() -> None:
    rng = np.random.default_rng(7)
    base = rng.integers(0, 2**63, 1500, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    # Plant neighbours at 1..12 flipped bits of some hashes.
    planted = []
    for i in range(300):
        bits = rng.choice(64, size=1 + i % 12, replace=False)
        mask = np.uint64(sum(1 << int(b) for b in bits))
        planted.append(base[i] ^ mask)
    hashes = np.unique(np.concatenate([base, np.array(planted, dtype=np.uint64)]))
    distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    for max_distance in (0, 3, 4, 6, 8, 12):
        a, b, d = hamming_pairs(hashes, max_distance)
        want = set(zip(*np.nonzero(np.triu(distance <= max_distance, k=1)), strict=True))
        assert set(zip(a.tolist(), b.tolist(), strict=True)) == {(int(x), int(y)) for x, y in want}
        assert np.array_equal(d, distance[a, b])
        assert (a < b).all()
    with pytest.raises(ValueError, match="max_distance must be an integer from 0 to 12"):
        hamming_pairs(hashes, 13)


def _png(image: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **options)
    return out.getvalue()


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def test_find_duplicates_runs_the_passes_in_turn(tmp_path: Path) -> None:
    # Task ids -> image bytes. 1/2: same bytes. 3/4: same pixels, other PNG encoding. 5/6/7: a JPEG
    # recompression and a half-size copy of 5 (perceptual). 8/9: different pictures whose vectors we
    # plant close together (embedding). 10..14: unrelated pictures.
    photo = {seed: scene(320, 240, seed=seed) for seed in range(20, 40)}
    files: dict[int, bytes] = {
        1: _png(photo[20]),
        2: _png(photo[20]),
        3: _png(photo[21], compress_level=1),
        4: _png(photo[21], compress_level=9),
        5: _png(photo[22]),
        6: _jpeg(photo[22], 40),
        7: _png(photo[22].resize((160, 120))),
        8: _png(photo[23]),
        9: _png(photo[24]),
        **{task: _png(photo[25 + task]) for task in range(10, 15)},
    }
    rng = np.random.default_rng(8)
    vectors = {task: rng.standard_normal(16).astype(np.float32) for task in files}
    vectors[9] = vectors[8] + 0.05 * rng.standard_normal(16).astype(np.float32)
    vectors = {task: v / np.linalg.norm(v) for task, v in vectors.items()}
    with VectorStore(tmp_path, 1, writer=True) as store:
        records = []
        for task, data in files.items():
            hashes = image_hashes(data, Image.open(io.BytesIO(data)).convert("RGB"))
            records.append(
                StoredVector(
                    task,
                    "v",
                    vectors[task],
                    hashes.sha256,
                    hashes.pixel_hash,
                    hashes.phash,
                    hashes.width,
                    hashes.height,
                )
            )
        store.upsert(records)
        index = VectorIndex.from_store(store, "v", device="cpu")
        report = find_duplicates(
            store.hash_table(), labeled=[2, 6], index=index, vector_blocks=store.iter_vectors("v", batch=4)
        )
    assert isinstance(report, DuplicateReport)
    assert [r.stage for r in report.stages] == ["bytes", "pixels", "perceptual", "embedding"]
    assert report.stage("bytes").neighbors_map == {2: [(1, 1.0)]}  # 2 is labeled: kept
    assert report.stage("pixels").neighbors_map == {3: [(4, 1.0)]}
    perceptual = report.stage("perceptual").groups
    assert len(perceptual) == 1
    assert perceptual[0].keeper == 6  # labeled, although 5 is as large and has a lower id
    assert set(perceptual[0].members) == {5, 6, 7}
    assert perceptual[0].min_similarity >= report.stage("perceptual").threshold
    embedding = report.stage("embedding")
    assert [g.members for g in embedding.groups] == [(8, 9)]
    assert report.duplicate_ids == [1, 4, 5, 7, 9]
    rows = report.rows()
    assert {(row["stage"], row["task_id"], row["is_keeper"]) for row in rows} >= {
        ("bytes", 1, False),
        ("bytes", 2, True),
    }
    assert report.to_dict()["stages"][0]["groups"][0]["members"][0] == {"task_id": 2, "similarity": 1.0}


def test_bad_thresholds_are_refused(tmp_path: Path) -> None:
    index = VectorIndex.build(np.arange(3), np.eye(3, dtype=np.float32), embedder="v", device="cpu")
    for threshold in (0.0, 1.5, -1, True):
        with pytest.raises(ValueError, match="threshold must be a cosine similarity"):
            embedding_pairs(index, [], threshold)
