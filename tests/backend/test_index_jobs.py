"""Index jobs end to end: the API (with its store writer thread), a real ``dinolabel worker`` process
serving a tiny DINOv2 loaded by path, real Redis, and a fake Label Studio project whose images are
Local Files on disk."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr
from rq import Worker

from backend.config import Settings
from backend.main import create_app
from backend.project_vectors import embedder_version_of
from backend.queues import BULK, COMBINED, EMBED, INTERACTIVE, PLAN, Queues
from indexer.store import VectorStore
from model import create_embedder
from model.images import decode_image
from tests.backend.conftest import FakeBucket, FakeProjectAPI, serving
from tests.images import png
from tests.processes import DINOLABEL, Service, wait_for
from tests.tiny_checkpoints import build_tiny_dinov2

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/></RectangleLabels></View>'
)
SECRET = "hook-secret"
IMAGES = 7  # tasks 1..7 have good images; task 8's file is not an image
BROKEN = 8


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny", img_size=224)


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    root.mkdir()
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
        webhook_secret=SecretStr(SECRET),
        fetch_allow=("127.0.0.1",),  # the image server of the one-fetch tests
    )


def worker_env(settings: Settings, models: str) -> dict[str, str]:
    return {
        "DINOLABEL_REDIS_URL": settings.redis_url or "",
        "DINOLABEL_WORKER_MODELS": models,
        "DINOLABEL_EMBEDDER_MODEL": settings.embedder_model,
        "DINOLABEL_DEVICE": "cpu",
        "DINOLABEL_LOCAL_FILES_DOCUMENT_ROOT": str(settings.local_files_document_root),
        "DINOLABEL_LABEL_STUDIO_URL": settings.label_studio_url or "",
        "DINOLABEL_FETCH_ALLOW": ",".join(settings.fetch_allow),
    }


@pytest.fixture
def embed_worker(settings: Settings, tmp_path: Path) -> Iterator[Service]:
    service = Service(["worker"], worker_env(settings, "embedder"), tmp_path / "worker.log").start()
    yield service
    service.stop()


@pytest.fixture
def detector_worker(settings: Settings, tiny_checkpoint: Path, tmp_path: Path) -> Iterator[Service]:
    env = {**worker_env(settings, "detector"), "DINOLABEL_DETECTOR_CHECKPOINT": str(tiny_checkpoint)}
    service = Service(["worker"], env, tmp_path / "detector.log").start()
    yield service
    service.stop()


def finished(client: httpx.Client | TestClient, job_id: str, worker: Service | None = None) -> dict:
    def ended() -> dict | bool:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job["status"] not in ("planning", "running") and job

    return wait_for(ended, 120, f"job {job_id} to end\n{worker.log_tail() if worker else ''}")


def stored(settings: Settings, version: str) -> tuple[list[int], np.ndarray]:
    with VectorStore(settings.index_dir, 1) as store:
        ids, vectors = store.load_vectors(version)
    return ids.tolist(), vectors


def test_index_job_stores_the_embedders_vectors_once_and_follows_the_project(
    settings: Settings, embed_worker: Service, detector_worker: Service, docs: Path, project: FakeProjectAPI
) -> None:
    hook = {"X-Dinolabel-Secret": SECRET}
    # Each worker listens only to its models' queues (and the plan queue, on its planner thread; the
    # detector's interactive queue on a thread of its own): one RQ worker per thread.
    connection = redis.Redis.from_url(settings.redis_url or "")
    threads = {detector_worker.process.pid: 3, embed_worker.process.pid: 2}

    def listening() -> dict[int, set[str]] | bool:
        workers: dict[int, set[str]] = {}
        counts: dict[int, int] = {}
        for worker in Worker.all(connection=connection):
            workers.setdefault(worker.pid, set()).update(worker.queue_names())
            counts[worker.pid] = counts.get(worker.pid, 0) + 1
        return all(counts.get(pid, 0) >= n for pid, n in threads.items()) and workers

    queues = wait_for(listening, 120, f"both workers\n{detector_worker.log_tail()}\n{embed_worker.log_tail()}")
    # Batches that both detect and embed go to both: each runs its part and hands the other on.
    assert queues[detector_worker.process.pid] == {INTERACTIVE, BULK, PLAN, COMBINED}, "never embedding work"
    assert queues[embed_worker.process.pid] == {EMBED, PLAN, COMBINED}
    with serving(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert wait_for(lambda: client.get("/health").json()["store_writers"], 30, "the store writer") == 1
        assert client.post("/setup", json={"project": "1.1", "schema": CONFIG}).status_code == 200
        started = client.post("/v1/projects/1/index")
        assert started.status_code == 202, started.text
        assert started.json()["kind"] == "index"
        job = finished(client, started.json()["id"], embed_worker)
        assert (job["status"], job["total"], job["done"], job["skipped"], job["failed"]) == ("done", 8, 7, 0, 1)
        assert job["failures"][0]["task_id"] == BROKEN and "decode" in job["failures"][0]["reason"]
        version = job["model_version"]
        assert version == embedder_version_of(settings)

        # What the store holds is what the embedder itself makes of these images.
        ids, vectors = stored(settings, version)
        assert ids == list(range(1, IMAGES + 1))
        images = [decode_image((docs / f"img{t}.png").read_bytes(), max_pixels=10**8) for t in ids]
        embedder = create_embedder(settings.embedder_model, device="cpu")
        cosines = np.sum(vectors * embedder.embed(images), axis=1)
        assert cosines.min() >= 0.9999, cosines
        with VectorStore(settings.index_dir, 1) as store:
            seq, row = store.seq, store.get(3)
        assert row is not None and (row.width, row.height) == (40 + 27, 30 + 15)

        # A second run, from the command line, embeds nothing: the good tasks are skipped.
        cli = subprocess.run([DINOLABEL, "index", "--project", "1", "--api", url, "--interval", "0.2", "--quiet"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert cli.returncode == 1, cli.stderr  # the broken image fails again
        assert "done: 0 embedded, 7 skipped (already indexed), 1 failed of 8 tasks" in cli.stdout
        with VectorStore(settings.index_dir, 1) as store:
            assert store.seq == seq, "nothing was written"

        # Label Studio's webhooks keep the index current: deleted tasks go, new tasks come.
        deleted = client.post("/webhook", json={"action": "TASKS_DELETED", "project": {"id": 1},
                                                "tasks": [{"id": 2}, {"id": 5}]})  # fmt: skip
        assert deleted.status_code == 401, "the same secret as TASKS_CREATED"
        deleted = client.post("/webhook", headers=hook, json={"action": "TASKS_DELETED", "project": {"id": 1},
                                                              "tasks": [{"id": 2}, {"id": 5}]})  # fmt: skip
        assert deleted.status_code == 200, deleted.text
        del project.tasks[2], project.tasks[5]
        wait_for(lambda: stored(settings, version)[0] == [1, 3, 4, 6, 7], 60, "the deleted tasks' vectors gone")
        (docs / "img9.png").write_bytes(png(50, 50, 9))
        project.tasks[9] = {"image": "/data/local-files/?d=img9.png"}
        event = {"action": "TASKS_CREATED", "project": {"id": 1}, "tasks": [{"id": 9, "data": project.tasks[9]}]}
        created = client.post("/webhook", headers=hook, json=event)
        assert created.status_code == 200 and created.json()["index_job_id"], created.text
        new = finished(client, created.json()["index_job_id"], embed_worker)
        assert (new["done"], new["total"]) == (1, 1)
        assert stored(settings, version)[0] == [1, 3, 4, 6, 7, 9]

        # A re-sync re-embeds a changed image, skips unchanged ones and drops tasks gone from the project.
        (docs / "img1.png").write_bytes(png(80, 60, 42))
        del project.tasks[3]  # deleted while no webhook was registered
        sync = finished(client, client.post("/v1/projects/1/index", json={"sync": True}).json()["id"], embed_worker)
        assert (sync["total"], sync["done"], sync["skipped"], sync["failed"]) == (6, 1, 4, 1), sync
        ids, vectors = stored(settings, version)
        assert ids == [1, 4, 6, 7, 9]
        again = embedder.embed([decode_image((docs / "img1.png").read_bytes(), max_pixels=10**8)])
        assert float(vectors[0] @ again[0]) >= 0.9999


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


# --- a webhook's new tasks, pre-annotated and indexed with one fetch of each image (backend.combined) ---------


@pytest.fixture
def served(project: FakeProjectAPI, fake_bucket: FakeBucket, docs: Path) -> FakeProjectAPI:
    """The project's images on a web server that counts the requests for each: task 7's image is a copy of
    task 3's (a search finds it), task 8's is not an image."""
    for t in range(1, BROKEN + 1):
        fake_bucket.objects[f"/img{t}.png"] = (docs / f"img{t if t != 7 else 3}.png").read_bytes()
    project.tasks.update({t: {"image": f"{fake_bucket.url}/img{t}.png"} for t in range(1, BROKEN + 1)})
    return project


@pytest.fixture
def both_worker(settings: Settings, tiny_checkpoint: Path, tmp_path: Path) -> Iterator[Service]:
    env = {**worker_env(settings, "detector,embedder"), "DINOLABEL_DETECTOR_CHECKPOINT": str(tiny_checkpoint)}
    service = Service(["worker"], env, tmp_path / "both.log").start()
    yield service
    service.stop()


@contextmanager
def indexing_api(settings: Settings) -> Iterator[httpx.Client]:
    """The API (with its store writer) where ``TASKS_CREATED`` indexes every project's new tasks."""
    app = create_app(settings.model_copy(update={"index_new_tasks": True}))
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def webhook_jobs(client: httpx.Client, project: FakeProjectAPI, *workers: Service) -> tuple[dict, dict]:
    """TASKS_CREATED for every task of the indexed project: its pre-annotation and index jobs, ended."""
    assert wait_for(lambda: client.get("/health").json()["store_writers"], 30, "the store writer") == 1
    assert client.post("/setup", json={"project": "1.1", "schema": CONFIG}).status_code == 200
    tasks = [{"id": t, "data": data} for t, data in sorted(project.tasks.items())]
    event = {"action": "TASKS_CREATED", "project": {"id": 1}, "tasks": tasks}
    created = client.post("/webhook", headers={"X-Dinolabel-Secret": SECRET}, json=event)
    assert created.status_code == 200, created.text
    detect = finished(client, created.json()["job_id"], workers[0])
    index = finished(client, created.json()["index_job_id"], workers[-1])
    outcomes = [(job["kind"], job["status"], job["done"], job["failed"]) for job in (detect, index)]
    assert outcomes == [("preannotate", "done", 7, 1), ("index", "done", 7, 1)], [w.log_tail() for w in workers]
    return detect, index


