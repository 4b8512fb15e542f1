"""One prediction round: tasks in, one Label Studio prediction per task out, in the same order.

Images are downloaded on threads ahead of the model; a task whose image cannot be fetched or decoded
fails alone (empty prediction, reason logged and returned) and the others are still served.

Nothing here waits without an end: a download is waited for at most as long as the fetcher may take
(plus decoding), and a call given a ``deadline`` stops at it. RQ's job time-out cannot interrupt a
thread blocked in a wait, so the work has to stop itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from backend.image_source import ImageFetcher, ImageFetchError
from backend.labeling import LabelTarget, match_label, typed_prompt
from backend.results import prediction, region
from model import DetectionParams, GroundingDinoDetector
from model.images import ImageDecodeError, decode_image

log = logging.getLogger(__name__)

CHUNK_BATCHES = 4
"""Batches of images the model takes at a time while the next ones download."""
DECODE_MARGIN_S = 10.0
"""Seconds on top of the fetcher's total time-out that loading one image (decoding included) may take."""
DEADLINE_PASSED = "deadline passed before this task was predicted"


@dataclass(frozen=True)
class TaskFailure:
    """Why one task got an empty prediction."""

    task_id: int | None
    reason: str


@dataclass
class PredictOutcome:
    """Predictions in task order, and the tasks that failed."""

    predictions: list[dict[str, Any]]
    failures: list[TaskFailure] = field(default_factory=list)


@dataclass(frozen=True)
class _Prompt:
    phrases: tuple[str, ...]
    groups: tuple[int, ...]  # label index of each phrase (the NMS group)
    notes: tuple[str | None, ...]  # per phrase, said in the region's meta


class Predictor:
    """Runs the detector for Label Studio tasks. Thread-safe: one forward pass at a time."""

    def __init__(
        self,
        detector: GroundingDinoDetector,
        *,
        batch_size: int = 4,
        max_pixels: int = 100_000_000,
        download_threads: int = 8,
    ) -> None:
        self.detector = detector
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        # Kept for the predictor's life: a pool per call would start threads on every request.
        self._downloads = ThreadPoolExecutor(max_workers=download_threads, thread_name_prefix="image-download")
        self._model_lock = threading.Lock()

    def predict(
        self,
        tasks: Sequence[Mapping[str, Any]],
        target: LabelTarget,
        params: DetectionParams,
        model_version: str,
        fetcher: ImageFetcher,
        context: Mapping[str, Any] | None = None,
        *,
        deadline: float | None = None,
    ) -> PredictOutcome:
        """Detect the project's labels (or the annotator's typed prompt) in every task's image.

        ``deadline`` (epoch seconds): once past it, no further chunk is started; the tasks not yet
        predicted fail with :data:`DEADLINE_PASSED` and their downloads that have not started are
        cancelled. A forward pass already running finishes first.
        """
        prompt = _prompt_for(target, context)
        outcome = PredictOutcome(predictions=[])
        # All downloads start now; the model takes the images chunk by chunk as they arrive, so fetching
        # the next chunk overlaps the forward passes of this one.
        pending = [self._downloads.submit(self._load_image, task, target, fetcher) for task in tasks]
        wait_limit = fetcher.total_timeout + DECODE_MARGIN_S
        step = self.batch_size * CHUNK_BATCHES
        for start in range(0, len(tasks), step):
            chunk = tasks[start : start + step]
            loaded = [
                _wait(future, task, wait_limit, deadline)
                for future, task in zip(pending[start : start + step], chunk, strict=True)
            ]
            if deadline is not None and time.time() >= deadline:
                for future in pending[start:]:
                    future.cancel()
                for task in tasks[start:]:
                    outcome.failures.append(TaskFailure(task_id=task.get("id"), reason=DEADLINE_PASSED))
                    outcome.predictions.append(prediction([], model_version))
                log.warning("deadline passed: %d of %d tasks not predicted", len(tasks) - start, len(tasks))
                break
            self._detect_chunk(chunk, loaded, target, params, model_version, prompt, outcome)
        return outcome

    def _detect_chunk(
        self,
        tasks: Sequence[Mapping[str, Any]],
        loaded: list[Image.Image | TaskFailure],
        target: LabelTarget,
        params: DetectionParams,
        model_version: str,
        prompt: _Prompt,
        outcome: PredictOutcome,
    ) -> None:
        good = [i for i, item in enumerate(loaded) if isinstance(item, Image.Image)]
        with self._model_lock:
            detections = self.detector.detect(
                [loaded[i] for i in good],
                prompt.phrases,
                params,
                groups=prompt.groups,
                batch_size=self.batch_size,
            )
        by_index = dict(zip(good, detections, strict=True))
        for index, (task, item) in enumerate(zip(tasks, loaded, strict=True)):
            if isinstance(item, TaskFailure):
                outcome.failures.append(item)
                outcome.predictions.append(prediction([], model_version))
                continue
            width, height = item.size
            regions = [
                region(d, target.labels[prompt.groups[d.phrase]], target, width, height, prompt.notes[d.phrase])
                for d in by_index[index]
            ]
            outcome.predictions.append(prediction(regions, model_version))
            log.debug("task %s: %d boxes", task.get("id"), len(regions))

    def _load_image(
        self, task: Mapping[str, Any], target: LabelTarget, fetcher: ImageFetcher
    ) -> Image.Image | TaskFailure:
        task_id = task.get("id")
        value = (task.get("data") or {}).get(target.value_key)
        if not isinstance(value, str) or not value:
            reason = f"task data has no image under {target.value_key!r}"
        else:
            try:
                data = fetcher.fetch(value, task_id=task_id)
                return decode_image(data, max_pixels=self.max_pixels)
            except (ImageFetchError, ImageDecodeError) as exc:
                reason = str(exc)
        log.warning("task %s failed: %s", task_id, reason)
        return TaskFailure(task_id=task_id, reason=reason)


def _wait(
    future: Future[Image.Image | TaskFailure], task: Mapping[str, Any], limit: float, deadline: float | None
) -> Image.Image | TaskFailure:
    """The loaded image (or failure), waiting at most ``limit`` seconds and never past ``deadline``."""
    timeout = limit if deadline is None else max(0.0, min(limit, deadline - time.time()))
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        future.cancel()  # a download still queued never starts; a running one ends by its own deadline
        past = deadline is not None and time.time() >= deadline
        reason = DEADLINE_PASSED if past else f"the image was not loaded within {limit:g} s"
        log.warning("task %s failed: %s", task.get("id"), reason)
        return TaskFailure(task_id=task.get("id"), reason=reason)


def _prompt_for(target: LabelTarget, context: Mapping[str, Any] | None) -> _Prompt:
    """The project's label phrases, or the typed prompt with each phrase mapped to a label."""
    typed = typed_prompt(context, target)
    if not typed:
        return _Prompt(target.phrases, target.phrase_label, (None,) * len(target.phrases))
    groups: list[int] = []
    notes: list[str | None] = []
    for phrase in typed:
        label = match_label(phrase, target)
        if label is None:
            groups.append(0)
            notes.append(f"prompt {phrase!r} matches no label; labelled {target.labels[0]!r}")
        else:
            groups.append(label)
            notes.append(f"prompt: {phrase}")
    return _Prompt(tuple(typed), tuple(groups), tuple(notes))
