"""One prediction round: tasks in, one Label Studio prediction per task out, in the same order.

Tasks go through ``model.pipeline``: images are fetched on threads, decoded and preprocessed on as many
threads as there are cores (or in worker processes: ``preprocess_processes``), batched by size and fed
to the model while the next ones are prepared, so a GPU does not wait for the CPU. A task whose image
cannot be fetched or decoded fails alone (empty prediction, reason logged and returned) and the others
are still served.

Nothing here waits without an end: an image is waited for at most as long as the fetcher may take
(plus decoding), and a call given a ``deadline`` stops at it. RQ's job time-out cannot interrupt a
thread blocked in a wait, so the work has to stop itself.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from backend.image_source import ImageFetcher, ImageFetchError
from backend.labeling import LabelTarget, match_label, typed_prompt
from backend.results import prediction, region
from model import Detection, DetectionParams, GroundingDinoDetector
from model.images import DecodeThen, ImageDecodeError
from model.pipeline import DEADLINE_PASSED as PIPELINE_DEADLINE_PASSED
from model.pipeline import Failed, Pipeline, PipelineStats, Stages

Size = tuple[int, int]
Detections = list[Detection]

log = logging.getLogger(__name__)

DECODE_MARGIN_S = 10.0
"""Seconds on top of the fetcher's total time-out that loading one image (decoding included) may take."""
DEADLINE_PASSED = "deadline passed before this task was predicted"


class MissingImage(ValueError):
    """The task's data has no image under the key the labeling config names."""


def fetch_task_image(fetcher: ImageFetcher, value: Any, *, key: str, task_id: int | None) -> bytes:
    """The bytes of a task's image, ``value`` being what its data holds under the labeling config's ``key``:
    the one fetch of the detector's, the embedder's and the shared loads, so that a task without an image
    fails with the same reason in every job."""
    if not isinstance(value, str) or not value:
        raise MissingImage(f"task data has no image under {key!r}")
    return fetcher.fetch(value, task_id=task_id)


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
        preprocess_threads: int | None = None,
        preprocess_processes: int = 0,
        draft_decode: bool = False,
        niceness: int = 0,
    ) -> None:
        """``preprocess_threads`` defaults to one per usable core; ``preprocess_processes`` above 0 decodes
        and preprocesses in that many processes instead (``model.preprocess_pool``). ``draft_decode``:
        decode large JPEGs at a reduced scale that still covers the model's input
        (``model.images.decode_image``). ``niceness``: the pipeline's image threads and processes run
        at that lower priority (``model.pipeline.Pipeline``)."""
        self.detector = detector
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        # The preprocessor's method, not the detector's: it travels to the preprocessing processes.
        self.decode_size = detector.preprocessor.input_size if draft_decode else None
        # Kept for the predictor's life: threads or processes per call would start on every request.
        self.pipeline = Pipeline(
            detector.device,
            load_threads=download_threads,
            preprocess_threads=preprocess_threads,
            preprocess_processes=preprocess_processes,
            niceness=niceness,
        )
        self._turns = ModelTurns()

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
        stats: PipelineStats | None = None,
        interactive: bool = False,
        load: Callable[[Mapping[str, Any]], Image.Image] | None = None,
    ) -> PredictOutcome:
        """Detect the project's labels (or the annotator's typed prompt) in every task's image.

        ``deadline`` (epoch seconds): once past it, no further batch goes to the model; the tasks not
        yet predicted fail with :data:`DEADLINE_PASSED` and their downloads that have not started are
        cancelled. A forward pass already running finishes first. ``stats``, if given, receives where
        the time went (``bench/pipeline_efficiency.py`` reads it). An ``interactive`` call (an annotator
        waiting) gets the model before bulk calls running on other threads, at their next batch.
        ``load`` replaces the fetch and decode of a task's image (``backend.shared_images`` keeps what
        the embedder needs of it on the way); it raises what the fetch and decode raise.
        """
        prompt = _prompt_for(target, context)
        stages = self._stages(prompt, params, interactive, decode=load is None)
        results: list[Any] = [None] * len(tasks)
        stats = stats if stats is not None else PipelineStats()
        for index, result in self.pipeline.run(
            tasks,
            load or (lambda task: self._fetch(task, target, fetcher)),
            stages,
            batch_size=self.batch_size,
            item_errors=(ImageFetchError, ImageDecodeError, MissingImage),
            item_timeout=fetcher.total_timeout + DECODE_MARGIN_S,
            deadline=deadline,
            stats=stats,
            in_processes=load is None,  # images that ``load`` decoded stay here: pixels cost more to ship
        ):
            results[index] = result
        log.debug("pipeline: %s", stats.as_dict())
        outcome = PredictOutcome(predictions=[])
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, Failed):
                reason = DEADLINE_PASSED if result == PIPELINE_DEADLINE_PASSED else result.reason
                log.warning("task %s failed: %s", task.get("id"), reason)
                outcome.failures.append(TaskFailure(task_id=task.get("id"), reason=reason))
                outcome.predictions.append(prediction([], model_version))
                continue
            detections, (width, height) = result
            regions = [
                region(d, target.labels[prompt.groups[d.phrase]], target, width, height, prompt.notes[d.phrase])
                for d in detections
            ]
            outcome.predictions.append(prediction(regions, model_version))
            log.debug("task %s: %d boxes", task.get("id"), len(regions))
        return outcome

    def _stages(
        self, prompt: _Prompt, params: DetectionParams, interactive: bool, *, decode: bool
    ) -> Stages[Any, Size, tuple[Detections, Size]]:
        """The detector's stages, decoding first when the loads only fetch bytes (``decode``), with one
        forward pass at a time (interactive ones first) and each image's size kept with its boxes
        (regions are percentages of it)."""
        stages = self.detector.stages(prompt.phrases, params, groups=prompt.groups)
        preprocess: Any = stages.preprocess
        if decode:
            preprocess = DecodeThen(stages.preprocess, max_pixels=self.max_pixels, decode_size=self.decode_size)

        def forward(pixels: torch.Tensor) -> Any:
            with self._turns.turn(interactive=interactive):
                return stages.forward(pixels)

        def postprocess(outputs: Any, sizes: Sequence[Size]) -> list[tuple[Detections, Size]]:
            return list(zip(stages.postprocess(outputs, sizes), sizes, strict=True))

        return dataclasses.replace(stages, preprocess=preprocess, forward=forward, postprocess=postprocess)

    def _fetch(self, task: Mapping[str, Any], target: LabelTarget, fetcher: ImageFetcher) -> bytes:
        key = target.value_key
        return fetch_task_image(fetcher, (task.get("data") or {}).get(key), key=key, task_id=task.get("id"))


class ModelTurns:
    """One forward pass at a time; a waiting interactive pass goes before waiting bulk passes.

    A plain lock is not fair: a bulk batch releasing it between two passes could take it again at once,
    and an annotator's request would wait for the whole bulk batch instead of one pass.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._interactive_waiting = 0

    @property
    def interactive_waiting(self) -> int:
        """Interactive passes waiting for their turn."""
        return self._interactive_waiting

    @contextmanager
    def turn(self, *, interactive: bool) -> Iterator[None]:
        with self._cond:
            self._interactive_waiting += int(interactive)
            try:
                while self._busy or (not interactive and self._interactive_waiting):
                    self._cond.wait()
            finally:
                self._interactive_waiting -= int(interactive)
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()


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
