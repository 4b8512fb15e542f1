"""The API with real Redis and real worker processes (no Label Studio needed here).

Bulk jobs writing to a real Label Studio are in tests/test_e2e_labelstudio.py.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from backend.bulk import BulkJob, JobSpec, JobStatus, Workers
from backend.config import Settings
from backend.jobs import enqueue_batch, enqueue_plan
from backend.main import create_app
from backend.marks import Marks
from backend.queues import Queues
from backend.state import SHUTDOWN_GRACE
from tests.backend.conftest import FakeBucket, FakeProjectAPI, _FakeServer, _Handler, _serve
from tests.images import png
from tests.labelstudio import free_port
from tests.processes import RedisServer, Service, health, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/><Label value="dog"/></RectangleLabels></View>'
)


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    for i in range(4):
        (root / f"img{i}.png").write_bytes(png(64 + 8 * i, 48, i))
    return root


@pytest.fixture
def settings(redis_url: str, tiny_checkpoint: Path, docs: Path, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=redis_url,
        detector_checkpoint=str(tiny_checkpoint),
        device="cpu",
        local_files_document_root=docs,
        data_dir=tmp_path,
        box_threshold=0.3,
        label_studio_url="http://127.0.0.1:9",
    )


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[Service]:
    """``dinolabel worker`` as a child process on the test's Redis."""
    env = {
        "DINOLABEL_REDIS_URL": settings.redis_url or "",
        "DINOLABEL_DETECTOR_CHECKPOINT": settings.detector_checkpoint,
        "DINOLABEL_DEVICE": "cpu",
        "DINOLABEL_LOCAL_FILES_DOCUMENT_ROOT": str(settings.local_files_document_root),
        "DINOLABEL_BOX_THRESHOLD": "0.3",
        "DINOLABEL_LABEL_STUDIO_URL": settings.label_studio_url or "",  # job records name no Label Studio
    }
    service = Service(["worker"], env, tmp_path / "worker.log").start()
    yield service
    service.stop()


def tasks(*names: str) -> list[dict]:
    return [{"id": i + 1, "data": {"image": f"/data/local-files/?d={n}"}} for i, n in enumerate(names)]


def ready(client: TestClient) -> dict:
    body = client.get("/health").json()
    return body if body.get("status") == "UP" else {}


def test_predict_is_answered_by_a_worker_process(settings: Settings, worker: Service) -> None:
    with TestClient(create_app(settings)) as client:
        body = wait_for(lambda: ready(client), 90, f"a ready worker\n{worker.log_tail()}")
        assert body["workers"]["ready"] == 1 and body["workers"]["details"][0]["pid"] == worker.process.pid
        response = client.post("/predict", json={"tasks": tasks("img0.png", "img1.png"), "project": "3.1",
                                                 "label_config": CONFIG})  # fmt: skip
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == 2 and all(r["result"] for r in results)
        assert [r["result"][0]["original_width"] for r in results] == [64, 72]
        assert {x["value"]["rectanglelabels"][0] for r in results for x in r["result"]} <= {"cat", "dog"}
        # Label Studio stores these itself: a later bulk job of the same version must skip them.
        marks = Marks(redis.Redis.from_url(settings.redis_url), 3, results[0]["model_version"])
        assert marks.done_by([1, 2, 3]) == {1: "predict", 2: "predict", 3: None}


def test_redis_outage_gives_503_and_recovers(settings: Settings, worker: Service, redis_server: RedisServer) -> None:
    request = {"tasks": tasks("img2.png"), "project": "3.1", "label_config": CONFIG}
    with TestClient(create_app(settings)) as client:
        wait_for(lambda: ready(client), 90, f"a ready worker\n{worker.log_tail()}")
        assert client.post("/predict", json=request).status_code == 200
        redis_server.stop()
        down = client.post("/predict", json=request)
        assert down.status_code == 503 and "Redis is unreachable" in down.json()["detail"]
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "DOWN"
        assert client.post("/setup", json={"project": "3.1", "schema": CONFIG}).status_code == 503
        redis_server.start()  # same port, empty: the worker reconnects and beats again
        wait_for(lambda: ready(client), 90, f"the worker back after the outage\n{worker.log_tail()}")
        again = client.post("/predict", json=request)
        assert again.status_code == 200 and again.json()["results"][0]["result"]
        assert worker.process.poll() is None, "the worker survived the outage"


