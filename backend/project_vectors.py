"""Where a project's vectors live and which embedder version is current: decided here, once.

The API process is the one writer of every project's store (vectors reach it through Redis from the
workers that embed); any other reader opens the store read-only. The version is computed from the
settings without loading the model (``model.embedder.embedder_version``), so the API, which runs no
model, knows which vectors a search must use: vectors of other versions are never mixed in.
"""

from __future__ import annotations

from functools import lru_cache

from backend.config import Settings
from indexer.store import VectorStore


def embedder_version_of(settings: Settings) -> str:
    """The version of the embedder the workers run with these settings (model, weights, size, precision)."""
    return _version(settings.embedder_model, settings.embedder_image_size, settings.embedder_precision)


@lru_cache(maxsize=16)
def _version(model: str, image_size: int, precision: str) -> str:
    from model.embedder import embedder_version  # imports torch: only when a version is first asked for

    return embedder_version(model, image_size=image_size, precision=precision)


def open_store(settings: Settings, project: int, *, writer: bool = False) -> VectorStore:
    """The project's vector store under ``DINOLABEL_DATA_DIR/index``; ``writer=True`` only in the store's
    one writer. A reader gets ``StoreNotFoundError`` for a project that was never indexed."""
    return VectorStore(settings.index_dir, project, writer=writer)
