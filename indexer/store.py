"""The durable truth of a project's index: one SQLite file of vectors and image hashes per project.

Why SQLite: upserts and deletes of single tasks are transactions, a crash never leaves half a row,
and in WAL mode readers (searches, duplicate passes, index rebuilds) never wait for the writer nor
block it. Exactly one writer per project is enforced with an exclusive ``flock`` on a lock file next
to the database, so a second writer fails at once (:class:`StoreBusyError`) instead of interleaving.

Each row is one Label Studio task: its vector (float32 bytes), the embedder version that made it,
the image's sha256, decoded-pixel hash and 64-bit perceptual hash, its size and when it was written.
A task's row is replaced when its image or the embedder version changes (:meth:`VectorStore.stale`
says which tasks need embedding). Every write takes the next sequence number and deletions leave a
tombstone, so an index built at sequence *s* catches up with :meth:`VectorStore.changes_since`.

The faiss index (``indexer.index``) is derived from this and can always be rebuilt from it.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from indexer.exceptions import DimensionMismatchError, StoreBusyError, StoreNotFoundError

__all__ = ["Changes", "HashTable", "StoredVector", "VectorStore", "project_dir"]

STORE_FILE = "vectors.sqlite3"
LOCK_FILE = "vectors.lock"
SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vectors (
    task_id INTEGER PRIMARY KEY,
    embedder TEXT NOT NULL,
    vector BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    pixel_hash TEXT NOT NULL,
    phash INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    updated REAL NOT NULL,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS vectors_seq ON vectors (seq);
CREATE TABLE IF NOT EXISTS tombstones (task_id INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tombstones_seq ON tombstones (seq);
"""
_COLUMNS = "task_id, embedder, vector, sha256, pixel_hash, phash, width, height, updated"
_MAX_TASK_ID = 2**63 - 1
_IDS_PER_QUERY = 500  # well under SQLite's limit on a statement's parameters (999 before 3.32)
_SIGN = 1 << 63  # SQLite integers are signed 64-bit; perceptual hashes are unsigned


def project_dir(folder: str | os.PathLike[str], project: int) -> Path:
    """Where a project's store and index live: ``<folder>/project-<id>``."""
    if isinstance(project, bool) or not isinstance(project, int) or project < 0:
        raise ValueError(f"project must be a non-negative integer, got {project!r}")
    return Path(folder) / f"project-{project}"


@dataclass(frozen=True)
class StoredVector:
    """One task's row. ``vector`` is float32 ``(dim,)``; ``phash`` is the unsigned 64-bit hash."""

    task_id: int
    embedder: str
    vector: np.ndarray
    sha256: str
    pixel_hash: str
    phash: int
    width: int
    height: int
    updated: float = 0.0


@dataclass(frozen=True)
class HashTable:
    """Column arrays of every row's hashes and sizes, in task-id order (for the duplicate passes)."""

    task_ids: np.ndarray  # int64
    sha256: list[str]
    pixel_hash: list[str]
    phash: np.ndarray  # uint64
    width: np.ndarray  # int64
    height: np.ndarray  # int64


@dataclass(frozen=True)
class Changes:
    """What happened after a sequence number: rows written (of one embedder) and tasks deleted."""

    task_ids: np.ndarray  # int64, rows upserted since
    vectors: np.ndarray  # float32 (n, dim)
    deleted: np.ndarray  # int64, tasks deleted since (or re-embedded by another embedder)
    seq: int  # the store's sequence number these changes bring a reader up to