def test_deadline_or_too_many_tasks_hand_off_to_a_bulk_job(settings: Settings) -> None:
    fast = settings.model_copy(update={"predict_deadline": 1.0, "interactive_max_tasks": 2})
    with TestClient(create_app(fast)) as client:  # no worker at all: the interactive wait must time out
        started = time.perf_counter()
        body = client.post("/predict", json={"tasks": tasks("img0.png"), "project": "4.1", "label_config": CONFIG})
        assert body.status_code == 200 and time.perf_counter() - started < 5
        assert body.json()["results"] == [[]] and body.json()["job_id"], "one entry per task: none for it now"
        queues = Queues.on(redis.Redis.from_url(settings.redis_url))
        assert queues.interactive.count == 0, "the waiting interactive job was cancelled"
        job = client.get(f"/v1/jobs/{body.json()['job_id']}").json()
        assert (job["project"], job["status"], job["source"], job["total"]) == (4, "planning", "predict:deadline", 1)
        many = client.post("/predict", json={"tasks": tasks("a", "b", "c"), "project": "4.1", "label_config": CONFIG})
        assert many.json()["results"] == [[], [], []]
        job = client.get(f"/v1/jobs/{many.json()['job_id']}").json()
        assert (job["source"], job["total"]) == ("predict:deadline", 3), "the third at once, the first two late"
        assert queues.plan.count == 2
    no_wait = settings.model_copy(update={"interactive_max_tasks": 0})
    with TestClient(create_app(no_wait)) as client:
        many = client.post("/predict", json={"tasks": tasks("a", "b"), "project": "4.1", "label_config": CONFIG})
        assert many.json()["results"] == [[], []]
        assert client.get(f"/v1/jobs/{many.json()['job_id']}").json()["source"] == "predict:too_many_tasks"


def test_webhook_tasks_created_needs_the_secret(settings: Settings) -> None:
    from pydantic import SecretStr

    secured = settings.model_copy(update={"webhook_secret": SecretStr("hook-secret"), "embedded_worker": False})
    event = {"action": "TASKS_CREATED", "project": {"id": 5, "label_config": CONFIG}, "tasks": tasks("img0.png")}
    with TestClient(create_app(secured)) as client:
        assert client.post("/webhook", json=event).status_code == 401
        assert client.post("/webhook", json=event, headers={"X-Dinolabel-Secret": "nope"}).status_code == 401
        queued = client.post("/webhook", json=event, headers={"X-Dinolabel-Secret": "hook-secret"})
        assert queued.status_code == 200 and queued.json()["status"] == "queued"
        job = client.get(f"/v1/jobs/{queued.json()['job_id']}").json()
        assert (job["project"], job["source"]) == (5, "webhook")
        assert client.post("/webhook", json={"action": "PROJECT_UPDATED"}).json()["status"] == "ignored"
        annotation = client.post("/webhook", json={"action": "ANNOTATION_CREATED"})  # a hook without its payload
        assert annotation.status_code == 422 and "project" in annotation.text
        bad = {"action": "TASKS_CREATED", "tasks": []}
        assert client.post("/webhook", json=bad, headers={"X-Dinolabel-Secret": "hook-secret"}).status_code == 422


