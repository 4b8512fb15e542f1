"""Streamed planning of bulk jobs, against a fake Label Studio project of a few thousand tasks.

The jobs run in an RQ worker in this process (``work(burst=True)``) with a stub predictor, so what is
tested is the bookkeeping: pages listed after a cursor, batches queued as pages arrive, what is held in
flight, resuming a planner that died, cancelling, and exactly one prediction per task.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from rq.serializers import JSONSerializer

from backend import worker as worker_module
from backend.bulk import BulkJob, JobSpec
from backend.config import Settings
from backend.jobs import cancel_queued, enqueue_plan
from backend.predictor import PredictOutcome
from backend.queues import Queues
from backend.results import prediction
from backend.worker import PredictionWorker, Runtime, requeue_abandoned
from backend.writer import Writer
from tests.backend.conftest import FakeProjectAPI

pytestmark = [pytest.mark.redis]

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/></RectangleLabels></View>'
)
VERSION = "stub-v1"
TASKS = 2500
HELD = range(1, 2501, 8)  # a prediction of the version already: 313 tasks


class StubPredictor:
    """Answers every task with an empty prediction, at once."""

    def predict(self, tasks: Sequence[dict[str, Any]], target: Any, params: Any, model_version: str, fetcher: Any,
                context: Any = None) -> PredictOutcome:  # fmt: skip
        return PredictOutcome(predictions=[prediction([], model_version) for _ in tasks])


@pytest.fixture
def project(fake_project: FakeProjectAPI) -> FakeProjectAPI:
    fake_project.tasks.update({t: {"image": f"/data/{t}.png"} for t in range(1, TASKS + 1)})
    fake_project.predictions.extend({"task": t, "result": [], "model_version": VERSION} for t in HELD)
    return fake_project


@pytest.fixture
def connection(redis_url: str, project: FakeProjectAPI, tmp_path: Path) -> Iterator[redis.Redis]:
    """Redis, and the runtime that job functions find on this thread (a dead worker's name: it never beats)."""
    connection = redis.Redis.from_url(redis_url)
    settings = Settings(redis_url=redis_url, label_studio_url=project.url, bulk_batch_size=100,
                        bulk_plan_ahead=1000, data_dir=tmp_path)  # fmt: skip
    writer = Writer(size=1000, wait=0.2, retries=0)
    writer.start()
    worker_module._local.runtime = Runtime(predictor=StubPredictor(), settings=settings, connection=connection,
                                           name="planner-under-test", writer=writer)  # type: ignore[arg-type]  # fmt: skip
    yield connection
    writer.stop()
    worker_module._local.runtime = None


def work(connection: redis.Redis, max_jobs: int | None = None) -> None:
    """Run queued jobs (at most ``max_jobs``), and what the writes of their batches queue in turn."""
    queues = Queues.on(connection)
    while True:
        worker = PredictionWorker(queues.in_listen_order(), connection=connection, serializer=JSONSerializer)
        worker.work(burst=True, max_jobs=max_jobs, logging_level="WARNING")
        worker_module.current_runtime().writer.flush()
        if max_jobs is not None or not any(queues.depths().values()):
            return


def new_job(connection: redis.Redis, project: FakeProjectAPI) -> BulkJob:
    spec = JobSpec(project=1, model_version=VERSION, label_config=CONFIG, params={})
    return BulkJob.create(connection, spec)


def listings(project: FakeProjectAPI) -> list[dict[str, Any]]:
    """The task listings (``include=id,data``) the planner asked for, as Data Manager queries."""
    return [json.loads(r.query["query"][0]) for r in project.seen("/api/tasks") if r.query["include"] == ["id,data"]]


def test_planning_streams_pages_and_holds_only_what_is_in_flight(
    connection: redis.Redis, project: FakeProjectAPI
) -> None:
    job = new_job(connection, project)
    queues = Queues.on(connection)
    enqueue_plan(queues, job)
    work(connection, max_jobs=1)  # one plan step: one page
    first = job.summary()
    assert (first["status"], first["total"], first["skipped"]) == ("running", TASKS, 125), first
    assert queues.bulk.count == 9, "the first page's 875 tasks to predict are queued at once"
    work(connection, max_jobs=1)  # the second page: now 1,750 tasks in flight, more than the 1,000 asked
    state = job.plan_state()
    assert (state["cursor"], state["listed"], state["in_flight"]) == (2000, 2000, 1750)
    assert queues.plan.count == 0 and queues.bulk.count == 18, "no third page while so much is in flight"
    assert connection.hlen(job.batches_key) == 18

    work(connection)
    done = job.summary()
    assert (done["status"], done["total"], done["done"], done["skipped"], done["failed"]) == (
        "done", TASKS, TASKS - len(HELD), len(HELD), 0,
    )  # fmt: skip
    assert project.per_task(VERSION) == dict.fromkeys(range(1, TASKS + 1), 1)
    cursors = [q["filters"]["items"][0]["value"] for q in listings(project)]
    assert cursors == [0, 1000, 2000], "each page listed once, after the last id planned"
    assert not project.seen("/api/predictions"), "nothing reads all of a project's predictions"
    calls = worker_module.current_runtime().writer.calls
    assert sum(calls) == TASKS - len(HELD) and max(calls) > 100, f"rows of many batches per import: {calls}"
    assert [len(rows) for rows in project.posted] == calls
    assert connection.hlen(job.batches_key) == 0 and connection.hlen(job.rq_jobs_key) == 0, "nothing left behind"


def test_a_planner_that_dies_mid_way_resumes_without_planning_a_task_twice(
    connection: redis.Redis, project: FakeProjectAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backend import jobs

    job = new_job(connection, project)
    enqueue_plan(Queues.on(connection), job)
    work(connection, max_jobs=1)
    real = jobs.enqueue_batch

    def dies_after_recording(*args: Any, **kwargs: Any) -> Any:
        raise redis.ConnectionError("Redis went away")  # the page is recorded, its batches are not queued

    monkeypatch.setattr(jobs, "enqueue_batch", dies_after_recording)
    work(connection, max_jobs=1)
    assert job.pending_plan_step() == "running:planner-under-test" and job.plan_state()["cursor"] == 2000
    monkeypatch.setattr(jobs, "enqueue_batch", real)

    assert requeue_abandoned(connection, batch_timeout=60) == 1, "the dead planner's step is queued again"
    work(connection)
    done = job.summary()
    assert (done["status"], done["done"] + done["skipped"], done["failed"]) == ("done", TASKS, 0), done
    assert project.per_task(VERSION) == dict.fromkeys(range(1, TASKS + 1), 1)
    assert [q["filters"]["items"][0]["value"] for q in listings(project)] == [0, 1000, 2000]


def test_cancelling_a_job_mid_plan_leaves_nothing_queued(connection: redis.Redis, project: FakeProjectAPI) -> None:
    job = new_job(connection, project)
    queues = Queues.on(connection)
    enqueue_plan(queues, job)
    work(connection, max_jobs=1)
    assert queues.bulk.count == 9 and queues.plan.count == 1
    assert job.cancel()
    assert cancel_queued(queues, job) == 10, "nine batches and the next plan step"
    assert (queues.bulk.count, queues.plan.count) == (0, 0)
    work(connection)
    assert job.summary()["status"] == "cancelled" and not project.posted, "nothing was predicted or written"


def test_a_job_over_some_tasks_plans_those_that_exist(connection: redis.Redis, project: FakeProjectAPI) -> None:
    job = new_job(connection, project)
    wanted = [*range(5, 505), 99_999]  # 500 tasks of the project (62 already predicted) and one unknown
    enqueue_plan(Queues.on(connection), job, task_ids=wanted)
    assert job.summary()["total"] == 501
    work(connection)
    done = job.summary()
    assert (done["status"], done["total"], done["done"], done["skipped"]) == ("done", 500, 438, 62), done
    assert set(project.per_task(VERSION)) == set(HELD) | set(range(5, 505))
    assert all(count == 1 for count in project.per_task(VERSION).values())
