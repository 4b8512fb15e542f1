"""Detector and embedder wrappers. Knows nothing of HTTP or Label Studio.

``create_detector`` and ``create_embedder`` are the entry points for detection and embedding models;
their public types are re-exported here.
"""

from __future__ import annotations

from model.embedder import DEFAULT_EMBEDDER, DinoV2Embedder, create_embedder, embedder_version
from model.grounding_dino import DEFAULT_CHECKPOINT, Detection, GroundingDinoDetector
from model.postprocess import DetectionParams
from model.prompt import PromptError, normalize_phrase
from model.versioning import model_version

__all__ = [
    "DEFAULT_CHECKPOINT",
    "DEFAULT_EMBEDDER",
    "Detection",
    "DetectionParams",
    "DinoV2Embedder",
    "GroundingDinoDetector",
    "PromptError",
    "create_detector",
    "create_embedder",
    "embedder_version",
    "model_version",
    "normalize_phrase",
]


def create_detector(
    checkpoint: str = DEFAULT_CHECKPOINT,
    *,
    revision: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
) -> GroundingDinoDetector:
    """Load a Grounding DINO checkpoint by hub id or local folder."""
    return GroundingDinoDetector.from_pretrained(checkpoint, revision=revision, device=device, precision=precision)
