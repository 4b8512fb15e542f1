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
"""

from __future__ import annotations

import logging
import threading
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


class IndexCache:
    """Per project: the read-only store and the up-to-date index (thread-safe; one lock per project)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._entries: dict[int, _Entry] = {}
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
            return store, index

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
        with self._lock:
            return self._entries.setdefault(project, _Entry())
