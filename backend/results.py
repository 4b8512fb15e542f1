"""Detections to Label Studio's prediction format (``rectanglelabels`` regions in percent)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from backend.labeling import LabelTarget
from model import Detection


def region(
    detection: Detection, label: str, target: LabelTarget, width: int, height: int, note: str | None = None
) -> dict[str, Any]:
    """One box as Label Studio stores it: ``x, y, width, height`` in percent of the displayed image.

    ``width``/``height`` are those of the image after EXIF orientation, i.e. as the browser shows it,
    which is the frame Label Studio's percentages refer to.
    """
    x0, x1 = sorted((_clip(detection.x0, width), _clip(detection.x1, width)))
    y0, y1 = sorted((_clip(detection.y0, height), _clip(detection.y1, height)))
    result: dict[str, Any] = {
        "id": secrets.token_hex(5),
        "from_name": target.from_name,
        "to_name": target.to_name,
        "type": "rectanglelabels",
        "value": {
            "x": 100.0 * x0 / width,
            "y": 100.0 * y0 / height,
            "width": 100.0 * (x1 - x0) / width,
            "height": 100.0 * (y1 - y0) / height,
            "rotation": 0,
            "rectanglelabels": [label],
        },
        "score": round(detection.score, 6),
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
    }
    if note:
        result["meta"] = {"text": [note]}
    return result


def prediction(regions: Sequence[dict[str, Any]], model_version: str) -> dict[str, Any]:
    """One task's prediction; its score is the mean of its boxes' scores (0 without boxes)."""
    scores = [r["score"] for r in regions]
    return {
        "result": list(regions),
        "score": round(sum(scores) / len(scores), 6) if scores else 0.0,
        "model_version": model_version,
    }


def _clip(value: float, limit: int) -> float:
    return min(max(value, 0.0), float(limit))