def test_jobs_api_cancels_what_has_not_started(settings: Settings) -> None:
    connection = redis.Redis.from_url(settings.redis_url)
    spec = JobSpec(project=6, model_version="v1", label_config=CONFIG, params={})
    job = BulkJob.create(connection, spec)
    job.start([[{"id": 1, "data": {}}], [{"id": 2, "data": {}}], [{"id": 3, "data": {}}]], skipped=1)
    queues = Queues.on(connection)
    for number in range(3):
        enqueue_batch(queues, job, number, timeout=60)
    with TestClient(create_app(settings.model_copy(update={"embedded_worker": False}))) as client:
        assert client.get("/v1/jobs/nope").status_code == 404
        before = client.get(f"/v1/jobs/{job.id}").json()
        assert (before["status"], before["total"], before["skipped"], before["remaining"]) == ("running", 4, 1, 3)
        assert queues.bulk.count == 3
        cancelled = client.delete(f"/v1/jobs/{job.id}").json()
        assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
        assert queues.bulk.count == 0
        assert client.delete(f"/v1/jobs/{job.id}").json()["status"] == "cancelled"


def test_a_batch_is_counted_once_however_often_it_runs(redis_url: str) -> None:
    connection = redis.Redis.from_url(redis_url)
    spec = JobSpec(project=8, model_version="v1", label_config=CONFIG, params={})
    job = BulkJob.create(connection, spec)
    job.start([[{"id": 1, "data": {}}, {"id": 2, "data": {}}], [{"id": 3, "data": {}}]], skipped=0)
    assert job.finish_batch(0, done=1, skipped=0, failures=[(2, "broken image")])
    assert not job.finish_batch(0, done=2, skipped=0, failures=[])  # a re-run of batch 0
    assert job.status() == JobStatus.RUNNING
    assert job.finish_batch(1, done=1, skipped=0, failures=[])
    summary = job.summary()
    assert (summary["status"], summary["done"], summary["failed"], summary["remaining"]) == ("done", 2, 1, 0)
    assert summary["failures"][0]["task_id"] == 2 and summary["failures"][0]["reason"] == "broken image"
    assert job.id not in {j.id for j in BulkJob.active(connection)}


def test_worker_stops_cleanly_on_sigterm(settings: Settings, worker: Service) -> None:
    connection = redis.Redis.from_url(settings.redis_url)
    wait_for(lambda: any(w["state"] == "ready" for w in Workers.all(connection).values()), 90, worker.log_tail())
    started = time.perf_counter()
    worker.process.terminate()
    assert worker.process.wait(timeout=15) == 0
    assert time.perf_counter() - started < 10, "an idle worker stops at once"
    assert Workers.all(connection) == {}, "it said goodbye: no stale live-worker entry"


class _SilentHub(_Handler):
    """A Hugging Face Hub that takes every request and answers none (it hangs up once released)."""

    server: Any

    def do_GET(self) -> None:
        self.server.state.record(self)
        self.server.state.release.wait()

    do_HEAD = do_GET


def test_serve_stops_on_sigterm_while_its_worker_still_tries_to_get_the_model(tmp_path: Path) -> None:
    """``dinolabel serve`` with its embedded worker, whose checkpoint is on a Hub that does not answer: the
    worker is loading for as long as the Hub client retries. SIGTERM ends the process promptly all the
    same: a loading worker holds no job, so it is not given the grace a job in progress gets."""
    hub = _FakeServer()
    port = free_port()
    env = {
        "DINOLABEL_DETECTOR_CHECKPOINT": "dinolabel-tests/not-in-any-cache",
        "DINOLABEL_WORKER_MODELS": "detector",
        "DINOLABEL_DEVICE": "cpu",
        "DINOLABEL_DATA_DIR": str(tmp_path / "data"),
        "DINOLABEL_HOST": "127.0.0.1",
        "DINOLABEL_PORT": str(port),
        "HF_HOME": str(tmp_path / "hf"),  # an empty cache
        "HF_HUB_OFFLINE": "0",  # offline, the load fails at once: the Hub below is what it asks instead
    }
    url = f"http://127.0.0.1:{port}"
    with _serve(_SilentHub, hub):
        api = Service(["serve"], {**env, "HF_ENDPOINT": hub.url}, tmp_path / "serve.log").start()
        try:
            wait_for(lambda: health(url), 90, lambda: f"the API\n{api.log_tail()}")
            wait_for(hub.seen, 90, lambda: f"the worker asking the Hub\n{api.log_tail()}")
            workers = health(url)["workers"]["details"]
            assert [w["state"] for w in workers] == ["loading"], workers
            api.process.send_signal(signal.SIGTERM)
            # Well within the grace of a job in progress, which it waited out before.
            status = api.process.wait(timeout=SHUTDOWN_GRACE / 2)
        finally:
            api.kill()
    # uvicorn shuts down gracefully, then re-raises the signal: the status of a process ended by SIGTERM.
    assert status == -signal.SIGTERM, api.log_tail()
    assert "Application shutdown complete" in api.log_tail(), "the lifespan's shutdown ran to its end"


