"""Prioritize runs end to end: the API with its store writer thread, real Redis, a store filled directly
with synthetic clustered vectors, and the fake Label Studio project (tasks, annotations, the Data
Manager's "Add Or Modify Data Field" action and tabs) that the ranking is written into."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from backend.config import Settings
from backend.ls_priority import TAB_TITLE
from backend.main import create_app
from backend.prioritize import after_index_job
from backend.project_vectors import embedder_version_of
from backend.queues import Queues
from indexer.duplicates import find_duplicates
from indexer.index import VectorIndex
from indexer.priority import rank
from indexer.store import StoredVector, VectorStore
from tests.backend.conftest import FakeProjectAPI, serving
from tests.indexer.vectors import clustered
from tests.processes import DINOLABEL, wait_for

pytestmark = pytest.mark.redis

TASKS = 60  # tasks 1..60; 57..60 are exact copies of tasks 1..4
COPIES = {57: 1, 58: 2, 59: 3, 60: 4}
LABELED = {1, 2, 5, 9}


@pytest.fixture
def settings(redis_url: str, tmp_path: Path, fake_project: FakeProjectAPI) -> Settings:
    return Settings(redis_url=redis_url, data_dir=tmp_path, label_studio_url=fake_project.url)


def fill_store(settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    """Vectors in 6 clusters, hashes unique except the exact copies (same bytes as their originals)."""
    vectors = clustered(TASKS, 32, clusters=6, seed=3)
    for copy, original in COPIES.items():
        vectors[copy - 1] = vectors[original - 1]
    ids = np.arange(1, TASKS + 1, dtype=np.int64)
    version = embedder_version_of(settings)
    with VectorStore(settings.index_dir, 1, writer=True) as store:
        store.upsert(
            StoredVector(
                task_id=int(task),
                embedder=version,
                vector=vectors[task - 1],
                sha256=f"sha-{COPIES.get(int(task), int(task))}",
                pixel_hash=f"px-{COPIES.get(int(task), int(task))}",
                phash=(int(task) * 0x9E3779B97F4A7C15) % 2**64,
                width=64,
                height=48,
            )
            for task in ids
        )
    return ids, vectors


def expected_ranking(settings: Settings, ids: np.ndarray, vectors: np.ndarray, **options: object):
    with VectorStore(settings.index_dir, 1) as store:
        table = store.hash_table()
    index = VectorIndex.build(ids, vectors, embedder=embedder_version_of(settings))
    report = find_duplicates(table, labeled=sorted(LABELED), index=index, vector_blocks=[(ids, vectors)])
    return rank(ids, vectors, sorted(LABELED), duplicates=report, **options)


def run(client: TestClient, project: int, body: dict | None = None) -> dict:
    started = client.post(f"/v1/projects/{project}/prioritize", json=body)
    assert started.status_code == 202, started.text
    assert started.json()["status"] == "queued"

    def ended() -> dict | bool:
        job = client.get(f"/v1/priority-jobs/{started.json()['id']}").json()
        return job["status"] in ("done", "failed") and job

    return wait_for(ended, 120, "the prioritize job to end")


def written_ranks(project: FakeProjectAPI) -> dict[int, tuple[int, str]]:
    return {
        task: (int(data["dinolabel_rank"]), str(data["dinolabel_reason"]))
        for task, data in project.tasks.items()
        if data.get("dinolabel_rank")
    }


def test_the_ranks_written_into_label_studio_are_the_rankings(settings: Settings, fake_project: FakeProjectAPI) -> None:
    fake_project.tasks.update({t: {"image": f"/data/local-files/?d=img{t}.png"} for t in range(1, TASKS + 1)})
    fake_project.labeled.update(LABELED)
    ids, vectors = fill_store(settings)
    expected = expected_ranking(settings, ids, vectors)
    with TestClient(create_app(settings)) as client:
        nothing = client.post("/v1/projects/2/prioritize")
        assert nothing.status_code == 404 and "index it first" in nothing.json()["detail"]
        assert client.get("/v1/projects/1/priority").status_code == 404, "never ranked"

        job = run(client, 1)
        assert job["status"] == "done", job
        assert (job["vectors"], job["labeled"], job["ranked"]) == (TASKS, len(LABELED), TASKS - len(LABELED))
        assert job["error"] is None and job["tab_id"] is not None

        ranks = written_ranks(fake_project)
        assert ranks == expected.ranks(), "what rank() makes of the same vectors, labeled tasks and duplicates"
        assert not LABELED & set(ranks), "labeled tasks are seeds: no rank"
        assert all(fake_project.tasks[t].get("dinolabel_rank") in (None, "") for t in LABELED)
        assert ranks[57][1] == ranks[58][1] == "duplicate", "copies of labeled tasks are pushed back"
        pushed = min(ranks[57][0], ranks[58][0])
        assert all(why == "duplicate" for r, why in ranks.values() if r > pushed), "among the duplicates, at the end"
        tab = fake_project.views[job["tab_id"]]
        assert tab["title"] == TAB_TITLE and tab["ordering"] == ["tasks:data.dinolabel_rank"]
        # Labeled tasks were listed in pages (one here), never one call per task.
        assert len([s for s in fake_project.seen("/api/tasks") if s.query["include"] == ["id,is_labeled"]]) == 1

        head = client.get("/v1/projects/1/priority").json()
        assert [t["task_id"] for t in head["head"]] == [int(t) for t in expected.task_ids[: len(head["head"])]]
        assert head["head"][0] == expected.explain(0)
        assert {t["task_id"] for t in head["pushed_back"]} == {t for t, (_, why) in ranks.items() if why == "duplicate"}
        page = client.get("/v1/projects/1/priority", params={"format": "html"})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "Labeling priority of project 1" in page.text

        # Annotations submitted since: the next ranking seeds with them and clears their rank.
        first = int(expected.task_ids[0])
        fake_project.labeled.add(first)
        LABELED.add(first)
        try:
            again = run(client, 1, {"like_task_ids": [30]})
            assert again["status"] == "done", again
            assert written_ranks(fake_project) == expected_ranking(settings, ids, vectors, like=vectors[[29]]).ranks()
            assert "dinolabel_rank" in fake_project.tasks[first] and not fake_project.tasks[first]["dinolabel_rank"]
        finally:
            LABELED.discard(first)

        failed = run(client, 1, {"like_task_ids": [999]})
        assert failed["status"] == "failed" and "[999]" in failed["error"]
        refused = client.post("/v1/projects/1/prioritize", json={"uncertainty_weight": 1.5})
        assert refused.status_code == 422


def test_an_index_job_ending_ranks_a_prioritized_project_again_once(settings: Settings, redis_url: str) -> None:
    import redis

    connection = redis.Redis.from_url(redis_url)
    queues = Queues.on(connection)
    after_index_job(connection, "index-job-a", 7)
    assert queues.store.count == 0, "project 7 was never prioritized: nothing to redo"
    connection.sadd("dinolabel:prioritized-projects", "7")
    after_index_job(connection, "index-job-a", 7)
    after_index_job(connection, "index-job-a", 7)  # the job's end seen twice (a batch stored again)
    assert queues.store.count == 1
    assert queues.store.jobs[0].func_name == "backend.prioritize.run_prioritize"


def test_the_command_line_follows_the_run_to_its_counts(settings: Settings, fake_project: FakeProjectAPI) -> None:
    fake_project.tasks.update({t: {"image": f"/data/local-files/?d=img{t}.png"} for t in range(1, TASKS + 1)})
    fake_project.labeled.update(LABELED)
    fill_store(settings)
    with serving(create_app(settings)) as url:

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            command = [DINOLABEL, "prioritize", "--api", url, "--interval", "0.2", *args]
            return subprocess.run(command, capture_output=True, text=True, timeout=120)

        done = cli("--project", "1", "--like-tasks", "30,31")
        assert done.returncode == 0, done.stderr
        ranked = TASKS - len(LABELED)
        assert f"done: {ranked} tasks ranked" in done.stdout and f"{len(LABELED)} labeled" in done.stdout
        assert "queued" in done.stderr or "running" in done.stderr, "progress"
        assert len(written_ranks(fake_project)) == ranked
        assert written_ranks(fake_project)[30][0] == 0, "the example itself is the best match"

        failed = cli("--project", "1", "--like-tasks", "999")
        assert failed.returncode == 1 and "[999]" in failed.stderr
        unindexed = cli("--project", "2")
        assert unindexed.returncode == 3 and "index it first" in unindexed.stderr
        malformed = cli("--project", "1", "--like-tasks", "1,x")
        assert malformed.returncode == 2 and "separated by commas" in malformed.stderr


def box(score: float, label: str, x: float = 10.0, y: float = 10.0) -> dict:
    """One rectangle of a prediction, as our detector writes it into Label Studio (percent)."""
    value = {"x": x, "y": y, "width": 20.0, "height": 20.0, "rotation": 0, "rectanglelabels": [label]}
    return {"type": "rectanglelabels", "from_name": "label", "to_name": "image", "score": score, "value": value}


def test_the_detectors_uncertainty_moves_a_task_ahead_of_an_equal_one(
    settings: Settings, fake_project: FakeProjectAPI, redis_url: str
) -> None:
    import redis

    from backend.state import ProjectStore

    # Task 1 is labeled; tasks 2-6 are all as far from it and from each other (orthogonal vectors), so
    # diversity alone ranks them in id order.
    ids = np.arange(1, 7, dtype=np.int64)
    vectors = np.eye(6, 32, dtype=np.float32)
    with VectorStore(settings.index_dir, 1, writer=True) as store:
        store.upsert(
            StoredVector(
                task_id=int(task), embedder=embedder_version_of(settings), vector=vectors[task - 1],
                sha256=f"sha-{task}", pixel_hash=f"px-{task}", phash=(int(task) * 0x9E3779B97F4A7C15) % 2**64,
                width=64, height=48,
            )
            for task in ids
        )  # fmt: skip
    fake_project.tasks.update({int(t): {"image": f"/data/local-files/?d=img{t}.png"} for t in ids})
    fake_project.labeled.add(1)
    projects = ProjectStore(settings, redis.Redis.from_url(redis_url))
    params = projects.get(1).params
    detector = projects.model_version(params)
    sure = [box(1.0, "cat")]  # far above the box threshold: no doubt
    close_call = [box(params.box_threshold + 0.01, "cat")]  # just kept
    fake_project.predictions += [
        {"task": 2, "result": sure, "score": 1.0, "model_version": detector},
        {"task": 3, "result": close_call, "score": 0.36, "model_version": "another-detector"},  # not ours
        {"task": 5, "result": close_call, "score": 0.36, "model_version": detector},
    ]
    listings = lambda: [s for s in fake_project.seen("/api/tasks") if s.query["include"] == ["id,predictions"]]  # noqa: E731

    with TestClient(create_app(settings)) as client:
        job = run(client, 1)
        assert job["status"] == "done", job
        assert (job["detector"], job["uncertainty_weight"]) == (detector, 0.3), "the setting's default weight"
        assert (job["predicted"], job["moved_by_uncertainty"]) == (2, 1)
        ranks = written_ranks(fake_project)
        assert sorted(ranks, key=lambda t: ranks[t][0]) == [5, 2, 3, 4, 6], "the close call first, then id order"
        assert ranks[5][1] == "uncertain" and {ranks[t][1] for t in (2, 3, 4, 6)} == {"diverse"}
        assert len(listings()) == 1 and listings()[0].query["fields"] == ["all"], "one page of predictions"

        head = {t["task_id"]: t for t in client.get("/v1/projects/1/priority").json()["head"]}
        assert head[5]["uncertainty_moved"] and "moved it ahead" in head[5]["text"]
        assert head[5]["uncertainty"] == pytest.approx(1 - 0.01 / (1 - params.box_threshold), abs=1e-3)
        assert head[2]["uncertainty"] == 0.0 and not head[2]["uncertainty_moved"]
        assert head[3]["uncertainty"] is None and head[4]["uncertainty"] is None, "no prediction of this detector"

        # Weight 0: diversity alone, and no predictions are read.
        plain = run(client, 1, {"uncertainty_weight": 0})
        assert plain["status"] == "done" and plain["uncertainty_weight"] == 0.0 and not plain["predicted"]
        ranks = written_ranks(fake_project)
        assert sorted(ranks, key=lambda t: ranks[t][0]) == [2, 3, 4, 5, 6]
        assert {why for _, why in ranks.values()} == {"diverse"}
        assert len(listings()) == 1


def colour(task: int) -> tuple[int, int, int]:
    """A distinct solid colour per task (copies share their original's: the same bytes)."""
    task = COPIES.get(task, task)
    return ((task * 67) % 200 + 30, (task * 151) % 200 + 30, (task * 23) % 200 + 30)


def test_the_html_report_shows_the_queue_and_the_duplicates_with_thumbnails_in_chromium(
    redis_url: str, tmp_path: Path, fake_project: FakeProjectAPI
) -> None:
    from backend.ls_credentials import LabelStudioAccess
    from backend.thumbnails import fetch_thumbnails
    from tests.backend.conftest import png_bytes
    from tests.browser import BrowserNotInstalled, Chromium, chromium_binary

    try:
        chromium_binary()
    except BrowserNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    files = tmp_path / "files"
    files.mkdir()
    settings = Settings(
        redis_url=redis_url, data_dir=tmp_path, label_studio_url=fake_project.url, local_files_document_root=files
    )
    fake_project.tasks.update({t: {"image": f"/data/local-files/?d=img{t}.png"} for t in range(1, TASKS + 1)})
    fake_project.labeled.update(LABELED)
    for task in range(1, TASKS + 1):
        (files / f"img{task}.png").write_bytes(png_bytes(320, 240, colour(task)))  # 160x120 thumbnails
    expected = expected_ranking(settings, *fill_store(settings))
    missing = int(expected.task_ids[1])  # its image is gone: "no preview"
    (files / f"img{missing}.png").unlink()

    with TestClient(create_app(settings)) as client:
        assert run(client, 1)["status"] == "done"
        response = client.get("/v1/projects/1/priority", params={"format": "html"})
    assert response.status_code == 200
    assert response.headers["content-security-policy"].startswith("default-src 'none'; img-src data:")
    page = tmp_path / "priority.html"
    page.write_text(response.text)
    with Chromium(tmp_path, width=1300, height=1600) as browser:
        browser.open(page.as_uri())
        head = browser.evaluate(
            "Array.from(document.querySelectorAll('section.queue figure')).map(f => ({rank: Number(f.dataset.rank),"
            " task: Number(f.querySelector('[data-task]').dataset.task), text: f.innerText,"
            " img: (i => i && {complete: i.complete, width: i.naturalWidth, shown: i.getBoundingClientRect().width,"
            " x: i.getBoundingClientRect().x, y: i.getBoundingClientRect().y})(f.querySelector('img'))}))"
        )
        pairs = browser.evaluate(
            "Array.from(document.querySelectorAll('section.duplicates .pair')).map(p => ({"
            " copy: Number(p.querySelector('figure.duplicate [data-task]').dataset.task),"
            " original: Number(p.querySelector('figure.original [data-task]').dataset.task),"
            " loaded: Array.from(p.querySelectorAll('img')).every(i => i.complete && i.naturalWidth > 0),"
            " images: p.querySelectorAll('img').length}))"
        )
        shot = Image.open(io.BytesIO(browser.screenshot())).convert("RGB")

    # The head of the queue, in rank order, each with its own picture but the one whose image is missing.
    ranked = [int(t) for t, why in zip(expected.task_ids, expected.reason, strict=True) if why != "duplicate"]
    assert [tile["task"] for tile in head] == ranked[: len(head)] and len(head) == min(60, len(ranked))
    assert head[1]["task"] == missing and head[1]["img"] is None and "no preview" in head[1]["text"]
    for tile in head[:1] + head[2:]:
        assert tile["img"]["complete"] and tile["img"]["width"] == 160 and tile["img"]["shown"] > 100, tile
    # Painted: the first tile shows its task's colour.
    x, y = round(head[0]["img"]["x"]) + 30, round(head[0]["img"]["y"]) + 50  # inside the 160x120 picture
    painted = np.asarray(shot, dtype=np.float32)[y : y + 40, x : x + 100].reshape(-1, 3).mean(axis=0)
    assert np.abs(painted - np.array(colour(head[0]["task"]))).max() < 12, painted
    # The pushed-back copies, each beside its labeled original, both pictures loaded.
    assert {(p["copy"], p["original"]) for p in pairs} >= {(57, 1), (58, 2)}
    for pair in pairs:
        assert pair["loaded"] and pair["images"] == (1 if missing in (pair["copy"], pair["original"]) else 2), pair

    # Bounded in time: with no time left, no image is fetched at all.
    access = LabelStudioAccess(fake_project.url, None)
    assert fetch_thumbnails(1, [4, 5], access, None, settings, budget_s=0) == {}
    assert set(fetch_thumbnails(1, [4, 5], access, None, settings, budget_s=30)) == {4, 5}
