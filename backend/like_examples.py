"""A label's annotated boxes as the examples of "more like these" (``POST .../prioritize {"like_label": ...}``).

"We need more bicycles": the boxes annotators drew with the label are cropped from their task images and
embedded, and the ranking (``backend.prioritize``) brings the tasks most like them to the front.

Cropping and embedding need the embedder and Label Studio, so they run as an RQ job on the embed queue
(``embed_label_boxes``, on a worker serving the embedder); the job keeps the crops' vectors in the
prioritize job's record and queues the ranking on the store writer. Bounded:

- one listing of at most ``ANNOTATED_TASKS`` tasks whose annotations mention the label, the most recently
  completed first (``LabelStudioClient.annotated_with``); annotations only, never predictions, and no
  cancelled (skipped) one;
- at most ``MAX_LABEL_BOXES`` boxes, spread over those tasks: each task's first box, then each one's
  second, and so on, so one crowded image cannot supply every example;
- boxes under ``MIN_BOX_PIXELS`` on a side are skipped (too few pixels to say what they show);
- each task image is fetched by the worker's ``ImageFetcher`` (the rules of every fetch), one at a time;
  an image that cannot be read loses its boxes, not the job.

Each crop takes ``CONTEXT_MARGIN`` of the box's size around it, as the embedder sees a whole image and
a little context keeps a thin object from filling the crop edge to edge.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from redis import Redis

from backend.image_source import ImageFetchError
from backend.jobs import RESULT_TTL
from backend.ls_auth import LabelStudioAuthError
from backend.ls_client import LabelStudioClient, LabelStudioError
from backend.predictor import MissingImage, fetch_task_image
from backend.prioritize import Examples, add_examples, create, fail, mark_running, read_job, start
from backend.queues import Queues
from backend.worker import Runtime, current_runtime
from model.images import ImageDecodeError, decode_image

log = logging.getLogger(__name__)

ANNOTATED_TASKS = 100
"""Tasks listed for their boxes of the label (one page, the most recently completed first)."""
MAX_LABEL_BOXES = 32
"""Boxes of the label embedded as examples, spread over the listed tasks."""
MIN_BOX_PIXELS = 8
"""Boxes narrower or lower than this (in image pixels) are skipped."""
CONTEXT_MARGIN = 0.1
"""Context around a box in a crop, as a fraction of the box's width and height on each side."""
JOB_TIMEOUT = 900
"""Seconds the embedding of a label's boxes may take (32 crops of up to 32 images fetched one by one)."""


@dataclass(frozen=True)
class LabelBox:
    """One annotated rectangle, in Label Studio's units: percent of the image, rotation in degrees."""

    task_id: int
    x: float
    y: float
    width: float
    height: float
    rotation: float = 0.0


class NoExamples(Exception):
    """The label has no usable annotated box (the message says why: the job's failure reason)."""


def submit_by_label(
    connection: Redis,
    project: int,
    label: str,
    *,
    to_name: str,
    image_key: str,
    uncertainty_weight: float | None = None,
) -> str:
    """Record a prioritize job whose examples are ``label``'s boxes and queue their embedding (which then
    queues the ranking); returns the job's id. ``to_name``: the ``<Image>`` the boxes are drawn on,
    ``image_key``: the task data key of its URL."""
    job_id = create(connection, project, like_label=label, uncertainty_weight=uncertainty_weight)
    Queues.on(connection).embed.enqueue(
        embed_label_boxes,
        job_id,
        label,
        to_name,
        image_key,
        at_front=True,  # one bounded job that a person waits for: not behind a project's index batches
        job_timeout=JOB_TIMEOUT,
        result_ttl=RESULT_TTL,
        description=f"embed the boxes of a label for prioritize job {job_id}",
    )
    return job_id


def embed_label_boxes(job_id: str, label: str, to_name: str, image_key: str) -> dict[str, Any]:
    """The RQ job (embed queue): the label's boxes become the prioritize job's examples, then the ranking
    is queued; or the job fails with the reason."""
    runtime = current_runtime()
    connection = runtime.connection
    project = read_job(connection, job_id)["project"]
    mark_running(connection, job_id)
    try:
        examples, boxes = _embed_boxes(runtime, project, label, to_name, image_key)
    except (NoExamples, LabelStudioError) as exc:  # our own messages: no secret in them
        reason = str(exc)
    except LabelStudioAuthError:
        reason = "Label Studio refused the credentials (check DINOLABEL_LABEL_STUDIO_API_KEY)"
    except Exception as exc:  # a bug: the details go to the log only
        log.exception("prioritize job %s: embedding the boxes of %r failed", job_id, label)
        reason = f"embedding the label's boxes failed: {type(exc).__name__} (see the worker's log)"
    else:
        add_examples(connection, job_id, examples, like_boxes=boxes)
        start(connection, job_id, project)
        return {"boxes": boxes}
    log.warning("prioritize job %s of project %d failed: %s", job_id, project, reason)
    fail(connection, job_id, reason)
    return {"failed": reason}


