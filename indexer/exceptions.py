"""The indexer's errors: one base class, so callers can catch everything the indexer refuses at once."""

from __future__ import annotations


class IndexerError(Exception):
    """Base of every error raised on purpose by ``indexer``."""


class StoreBusyError(IndexerError):
    """Another process (or object) already holds the project's store for writing."""


class StoreNotFoundError(IndexerError):
    """A reader asked for a project store that has never been written."""


class DimensionMismatchError(IndexerError):
    """Vectors of a width other than the store's or the index's were offered."""


class IndexFormatError(IndexerError):
    """A saved index is missing, incomplete or disagrees with its sidecar."""
