"""The faiss index against numpy brute force, its IVF recall, incremental updates and atomic saving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer.exceptions import DimensionMismatchError, IndexFormatError
from indexer.index import SIDECAR, VectorIndex
from indexer.store import StoredVector, VectorStore
from tests.indexer.vectors import clustered

ROOT = Path(__file__).resolve().parents[2]
EMBEDDER = "test-embedder-v1"


def _brute_force(data: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ data.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    vectors = clustered(3000, 32, clusters=40, seed=1)
    ids = np.arange(3000, dtype=np.int64) * 7 + 1_000_000_000_000  # sparse, large task ids
    return ids, vectors


def test_flat_search_equals_numpy_brute_force(data: tuple[np.ndarray, np.ndarray]) -> None:
    ids, vectors = data
    index = VectorIndex.build(ids, vectors, embedder=EMBEDDER, device="cpu")
    assert index.kind == "flat" and len(index) == 3000
    queries = clustered(50, 32, clusters=40, seed=1)  # same centres, fresh points
    scores, found = index.search(queries, 10)
    want_scores, want_ids = _brute_force(vectors, ids, queries, 10)
    assert np.allclose(scores, want_scores, atol=1e-5)
    # Ids agree wherever the scores are not tied to float precision.
    distinct = np.abs(np.diff(want_scores, axis=1)) > 1e-5
    assert (found[:, :1] == want_ids[:, :1]).all()
    assert (found[:, 1:][distinct] == want_ids[:, 1:][distinct]).all()
    # A vector of the index finds itself first with cosine 1.
    scores, found = index.search(vectors[17], 3)
    assert found[0, 0] == ids[17] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    # k above the size is capped.
    small = VectorIndex.build(ids[:4], vectors[:4], embedder=EMBEDDER, device="cpu")
    assert small.search(vectors[:2], 10)[1].shape == (2, 4)


def test_range_search_equals_numpy(data: tuple[np.ndarray, np.ndarray]) -> None:
    ids, vectors = data
    index = VectorIndex.build(ids, vectors, embedder=EMBEDDER, device="cpu")
    queries = vectors[:40]
    lims, scores, found = index.range_search(queries, 0.9)
    similarity = queries @ vectors.T
    for q in range(len(queries)):
        got = dict(zip(found[lims[q] : lims[q + 1]].tolist(), scores[lims[q] : lims[q + 1]].tolist(), strict=True))
        want = {int(ids[j]) for j in np.flatnonzero(similarity[q] > 0.9 + 1e-5)}
        assert want <= set(got)
        assert all(similarity[q, np.searchsorted(ids, i)] > 0.9 - 1e-5 for i in got)


def test_ivf_reaches_its_recall_on_fresh_queries() -> None:
    vectors = clustered(20_000, 48, clusters=200, seed=2)
    ids = np.arange(20_000, dtype=np.int64)
    index = VectorIndex.build(ids, vectors, embedder=EMBEDDER, exact_below=10_000, device="cpu")
    info = index.info
    assert info.kind == "ivf"
    assert info.nlist == 256  # ~4 sqrt(n), with 39 training vectors per centroid
    assert info.recall_at_10 >= 0.95
    assert 1 <= info.nprobe < info.nlist  # approximate, yet enough
    queries = clustered(300, 48, clusters=200, seed=2)[::-1].copy()
    _, found = index.search(queries, 10)
    _, truth = _brute_force(vectors, ids, queries, 10)
    assert _recall(found, truth) >= 0.9
    # A lower nprobe than chosen loses recall: the choice is not arbitrary.
    if info.nprobe > 1:
        lower = VectorIndex.build(ids, vectors, embedder=EMBEDDER, exact_below=10_000, target_recall=0.3, device="cpu")
        assert lower.info.nprobe < info.nprobe


def test_add_replaces_and_remove_forgets(data: tuple[np.ndarray, np.ndarray]) -> None:
    ids, vectors = data
    index = VectorIndex.build(ids[:100], vectors[:100], embedder=EMBEDDER, device="cpu")
    moved = vectors[500]
    index.add(ids[[3]], moved[None, :])  # task 3 now shows another image
    assert len(index) == 100
    _, found = index.search(moved, 1)
    assert found[0, 0] == ids[3]
    scores, found = index.search(vectors[3], 100)
    assert found[0, 0] != ids[3] or scores[0, 0] < 0.999
    assert index.remove(ids[[5, 6, 999]]) == 2
    assert len(index) == 98 and index.info.count == 98
    _, found = index.search(vectors[:10], 98)
    assert not np.isin(found, ids[[5, 6]]).any()


def test_catching_up_with_the_store_equals_a_rebuild(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    ids, vectors = data

    def rows(indices: range | list[int], shift: int = 0) -> list[StoredVector]:
        return [
            StoredVector(int(ids[i]), EMBEDDER, vectors[i + shift], f"s{i}", f"p{i}", 0, 10, 10, 1.0) for i in indices
        ]

    with VectorStore(tmp_path, 1, writer=True) as store:
        store.upsert(rows(range(200)))
        index = VectorIndex.from_store(store, EMBEDDER, device="cpu")
        assert len(index) == 200 and index.info.store_seq == store.seq
        store.upsert(rows(range(200, 260)))
        store.upsert(rows([10, 11], shift=1000))  # changed images
        store.delete(ids[[20, 21, 22]].tolist())
        store.upsert([StoredVector(int(ids[30]), "other-embedder", vectors[30], "x", "y", 0, 1, 1, 1.0)])
        index.apply(store.changes_since(index.info.store_seq, EMBEDDER))
        rebuilt = VectorIndex.from_store(store, EMBEDDER, device="cpu")
    assert len(index) == len(rebuilt) == 256
    assert index.info.store_seq == rebuilt.info.store_seq
    queries = vectors[[0, 10, 250, 1010, 20]]
    s1, i1 = index.search(queries, 8)
    s2, i2 = rebuilt.search(queries, 8)
    assert np.allclose(s1, s2, atol=1e-6)
    assert np.array_equal(i1, i2)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    vectors = clustered(12_000, 16, clusters=60, seed=3)
    ids = np.arange(12_000, dtype=np.int64) + 5
    for exact_below in (100_000, 5_000):  # flat, then IVF
        index = VectorIndex.build(ids, vectors, embedder=EMBEDDER, exact_below=exact_below, device="cpu")
        folder = tmp_path / index.kind
        sidecar = index.save(folder)
        meta = json.loads(sidecar.read_text())
        assert meta["kind"] == index.kind and meta["count"] == 12_000 and meta["embedder"] == EMBEDDER
        loaded = VectorIndex.load(folder, embedder=EMBEDDER, device="cpu")
        assert loaded.info == index.info
        assert loaded.info.nprobe == index.info.nprobe
        assert np.array_equal(loaded.search(vectors[:20], 5)[1], index.search(vectors[:20], 5)[1])
        # Saving again replaces the file and leaves only the one the sidecar names.
        index.remove(ids[:10])
        index.save(folder)
        assert sorted(p.name for p in folder.iterdir()) == sorted([SIDECAR, index.info.file])
        assert len(VectorIndex.load(folder, device="cpu")) == 11_990
    with pytest.raises(IndexFormatError, match="holds vectors of test-embedder-v1, not other"):
        VectorIndex.load(tmp_path / "flat", embedder="other", device="cpu")
    with pytest.raises(IndexFormatError, match="no saved index"):
        VectorIndex.load(tmp_path / "nothing", device="cpu")
    named = tmp_path / "flat" / json.loads((tmp_path / "flat" / SIDECAR).read_text())["file"]
    with named.open("ab") as handle:
        handle.write(b"junk")
    with pytest.raises(IndexFormatError, match="is not the"):
        VectorIndex.load(tmp_path / "flat", device="cpu")


def test_bad_input_is_refused_by_name(data: tuple[np.ndarray, np.ndarray]) -> None:
    ids, vectors = data
    index = VectorIndex.build(ids[:10], vectors[:10], embedder=EMBEDDER, device="cpu")
    with pytest.raises(DimensionMismatchError, match="queries must be 32-d"):
        index.search(np.zeros((1, 8), dtype=np.float32), 3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(vectors[:1], 0)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full((1, 32), np.nan, dtype=np.float32), 3)
    with pytest.raises(DimensionMismatchError, match="vectors are 8-d"):
        index.add(ids[:1], np.zeros((1, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="unique"):
        VectorIndex.build(np.array([1, 1]), vectors[:2], embedder=EMBEDDER, device="cpu")
    with pytest.raises(ValueError, match="expected 3 vectors"):
        VectorIndex.build(ids[:3], vectors[:2], embedder=EMBEDDER, device="cpu")


_SAVER = """
import os, sys, time
import faiss
import numpy as np
import indexer.index as module
from indexer.index import VectorIndex
from tests.indexer.vectors import clustered