def _embed_boxes(runtime: Runtime, project: int, label: str, to_name: str, image_key: str) -> tuple[Examples, int]:
    embedder = runtime.embedder
    if embedder is None:
        raise RuntimeError(f"worker {runtime.name} does not serve the embedder (DINOLABEL_WORKER_MODELS)")
    access = runtime.label_studio(project)
    with LabelStudioClient(access.url or "", access.api_key, retries=runtime.settings.label_studio_retries) as client:
        tasks = client.annotated_with(project, label, limit=ANNOTATED_TASKS)
    boxes = label_boxes(tasks, label, to_name, limit=MAX_LABEL_BOXES)
    if not boxes:
        raise NoExamples(f"no annotated boxes of label {label!r} yet")
    images = {task["id"]: (task.get("data") or {}).get(image_key) for task in tasks}
    by_task: dict[int, list[LabelBox]] = {}  # each image once, in box order
    for box in boxes:
        by_task.setdefault(box.task_id, []).append(box)
    fetcher = runtime.fetcher(access)
    vectors: list[np.ndarray] = []
    problems: list[str] = []
    for task_id, its_boxes in by_task.items():
        try:
            data = fetch_task_image(fetcher, images[task_id], key=image_key, task_id=task_id)
            image = decode_image(data, max_pixels=runtime.settings.image_max_pixels)
        except (MissingImage, ImageFetchError, ImageDecodeError) as exc:  # ours, redacted: no secret in them
            log.warning("task %d: its boxes of %r are skipped: %s", task_id, label, exc)
            problems.append(f"task {task_id}: {exc}")
            continue
        for box in its_boxes:
            crop = crop_box(image, box)
            if crop is not None:  # one crop at a time in memory
                vectors.append(embedder.embed([crop])[0])
    if not vectors:
        why = f"; {problems[0]}" if problems else f" (all under {MIN_BOX_PIXELS} pixels)"
        raise NoExamples(f"none of the {len(boxes)} annotated boxes of label {label!r} could be used{why}")
    return Examples(np.stack(vectors).astype(np.float32), embedder.version), len(vectors)


def label_boxes(tasks: list[dict[str, Any]], label: str, to_name: str, *, limit: int) -> list[LabelBox]:
    """Up to ``limit`` rectangles labeled ``label`` on ``to_name`` in the tasks' annotations (tasks in the
    order given, each task's newest annotation first), spread over tasks: every task's first box, then
    every task's second, and so on. Cancelled annotations, other regions and malformed ones do not count;
    boxes whose original image size says they are under ``MIN_BOX_PIXELS`` are skipped here already."""
    per_task: list[list[LabelBox]] = []
    for task in tasks:
        found: list[LabelBox] = []
        annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        for annotation in sorted(annotations, key=lambda a: str(a.get("updated_at") or ""), reverse=True):
            for region in annotation.get("result") or []:
                box = _box(int(task["id"]), region, label, to_name)
                if box is not None:
                    found.append(box)
        if found:
            per_task.append(found)
    spread: list[LabelBox] = []
    for depth in range(max((len(found) for found in per_task), default=0)):
        spread += [found[depth] for found in per_task if depth < len(found)]
    return spread[:limit]


def _box(task_id: int, region: Any, label: str, to_name: str) -> LabelBox | None:
    """The region as a box of ``label``, or None (another label or control, a malformed or tiny region)."""
    if not isinstance(region, dict) or region.get("type") != "rectanglelabels" or region.get("to_name") != to_name:
        return None
    value = region.get("value")
    if not isinstance(value, dict) or label not in (value.get("rectanglelabels") or []):
        return None
    try:
        x, y, width, height = (float(value[k]) for k in ("x", "y", "width", "height"))
        rotation = float(value.get("rotation") or 0.0)
    except (KeyError, TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, width, height, rotation)) or width <= 0 or height <= 0:
        return None
    try:  # Label Studio records the image size the box was drawn on: tiny boxes go before any fetch
        too_small = min(width * float(region["original_width"]), height * float(region["original_height"])) / 100
    except (KeyError, TypeError, ValueError):
        too_small = math.inf
    if too_small < MIN_BOX_PIXELS:
        return None
    return LabelBox(task_id, x, y, width, height, rotation)


def crop_box(image: Image.Image, box: LabelBox, margin: float = CONTEXT_MARGIN) -> Image.Image | None:
    """The part of ``image`` (PIL) under ``box`` with ``margin`` of context, clipped to the image; None when
    the box is under ``MIN_BOX_PIXELS`` on a side. A rotated box (Label Studio turns it about its top-left
    corner) is cropped by its upright bounds."""
    width, height = image.size
    x, y = box.x / 100 * width, box.y / 100 * height
    w, h = box.width / 100 * width, box.height / 100 * height
    if min(w, h) < MIN_BOX_PIXELS:
        return None
    turn = math.radians(box.rotation)
    cos, sin = math.cos(turn), math.sin(turn)
    xs = [x + dx * cos - dy * sin for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    ys = [y + dx * sin + dy * cos for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    left, right, top, bottom = min(xs), max(xs), min(ys), max(ys)
    pad_x, pad_y = (right - left) * margin, (bottom - top) * margin
    bounds = (  # rounded: a quarter turn leaves float noise in the corners
        max(0, round(left - pad_x)),
        max(0, round(top - pad_y)),
        min(width, round(right + pad_x)),
        min(height, round(bottom + pad_y)),
    )
    if bounds[2] - bounds[0] < MIN_BOX_PIXELS or bounds[3] - bounds[1] < MIN_BOX_PIXELS:
        return None  # a box almost entirely outside the image
    return image.crop(bounds)