def test_label_studio_unreachable_fails_the_job_with_reasons_not_the_worker(
    settings: Settings, worker: Service
) -> None:
    worker.env["DINOLABEL_LABEL_STUDIO_RETRIES"] = "0"
    worker.stop()
    worker.start()
    connection = redis.Redis.from_url(settings.redis_url)
    with TestClient(create_app(settings.model_copy(update={"embedded_worker": False}))) as client:
        wait_for(lambda: ready(client), 90, f"a ready worker\n{worker.log_tail()}")
        # Planning needs Label Studio (nothing listens on port 9): the job fails and says why.
        planned = client.post("/v1/projects/9/preannotate").json()
        failed = wait_for(lambda: (j := client.get(f"/v1/jobs/{planned['id']}").json())["status"] != "planning" and j,
                          60, "planning to end")  # fmt: skip
        assert failed["status"] == "failed" and "planning failed" in failed["failures"][0]["reason"]
        # A batch whose predictions cannot be written: each task fails with the reason, the job ends.
        spec = JobSpec(project=9, model_version="v1", label_config=CONFIG, params={"box_threshold": 0.3})
        job = BulkJob.create(connection, spec)
        job.start([tasks("img0.png", "img1.png", "missing.png")], skipped=0)
        enqueue_batch(Queues.on(connection), job, 0, timeout=60)
        done = wait_for(lambda: (j := job.summary())["status"] == "done" and j, 60, worker.log_tail())
        assert (done["done"], done["failed"]) == (0, 3)
        reasons = {f["task_id"]: f["reason"] for f in done["failures"]}
        assert "missing.png" in reasons[3] and "writing the prediction failed" in reasons[1]
        assert Marks(connection, 9, "v1").claim([1, 2, 3], "another") == {1: "claimed", 2: "claimed", 3: "claimed"}
        assert worker.process.poll() is None


def test_waiting_predicts_never_starve_health(settings: Settings) -> None:
    from concurrent.futures import ThreadPoolExecutor

    slow = settings.model_copy(update={"predict_deadline": 4.0, "embedded_worker": False})
    with TestClient(create_app(slow)) as client, ThreadPoolExecutor(max_workers=60) as pool:
        # No worker: 60 requests (more than FastAPI's thread pool of 40) wait out their deadline.
        body = {"tasks": tasks("img0.png"), "project": "10.1", "label_config": CONFIG}
        waiting = [pool.submit(client.post, "/predict", json=body) for _ in range(60)]
        time.sleep(1.0)
        started = time.perf_counter()
        assert client.get("/health").status_code == 200
        assert time.perf_counter() - started < 1.0, "Label Studio's /health time-out is 1 s"
        assert client.post("/setup", json={"project": "10.1", "schema": CONFIG}).status_code == 200
        answers = [f.result(timeout=60) for f in waiting]
        assert all(a.status_code == 200 and a.json()["results"] == [[]] for a in answers), "all handed off"