folder, stage = sys.argv[1], sys.argv[2]
vectors = clustered(20_000, 64, clusters=100, seed=4)
ids = np.arange(20_000, dtype=np.int64)
index = VectorIndex.build(ids, vectors, embedder="v", device="cpu")
index.save(folder)
print("saved", flush=True)
index.remove(ids[-1:])

def pause(where):
    print(where, flush=True)
    time.sleep(600)  # the parent kills us here

real_write, real_rename, real_replace = faiss.write_index, os.rename, os.replace
if stage == "write":  # half of the faiss file is on disk
    def write_index(index, path):
        real_write(index, path)
        os.truncate(path, os.path.getsize(path) // 2)
        pause(stage)
    module.faiss.write_index = write_index
elif stage == "rename":  # the complete file is still under its temporary name
    module.os.rename = lambda a, b: pause(stage)
elif stage == "publish":  # the new file is in place, the sidecar not yet replaced
    module.os.replace = lambda a, b: pause(stage)
index.save(folder)
"""


@pytest.mark.parametrize("stage", ["write", "rename", "publish"])
def test_a_process_killed_mid_save_leaves_the_previous_index_readable(tmp_path: Path, stage: str) -> None:
    folder = tmp_path / "index"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(folder), stage], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout.readline().strip() == "saved"
        assert child.stdout.readline().strip() == stage
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait(timeout=30)
    leftovers = sorted(p.name for p in folder.iterdir())
    assert SIDECAR in leftovers and len(leftovers) >= 3  # plus the previous file and the unfinished new one
    index = VectorIndex.load(folder, device="cpu")
    assert len(index) == 20_000  # the previous save, whole
    assert index.search(np.eye(64, dtype=np.float32)[:1], 3)[1].shape == (1, 3)
    # The next save publishes a new index and clears what the killed one left.
    index.remove(np.array([0]))
    index.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([SIDECAR, index.info.file])
    assert len(VectorIndex.load(folder, device="cpu")) == 19_999


@pytest.mark.gpu
def test_a_gpu_index_answers_like_the_cpu_one(data: tuple[np.ndarray, np.ndarray]) -> None:
    from indexer.index import gpu_available

    assert gpu_available(), "faiss has no GPU build here, or sees no GPU (pip install faiss-gpu)"
    ids, vectors = data
    queries = vectors[:64]
    for exact_below in (10_000, 1_000):  # flat, then IVF
        cpu = VectorIndex.build(ids, vectors, embedder=EMBEDDER, exact_below=exact_below, device="cpu")
        gpu = VectorIndex.build(ids, vectors, embedder=EMBEDDER, exact_below=exact_below, device="gpu")
        assert gpu.on_gpu and not cpu.on_gpu
        cpu_scores, cpu_ids = cpu.search(queries, 10)
        gpu_scores, gpu_ids = gpu.search(queries, 10)
        assert np.allclose(cpu_scores, gpu_scores, atol=1e-4)
        assert (cpu_ids[:, 0] == gpu_ids[:, 0]).all()
        gpu.add(ids[:1], vectors[500:501])  # a write re-copies the index to the GPU
        assert gpu.search(vectors[500], 1)[1][0, 0] in (ids[0], ids[500])
