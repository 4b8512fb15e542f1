"""Shared fixtures. Tests run offline: the Hugging Face Hub is never reached."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest

from model import GroundingDinoDetector, create_detector
from tests.tiny_checkpoints import build_tiny_grounding_dino


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Grounding DINO checkpoint folder, built once per session."""
    return build_tiny_grounding_dino(tmp_path_factory.mktemp("checkpoints") / "tiny-grounding-dino")


@pytest.fixture(scope="session")
def tiny_detector(tiny_checkpoint: Path) -> GroundingDinoDetector:
    """The tiny checkpoint loaded by path through the production code."""
    return create_detector(str(tiny_checkpoint), device="cpu")