def worker_on(
    redis_url: str, settings: Settings, project: FakeProjectAPI, log: Path, *, write_size: int = 8, **extra: str
) -> Service:
    """A ``dinolabel worker`` child process that writes to the fake Label Studio ``project``, once ready
    (``extra``: more environment)."""
    env = {
        "DINOLABEL_REDIS_URL": redis_url,
        "DINOLABEL_DETECTOR_CHECKPOINT": settings.detector_checkpoint,
        "DINOLABEL_DEVICE": "cpu",
        "DINOLABEL_LOCAL_FILES_DOCUMENT_ROOT": str(settings.local_files_document_root),
        "DINOLABEL_LABEL_STUDIO_URL": project.url,
        "DINOLABEL_BULK_BATCH_SIZE": "4",
        "DINOLABEL_BULK_WRITE_SIZE": str(write_size),  # 8: two batches per import call
        "DINOLABEL_BULK_WRITE_WAIT": "0.2",
        **extra,
    }
    worker = Service(["worker"], env, log).start()
    connection = redis.Redis.from_url(redis_url)
    wait_for(lambda: any(w["state"] == "ready" for w in Workers.all(connection).values()), 90, worker.log_tail())
    return worker


def project_job(connection: redis.Redis, project: FakeProjectAPI) -> BulkJob:
    spec = JobSpec(project=1, model_version="v1", label_config=CONFIG, params={"box_threshold": 0.3})
    return BulkJob.create(connection, spec)


def finished(job: BulkJob, worker: Service) -> dict:
    return wait_for(lambda: (s := job.summary())["status"] not in ("planning", "running") and s, 120, worker.log_tail())


def test_deleted_predictions_are_predicted_again_and_never_twice(
    settings: Settings, tmp_path: Path, fake_project: FakeProjectAPI
) -> None:
    """Label Studio is the truth: predictions deleted there are predicted again by the next job,
    although the write marks remember them; a task that still holds one is never written twice."""
    fake_project.tasks.update({t: {"image": f"/data/local-files/?d=img{t % 4}.png"} for t in range(1, 9)})
    tasks = [{"id": t, "data": d} for t, d in sorted(fake_project.tasks.items())]
    connection = redis.Redis.from_url(settings.redis_url)
    queues = Queues.on(connection)
    worker = worker_on(settings.redis_url, settings, fake_project, tmp_path / "worker.log")
    try:
        first = project_job(connection, fake_project)
        enqueue_plan(queues, first, tasks=tasks)
        assert (finished(first, worker)["done"], fake_project.per_task("v1")) == (8, dict.fromkeys(range(1, 9), 1))

        with fake_project.lock:  # "Delete predictions" in the Data Manager, for tasks 1-4
            fake_project.predictions[:] = [p for p in fake_project.predictions if p["task"] > 4]
        second = project_job(connection, fake_project)
        enqueue_plan(queues, second, tasks=tasks)
        summary = finished(second, worker)
        assert (summary["done"], summary["skipped"], summary["failed"]) == (4, 4, 0)
        assert fake_project.per_task("v1") == dict.fromkeys(range(1, 9), 1)
        assert sorted(r["task"] for r in fake_project.posted[-1]) == [1, 2, 3, 4]

        # A batch planned before a deletion (and before other writes): it checks Label Studio itself.
        with fake_project.lock:
            fake_project.predictions[:] = [p for p in fake_project.predictions if p["task"] not in (5, 6)]
        third = project_job(connection, fake_project)
        third.start([tasks], skipped=0)
        enqueue_batch(queues, third, 0, timeout=60)
        summary = finished(third, worker)
        assert (summary["done"], summary["skipped"], summary["failed"]) == (2, 6, 0)
        assert fake_project.per_task("v1") == dict.fromkeys(range(1, 9), 1)
        assert sorted(r["task"] for r in fake_project.posted[-1]) == [5, 6]
    finally:
        worker.stop()