def test_a_worker_with_both_models_fetches_each_new_image_once(
    settings: Settings, served: FakeProjectAPI, fake_bucket: FakeBucket, both_worker: Service
) -> None:
    with indexing_api(settings) as client:
        detect, index = webhook_jobs(client, served, both_worker)
        hits = client.get("/v1/projects/1/similar", params={"task_id": 7, "k": 3}).json()["results"]
    fetched = Counter(seen.path for seen in fake_bucket.seen())
    assert fetched == {f"/img{t}.png": 1 for t in range(1, BROKEN + 1)}, "each image once, the broken one too"
    # The broken image fails its task in both jobs, with the same reason.
    failures = [[(f["task_id"], f["reason"]) for f in job["failures"]] for job in (detect, index)]
    assert failures[0] == failures[1] and failures[0][0][0] == BROKEN and "decode" in failures[0][0][1]
    # One prediction per task (the detector's version) and one vector per task (the embedder's).
    assert served.per_task(detect["model_version"]) == dict.fromkeys(range(1, BROKEN), 1)
    ids, vectors = stored(settings, index["model_version"])
    assert ids == list(range(1, BROKEN))
    # The vectors made from the images loaded for the detector are the embedder's own.
    images = [decode_image(fake_bucket.objects[f"/img{t}.png"], max_pixels=10**8) for t in ids]
    cosines = np.sum(vectors * create_embedder(settings.embedder_model, device="cpu").embed(images), axis=1)
    assert cosines.min() >= 0.9999, cosines
    # Searchable at once: task 7's image is task 3's.
    assert hits[0]["task_id"] == 3 and hits[0]["score"] >= 0.9999, hits


