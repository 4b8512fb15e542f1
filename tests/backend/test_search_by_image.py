"""Search by image end to end: the API, a real ``dinolabel worker`` process serving a tiny DINOv2 loaded by
path, real Redis, a store filled with that model's own embeddings, and a fake Label Studio."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from backend.config import Settings
from backend.main import create_app
from tests.backend.conftest import LEGACY_TOKEN, FakeLabelStudio
from tests.backend.embedding import start_embed_worker, store_embeddings
from tests.images import encode_png, scene
from tests.processes import Service, wait_for
from tests.tiny_checkpoints import build_tiny_dinov2

pytestmark = [pytest.mark.redis, pytest.mark.slow]

PROJECT = 12
TASKS = range(1, 9)


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny", img_size=224)


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    for task in TASKS:
        (root / f"img{task}.png").write_bytes(encode_png(scene(160 + 8 * task, 120, seed=70 + task)))
    return root


@pytest.fixture
def settings(redis_url: str, dinov2: Path, docs: Path, tmp_path: Path, fake_ls: FakeLabelStudio) -> Iterator[Settings]:
    settings = Settings(
        redis_url=redis_url,
        worker_models=("embedder",),
        embedder_model=str(dinov2),
        device="cpu",
        local_files_document_root=docs,
        data_dir=tmp_path / "data",
        label_studio_url=fake_ls.url,
        label_studio_api_key=SecretStr(LEGACY_TOKEN),
        predict_deadline=120,  # the worker process loads torch and the model first
    )
    fake_ls.tasks.update({task: {"image": f"/data/local-files/?d=img{task}.png"} for task in TASKS})
    store_embeddings(settings, PROJECT, docs, TASKS)
    yield settings


@pytest.fixture
def embed_worker(settings: Settings, tmp_path: Path) -> Iterator[Service]:
    service = start_embed_worker(settings, tmp_path / "worker.log")
    yield service
    service.stop()


def test_an_uploaded_image_and_a_label_studio_url_find_their_own_task_first(
    settings: Settings, embed_worker: Service, docs: Path, fake_ls: FakeLabelStudio
) -> None:
    url = f"/v1/projects/{PROJECT}/search"
    with TestClient(create_app(settings)) as client:
        upload = client.post(url, files={"image": ("q.png", (docs / "img3.png").read_bytes())}, params={"k": 3})
        assert upload.status_code == 200, f"{upload.text}\n{embed_worker.log_tail()}"
        body = upload.json()
        assert body["results"][0]["task_id"] == 3 and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert body["results"][0]["image"] == f"{fake_ls.url}/data/local-files/?d=img3.png"
        assert [h["score"] for h in body["results"]] == sorted((h["score"] for h in body["results"]), reverse=True)
        assert len(body["results"]) == 3 and body["task_id"] is None and body["label_studio"] == "ok"

        for query in ("/data/local-files/?d=img5.png", f"{fake_ls.url}/data/local-files/?d=img5.png"):
            by_url = client.post(url, json={"url": query}, params={"k": 2})
            assert by_url.status_code == 200, by_url.text
            assert by_url.json()["results"][0]["task_id"] == 5
            assert by_url.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)

        truncated = (docs / "img4.png").read_bytes()[:400]  # a PNG header, then nothing: the worker cannot decode it
        refused = client.post(url, files={"image": ("broken.png", truncated)})
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"].startswith("image: cannot decode PNG image of 192x120 (400 bytes)")
        missing = client.post(url, json={"url": "/data/local-files/?d=nothing-here.png"})
        assert missing.status_code == 422 and missing.json()["detail"].startswith("image: cannot fetch image")
        assert client.app.state.service.queues.embed.count == 0
    # Task 3's upload and the image files never went to Label Studio: the worker read the Local Files itself.
    assert fake_ls.seen("/data/") == []
    scores = np.array([h["score"] for h in body["results"]])
    assert (scores[1:] < 0.9999).all()


CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/></RectangleLabels></View>'
)


def test_a_search_right_after_an_index_job_sees_its_vectors(
    settings: Settings, embed_worker: Service, docs: Path, fake_ls: FakeLabelStudio
) -> None:
    (docs / "img9.png").write_bytes((docs / "img3.png").read_bytes())  # a new task holding task 3's image
    fake_ls.tasks[9] = {"image": "/data/local-files/?d=img9.png"}
    similar = f"/v1/projects/{PROJECT}/similar"
    with TestClient(create_app(settings)) as client:
        before = client.get(similar, params={"task_id": 3, "k": 2}).json()  # the cached index, before the job
        assert 9 not in [hit["task_id"] for hit in before["results"]]
        assert client.post("/setup", json={"project": f"{PROJECT}.1", "schema": CONFIG}).status_code == 200
        started = client.post(f"/v1/projects/{PROJECT}/index")
        assert started.status_code == 202, started.text

        def ended() -> dict | bool:
            job = client.get(f"/v1/jobs/{started.json()['id']}").json()
            return job["status"] not in ("planning", "running") and job

        job = wait_for(ended, 180, f"the index job\n{embed_worker.log_tail()}")
        assert (job["status"], job["done"], job["skipped"]) == ("done", 1, len(TASKS)), job
        after = client.get(similar, params={"task_id": 3, "k": 2}).json()
    assert after["results"][0]["task_id"] == 9 and after["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