def test_a_redis_outage_mid_job_does_not_end_the_worker(
    settings: Settings, tmp_path: Path, fake_project: FakeProjectAPI
) -> None:
    """Redis (AOF) killed while a batch writes to Label Studio, back 6 s later: the same worker
    process finishes the job, and every task holds exactly one prediction."""
    server = RedisServer(tmp_path / "redis-aof", aof=True)
    server.directory.mkdir()
    server.start()
    fake_project.tasks.update({t: {"image": f"/data/local-files/?d=img{t % 4}.png"} for t in range(1, 41)})
    fake_project.import_seconds = 0.4  # the batch spends most of its time in the write, where Redis dies
    worker = worker_on(server.url, settings, fake_project, tmp_path / "worker.log")
    try:
        connection = redis.Redis.from_url(server.url)
        job = project_job(connection, fake_project)
        tasks = [{"id": t, "data": d} for t, d in sorted(fake_project.tasks.items())]
        job.start([tasks[i : i + 4] for i in range(0, 40, 4)], skipped=0)
        for number in range(10):
            enqueue_batch(Queues.on(connection), job, number, timeout=60)

        def writing() -> bool:  # a write under way, after some batches were counted
            return job.summary()["done"] >= 8 and len(fake_project.seen("/api/projects")) > len(fake_project.posted)

        wait_for(writing, 60, f"a write in progress\n{worker.log_tail()}", interval=0.005)
        server.kill()
        time.sleep(6)
        server.start()
        done = wait_for(lambda: (s := job.summary())["status"] == "done" and s, 120, worker.log_tail)
        assert (done["done"], done["failed"], done["total"]) == (40, 0, 40), done
        assert fake_project.per_task("v1") == dict.fromkeys(range(1, 41), 1), "every task once, none twice"
        assert worker.process.poll() is None, "the same worker process carried on"
    finally:
        worker.stop()
        server.stop()


def test_a_worker_killed_with_unwritten_predictions_loses_nothing_and_writes_nothing_twice(
    settings: Settings, tmp_path: Path, fake_project: FakeProjectAPI
) -> None:
    """Predictions wait in the worker's writer while Label Studio imports slowly; the worker is killed
    during an import: the batches it held are re-run by another worker, which writes only what Label
    Studio lacks."""
    fake_project.tasks.update({t: {"image": f"/data/local-files/?d=img{t % 4}.png"} for t in range(1, 41)})
    fake_project.import_seconds = 1.0  # slower than the model: predicted rows queue up in the writer
    connection = redis.Redis.from_url(settings.redis_url)
    victim = worker_on(settings.redis_url, settings, fake_project, tmp_path / "victim.log")
    replacement = None
    try:
        job = project_job(connection, fake_project)
        tasks = [{"id": t, "data": d} for t, d in sorted(fake_project.tasks.items())]
        job.start([tasks[i : i + 4] for i in range(0, 40, 4)], skipped=0)
        for number in range(10):
            enqueue_batch(Queues.on(connection), job, number, timeout=60)

        def importing() -> bool:  # the second import under way: predicted rows wait behind it
            return len(fake_project.posted) == 1 and len(fake_project.seen("/api/projects")) == 2

        wait_for(importing, 60, f"the second import\n{victim.log_tail()}", interval=0.005)
        victim.kill()
        assert 0 < job.summary()["done"] < 40 and len(fake_project.per_task("v1")) < 40
        replacement = worker_on(settings.redis_url, settings, fake_project, tmp_path / "replacement.log")
        done = finished(job, replacement)
        assert (done["status"], done["done"], done["failed"]) == ("done", 40, 0), done
        assert fake_project.per_task("v1") == dict.fromkeys(range(1, 41), 1), "every task once, none twice"
        assert "is gone: re-queueing batch" in replacement.log.read_text()
    finally:
        victim.stop()
        if replacement is not None:
            replacement.stop()


