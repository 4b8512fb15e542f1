"""The indexer's library: per-project vector store, faiss index, duplicate passes and their report.

Knows nothing of HTTP, Redis or Label Studio; takes folders, arrays and thresholds. The backend builds
jobs and routes on top of these names.
"""

from __future__ import annotations

from indexer.duplicates import (
    DEFAULT_EMBEDDING_THRESHOLD,
    DEFAULT_PHASH_DISTANCE,
    DuplicateGroup,
    DuplicateReport,
    DuplicateResult,
    find_duplicates,
)
from indexer.exceptions import (
    DimensionMismatchError,
    IndexerError,
    IndexFormatError,
    StoreBusyError,
    StoreNotFoundError,
)
from indexer.gallery import render_html, thumbnail
from indexer.hashes import ImageHashes, image_hashes
from indexer.index import EXACT_BELOW, IndexInfo, VectorIndex, gpu_available
from indexer.store import Changes, HashTable, StoredVector, VectorStore, project_dir

__all__ = [
    "DEFAULT_EMBEDDING_THRESHOLD",
    "DEFAULT_PHASH_DISTANCE",
    "EXACT_BELOW",
    "Changes",
    "DimensionMismatchError",
    "DuplicateGroup",
    "DuplicateReport",
    "DuplicateResult",
    "HashTable",
    "ImageHashes",
    "IndexFormatError",
    "IndexInfo",
    "IndexerError",
    "StoreBusyError",
    "StoreNotFoundError",
    "StoredVector",
    "VectorIndex",
    "VectorStore",
    "find_duplicates",
    "gpu_available",
    "image_hashes",
    "project_dir",
    "render_html",
    "thumbnail",
]
