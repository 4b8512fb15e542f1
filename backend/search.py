"""Similar-image search over a project's index: by one of its tasks, or by an image a client sends.

The vectors and scores come from the API's own index cache (``backend.index_cache``); what a person
needs beside them, each result's image URL and whether the task is already labeled, comes from Label
Studio in one task listing for the k ids (``LabelStudioClient.tasks_by_id``), never one call per task.
When Label Studio cannot be asked (no address known, unreachable, refusing) the search still answers,
with ids and scores only, and says so in ``label_studio`` and ``warning``.

A query image is embedded by a worker that serves the embedder (``embed_query``, an interactive RQ
job, as ``/predict`` does with the detector): the API process runs no model.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from backend.config import Settings
from backend.image_source import ImageFetchError, redact_url
from backend.index_cache import IndexCache
from backend.ls_auth import LabelStudioAuthError
from backend.ls_client import LabelStudioClient, LabelStudioError
from backend.ls_credentials import LabelStudioAccess

log = logging.getLogger(__name__)

LS_TIMEOUT = 10.0
"""Seconds an interactive search waits for Label Studio's listing (once retried) before answering without it."""


class TaskNotIndexed(LookupError):
    """The query task has no vector of the current embedder in the project's store."""


@dataclass(frozen=True)
class Hit:
    task_id: int
    score: float
    image: str | None = None  # the task's image URL (absolute when Label Studio serves it)
    labeled: bool | None = None  # None: Label Studio was not asked or did not answer


@dataclass(frozen=True)
class Found:
    """Search results, most similar first, and what Label Studio added to them."""

    hits: list[Hit]
    label_studio: str  # "ok", "unreachable" or "unknown" (no address known for the project)
    warning: str | None = None


def nearest(cache: IndexCache, project: int, vector: np.ndarray, k: int, *, exclude: int | None = None) -> list[Hit]:
    """The ``k`` tasks most similar to ``vector`` (``exclude`` left out), scores only."""
    _, index = cache.get(project)
    scores, ids = index.search(np.asarray(vector, dtype=np.float32), k + (exclude is not None))
    hits = [Hit(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0 and i != exclude]
    return hits[:k]


def task_vector(cache: IndexCache, project: int, task_id: int) -> np.ndarray:
    """The stored vector of one task of the project, of the current embedder version."""
    store, _ = cache.get(project)
    row = store.get(task_id)
    if row is None or row.embedder != cache.version:
        raise TaskNotIndexed(
            f"task {task_id} is not in project {project}'s index (not a task of the project, not indexed yet, "
            "or deleted)"
        )
    return row.vector


def with_label_studio(
    hits: list[Hit], project: int, access: LabelStudioAccess, label_config: str | None, settings: Settings
) -> Found:
    """Add each hit's image URL and labeled state from one Label Studio listing; tasks Label Studio no
    longer has are dropped (their vectors go when its ``TASKS_DELETED`` reaches us)."""
    if not hits:
        return Found(hits, "ok")
    if not access.url:
        return Found(
            hits,
            "unknown",
            f"no Label Studio address is known for project {project} (connect the model in Label Studio, or set "
            "DINOLABEL_LABEL_STUDIO_URL): results carry task ids and scores only",
        )
    try:
        with LabelStudioClient(access.url, access.api_key, timeout=LS_TIMEOUT, retries=1) as client:
            tasks = client.tasks_by_id(project, [hit.task_id for hit in hits])
    except (LabelStudioError, LabelStudioAuthError, httpx.HTTPError, ValueError) as exc:
        log.warning("project %d: Label Studio listing failed: %s", project, exc)
        return Found(
            hits,
            "unreachable",
            f"Label Studio at {redact_url(access.url)} did not list the tasks ({type(exc).__name__}): results "
            "carry task ids and scores only",
        )
    key = image_key(label_config)
    enriched = [
        Hit(
            hit.task_id,
            hit.score,
            image_url(tasks[hit.task_id]["data"], key, access.url),
            tasks[hit.task_id]["is_labeled"],
        )
        for hit in hits
        if hit.task_id in tasks
    ]
    return Found(enriched, "ok")


def image_key(label_config: str | None) -> str | None:
    """The task data key of the labeling config's first ``<Image>`` (``$image`` -> ``image``), if known."""
    if not label_config:
        return None
    try:
        from label_studio_sdk.label_interface import LabelInterface

        interface = LabelInterface(label_config)
    except Exception:  # an unparseable config only costs the key: image_url() guesses then
        return None
    for tag in interface.objects:
        value = getattr(tag, "value", None)
        if type(tag).__name__ == "ImageTag" and isinstance(value, str) and value.startswith("$"):
            return value[1:]
    return None


def image_value(data: dict[str, Any], key: str | None) -> str | None:
    """A task's image reference: under the config's key, else ``image``, else the task's only text value."""
    value = data.get(key) if key else None
    if value is None:
        strings = [v for v in data.values() if isinstance(v, str)]
        value = data.get("image") if isinstance(data.get("image"), str) else (strings[0] if len(strings) == 1 else None)
    return value if isinstance(value, str) and value else None


def image_url(data: dict[str, Any], key: str | None, base: str) -> str | None:
    """A task's image as a URL a client can open: Label Studio paths made absolute; data URIs left out
    (they are the image itself, not an address)."""
    value = image_value(data, key)
    if value is None or value[:5].lower() == "data:":
        return None
    if value.startswith("/") and not value.startswith("//"):
        return base.rstrip("/") + value
    return value


# --- in the worker -----------------------------------------------------------------------------------------


def embed_query(payload: dict[str, Any]) -> dict[str, Any]:
    """Embed query images in a worker: ``{"vectors": [[...], ...], "embedder": version}``, or ``{"refused":
    reason, "index": i}`` when image ``i`` cannot be fetched or decoded (the client's fault: the API answers
    422).

    ``payload``: ``{"project": id, "images": [base64 bytes, ...]}`` (uploads: a search's one, or the examples
    of "more like these") or ``{"project": id, "url": ...}`` (on Label Studio's origin, checked by the API;
    fetched here under the workers' rules).
    """
    from backend.worker import current_runtime
    from model.images import ImageDecodeError, decode_image

    runtime = current_runtime()
    embedder = runtime.embedder
    if embedder is None:
        raise RuntimeError("this worker does not serve the embedder (DINOLABEL_WORKER_MODELS)")
    vectors = []
    sources = payload.get("images", [None])  # None: the URL
    for index, encoded in enumerate(sources):  # one at a time: one decoded image (up to max_pixels) in memory
        try:
            if encoded is not None:
                data = base64.b64decode(encoded)
            else:
                data = runtime.fetcher(runtime.label_studio(payload["project"])).fetch(payload["url"])
            image = decode_image(data, max_pixels=runtime.settings.image_max_pixels)
        except (ImageFetchError, ImageDecodeError) as exc:
            return {"refused": str(exc), "index": index}
        vectors.append([float(v) for v in embedder.embed([image])[0]])
    return {"vectors": vectors, "embedder": embedder.version}


def vector_of(values: Sequence[float], dim: int) -> np.ndarray:
    """A worker's answer as a query vector of the index's width (a mismatch means another embedder)."""
    vector = np.asarray(values, dtype=np.float32)
    if vector.shape != (dim,):
        raise ValueError(f"the worker's embedding has {vector.size} values; the index holds {dim}-d vectors")
    return vector
