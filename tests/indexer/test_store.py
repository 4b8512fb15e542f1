"""The per-project SQLite vector store: rows, re-sync, one writer, readers never blocked."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer.exceptions import DimensionMismatchError, StoreBusyError, StoreNotFoundError
from indexer.store import StoredVector, VectorStore, project_dir

ROOT = Path(__file__).resolve().parents[2]
V1 = "tiny-224px-fp32-aaaaaaaaaa"
V2 = "tiny-224px-bf16-bbbbbbbbbb"


def _record(task_id: int, *, dim: int = 8, embedder: str = V1, sha: str | None = None, seed: int | None = None):
    rng = np.random.default_rng(task_id if seed is None else seed)
    vector = rng.standard_normal(dim).astype(np.float32)
    return StoredVector(
        task_id=task_id,
        embedder=embedder,
        vector=vector / np.linalg.norm(vector),
        sha256=sha or f"sha-{task_id}",
        pixel_hash=f"px-{task_id}",
        phash=(task_id * 0x9E3779B97F4A7C15) % 2**64,
        width=100 + task_id,
        height=50 + task_id,
        updated=1000.0 + task_id,
    )


def _child(code: str) -> subprocess.Popen:
    """A Python child process with the repository on its path, talking over stdin/stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )


def test_rows_round_trip_exactly(tmp_path: Path) -> None:
    records = [_record(i) for i in (5, 1, 2**40, 3)]
    with VectorStore(tmp_path, 7, writer=True) as store:
        store.upsert(records)
        assert store.path == tmp_path / "project-7" / "vectors.sqlite3"
        assert store.count() == 4
        assert store.dim == 8
        for record in records:
            got = store.get(record.task_id)
            assert got is not None
            assert np.array_equal(got.vector, record.vector)
            assert (got.sha256, got.pixel_hash, got.phash, got.width, got.height, got.updated, got.embedder) == (
                record.sha256,
                record.pixel_hash,
                record.phash,
                record.width,
                record.height,
                record.updated,
                record.embedder,
            )
        assert any(r.phash >= 2**63 for r in records)  # the unsigned high bit survives SQLite's signed integers
        assert store.get(999) is None
        assert store.task_ids().tolist() == [1, 3, 5, 2**40]
        table = store.hash_table()
        assert table.task_ids.tolist() == [1, 3, 5, 2**40]
        assert table.phash.tolist() == [store.get(i).phash for i in (1, 3, 5, 2**40)]
        assert table.width.tolist() == [101, 103, 105, 100 + 2**40]


def test_vectors_come_back_in_blocks_per_embedder(tmp_path: Path) -> None:
    with VectorStore(tmp_path, 1, writer=True) as store:
        store.upsert([_record(i) for i in range(10)])
        store.upsert([_record(i, embedder=V2) for i in range(10, 13)])
        blocks = list(store.iter_vectors(V1, batch=3))
        assert [len(ids) for ids, _ in blocks] == [3, 3, 3, 1]
        ids, vectors = store.load_vectors(V1)
        assert ids.tolist() == list(range(10))
        assert np.array_equal(vectors, np.stack([_record(i).vector for i in range(10)]))
        assert store.embedders() == {V1: 10, V2: 3}
        assert store.count(V2) == 3
        empty_ids, empty = store.load_vectors("never-used")
        assert empty_ids.shape == (0,) and empty.shape == (0, 8)


def test_changed_images_and_other_embedders_are_stale(tmp_path: Path) -> None:
    with VectorStore(tmp_path, 1, writer=True) as store:
        store.upsert([_record(1), _record(2), _record(3, embedder=V2)])
        wanted = {1: "sha-1", 2: "sha-2-new-image", 3: "sha-3", 4: "sha-4"}
        assert store.stale(wanted, V1) == [2, 3, 4]
        assert store.stale(wanted, V2) == [1, 2, 4]
        # Re-embedding replaces the row: one row per task, the new image's hash and vector.
        store.upsert([_record(2, sha="sha-2-new-image", seed=99)])
        assert store.count() == 3
        assert store.get(2).sha256 == "sha-2-new-image"
        assert np.array_equal(store.get(2).vector, _record(2, seed=99).vector)
        assert store.stale(wanted, V1) == [3, 4]


def test_digests_are_the_image_hashes_of_one_embedders_rows_past_a_query_chunk(tmp_path: Path) -> None:
    with VectorStore(tmp_path, 1, writer=True) as store:
        store.upsert([_record(i) for i in range(1200)])
        store.upsert([_record(3, embedder=V2, sha="sha-3-new-image"), _record(5000, embedder=V2)])
        asked = [*range(0, 1300, 2), 3, 5000, 7777]  # more ids than one query takes; some unknown
        assert store.digests(asked, V1) == {i: f"sha-{i}" for i in range(0, 1200, 2)}
        assert store.digests(asked, V2) == {3: "sha-3-new-image", 5000: "sha-5000"}
        assert store.digests([], V1) == {}