class VectorStore:
    """A project's vectors in ``<project_dir>/vectors.sqlite3``; open with ``writer=True`` to change it.

    One object may be shared by threads (calls are serialised on its connection). Close it, or use it
    as a context manager, to release the writer lock.
    """

    def __init__(self, folder: str | os.PathLike[str], project: int, *, writer: bool = False) -> None:
        self.dir = project_dir(folder, project)
        self.path = self.dir / STORE_FILE
        self.project = project
        self.writer = writer
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        if writer:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _take_writer_lock(self.dir / LOCK_FILE)
        elif not self.path.is_file():
            raise StoreNotFoundError(f"project {project} has no vector store yet ({self.path})")
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 30000")
            if writer:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, never corrupt
                self._db.executescript(_SCHEMA)
                self._db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?), ('seq', '0')", (SCHEMA_VERSION,)
                )
            else:
                self._db.execute("PRAGMA query_only = 1")
        except BaseException:
            self._release()
            raise

    # --- lifecycle ---------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._release()

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    # --- reads ---------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int | None:
        """Width of the stored vectors, or None while the store is empty of vectors."""
        value = self._meta("dim")
        return None if value is None else int(value)

    @property
    def seq(self) -> int:
        """The sequence number of the last write (0 for a new store)."""
        return int(self._meta("seq") or 0)

    def count(self, embedder: str | None = None) -> int:
        """Rows in the store, or rows made by ``embedder``."""
        if embedder is None:
            return self._one("SELECT COUNT(*) FROM vectors")[0]
        return self._one("SELECT COUNT(*) FROM vectors WHERE embedder = ?", (embedder,))[0]

    def embedders(self) -> dict[str, int]:
        """Row counts per embedder version (more than one while a re-embedding is under way)."""
        with self._lock:
            return dict(self._db.execute("SELECT embedder, COUNT(*) FROM vectors GROUP BY embedder").fetchall())

    def get(self, task_id: int) -> StoredVector | None:
        row = self._one(f"SELECT {_COLUMNS} FROM vectors WHERE task_id = ?", (task_id,))
        return None if row is None else _row_to_record(row)

    def task_ids(self, after: int = -1, upto: int = _MAX_TASK_ID) -> np.ndarray:
        """Every stored task id, ascending; or those with ``after < id <= upto`` (a re-sync's page)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT task_id FROM vectors WHERE task_id > ? AND task_id <= ? ORDER BY task_id", (after, upto)
            ).fetchall()
        return np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))

    def iter_vectors(self, embedder: str, *, batch: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(task_ids, vectors)`` blocks of one embedder's rows, in task-id order, ``batch`` rows at a time.

        Reads block by block (keyset pagination), so a million vectors never sit in Python objects at once.
        """
        dim = self.dim
        last = -1
        while dim is not None:
            with self._lock:
                rows = self._db.execute(
                    "SELECT task_id, vector FROM vectors WHERE embedder = ? AND task_id > ? ORDER BY task_id LIMIT ?",
                    (embedder, last, batch),
                ).fetchall()
            if not rows:
                return
            ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
            vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32).reshape(len(rows), dim)
            last = int(ids[-1])
            yield ids, vectors

    def load_vectors(self, embedder: str) -> tuple[np.ndarray, np.ndarray]:
        """All of one embedder's ``(task_ids, vectors)`` in task-id order."""
        parts = list(self.iter_vectors(embedder))
        if not parts:
            return np.empty(0, dtype=np.int64), np.empty((0, self.dim or 0), dtype=np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def hash_table(self) -> HashTable:
        """Every row's hashes and image size, for the exact and perceptual duplicate passes."""
        with self._lock:
            rows = self._db.execute(
                "SELECT task_id, sha256, pixel_hash, phash, width, height FROM vectors ORDER BY task_id"
            ).fetchall()
        n = len(rows)
        return HashTable(
            task_ids=np.fromiter((r[0] for r in rows), dtype=np.int64, count=n),
            sha256=[r[1] for r in rows],
            pixel_hash=[r[2] for r in rows],
            phash=np.fromiter((r[3] % (1 << 64) for r in rows), dtype=np.uint64, count=n),
            width=np.fromiter((r[4] for r in rows), dtype=np.int64, count=n),
            height=np.fromiter((r[5] for r in rows), dtype=np.int64, count=n),
        )

    def stale(self, images: Mapping[int, str], embedder: str) -> list[int]:
        """Of ``images`` (task id -> image sha256), the tasks to embed: unknown, changed image or other embedder."""
        stored: dict[int, tuple[str, str]] = {}
        ids = list(images)
        with self._lock:
            for start in range(0, len(ids), _IDS_PER_QUERY):
                chunk = ids[start : start + _IDS_PER_QUERY]
                marks = ",".join("?" * len(chunk))
                for task_id, sha, version in self._db.execute(
                    f"SELECT task_id, sha256, embedder FROM vectors WHERE task_id IN ({marks})", chunk
                ):
                    stored[task_id] = (sha, version)
        return [task_id for task_id, sha in images.items() if stored.get(task_id) != (sha, embedder)]

    def digests(self, task_ids: Iterable[int], embedder: str) -> dict[int, str]:
        """Of ``task_ids``, those whose row ``embedder`` made: task id -> the sha256 of the image it was made
        from. A planner checks a page of tasks with it: one query per 500 ids, no vector read."""
        ids = list(task_ids)
        found: dict[int, str] = {}
        with self._lock:
            for start in range(0, len(ids), _IDS_PER_QUERY):
                chunk = ids[start : start + _IDS_PER_QUERY]
                marks = ",".join("?" * len(chunk))
                found.update(
                    self._db.execute(
                        f"SELECT task_id, sha256 FROM vectors WHERE embedder = ? AND task_id IN ({marks})",
                        (embedder, *chunk),
                    )
                )
        return found

    def changes_since(self, seq: int, embedder: str) -> Changes:
        """Rows of ``embedder`` written after ``seq``, and tasks deleted (or now of another embedder) since."""
        with self._lock:
            self._db.execute("BEGIN")  # one snapshot for rows, tombstones and seq
            try:
                # No ORDER BY: sorting by task_id makes SQLite scan the whole table (its primary key)
                # instead of searching the seq index; a reader with nothing to catch up then paid a full scan.
                rows = self._db.execute(
                    "SELECT task_id, vector, embedder FROM vectors WHERE seq > ?", (seq,)
                ).fetchall()
                deleted = [r[0] for r in self._db.execute("SELECT task_id FROM tombstones WHERE seq > ?", (seq,))]
                now = int(self._db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])
            finally:
                self._db.execute("COMMIT")
        rows.sort(key=lambda row: row[0])
        dim = self.dim or 0
        kept = [r for r in rows if r[2] == embedder]
        deleted += [r[0] for r in rows if r[2] != embedder]  # re-embedded by another version: not ours any more
        vectors = np.frombuffer(b"".join(r[1] for r in kept), dtype=np.float32).reshape(len(kept), dim)
        return Changes(
            task_ids=np.array([r[0] for r in kept], dtype=np.int64),
            vectors=vectors,
            deleted=np.array(sorted(deleted), dtype=np.int64),
            seq=now,
        )

    # --- writes --------------------------------------------------------------------------------------------

    def upsert(self, records: Iterable[StoredVector]) -> int:
        """Insert or replace rows in one transaction; returns the new sequence number."""
        self._require_writer()
        prepared = [self._prepare(record) for record in records]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._next_seq()
                if prepared and self._meta_locked("dim") is None:
                    self._db.execute("INSERT INTO meta (key, value) VALUES ('dim', ?)", (str(_width(prepared[0])),))
                dim = int(self._meta_locked("dim") or 0)
                for row in prepared:
                    if (width := _width(row)) != dim:
                        raise DimensionMismatchError(
                            f"task {row[0]}: vector of {width} values, but this store holds {dim}-d vectors"
                        )
                self._db.executemany(
                    f"INSERT OR REPLACE INTO vectors ({_COLUMNS}, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(*row, seq) for row in prepared],
                )
                self._db.executemany("DELETE FROM tombstones WHERE task_id = ?", [(row[0],) for row in prepared])
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return seq

    def delete(self, task_ids: Iterable[int]) -> int:
        """Remove tasks' rows (unknown ids are ignored); returns how many rows went."""
        self._require_writer()
        ids = [(_task_id(task_id),) for task_id in task_ids]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._next_seq()
                before = self._db.total_changes
                self._db.executemany("DELETE FROM vectors WHERE task_id = ?", ids)
                removed = self._db.total_changes - before
                self._db.executemany(
                    "INSERT OR REPLACE INTO tombstones (task_id, seq) VALUES (?, ?)", [(i, seq) for (i,) in ids]
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return removed

    def remove_vanished(self, current: Iterable[int]) -> list[int]:
        """Full re-sync: delete every stored task not in ``current`` (the project's task ids now)."""
        keep = {_task_id(task_id) for task_id in current}
        vanished = [int(task_id) for task_id in self.task_ids() if int(task_id) not in keep]
        if vanished:
            self.delete(vanished)
        return vanished

    # --- helpers -------------------------------------------------------------------------------------------

    def _prepare(self, record: StoredVector) -> tuple:
        vector = np.ascontiguousarray(record.vector, dtype=np.float32)
        if vector.ndim != 1 or vector.size == 0:
            raise DimensionMismatchError(f"task {record.task_id}: vector must be 1-d and non-empty")
        if not np.isfinite(vector).all():
            raise ValueError(f"task {record.task_id}: vector holds NaN or infinity")
        if not 0 <= record.phash < (1 << 64):
            raise ValueError(f"task {record.task_id}: phash must be an unsigned 64-bit integer")
        signed_phash = record.phash - (1 << 64) if record.phash & _SIGN else record.phash
        return (
            _task_id(record.task_id),
            str(record.embedder),
            vector.tobytes(),
            str(record.sha256),
            str(record.pixel_hash),
            signed_phash,
            int(record.width),
            int(record.height),
            float(record.updated or time.time()),
        )

    def _require_writer(self) -> None:
        if not self.writer:
            raise PermissionError("this store was opened for reading; open it with writer=True to change it")

    def _next_seq(self) -> int:
        seq = int(self._meta_locked("seq") or 0) + 1
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (str(seq),))
        return seq

    def _meta(self, key: str) -> str | None:
        with self._lock:
            return self._meta_locked(key)

    def _meta_locked(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _one(self, sql: str, args: tuple = ()) -> tuple | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()


def _task_id(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= int(value) <= _MAX_TASK_ID:
        raise ValueError(f"task ids are non-negative 64-bit integers, got {value!r}")
    return int(value)


def _width(row: tuple) -> int:
    """Values in a prepared row's vector blob (float32)."""
    return len(row[2]) // 4


def _row_to_record(row: tuple) -> StoredVector:
    task_id, embedder, blob, sha, pixels, signed_phash, width, height, updated = row
    return StoredVector(
        task_id=task_id,
        embedder=embedder,
        vector=np.frombuffer(blob, dtype=np.float32).copy(),
        sha256=sha,
        pixel_hash=pixels,
        phash=signed_phash % (1 << 64),
        width=width,
        height=height,
        updated=updated,
    )


def _take_writer_lock(path: Path) -> int:
    """An exclusive, non-blocking ``flock``; released by closing the descriptor (or by the process dying)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreBusyError(f"another writer holds {path}; one writer per project store") from None
    return fd