def test_annotators_do_not_wait_behind_planning_or_label_studio_writes(
    settings: Settings, tmp_path: Path, fake_project: FakeProjectAPI
) -> None:
    """With one worker, a /predict is answered while a plan step waits on Label Studio's task listing,
    and while the batches' import waits on Label Studio: neither holds the model's thread."""
    fake_project.tasks.update({t: {"image": f"/data/local-files/?d=img{t % 4}.png"} for t in range(1, 9)})
    connection = redis.Redis.from_url(settings.redis_url)
    worker = worker_on(settings.redis_url, settings, fake_project, tmp_path / "worker.log")
    request = {"tasks": tasks("img1.png"), "project": "1.1", "label_config": CONFIG}
    try:
        with TestClient(create_app(settings.model_copy(update={"embedded_worker": False}))) as client:
            fake_project.listing_gate.clear()
            job = project_job(connection, fake_project)
            enqueue_plan(Queues.on(connection), job)
            wait_for(lambda: fake_project.seen("/api/tasks"), 30, "the plan step to ask for a page")
            during_planning = client.post("/predict", json=request)
            assert during_planning.status_code == 200 and during_planning.json()["results"][0]["result"]
            assert not fake_project.listing_gate.is_set() and job.summary()["status"] == "planning"

            fake_project.import_gate.clear()
            fake_project.listing_gate.set()
            wait_for(lambda: fake_project.seen("/api/projects"), 60, f"an import\n{worker.log_tail()}")
            during_writes = client.post("/predict", json=request)
            assert during_writes.status_code == 200 and during_writes.json()["results"][0]["result"]
            assert not fake_project.posted, "the import was still waiting on Label Studio"
            fake_project.import_gate.set()
            assert finished(job, worker)["done"] == 8
    finally:
        fake_project.listing_gate.set()
        fake_project.import_gate.set()
        worker.stop()


def label_studio_retrieves(client: TestClient, project: FakeProjectAPI, version: str, ids: list[int]) -> dict:
    """What Label Studio 1.23 does for "Retrieve predictions" (``ml/models.py:342-366``): one /predict
    with the tasks lacking a prediction of the version, then each entry of the answer stored for the
    task at its position (a dict, or each dict of a list: ``[]`` stores nothing)."""
    held = project.per_task(version)
    chosen = [t for t in ids if t not in held]
    sent = [{"id": t, "data": project.tasks[t]} for t in chosen]
    body = client.post("/predict", json={"tasks": sent, "project": "1.1", "label_config": CONFIG}).json()
    assert len(body["results"]) == len(chosen), body
    with project.lock:
        for task, entry in zip(chosen, body["results"], strict=True):
            for p in [entry] if isinstance(entry, dict) else entry:
                project.predictions.append({"task": task, "model_version": p["model_version"], "result": p["result"]})
    return body


