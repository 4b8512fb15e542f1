"""Re-ranking after annotations: Label Studio's annotation events through ``/webhook`` (the real app, real
Redis) schedule one debounced run per prioritized project, which the store writer starts once it is due
(``backend.prioritize.after_annotations``, ``start_due_reranks``; the store writer's ``DueReranks``).

Time is driven through ``start_due_reranks(now=...)`` with a delay of an hour (nothing falls due by the
clock), and the store writer runs in this process (``burst``) when a test wants the queued runs done; the
last test lets the store writer of a restarted app start a due run by itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from backend.bulk import JOB_TTL
from backend.config import Settings
from backend.ls_client import LabelStudioClient
from backend.ls_priority import remove_priority
from backend.main import create_app
from backend.prioritize import ANNOTATIONS, PRIORITIZED_KEY, RERANK_DUE_KEY, start_due_reranks
from backend.project_vectors import embedder_version_of
from backend.queues import Queues, connect
from backend.routes.ls import ANNOTATION_ACTIONS
from backend.store_writer import run_store_writer
from indexer.duplicates import find_duplicates
from indexer.index import VectorIndex
from indexer.priority import rank
from indexer.store import VectorStore
from tests.backend.conftest import FakeProjectAPI
from tests.backend.test_prioritize import LABELED, TASKS, fill_store, written_ranks
from tests.processes import wait_for

pytestmark = pytest.mark.redis

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "label_studio"
SAMPLE = json.loads((SAMPLES / "ls_to_backend_webhook.json").read_text())["body"]
HOUR = 3600.0


@pytest.fixture
def settings(redis_url: str, tmp_path: Path, fake_project: FakeProjectAPI) -> Settings:
    """No store writer thread (``drain`` runs one when wanted); an hour's delay, driven by hand."""
    fake_project.tasks.update({t: {"image": f"/data/local-files/?d=img{t}.png"} for t in range(1, TASKS + 1)})
    fake_project.labeled.update(LABELED)
    return Settings(
        redis_url=redis_url,
        data_dir=tmp_path,
        label_studio_url=fake_project.url,
        store_writer=False,
        priority_rerank_delay=HOUR,
        priority_uncertainty_weight=0,
    )


def event(project: int, action: str = "ANNOTATION_CREATED") -> dict:
    """What Label Studio 1.23 posts: the annotation(s) and the project (tests/data/label_studio)."""
    if action == "ANNOTATIONS_DELETED":  # OnlyIDWebhookSerializer: ids only
        return {"action": action, "annotations": [{"id": 1}], "project": {**SAMPLE["project"], "id": project}}
    if action == "ANNOTATIONS_CREATED":  # many: a list of annotations and their tasks
        body = {**SAMPLE, "annotation": [SAMPLE["annotation"]], "task": [SAMPLE["task"]]}
        return {**body, "action": action, "project": {**SAMPLE["project"], "id": project}}
    return {**SAMPLE, "action": action, "project": {**SAMPLE["project"], "id": project}}


def annotated(client: TestClient, project: int, action: str = "ANNOTATION_CREATED") -> dict:
    """Post an annotation event without any credentials, as Label Studio's own hook does."""
    response = client.post("/webhook", json=event(project, action))
    assert response.status_code == 200, response.text
    return response.json()


def drain(settings: Settings) -> None:
    """Run the store writer here until its queues are empty (the queued prioritize runs end)."""
    run_store_writer(settings, connect(settings.redis_url), burst=True)


def expected_ranks(settings: Settings, ids: np.ndarray, vectors: np.ndarray, labeled: Iterable[int]) -> dict:
    """What ``rank`` makes of the stored vectors with these labeled tasks (as a run computes it)."""
    seeds = sorted(labeled)
    with VectorStore(settings.index_dir, 1) as store:
        table = store.hash_table()
    index = VectorIndex.build(ids, vectors, embedder=embedder_version_of(settings))
    report = find_duplicates(table, labeled=seeds, index=index, vector_blocks=[(ids, vectors)])
    return rank(ids, vectors, seeds, duplicates=report).ranks()


