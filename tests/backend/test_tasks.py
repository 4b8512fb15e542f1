"""Tasks are checked once where they enter: a malformed one fails alone, with its reason (issue 6, item 6).

The webhook test runs the real app (embedded Redis and worker, tiny model) against the fake Label
Studio of tests/backend/conftest.py, which records the predictions the bulk job writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from backend.config import Settings
from backend.main import create_app
from backend.routes.ls import SECRET_HEADER
from backend.tasks import check_tasks
from tests.backend.conftest import LEGACY_TOKEN, FakeLabelStudio
from tests.backend.test_ls_api import wait_until_up
from tests.images import png
from tests.processes import wait_for

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/><Label value="dog"/></RectangleLabels></View>'
)
SECRET = "hook-secret"
IMAGE = {"image": "/data/local-files/?d=img.png"}


def test_check_tasks_keeps_the_good_ones_in_order_and_says_why_it_refused_the_others() -> None:
    checked = check_tasks(
        [
            {"id": 11, "data": "not an object"},
            {"id": 12, "data": IMAGE, "meta": {"kept": "as sent"}},
            {"id": {"nested": 1}, "data": {}},
            {"id": True, "data": {}},
            {"id": 2**70, "data": {}},
            {"id": 1.5, "data": {}},
            {"id": "13", "data": {}},
            {"id": -1, "data": {}},
            "not a task",
            {"data": {}},
            {"id": 14},
            {"id": 12, "data": {"image": "again"}},
            {"id": 0, "data": {}},
        ]
    )
    assert checked.tasks == [{"id": 12, "data": IMAGE}, {"id": 0, "data": {}}]
    assert [r.task_id for r in checked.rejected] == [11, None, None, None, None, None, None, None, None, 14, 12]
    reasons = [r.reason for r in checked.rejected]
    assert reasons[0] == "task #0 refused: data: Input should be a valid dictionary"
    assert all("id: Input should be" in reason for reason in reasons[1:7]), reasons
    assert "less than or equal to 9223372036854775807" in reasons[3]
    assert reasons[7] == "task #8 refused: task: Input should be a valid dictionary or instance of Task"
    assert reasons[8] == "task #9 refused: it has no id"
    assert reasons[9] == "task #10 refused: data: Field required"
    assert reasons[10] == "task #11 refused: id 12 is given twice"


def test_check_tasks_never_echoes_the_refused_values() -> None:
    checked = check_tasks([{"id": "s3cret-looking-value", "data": ["root:x:0:0"]}])
    assert checked.tasks == [] and [r.task_id for r in checked.rejected] == [None]
    assert "s3cret" not in checked.rejected[0].reason and "root:x" not in checked.rejected[0].reason


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    (root / "img.png").write_bytes(png(72, 48, 5))
    return root


@pytest.fixture(scope="module")
def no_worker(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[TestClient]:
    """The app with its embedded Redis but no worker: what is refused at the door needs no model."""
    settings = Settings(
        detector_checkpoint=str(tiny_checkpoint),
        data_dir=tmp_path_factory.mktemp("data"),
        embedded_worker=False,
        label_studio_url="http://127.0.0.1:9",
        webhook_secret=SecretStr(SECRET),
        max_tasks_per_request=3,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def tasks_created(project: object, tasks: object, **extra: object) -> dict:
    return {"action": "TASKS_CREATED", "project": project, "tasks": tasks, **extra}


def test_a_malformed_task_fails_alone_and_the_valid_one_is_predicted_and_written(
    tiny_checkpoint: Path, docs: Path, fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    settings = Settings(
        detector_checkpoint=str(tiny_checkpoint),
        device="cpu",
        data_dir=tmp_path,
        local_files_document_root=docs,
        label_studio_url=fake_ls.url,
        label_studio_api_key=SecretStr(LEGACY_TOKEN),
        label_studio_retries=0,
        webhook_secret=SecretStr(SECRET),
        box_threshold=0.3,
    )
    tasks = [{"id": 11, "data": "not an object"}, {"id": 12, "data": IMAGE}, {"id": {"nested": 1}, "data": IMAGE}]
    fake_ls.tasks[12] = IMAGE  # Label Studio holds the valid task it announces (planning lists it from there)
    with TestClient(create_app(settings)) as client:
        wait_until_up(client)
        response = client.post(
            "/webhook", json=tasks_created({"id": 3, "label_config": CONFIG}, tasks), headers={SECRET_HEADER: SECRET}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["status"], body["tasks"], body["rejected"]) == ("queued", 1, 2)
        job = wait_for(
            lambda: (j := client.get(f"/v1/jobs/{body['job_id']}").json())["status"] in ("done", "failed") and j,
            60,
            "the job to end",
        )
    assert (job["status"], job["total"], job["done"], job["failed"], job["skipped"]) == ("done", 3, 1, 2, 0)
    failures = [(f["task_id"], f["reason"]) for f in job["failures"]]
    assert failures == [
        (11, "task #0 refused: data: Input should be a valid dictionary"),
        (None, "task #2 refused: id: Input should be a valid integer"),
    ]
    written = fake_ls.predictions
    assert [(p["task"], p["model_version"]) for p in written] == [(12, job["model_version"])]
    assert {r.path for r in fake_ls.seen("/api/projects/")} == {"/api/projects/3/import/predictions"}
    regions = written[0]["result"]
    assert regions, "the tiny model finds boxes at threshold 0.3"
    assert {r["value"]["rectanglelabels"][0] for r in regions} <= {"cat", "dog"}
    assert {(r["original_width"], r["original_height"]) for r in regions} == {(72, 48)}


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (tasks_created([1], [{"id": 1, "data": IMAGE}]), "project"),
        (tasks_created({"id": "1"}, [{"id": 1, "data": IMAGE}]), "project"),
        (tasks_created({"id": 1, "label_config": 5}, [{"id": 1, "data": IMAGE}]), "project"),
        (tasks_created(1, {"1": {"id": 1}}), "tasks"),
        (tasks_created(1, []), "tasks"),
        ({"action": "TASKS_CREATED", "project": 1}, "tasks"),
        ({"action": ["TASKS_CREATED"]}, "action"),
        ({"action": "X" * 129}, "action"),
    ],
)
def test_malformed_webhook_fields_get_a_422_naming_the_field(no_worker: TestClient, event: dict, field: str) -> None:
    response = no_worker.post("/webhook", json=event, headers={SECRET_HEADER: SECRET})
    assert response.status_code == 422, response.text
    assert [p["loc"] for p in response.json()["detail"]] == [["body", field]]


def test_a_webhook_without_any_usable_task_is_refused_with_the_reasons(no_worker: TestClient) -> None:
    event = tasks_created(1, [{"id": True, "data": IMAGE}, {"id": 2, "data": []}])
    response = no_worker.post("/webhook", json=event, headers={SECRET_HEADER: SECRET})
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "TASKS_CREATED without a usable task: task #0 refused: id: Input should be a valid integer; "
        "task #1 refused: data: Input should be a valid dictionary"
    )


def test_ids_given_to_the_job_api_are_integers_in_range(no_worker: TestClient) -> None:
    for bad in ([True], [1.5], ["7"], [2**63], [{"id": 1}]):
        response = no_worker.post("/v1/projects/1/preannotate", json={"task_ids": bad})
        assert response.status_code == 422, bad
        assert response.json()["detail"][0]["loc"] == ["body", "task_ids", 0]
    for project in ("1.5", "true", str(2**63), "²"):
        response = no_worker.post(f"/v1/projects/{project}/preannotate")
        assert response.status_code == 422, project
        assert response.json()["detail"][0]["loc"] == ["path", "project"]