def test_predict_racing_a_bulk_job_gives_each_task_one_prediction(
    settings: Settings, tmp_path: Path, fake_project: FakeProjectAPI
) -> None:
    """Label Studio sends a /predict for two tasks of a running bulk job while the job's import call
    hangs in Label Studio: one task is in that call (left to the job: no answer for it), the other's
    row waits in the writer (answered; the writer drops the row). Then a /predict that Label Studio
    chose before the import committed. Every task ends with exactly one prediction of the version."""
    fake_project.tasks.update({t: {"image": f"/data/local-files/?d=img{t % 4}.png"} for t in range(1, 9)})
    connection = redis.Redis.from_url(settings.redis_url)
    queues = Queues.on(connection)
    worker = worker_on(settings.redis_url, settings, fake_project, tmp_path / "worker.log", write_size=4)
    try:
        with TestClient(create_app(settings.model_copy(update={"embedded_worker": False}))) as client:
            version = client.post("/setup", json={"project": "1.1", "schema": CONFIG}).json()["model_version"]
            spec = JobSpec(project=1, model_version=version, label_config=CONFIG, params={"box_threshold": 0.3})
            job = BulkJob.create(connection, spec)
            listed = [{"id": t, "data": d} for t, d in sorted(fake_project.tasks.items())]
            job.start([listed[:4], listed[4:]], skipped=0)
            fake_project.import_gate.clear()  # Label Studio's import hangs until /predict has answered
            for number in range(2):
                enqueue_batch(queues, job, number, timeout=60)

            def second_batch_waits_in_the_writer() -> bool:
                rq_job = queues.bulk.fetch_job(job.rq_jobs().get(1, ""))
                return rq_job is not None and rq_job.get_status() == "finished"

            wait_for(second_batch_waits_in_the_writer, 60, f"batch 1 handed to the writer\n{worker.log_tail()}")
            assert len(fake_project.seen("/api/projects")) == 1 and not fake_project.posted, "batch 0's import hangs"

            answer = label_studio_retrieves(client, fake_project, version, [2, 6])
            assert answer["results"][0] == [], "task 2 is in the import call under way: the job's prediction"
            assert answer["results"][1]["result"], "task 6 only waited in the writer: the annotator gets boxes"
            assert "job_id" not in answer, "nothing handed off: task 2 is the job's already"

            fake_project.import_gate.set()
            summary = wait_for(lambda: (s := job.summary())["status"] == "done" and s, 60, worker.log_tail())
            assert (summary["done"], summary["skipped"], summary["failed"]) == (7, 1, 0), summary
            assert [sorted(r["task"] for r in rows) for rows in fake_project.posted] == [[1, 2, 3, 4], [5, 7, 8]]

            # Chosen by Label Studio before the import committed, sent after it: left to the job.
            late = client.post("/predict", json={"tasks": [{"id": 3, "data": fake_project.tasks[3]}],
                                                 "project": "1.1", "label_config": CONFIG}).json()  # fmt: skip
            assert late["results"] == [[]] and "job_id" not in late
            assert fake_project.per_task(version) == dict.fromkeys(range(1, 9), 1), "every task once, none twice"
    finally:
        fake_project.import_gate.set()
        worker.stop()


def test_predict_is_answered_while_a_bulk_batch_waits_between_model_passes(
    settings: Settings, tmp_path: Path, fake_project: FakeProjectAPI, fake_bucket: FakeBucket
) -> None:
    """One worker; its bulk batch of four has predicted task 1 and waits for task 2's image (a server
    that sends one byte a second): the model is free, and an annotator's /predict is answered from it
    then, not after the batch."""
    fake_project.tasks.update({t: {"image": f"/data/local-files/?d=img{t % 4}.png"} for t in (1, 3, 4)})
    fake_project.tasks[2] = {"image": f"{fake_bucket.url}/trickle"}
    connection = redis.Redis.from_url(settings.redis_url)
    worker = worker_on(settings.redis_url, settings, fake_project, tmp_path / "worker.log",
                       DINOLABEL_FETCH_ALLOW="127.0.0.1", DINOLABEL_IMAGE_TOTAL_TIMEOUT="120")  # fmt: skip
    request = {"tasks": tasks("img1.png"), "project": "1.1", "label_config": CONFIG}
    try:
        with TestClient(create_app(settings.model_copy(update={"embedded_worker": False}))) as client:
            job = project_job(connection, fake_project)
            enqueue_plan(Queues.on(connection), job)
            wait_for(lambda: fake_bucket.seen("/trickle"), 60, f"the batch to fetch task 2\n{worker.log_tail()}")
            answer = client.post("/predict", json=request)
            assert answer.status_code == 200 and answer.json()["results"][0]["result"], answer.text
            assert job.summary()["done"] == 0 and not fake_project.posted, "the batch was still running"
            fake_bucket.release.set()  # the trickle ends short of what it promised: task 2 fails alone
            summary = finished(job, worker)
            assert (summary["done"], summary["failed"]) == (3, 1)
            assert fake_project.per_task("v1") == {1: 1, 3: 1, 4: 1}
    finally:
        fake_bucket.release.set()
        worker.stop()