def test_annotation_events_rerank_a_prioritized_project_once_per_delay(
    settings: Settings, fake_project: FakeProjectAPI
) -> None:
    ids, vectors = fill_store(settings)
    connection = redis.Redis.from_url(settings.redis_url)
    store = Queues.on(connection).store
    with TestClient(create_app(settings)) as client:
        # Never prioritized: acknowledged, and nothing stored (fake events for any project id cost nothing).
        for project in (1, 2, 77):
            assert annotated(client, project)["status"] == "ignored"
        assert not connection.exists(RERANK_DUE_KEY) and store.count == 0

        first = client.post("/v1/projects/1/prioritize").json()
        drain(settings)
        assert client.get(f"/v1/priority-jobs/{first['id']}").json()["status"] == "done"

        # Twelve events of every kind, one run: due an hour after the first.
        before = time.time()
        answers = [annotated(client, 1, action) for action in ANNOTATION_ACTIONS for _ in range(3)]
        due = answers[0]["rerank_at"]
        assert before + HOUR <= due <= time.time() + HOUR
        assert [(a["status"], a["action"], a["rerank_at"]) for a in answers] == [
            ("scheduled", action, due) for action in ANNOTATION_ACTIONS for _ in range(3)
        ]
        assert annotated(client, 2)["status"] == "ignored", "another project, never prioritized"
        assert connection.zrange(RERANK_DUE_KEY, 0, -1) == [b"1"]
        assert connection.ttl(RERANK_DUE_KEY) in range(1, JOB_TTL + 1), "the schedule expires"
        assert start_due_reranks(connection, now=due - 1) == [] and store.count == 0, "not due yet"
        (rerank,) = start_due_reranks(connection, now=due)
        assert start_due_reranks(connection, now=due + 2 * HOUR) == [], "taken: nothing more to start"
        assert store.count == 1

        # A task annotated, and events while that run waits or runs: exactly one more run, after it.
        newly = next(t for t in range(1, TASKS + 1) if t not in LABELED)
        fake_project.labeled.add(newly)
        during = [annotated(client, 1, "ANNOTATION_CREATED")["rerank_at"] for _ in range(3)]
        assert len(set(during)) == 1 and during[0] >= due
        assert start_due_reranks(connection, now=during[0] + 1) == [], "held back while the run before is queued"
        drain(settings)
        job = client.get(f"/v1/priority-jobs/{rerank}").json()
        assert (job["status"], job["source"], job["labeled"]) == ("done", ANNOTATIONS, len(LABELED) + 1), job
        assert written_ranks(fake_project) == expected_ranks(settings, ids, vectors, LABELED | {newly})
        assert newly not in written_ranks(fake_project), "labeled since: its rank is cleared"
        (follow_up,) = start_due_reranks(connection, now=during[0] + 1)
        assert start_due_reranks(connection, now=during[0] + 3 * HOUR) == []
        drain(settings)
        assert client.get(f"/v1/priority-jobs/{follow_up}").json()["status"] == "done"
        assert store.count == 0 and not connection.exists(RERANK_DUE_KEY)


