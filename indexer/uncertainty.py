"""How unsure the detector was about one image, from the boxes it returned: a number in [0, 1] that
:func:`indexer.priority.rank` mixes into the labeling priority.

Why these three signals: a pre-annotation an annotator only has to confirm is cheap, one they have to fix
is where their time goes and where the model learns most. The detector's boxes say where that is:

- **Close calls**: a box whose score is just above the box threshold could as well have been dropped.
  Each box counts ``1 - (score - threshold) / (1 - threshold)`` (1 at the threshold, 0 at score 1);
  the image takes its least sure box's value.
- **Conflicts**: two boxes of different labels over the same object (IoU >= ``CONFLICT_IOU``) mean the
  detector could not tell the labels apart; per-label NMS keeps both. The pair counts
  ``1 - |score_a - score_b|`` (1 when both are equally likely), the image its most conflicting pair.
- **No box at all** counts ``NO_BOX`` (0.5): an empty image and a missed object look the same.

The image's uncertainty is the largest of these. Nothing here reads the environment or knows Label
Studio: boxes come in as arrays (any one frame for all of them: IoU does not depend on it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["CONFLICT_IOU", "NO_BOX", "detection_uncertainty"]

CONFLICT_IOU = 0.5
"""Overlap (IoU) at which two boxes of different labels count as one object labeled two ways."""
NO_BOX = 0.5
"""The uncertainty of an image the detector found nothing in."""


def detection_uncertainty(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[str],
    boxes: Sequence[Sequence[float]] | np.ndarray,
    box_threshold: float,
) -> float:
    """The detector's uncertainty about one image (see the module docstring).

    Args:
        scores: per box, in [0, 1].
        labels: per box.
        boxes: per box ``(x0, y0, x1, y1)``, all in one frame (pixels or percent).
        box_threshold: the threshold the boxes were kept at (the detector's ``box_threshold``).
    """
    score = np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), 0.0, 1.0)
    if len(labels) != len(score) or len(boxes) != len(score):
        raise ValueError(f"{len(score)} scores, {len(labels)} labels and {len(boxes)} boxes: one each per box")
    if not 0.0 <= box_threshold < 1.0:
        raise ValueError(f"box_threshold must be in [0, 1), got {box_threshold}")
    if not len(score):
        return NO_BOX
    close = float(np.max(1.0 - np.clip((score - box_threshold) / (1.0 - box_threshold), 0.0, 1.0)))
    xyxy = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    names = np.asarray(labels, dtype=object)
    overlap = _iou(xyxy) >= CONFLICT_IOU
    differ = names[:, None] != names[None, :]
    pairs = np.triu(overlap & differ, k=1)
    conflict = float(np.max(1.0 - np.abs(score[:, None] - score[None, :])[pairs])) if pairs.any() else 0.0
    return max(close, conflict)


def _iou(xyxy: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes; a box without area overlaps nothing."""
    x0, y0 = np.minimum(xyxy[:, 0], xyxy[:, 2]), np.minimum(xyxy[:, 1], xyxy[:, 3])
    x1, y1 = np.maximum(xyxy[:, 0], xyxy[:, 2]), np.maximum(xyxy[:, 1], xyxy[:, 3])
    area = (x1 - x0) * (y1 - y0)
    width = np.clip(np.minimum(x1[:, None], x1[None, :]) - np.maximum(x0[:, None], x0[None, :]), 0.0, None)
    height = np.clip(np.minimum(y1[:, None], y1[None, :]) - np.maximum(y0[:, None], y0[None, :]), 0.0, None)
    inter = width * height
    union = area[:, None] + area[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
