"""One fetch and one decode of a task's image for both models, when a batch is both detected and embedded.

A worker serving the detector and the embedder runs a combined batch (``backend.combined``) as its
detection batch first, loading each image through :meth:`SharedImages.loader`. The loader fetches and
decodes the image as the detector's own loader does, except that it always decodes at full size (the
embedder's pixel hash needs every pixel, so ``DINOLABEL_IMAGE_DRAFT_DECODE`` does not apply here), and
keeps, for each task of the embedding batch, what the embedder needs: the image's hashes and its pixels
already preprocessed at the embedder's input size (a few hundred kB, not the decoded image), or the
exception that failed it. The embedding batch then takes those (:meth:`SharedImages.take`) instead of
fetching again, so a broken image fails its task in both jobs with the same reason. A task that the
detection did not load (it holds a prediction already, another batch is writing it) is fetched by the
embedding batch itself.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from backend.image_source import ImageFetcher, ImageFetchError
from backend.predictor import MissingImage, fetch_task_image
from indexer.hashes import ImageHashes, image_hashes
from model import DinoV2Embedder
from model.images import ImageDecodeError, decode_image
from model.pipeline import Stages


@dataclass(frozen=True)
class Prepared:
    """What the embedder needs of one image: its pixels preprocessed for it, and its hashes."""

    pixels: torch.Tensor
    hashes: ImageHashes


class SharedImages:
    """What a detection batch's loads keep for the embedding batch of the same tasks. Thread-safe: the
    detector's pipeline loads on several threads."""

    def __init__(self, embedder: DinoV2Embedder, task_ids: Iterable[int], *, max_pixels: int) -> None:
        """``task_ids``: the tasks the embedding batch embeds (only theirs are kept)."""
        self.embedder = embedder
        self.wanted = frozenset(task_ids)
        self.max_pixels = max_pixels
        self._kept: dict[int, Prepared | BaseException] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_batch(
        cls, embedder: DinoV2Embedder, tasks: Iterable[Mapping[str, Any]], *, max_pixels: int
    ) -> SharedImages:
        """For an index batch's tasks; those a sync re-checks (``known``) load on the embedding side, which
        compares their bytes with the stored vector's first."""
        return cls(embedder, [t["id"] for t in tasks if not t.get("known")], max_pixels=max_pixels)

    def loader(self, fetcher: ImageFetcher, value_key: str) -> Callable[[Mapping[str, Any]], Image.Image]:
        """The detector's load (``Predictor.predict(load=...)``): fetch and decode, keeping the embedder's part."""

        def load(task: Mapping[str, Any]) -> Image.Image:
            task_id = task.get("id")
            try:
                value = (task.get("data") or {}).get(value_key)
                data = fetch_task_image(fetcher, value, key=value_key, task_id=task_id)
                image = decode_image(data, max_pixels=self.max_pixels)
            except (ImageFetchError, ImageDecodeError, MissingImage) as exc:
                # A copy: same type and reason, no traceback holding the fetched bytes until the batch ends
                self._keep(task_id, copy.copy(exc))
                raise
            if task_id in self.wanted:
                self._keep(task_id, Prepared(self.embedder.preprocess_image(image), image_hashes(data, image)))
            return image

        return load

    def _keep(self, task_id: Any, kept: Prepared | BaseException) -> None:
        if task_id in self.wanted:
            with self._lock:
                self._kept[task_id] = kept

    def take(self, task_id: int) -> Prepared | None:
        """The task's prepared image (once), None when the detection did not load it; raises the
        exception that failed its load, so the embedding fails it with the same reason."""
        with self._lock:
            kept = self._kept.pop(task_id, None)
        if isinstance(kept, BaseException):
            raise kept
        return kept

    @staticmethod
    def embedder_stages(
        stages: Stages[Image.Image, None, np.ndarray],
    ) -> Stages[Image.Image | torch.Tensor, None, np.ndarray]:
        """The embedder's stages, taking pixels prepared already as they are."""
        base = stages.preprocess

        def preprocess(item: Image.Image | torch.Tensor) -> tuple[torch.Tensor, None]:
            return (item, None) if isinstance(item, torch.Tensor) else base(item)

        return dataclasses.replace(stages, preprocess=preprocess)  # type: ignore[arg-type]
