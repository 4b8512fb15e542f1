"""A project's faiss index: derived from the vector store, rebuildable, saved atomically.

Two kinds, one API (inner product on L2-normalised vectors, i.e. cosine similarity; results are
``(scores, task_ids)`` in faiss's ``(D, I)`` convention, ``-1`` where fewer than k exist):

* ``flat``: exact search, ``IndexIDMap2(IndexFlatIP)``. Below :data:`EXACT_BELOW` vectors a scan is
  already fast (bench/index_search.py measures it) and needs no training.
* ``ivf``: ``IndexIVFFlat`` with ``nlist`` ~ 4 sqrt(n) centroids trained (spherical k-means) on the
  project's own vectors. ``nprobe`` is the smallest power of two whose recall@10 against exact search
  reaches ``target_recall`` (0.95) on queries held out of the training sample; the recall reached is
  kept in the sidecar.

On a machine with a faiss GPU build and a GPU, searches run on a GPU copy of the index; the CPU index
stays the master for writes, range searches and saving. Saving never leaves a half-written index
behind: the faiss file gets a fresh name, is flushed to disk, and only then does the JSON sidecar
(``index.json``, replaced with ``os.replace``) point to it; a process killed at any moment leaves the
previous sidecar and the file it names intact.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.exceptions import DimensionMismatchError, IndexFormatError
from indexer.store import Changes, VectorStore

__all__ = ["EXACT_BELOW", "IndexInfo", "VectorIndex", "gpu_available"]

log = logging.getLogger(__name__)

EXACT_BELOW = 50_000
"""Vectors below which the index stays exact (flat). A 384-d flat scan of 50k vectors takes ~1-2 ms per
query on a 2-core CPU (bench/index_search.py), IVF needs ~40 training points per centroid, and exact
results need no recall check."""

DEFAULT_TARGET_RECALL = 0.95
"""Recall@10 against exact search that the chosen ``nprobe`` must reach on held-out queries."""

SIDECAR = "index.json"
FORMAT_VERSION = 1
_HELD_OUT = 1000  # queries kept out of k-means training to measure recall
_TRAIN_PER_CENTROID = 64  # training sample size per centroid (faiss warns below 39)
_GPU_MAX_K = 2048  # faiss GPU indexes refuse larger k
_SCAN_FLOATS = 32 * 2**20  # scores held at once by the exact scan (128 MiB)


@dataclass(frozen=True)
class IndexInfo:
    """What the sidecar records and ``load`` checks: enough to know the index is the one wanted."""

    kind: str  # "flat" or "ivf"
    dim: int
    count: int
    embedder: str
    store_seq: int = 0  # the store's sequence number the index reflects
    nlist: int | None = None
    nprobe: int | None = None
    recall_at_10: float | None = None  # measured when nprobe was chosen
    trained_on: int | None = None  # vectors in the index when the centroids were trained
    metric: str = "inner_product"
    file: str = ""
    bytes: int = 0
    format: int = FORMAT_VERSION


def gpu_available() -> bool:
    """True when this faiss is a GPU build and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class VectorIndex:
    """A loaded index of one project and embedder; thread-safe (calls are serialised)."""

    def __init__(self, index: faiss.Index, info: IndexInfo, *, device: str = "auto") -> None:
        if device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu; got {device!r}")
        if device == "gpu" and not gpu_available():
            raise ValueError("device 'gpu' asked for, but faiss has no GPU build or sees no GPU here")
        self._index = index
        self.info = info
        self._use_gpu = device == "gpu" or (device == "auto" and gpu_available())
        self._gpu_index: faiss.Index | None = None
        self._gpu_resources: Any = None
        self._lock = threading.RLock()
        if info.nprobe is not None:
            faiss.extract_index_ivf(index).nprobe = info.nprobe

    # --- building ------------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        task_ids: np.ndarray,
        vectors: np.ndarray,
        *,
        embedder: str,
        store_seq: int = 0,
        exact_below: int = EXACT_BELOW,
        target_recall: float = DEFAULT_TARGET_RECALL,
        nlist: int | None = None,
        device: str = "auto",
        seed: int = 0,
    ) -> VectorIndex:
        """Index ``vectors`` (float32, L2-normalised) under ``task_ids``: flat below ``exact_below``, else IVF."""
        ids, data = _check_batch(task_ids, vectors, None)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("task ids must be unique")
        if not 0.0 < target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        dim = data.shape[1]
        started = time.perf_counter()
        if len(ids) < exact_below:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
            index.add_with_ids(data, ids)
            info = IndexInfo(kind="flat", dim=dim, count=len(ids), embedder=embedder, store_seq=store_seq)
        else:
            index, info = _build_ivf(ids, data, embedder, store_seq, target_recall, nlist, seed)
        log.info(
            "built a %s index of %d %d-d vectors in %.1f s%s",
            info.kind,
            info.count,
            dim,
            time.perf_counter() - started,
            f" (nlist {info.nlist}, nprobe {info.nprobe}, recall@10 {info.recall_at_10:.3f})" if info.nlist else "",
        )
        return cls(index, info, device=device)

    @classmethod
    def from_store(cls, store: VectorStore, embedder: str, **options: Any) -> VectorIndex:
        """Rebuild from the store: every row of ``embedder``, at the store's current sequence number."""
        seq = store.seq  # read first: rows written meanwhile are caught up with changes_since(seq)
        ids, vectors = store.load_vectors(embedder)
        if not len(ids):
            dim = store.dim or 0
            if not dim:
                raise ValueError(f"project {store.project} has no vectors to index")
            return cls(
                faiss.IndexIDMap2(faiss.IndexFlatIP(dim)),
                IndexInfo(kind="flat", dim=dim, count=0, embedder=embedder, store_seq=seq),
                device=options.get("device", "auto"),
            )
        return cls.build(ids, vectors, embedder=embedder, store_seq=seq, **options)

    # --- queries -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def nbytes(self) -> int:
        """Host memory its vectors take: vectors x (dimension x 4 + an 8-byte id), plus IVF centroids.

        faiss's own bookkeeping (the id map's reverse table, list headers) comes on top; this is what a
        cache of indexes budgets by (``backend.index_cache``).
        """
        return len(self) * (self.info.dim * 4 + 8) + (self.info.nlist or 0) * self.info.dim * 4

    @property
    def on_gpu(self) -> bool:
        """Whether searches run on a GPU copy (then range searches still run on the CPU index)."""
        return self._use_gpu

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by cosine for each query row: ``(scores float32 (n, c), task_ids int64 (n, c))``.

        ``c`` is ``k`` capped at the index size (and at 2048 on a GPU); an IVF index whose probed lists hold
        fewer than ``c`` vectors fills the rest with id ``-1``.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        queries = _check_queries(queries, self.info.dim)
        with self._lock:
            index = self._searcher()
            columns = min(k, int(index.ntotal), _GPU_MAX_K if index is self._gpu_index else k)
            if columns == 0:
                return np.empty((len(queries), 0), dtype=np.float32), np.empty((len(queries), 0), dtype=np.int64)
            if self.kind == "flat" and index is self._index:
                return self._scan(queries, columns)
            return index.search(queries, columns)

    def _scan(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search as one BLAS product over the flat index's own storage (a view, no copy).

        faiss's flat search scans a single query on one OpenMP thread, and its threads spin badly when
        other processes share the cores; numpy's BLAS does neither (bench/index_search.py measured faiss
        3.9x slower than this on a busy 2-core machine). Call with the lock held.
        """
        flat = faiss.downcast_index(self._index.index)
        n, dim = int(flat.ntotal), self.info.dim
        stored = faiss.rev_swig_ptr(flat.get_xb(), n * dim).reshape(n, dim)
        task_ids = faiss.rev_swig_ptr(self._index.id_map.data(), n)
        scores_out = np.empty((len(queries), k), dtype=np.float32)
        ids_out = np.empty((len(queries), k), dtype=np.int64)
        step = max(1, _SCAN_FLOATS // max(n, 1))  # bound the (queries x n) score block
        for first in range(0, len(queries), step):
            scores = queries[first : first + step] @ stored.T
            top = (
                np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n else np.broadcast_to(np.arange(n), scores.shape)
            )
            best = np.take_along_axis(scores, top, axis=1)
            order = np.argsort(-best, axis=1, kind="stable")
            scores_out[first : first + step] = np.take_along_axis(best, order, axis=1)
            ids_out[first : first + step] = task_ids[np.take_along_axis(top, order, axis=1)]
        return scores_out, ids_out

    def range_search(self, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every indexed vector with cosine above ``threshold``, per query, in faiss's ``(lims, D, I)`` form.

        Always on the CPU index (faiss GPU indexes have no range search); IVF probes ``nprobe`` lists.
        """
        queries = _check_queries(queries, self.info.dim)
        with self._lock:
            return self._index.range_search(queries, float(threshold))

    # --- writes --------------------------------------------------------------------------------------------

    def add(self, task_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert vectors; a task id already present is replaced (IVF: assigned to its nearest centroid)."""
        ids, data = _check_batch(task_ids, vectors, self.info.dim)
        with self._lock:
            self._index.remove_ids(faiss.IDSelectorBatch(ids))
            self._index.add_with_ids(data, ids)
            self._changed()

    def remove(self, task_ids: np.ndarray) -> int:
        """Drop task ids (absent ones are ignored); returns how many went."""
        ids = np.ascontiguousarray(task_ids, dtype=np.int64).reshape(-1)
        if not len(ids):
            return 0
        with self._lock:
            removed = int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))
            self._changed()
            return removed

    def apply(self, changes: Changes) -> None:
        """Catch up with the store (``VectorStore.changes_since(index.info.store_seq, embedder)``)."""
        with self._lock:
            if len(changes.deleted):
                self._index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(changes.deleted, dtype=np.int64)))
            if len(changes.task_ids):
                self.add(changes.task_ids, changes.vectors)
            self.info = replace(self.info, store_seq=changes.seq, count=len(self))
            self._gpu_index = None

    def _changed(self) -> None:
        self.info = replace(self.info, count=len(self))
        self._gpu_index = None  # re-copied to the GPU on the next search

    def _searcher(self) -> faiss.Index:
        if not self._use_gpu:
            return self._index
        if self._gpu_index is None:
            if self._gpu_resources is None:
                self._gpu_resources = faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._index)
            if self.info.nprobe is not None:
                faiss.GpuParameterSpace().set_index_parameter(self._gpu_index, "nprobe", self.info.nprobe)
        return self._gpu_index

    # --- persistence ---------------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the index under ``folder`` atomically; returns the sidecar's path.

        Order: faiss file under a temporary name -> fsync -> rename to its final, unique name -> fsync the
        folder -> sidecar to a temporary file -> fsync -> ``os.replace`` onto ``index.json`` -> fsync the
        folder -> remove index files no sidecar names. Killed anywhere, the folder still holds a complete
        sidecar and the file it names.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        token = f"{int(time.time() * 1000):x}-{secrets.token_hex(4)}"
        final = folder / f"index-{token}.faiss"
        partial = folder / f".index-{token}.faiss.tmp"
        with self._lock:
            faiss.write_index(self._index, str(partial))
            info = replace(self.info, count=len(self), file=final.name, bytes=partial.stat().st_size)
        _fsync_file(partial)
        os.rename(partial, final)
        _fsync_dir(folder)
        sidecar = folder / SIDECAR
        pending = folder / f".{SIDECAR}.{token}.tmp"
        pending.write_text(json.dumps(asdict(info), indent=2, sort_keys=True))
        _fsync_file(pending)
        os.replace(pending, sidecar)
        _fsync_dir(folder)
        for stale in folder.glob("index-*.faiss"):
            if stale.name != final.name:
                stale.unlink(missing_ok=True)
        for leftover in folder.glob(".index-*.tmp"):
            leftover.unlink(missing_ok=True)
        for leftover in folder.glob(f".{SIDECAR}.*.tmp"):
            leftover.unlink(missing_ok=True)
        self.info = info
        return sidecar

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, embedder: str | None = None, device: str = "auto") -> VectorIndex:
        """Load what ``save`` wrote; checks the sidecar against the file and, if given, the embedder."""
        folder = Path(folder)
        sidecar = folder / SIDECAR
        for attempt in range(2):
            info = _read_sidecar(sidecar)
            if embedder is not None and info.embedder != embedder:
                raise IndexFormatError(f"index in {folder} holds vectors of {info.embedder}, not {embedder}")
            path = folder / info.file
            try:
                if "/" in info.file or path.stat().st_size != info.bytes:
                    raise IndexFormatError(f"index file {path} is not the {info.bytes} bytes {sidecar} says")
                index = faiss.read_index(str(path))
                break
            except (FileNotFoundError, RuntimeError) as exc:
                # A writer may have published a newer index and removed this file between our two reads.
                if attempt:
                    raise IndexFormatError(f"index file {path} named by {sidecar} cannot be read: {exc}") from exc
        if index.d != info.dim or index.ntotal != info.count:
            raise IndexFormatError(
                f"index file {path} holds {index.ntotal} {index.d}-d vectors; sidecar says {info.count} {info.dim}-d"
            )
        return cls(index, info, device=device)


def _read_sidecar(sidecar: Path) -> IndexInfo:
    try:
        info = IndexInfo(**json.loads(sidecar.read_text()))
    except FileNotFoundError:
        raise IndexFormatError(f"no saved index in {sidecar.parent}") from None
    except (ValueError, TypeError) as exc:
        raise IndexFormatError(f"unreadable index sidecar {sidecar}: {exc}") from exc
    if info.format != FORMAT_VERSION:
        raise IndexFormatError(f"index format {info.format} in {sidecar}; this version reads {FORMAT_VERSION}")
    return info


def _build_ivf(
    ids: np.ndarray,
    data: np.ndarray,
    embedder: str,
    store_seq: int,
    target_recall: float,
    nlist: int | None,
    seed: int,
) -> tuple[faiss.Index, IndexInfo]:
    n, dim = data.shape
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    held_out = order[: min(_HELD_OUT, n // 20)]
    nlist = nlist or _default_nlist(n - len(held_out))
    train = data[np.sort(order[len(held_out) : len(held_out) + _TRAIN_PER_CENTROID * nlist])]
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True  # centroids on the unit sphere, like the vectors
    index.cp.seed = seed
    index.train(train)
    index.add_with_ids(data, ids)

    queries = data[held_out]
    _, truth = faiss.knn(queries, data, 10, metric=faiss.METRIC_INNER_PRODUCT)  # exact, without a copy of data
    truth_ids = ids[truth]
    nprobe, recall = nlist, 1.0
    probe = 1
    while probe <= nlist:
        index.nprobe = probe
        _, found = index.search(queries, 10)
        recall = _recall(found, truth_ids)
        if recall >= target_recall:
            nprobe = probe
            break
        probe *= 2
    else:
        nprobe, recall = nlist, 1.0  # probing every list is exact
    index.nprobe = nprobe
    info = IndexInfo(
        kind="ivf",
        dim=dim,
        count=n,
        embedder=embedder,
        store_seq=store_seq,
        nlist=nlist,
        nprobe=nprobe,
        recall_at_10=round(float(recall), 4),
        trained_on=n,
    )
    return index, info


def _default_nlist(n: int) -> int:
    """A power of two near 4 sqrt(n), with at least 39 training vectors per centroid."""
    target = 4 * np.sqrt(n)
    nlist = 1 << int(np.round(np.log2(max(target, 1))))
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return nlist


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k found in the approximate top-k."""
    hits = sum(len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth, strict=True))
    return hits / max(int((truth >= 0).sum()), 1)


def _check_batch(task_ids: np.ndarray, vectors: np.ndarray, dim: int | None) -> tuple[np.ndarray, np.ndarray]:
    ids = np.ascontiguousarray(task_ids, dtype=np.int64).reshape(-1)
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    if data.ndim != 2 or data.shape[0] != len(ids):
        raise ValueError(f"expected {len(ids)} vectors as a 2-d array, got shape {data.shape}")
    if dim is not None and data.shape[1] != dim:
        raise DimensionMismatchError(f"vectors are {data.shape[1]}-d, the index holds {dim}-d vectors")
    if len(ids) and ids.min() < 0:
        raise ValueError("task ids must be non-negative")
    if not np.isfinite(data).all():
        raise ValueError("vectors hold NaN or infinity")
    return ids, data


def _check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    data = np.ascontiguousarray(queries, dtype=np.float32)
    if data.ndim == 1:
        data = data[None, :]
    if data.ndim != 2 or data.shape[1] != dim:
        raise DimensionMismatchError(f"queries must be {dim}-d vectors, got shape {np.shape(queries)}")
    if not np.isfinite(data).all():
        raise ValueError("queries hold NaN or infinity")
    return data


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
