"""Index jobs end to end: the API (with its store writer thread), a real ``dinolabel worker`` process
serving a tiny DINOv2 loaded by path, real Redis, and a fake Label Studio project whose images are
Local Files on disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from rq import Worker

from backend.config import Settings
from backend.main import create_app
from backend.project_vectors import embedder_version_of
from backend.queues import EMBED, Queues
from indexer.store import VectorStore
from model import create_embedder
from model.images import decode_image
from tests.backend.conftest import FakeProjectAPI
from tests.images import png
from tests.processes import Service, wait_for
from tests.tiny_checkpoints import build_tiny_dinov2

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/></RectangleLabels></View>'
)
IMAGES = 7  # tasks 1..7 have good images; task 8's file is not an image
BROKEN = 8


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny", img_size=224)


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    for i in range(1, IMAGES + 1):
        (root / f"img{i}.png").write_bytes(png(40 + 9 * i, 30 + 5 * i, i))
    (root / f"img{BROKEN}.png").write_bytes(b"this is not an image")
    return root


@pytest.fixture
def project(fake_project: FakeProjectAPI) -> FakeProjectAPI:
    fake_project.tasks.update({t: {"image": f"/data/local-files/?d=img{t}.png"} for t in range(1, BROKEN + 1)})
    return fake_project


@pytest.fixture
def settings(redis_url: str, dinov2: Path, docs: Path, tmp_path: Path, project: FakeProjectAPI) -> Settings:
    return Settings(
        redis_url=redis_url,
        worker_models=("embedder",),
        embedder_model=str(dinov2),
        device="cpu",
        local_files_document_root=docs,
        data_dir=tmp_path,
        label_studio_url=project.url,
        bulk_batch_size=3,
    )


def worker_env(settings: Settings, models: str) -> dict[str, str]:
    return {
        "DINOLABEL_REDIS_URL": settings.redis_url or "",
        "DINOLABEL_WORKER_MODELS": models,
        "DINOLABEL_EMBEDDER_MODEL": settings.embedder_model,
        "DINOLABEL_DEVICE": "cpu",
        "DINOLABEL_LOCAL_FILES_DOCUMENT_ROOT": str(settings.local_files_document_root),
        "DINOLABEL_LABEL_STUDIO_URL": settings.label_studio_url or "",
    }


@pytest.fixture
def embed_worker(settings: Settings, tmp_path: Path) -> Iterator[Service]:
    service = Service(["worker"], worker_env(settings, "embedder"), tmp_path / "worker.log").start()
    yield service
    service.stop()


def finished(client: TestClient, job_id: str, worker: Service | None = None) -> dict:
    def ended() -> dict | bool:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job["status"] not in ("planning", "running") and job

    return wait_for(ended, 120, f"job {job_id} to end\n{worker.log_tail() if worker else ''}")


def test_index_job_stores_the_embedders_vectors_once(settings: Settings, embed_worker: Service, docs: Path) -> None:
    with TestClient(create_app(settings)) as client:
        assert client.post("/setup", json={"project": "1.1", "schema": CONFIG}).status_code == 200
        started = client.post("/v1/projects/1/index")
        assert started.status_code == 202, started.text
        assert started.json()["kind"] == "index"
        job = finished(client, started.json()["id"], embed_worker)
        assert (job["status"], job["total"], job["done"], job["skipped"], job["failed"]) == ("done", 8, 7, 0, 1)
        assert job["failures"][0]["task_id"] == BROKEN and "decode" in job["failures"][0]["reason"]
        assert job["model_version"] == embedder_version_of(settings)

        # What the store holds is what the embedder itself makes of these images.
        with VectorStore(settings.index_dir, 1) as store:
            ids, vectors = store.load_vectors(job["model_version"])
            seq = store.seq
            row = store.get(3)
        assert ids.tolist() == list(range(1, IMAGES + 1))
        images = [decode_image((docs / f"img{t}.png").read_bytes(), max_pixels=10**8) for t in ids]
        expected = create_embedder(settings.embedder_model, device="cpu").embed(images)
        cosines = np.sum(vectors * expected, axis=1)
        assert cosines.min() >= 0.9999, cosines
        assert row is not None and (row.width, row.height) == (40 + 27, 30 + 15)

        # A second run embeds nothing: every good task is skipped, the store is not written.
        again = finished(client, client.post("/v1/projects/1/index").json()["id"], embed_worker)
        assert (again["done"], again["skipped"], again["failed"]) == (0, 7, 1)
        with VectorStore(settings.index_dir, 1) as store:
            assert store.seq == seq


def test_a_detector_only_worker_never_listens_to_embedding(
    settings: Settings, embed_worker: Service, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    env = {**worker_env(settings, "detector"), "DINOLABEL_DETECTOR_CHECKPOINT": str(tiny_checkpoint)}
    detector = Service(["worker"], env, tmp_path / "detector.log").start()
    try:
        connection = redis.Redis.from_url(settings.redis_url or "")

        def listening() -> dict[int, list[str]] | bool:
            workers = {w.pid: w.queue_names() for w in Worker.all(connection=connection)}
            return detector.process.pid in workers and embed_worker.process.pid in workers and workers

        queues = wait_for(listening, 120, f"both workers\n{detector.log_tail()}\n{embed_worker.log_tail()}")
        assert EMBED not in queues[detector.process.pid]
        assert queues[embed_worker.process.pid] == [EMBED]
    finally:
        detector.stop()


def test_cancel_leaves_nothing_queued(settings: Settings) -> None:
    connection = redis.Redis.from_url(settings.redis_url or "")
    queues = Queues.on(connection)
    with TestClient(create_app(settings)) as client:  # no worker: batches wait on the embed queue
        client.post("/setup", json={"project": "1.1", "schema": CONFIG})
        job = client.post("/v1/projects/1/index").json()
        wait_for(lambda: queues.embed.count == 3, 60, "the planned batches (8 tasks in batches of 3)")
        cancelled = client.delete(f"/v1/jobs/{job['id']}").json()
        assert cancelled["status"] == "cancelled"
        assert (queues.embed.count, queues.index_plan.count, queues.store.count) == (0, 0, 0)