def test_workers_with_one_model_each_do_their_part_of_a_combined_batch(
    settings: Settings, served: FakeProjectAPI, fake_bucket: FakeBucket, detector_worker: Service,
    embed_worker: Service,
) -> None:  # fmt: skip
    with indexing_api(settings) as client:
        detect, index = webhook_jobs(client, served, detector_worker, embed_worker)
    # Each model fetched each image once: nothing lost, nothing done twice.
    fetched = Counter(seen.path for seen in fake_bucket.seen())
    assert fetched == {f"/img{t}.png": 2 for t in range(1, BROKEN + 1)}
    assert served.per_task(detect["model_version"]) == dict.fromkeys(range(1, BROKEN), 1)
    assert stored(settings, index["model_version"])[0] == list(range(1, BROKEN))
    failures = [[(f["task_id"], f["reason"]) for f in job["failures"]] for job in (detect, index)]
    assert [f[0] for f in failures[0]] == [f[0] for f in failures[1]] == [BROKEN]
    queues = Queues.on(redis.Redis.from_url(settings.redis_url or ""))
    assert (queues.combined.count, queues.bulk.count, queues.embed.count) == (0, 0, 0)


@pytest.mark.parametrize("first", ["job_id", "index_job_id"])
def test_cancelling_one_job_of_the_pair_leaves_the_others_batches(
    settings: Settings, served: FakeProjectAPI, first: str
) -> None:
    queues = Queues.on(redis.Redis.from_url(settings.redis_url or ""))
    with TestClient(create_app(settings.model_copy(update={"index_new_tasks": True}))) as client:  # no worker
        client.post("/setup", json={"project": "1.1", "schema": CONFIG})
        tasks = [{"id": t, "data": data} for t, data in sorted(served.tasks.items())]
        event = {"action": "TASKS_CREATED", "project": {"id": 1}, "tasks": tasks}
        created = client.post("/webhook", headers={"X-Dinolabel-Secret": SECRET}, json=event).json()
        wait_for(lambda: queues.combined.count == 3, 60, "8 tasks in 3 combined batches")
        assert (queues.bulk.count, queues.embed.count) == (0, 0), "no batch queued twice"
        second = "index_job_id" if first == "job_id" else "job_id"
        assert client.delete(f"/v1/jobs/{created[first]}").json()["status"] == "cancelled"
        assert queues.combined.count == 3, "the other job's part of each batch is still to run"
        assert client.get(f"/v1/jobs/{created[second]}").json()["status"] == "running"
        assert client.delete(f"/v1/jobs/{created[second]}").json()["status"] == "cancelled"
        assert (queues.combined.count, queues.bulk.count, queues.embed.count, queues.index_plan.count) == (0, 0, 0, 0)
