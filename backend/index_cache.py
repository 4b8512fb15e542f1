"""The API process's faiss indexes: one per project, of the current embedder version, kept current.

The store (``indexer.store``, SQLite in WAL mode) is the truth; the index is derived from it. On the first
search of a project the index is loaded from its last save (``<project dir>/faiss/``) or, when there is
none or it holds another embedder's vectors, rebuilt from the store and saved, so an API restart on a
big project costs a file read, not a rebuild. Every later use first compares the store's sequence
number with the index's (one read) and applies ``store.changes_since(seq)`` when they differ (an
indexed query over the rows written since), so a search always sees
what the store's writer committed before it, deletions included. The store is opened read-only here:
readers never block its one writer.

What changed since the last save is saved again every ``SAVE_EVERY`` changed rows and when the service
stops; a saved index that is behind the store is caught up by the same ``changes_since`` on load.

Memory is bounded: at most ``DINOLABEL_INDEX_CACHE_PROJECTS`` projects and ``DINOLABEL_INDEX_CACHE_BYTES``
of vectors (``VectorIndex.nbytes``) are held; past either, the least recently searched projects are let
go, and their next search loads them again (from the saved file, caught up with the store). The project
just searched is always kept, even alone over the byte budget: answering needs it. An evicted index is
not saved on the way out (that would make the evicting search wait for the write): the store has every
change, and a reload catches up the at most ``SAVE_EVERY`` rows applied since the last save. Projects
that have nothing to search hold no place.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from backend.config import Settings
from backend.project_vectors import embedder_version_of, open_store
from indexer import IndexFormatError, StoreNotFoundError, VectorIndex, VectorStore, project_dir

log = logging.getLogger(__name__)

INDEX_FOLDER = "faiss"
"""Where a project's saved index lives, below its store's folder."""
SAVE_EVERY = 10_000
"""Rows changed since the last save after which a query saves the index again."""


class NotIndexed(LookupError):
    """The project has no vectors of the current embedder version (never indexed, or not yet)."""


@dataclass
class _Entry:
    lock: threading.Lock = field(default_factory=threading.Lock)
    store: VectorStore | None = None
    index: VectorIndex | None = None
    unsaved: int = 0  # rows applied since the last save
    nbytes: int = 0  # what the index held after its last use (VectorIndex.nbytes)


class IndexCache:
    """Per project: the read-only store and the up-to-date index (thread-safe; one lock per project),
    for at most ``index_cache_projects`` projects and ``index_cache_bytes`` of vectors, least recently
    used let go first."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        """The embedder version whose vectors are searched (the workers' current one)."""
        return embedder_version_of(self.settings)

    def folder(self, project: int) -> Path:
        return project_dir(self.settings.index_dir, project) / INDEX_FOLDER

    def get(self, project: int) -> tuple[VectorStore, VectorIndex]:
        """The project's store and its index brought up to date; ``NotIndexed`` when there is nothing to
        search (no store, or no vector of the current version)."""
        entry = self._entry(project)
        try:
            store, index = self._current(project, entry)
        except NotIndexed:
            self._forget(project, entry)  # a probe of unindexed projects must not push real indexes out
            raise
        self._evict(keep=project)
        return store, index

    def _current(self, project: int, entry: _Entry) -> tuple[VectorStore, VectorIndex]:
        version = self.version
        with entry.lock:
            if entry.store is None:
                try:
                    entry.store = open_store(self.settings, project)
                except StoreNotFoundError:
                    raise NotIndexed(
                        f"project {project} has not been indexed: run `dinolabel index --project {project}`"
                    ) from None
            store = entry.store
            if entry.index is None or entry.index.info.embedder != version:
                entry.index, entry.unsaved = self._open(project, store, version), 0
                if entry.index.nbytes > self.settings.index_cache_bytes:
                    log.warning(
                        "project %d: its index alone holds %d bytes, over DINOLABEL_INDEX_CACHE_BYTES (%d): it is "
                        "kept while searched, and every other project is let go",
                        project, entry.index.nbytes, self.settings.index_cache_bytes,
                    )  # fmt: skip
            index = entry.index
            if store.seq != index.info.store_seq:  # every write moves seq: equal means nothing to catch up
                changes = store.changes_since(index.info.store_seq, version)
                index.apply(changes)
                entry.unsaved += len(changes.task_ids) + len(changes.deleted)
                if entry.unsaved >= SAVE_EVERY:
                    index.save(self.folder(project))
                    entry.unsaved = 0
            if len(index) == 0 and store.count(version) == 0:
                raise NotIndexed(
                    f"project {project} has no vectors of the current embedder ({version}) yet: "
                    f"run `dinolabel index --project {project}`"
                )
            entry.nbytes = index.nbytes
            return store, index

    def held(self) -> list[tuple[int, int]]:
        """``(project, bytes)`` of each project held, least recently used first."""
        with self._lock:
            return [(project, entry.nbytes) for project, entry in self._entries.items()]

    def _evict(self, *, keep: int) -> None:
        """Let go of the least recently used projects (never ``keep``) until both budgets hold."""
        limit, budget = self.settings.index_cache_projects, self.settings.index_cache_bytes
        evicted: list[tuple[int, int]] = []
        with self._lock:
            total = sum(entry.nbytes for entry in self._entries.values())
            for project in list(self._entries):
                if len(self._entries) <= limit and total <= budget:
                    break
                if project == keep:
                    continue
                entry = self._entries.pop(project)
                total -= entry.nbytes
                evicted.append((project, entry.nbytes))
        # The read-only stores are not closed here: a search in flight may still read one. Dropped, its
        # SQLite connection closes with its last reference.
        for project, nbytes in evicted:
            log.info("project %d: index let go (%d bytes; least recently searched)", project, nbytes)

    def _forget(self, project: int, entry: _Entry) -> None:
        with self._lock:
            if self._entries.get(project) is entry:
                del self._entries[project]

    def _open(self, project: int, store: VectorStore, version: str) -> VectorIndex:
        """The saved index when it is this version's; else rebuilt from the store (and saved)."""
        folder = self.folder(project)
        try:
            index = VectorIndex.load(folder, embedder=version)
            log.info("project %d: loaded its %s index of %d vectors", project, index.kind, len(index))
            return index
        except IndexFormatError as exc:
            log.info("project %d: rebuilding its index from the store (%s)", project, exc)
        if store.dim is None or store.count(version) == 0:
            raise NotIndexed(
                f"project {project} has no vectors of the current embedder ({version}) yet: "
                f"run `dinolabel index --project {project}`"
            )
        index = VectorIndex.from_store(store, version)
        index.save(folder)
        return index

    def close(self) -> None:
        """Save what changed since the last save, and close the stores (at the service's shutdown)."""
        with self._lock:
            entries = dict(self._entries)
            self._entries.clear()
        for project, entry in entries.items():
            with entry.lock:
                if entry.index is not None and entry.unsaved:
                    try:
                        entry.index.save(self.folder(project))
                    except OSError:
                        log.exception("project %d: could not save its index (it is rebuilt on next use)", project)
                if entry.store is not None:
                    entry.store.close()

    def _entry(self, project: int) -> _Entry:
        """The project's entry, made the most recently used."""
        with self._lock:
            entry = self._entries.setdefault(project, _Entry())
            self._entries.move_to_end(project)
            return entry