def test_no_rerank_with_a_delay_of_zero(settings: Settings) -> None:
    connection = redis.Redis.from_url(settings.redis_url)
    connection.sadd(PRIORITIZED_KEY, "1")
    with TestClient(create_app(settings.model_copy(update={"priority_rerank_delay": 0}))) as client:
        for action in ANNOTATION_ACTIONS:
            assert annotated(client, 1, action) == {"status": "ignored", "action": action}
    assert not connection.exists(RERANK_DUE_KEY)
    assert start_due_reranks(connection, now=time.time() + 10 * HOUR) == []
    assert Queues.on(connection).store.count == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}, "project"),  # a hook without its payload
        ({"action": "ANNOTATIONS_DELETED", "project": {"id": "1"}}, "project"),
        ({"action": "ANNOTATION_UPDATED", "project": -1}, "project"),
        ({"action": "ANNOTATIONS_CREATED", "project": {"title": "no id"}}, "project"),
        ({"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": 5}}, "label_config"),
    ],
)
def test_malformed_annotation_events_get_a_422_naming_the_field(settings: Settings, body: dict, field: str) -> None:
    connection = redis.Redis.from_url(settings.redis_url)
    connection.sadd(PRIORITIZED_KEY, "1")
    with TestClient(create_app(settings)) as client:
        response = client.post("/webhook", json=body)
    assert response.status_code == 422, response.text
    assert field in json.dumps(response.json()["detail"])
    assert not connection.exists(RERANK_DUE_KEY)


def test_a_rerank_scheduled_before_a_restart_is_started_by_the_store_writer(settings: Settings) -> None:
    fill_store(settings)
    connection = redis.Redis.from_url(settings.redis_url)
    with TestClient(create_app(settings.model_copy(update={"priority_rerank_delay": 1}))) as client:
        first = client.post("/v1/projects/1/prioritize").json()
        drain(settings)
        scheduled = annotated(client, 1)
        assert scheduled["status"] == "scheduled"
    assert connection.zscore(RERANK_DUE_KEY, "1") == scheduled["rerank_at"], "kept in Redis across the restart"

    with TestClient(create_app(settings.model_copy(update={"store_writer": True}))) as client:

        def reranked() -> dict | bool:
            ranking = client.get("/v1/projects/1/priority").json()
            return ranking["job_id"] != first["id"] and ranking

        job_id = wait_for(reranked, 60, "the store writer to re-rank the project")["job_id"]

        def ended() -> dict | bool:
            job = client.get(f"/v1/priority-jobs/{job_id}").json()
            return job["status"] in ("done", "failed") and job

        job = wait_for(ended, 60, "the re-ranking to end")
        assert (job["status"], job["source"]) == ("done", ANNOTATIONS), job
    assert not connection.exists(RERANK_DUE_KEY)


def test_a_project_whose_ranking_was_removed_is_not_ranked_again(
    settings: Settings, fake_project: FakeProjectAPI
) -> None:
    # `dinolabel unprioritize` talks to Label Studio only: the next automatic run finds our tab gone,
    # writes nothing and forgets the project, whose later events are ignored again.
    fill_store(settings)
    connection = redis.Redis.from_url(settings.redis_url)
    with TestClient(create_app(settings)) as client:
        first = client.post("/v1/projects/1/prioritize").json()
        drain(settings)
        assert client.get(f"/v1/priority-jobs/{first['id']}").json()["status"] == "done"
        assert fake_project.views, "the ranking's tab"
        with LabelStudioClient(fake_project.url, None) as ls:
            remove_priority(ls, 1)  # what `dinolabel unprioritize` does
        assert not fake_project.views
        actions = len(fake_project.actions)

        due = annotated(client, 1)["rerank_at"]
        (rerank,) = start_due_reranks(connection, now=due)
        drain(settings)
        job = client.get(f"/v1/priority-jobs/{rerank}").json()
        assert (job["status"], job["source"], job["ranked"]) == ("done", ANNOTATIONS, None), job
        assert "tab is gone" in job["skipped"]
        assert len(fake_project.actions) == actions, "nothing written back"
        assert not fake_project.views, "no tab made again"
        assert not connection.sismember(PRIORITIZED_KEY, "1")
        assert annotated(client, 1)["status"] == "ignored"

        # Prioritized by hand again: automatic runs resume.
        again = client.post("/v1/projects/1/prioritize").json()
        drain(settings)
        assert client.get(f"/v1/priority-jobs/{again['id']}").json()["status"] == "done"
        assert annotated(client, 1)["status"] == "scheduled"