def test_full_resync_removes_vanished_tasks_and_leaves_tombstones(tmp_path: Path) -> None:
    with VectorStore(tmp_path, 1, writer=True) as store:
        store.upsert([_record(i) for i in range(6)])
        start = store.seq
        assert store.remove_vanished([0, 2, 4, 77]) == [1, 3, 5]
        assert store.task_ids().tolist() == [0, 2, 4]
        store.upsert([_record(7), _record(3, embedder=V2)])
        assert store.delete([0, 12345]) == 1
        changes = store.changes_since(start, V1)
        assert changes.task_ids.tolist() == [7]
        assert np.array_equal(changes.vectors, _record(7).vector[None, :])
        # 3 came back under another embedder: for an index of V1 it is gone.
        assert changes.deleted.tolist() == [0, 1, 3, 5, 12345]
        assert changes.seq == store.seq > start
        assert store.changes_since(store.seq, V1).task_ids.size == 0


def test_bad_rows_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    with VectorStore(tmp_path, 1, writer=True) as store:
        store.upsert([_record(1)])
        with pytest.raises(DimensionMismatchError, match="task 3: vector of 16 values"):
            store.upsert([_record(2), _record(3, dim=16)])
        assert store.task_ids().tolist() == [1]
        nan = _record(4)
        nan.vector[0] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            store.upsert([nan])
        with pytest.raises(ValueError, match="task ids are non-negative"):
            store.upsert([dataclasses.replace(_record(1), task_id=-1)])
        with pytest.raises(ValueError, match="project must be"):
            project_dir(tmp_path, -3)


def test_one_writer_at_a_time_across_processes(tmp_path: Path) -> None:
    child = _child(
        "import sys\n"
        "from indexer.store import VectorStore\n"
        f"store = VectorStore({str(tmp_path)!r}, 3, writer=True)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(StoreBusyError, match="one writer per project store"):
            VectorStore(tmp_path, 3, writer=True)
        VectorStore(tmp_path, 4, writer=True).close()  # other projects are independent
        # A writer killed outright releases the lock with its process.
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        with VectorStore(tmp_path, 3, writer=True) as store:
            store.upsert([_record(1)])
    finally:
        child.kill()
        child.wait(timeout=30)
    # In one process too: a second writer object is refused until the first closes.
    first = VectorStore(tmp_path, 3, writer=True)
    with pytest.raises(StoreBusyError):
        VectorStore(tmp_path, 3, writer=True)
    first.close()
    VectorStore(tmp_path, 3, writer=True).close()


def test_readers_are_never_blocked_by_a_writer_mid_transaction(tmp_path: Path) -> None:
    with VectorStore(tmp_path, 1, writer=True) as store:
        store.upsert([_record(i) for i in range(4)])
    path = tmp_path / "project-1" / "vectors.sqlite3"
    # A writer in another process with an open, uncommitted write transaction that added rows.
    child = _child(
        "import sqlite3, sys\n"
        f"db = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
        "db.execute('BEGIN IMMEDIATE')\n"
        "db.execute(\"UPDATE vectors SET sha256 = 'changed'\")\n"
        'db.execute("INSERT INTO vectors SELECT task_id + 100, embedder, vector, sha256, pixel_hash, phash, '
        'width, height, updated, seq FROM vectors")\n'
        "print('writing', flush=True)\n"
        "sys.stdin.readline()\n"
        "db.execute('COMMIT')\n"
        "print('committed', flush=True)\n"
    )
    try:
        assert child.stdout.readline().strip() == "writing"
        reader = VectorStore(tmp_path, 1)
        assert reader._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        reader._db.execute("PRAGMA busy_timeout = 0")  # waiting at all would raise 'database is locked'
        assert reader.count() == 4
        assert reader.get(2).sha256 == "sha-2"
        ids, vectors = reader.load_vectors(V1)
        assert ids.tolist() == [0, 1, 2, 3] and vectors.shape == (4, 8)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "committed"
        assert reader.count() == 8
        assert reader.get(2).sha256 == "changed"
        with pytest.raises(PermissionError, match="opened for reading"):
            reader.upsert([_record(9)])
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader._db.execute("DELETE FROM vectors")
        reader.close()
    finally:
        child.kill()
        child.wait(timeout=30)


def test_a_reader_of_a_project_never_written_is_told_so(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="project 9 has no vector store yet"):
        VectorStore(tmp_path, 9)
    assert not (tmp_path / "project-9").exists()
