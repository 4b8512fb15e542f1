"""The Label Studio harness against a real server: projects, uploads, local files, image access,
an ML backend (a stand-in, started here) and webhooks."""

from __future__ import annotations

import io
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from PIL import Image

from tests.labelstudio import LabelStudioAPI, LabelStudioServer

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]

LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/><Label value="dog"/></RectangleLabels></View>'
)
MODEL_VERSION = "stand-in-v1"
BOX = {"x": 25.0, "y": 25.0, "width": 50.0, "height": 50.0, "rotation": 0, "rectanglelabels": ["cat"]}


# -- a stand-in ML backend: answers /health, /setup, /predict (one fixed box per task), records all


@dataclass
class Seen:
    at: float
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class StandIn:
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, entry: Seen) -> None:
        with self.lock:
            self.seen.append(entry)

    def requests(self, path: str | None = None) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if path is None or s.path == path]

    def clear(self) -> None:
        with self.lock:
            self.seen.clear()


def _handler(state: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, body: Any) -> None:
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _record(self, body: Any) -> None:
            state.record(Seen(time.monotonic(), self.command, self.path, dict(self.headers), body))

        def do_GET(self) -> None:
            self._record(None)
            self._answer({"status": "UP", "model_class": "StandIn"})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.loads(raw) if raw else None
            self._record(body)
            if self.path == "/setup":
                self._answer({"model_version": MODEL_VERSION})
            elif self.path == "/predict":
                results = [
                    {
                        "model_version": MODEL_VERSION,
                        "score": 0.87,
                        "result": [
                            {
                                "id": f"box-{task['id']}",
                                "from_name": "label",
                                "to_name": "image",
                                "type": "rectanglelabels",
                                "value": dict(BOX),
                                "score": 0.87,
                            }
                        ],
                    }
                    for task in body["tasks"]
                ]
                self._answer({"results": results})
            else:  # /webhook (registered by Label Studio itself) and webhooks added by tests
                self._answer({})

    return Handler


@pytest.fixture(scope="module")
def stand_in() -> Iterator[StandIn]:
    state = StandIn()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="stand-in-ml-backend", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# -- a project with two uploaded images and two from a local-files storage


def png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Project:
    id: int
    uploaded: dict[int, bytes]  # task id -> PNG bytes
    local: dict[int, bytes]
    local_relpaths: dict[int, str]  # task id -> path under the document root

    @property
    def task_ids(self) -> list[int]:
        return sorted([*self.uploaded, *self.local])

    def png(self, task_id: int) -> bytes:
        return self.uploaded.get(task_id) or self.local[task_id]


@pytest.fixture(scope="module")
def label_studio_project(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI], tmp_path_factory: pytest.TempPathFactory
) -> Project:
    server, api = label_studio
    tag = uuid.uuid4().hex[:6]
    project = api.create_project(f"harness-{tag}", LABEL_CONFIG)
    assert project["label_config"] == LABEL_CONFIG

    upload_dir = tmp_path_factory.mktemp("uploads")
    uploads = {upload_dir / f"up_{tag}_{i}.png": png(64 + 8 * i, 48 + 4 * i, (200, 40 * i, 30)) for i in range(2)}
    for path, data in uploads.items():
        path.write_bytes(data)
    uploaded_ids = api.import_uploaded_images(project["id"], list(uploads))
    assert len(uploaded_ids) == 2
    tasks = {task["id"]: task for task in api.list_tasks(project["id"])}
    uploaded = {}
    for task_id in uploaded_ids:
        name = tasks[task_id]["data"]["image"].rsplit("-", 1)[-1]
        uploaded[task_id] = next(data for path, data in uploads.items() if path.name == name)

    local_dir = server.document_root / f"project{project['id']}-{tag}"
    local_dir.mkdir()
    local_files = {f"local_{tag}_{i}.png": png(72 + 8 * i, 40 + 6 * i, (30, 90, 60 * i)) for i in range(2)}
    for name, data in local_files.items():
        (local_dir / name).write_bytes(data)
    (local_dir / "notes.txt").write_text("not an image: the storage's regex_filter leaves it out\n")
    storage_id = api.add_local_storage(project["id"], local_dir)
    storage = api.sync_storage(storage_id)
    assert storage["last_sync_count"] == 2, storage

    local, local_relpaths = {}, {}
    for task in api.list_tasks(project["id"]):
        if task["id"] in uploaded:
            continue
        relpath = f"{local_dir.name}/{task['storage_filename'].rsplit('/', 1)[-1]}"
        local[task["id"]] = local_files[relpath.rsplit("/", 1)[-1]]
        local_relpaths[task["id"]] = relpath
    return Project(project["id"], uploaded, local, local_relpaths)


def test_tasks_carry_upload_and_local_files_urls(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI], label_studio_project: Project
) -> None:
    server, api = label_studio
    tasks = {task["id"]: task for task in api.list_tasks(label_studio_project.id)}
    assert sorted(tasks) == label_studio_project.task_ids
    for task_id in label_studio_project.uploaded:
        image = tasks[task_id]["data"]["image"]
        assert re.fullmatch(rf"/data/upload/{label_studio_project.id}/[0-9a-f]{{8}}-up_\w+_\d\.png", image), image
    for task_id, relpath in label_studio_project.local_relpaths.items():
        # Absolute: Label Studio prefixes local-files URLs with its HOST (the harness sets it to its URL).
        assert tasks[task_id]["data"]["image"] == f"{server.url}/data/local-files/?d={quote(relpath)}"
        assert tasks[task_id]["storage_filename"] == str(server.document_root / relpath)
    assert api.project(label_studio_project.id)["task_number"] == 4


def test_task_images_are_served_with_the_token_only(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI], label_studio_project: Project
) -> None:
    server, api = label_studio
    for task in api.list_tasks(label_studio_project.id):
        url = task["data"]["image"]
        with_token = api.download(url)
        assert with_token.status_code == 200, (url, with_token.text[:300])
        assert with_token.headers["content-type"] == "image/png"
        assert with_token.content == label_studio_project.png(task["id"]), url
        without = httpx.get(server.absolute(url), timeout=30)
        assert without.status_code in (401, 403), (url, without.status_code)


def test_retrieve_predictions_from_an_ml_backend(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI], label_studio_project: Project, stand_in: StandIn
) -> None:
    server, api = label_studio
    project_id, task_ids = label_studio_project.id, label_studio_project.task_ids
    stand_in.clear()

    backend = api.connect_ml_backend(project_id, stand_in.url, title="stand-in")
    assert backend["state"] == "CO", backend
    assert backend["model_version"] == MODEL_VERSION
    setup = stand_in.requests("/setup")[-1]
    assert setup.body["access_token"] == server.token
    assert setup.body["hostname"] == server.url
    assert setup.body["schema"] == LABEL_CONFIG
    assert "Authorization" not in setup.headers
    # Label Studio registers <backend>/webhook for the project by itself.
    assert any(hook["url"] == f"{stand_in.url}/webhook" for hook in api.webhooks(project_id))

    stand_in.clear()
    answer = api.retrieve_predictions(project_id, task_ids)
    assert answer["processed_items"] == 4, answer
    assert [(s.method, s.path) for s in stand_in.requests()] == [
        ("GET", "/health"),
        ("POST", "/setup"),
        ("POST", "/predict"),
    ]
    predict = stand_in.requests("/predict")[0].body
    assert sorted(task["id"] for task in predict["tasks"]) == task_ids  # one batch
    assert predict["label_config"] == LABEL_CONFIG

    for task_id in task_ids:
        predictions = api.predictions(task_id)
        assert len(predictions) == 1, predictions
        assert predictions[0]["model_version"] == MODEL_VERSION
        assert predictions[0]["task"] == task_id
        assert predictions[0]["result"][0]["value"] == BOX

    # Asked again with the same model version: /health and /setup, no /predict, nothing new stored.
    stand_in.clear()
    api.retrieve_predictions(project_id, task_ids)
    assert [s.path for s in stand_in.requests()] == ["/health", "/setup"]
    assert all(len(api.predictions(task_id)) == 1 for task_id in task_ids)


def test_webhook_is_sent_with_its_headers(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI], label_studio_project: Project, stand_in: StandIn
) -> None:
    _, api = label_studio
    secret = uuid.uuid4().hex
    hook = api.add_webhook(
        label_studio_project.id, f"{stand_in.url}/hook", {"X-Dinolabel-Secret": secret}, ["ANNOTATION_CREATED"]
    )
    assert hook["actions"] == ["ANNOTATION_CREATED"]
    assert hook["send_for_all_actions"] is False
    assert hook["headers"] == {"X-Dinolabel-Secret": secret}

    task_id = label_studio_project.task_ids[0]
    stand_in.clear()
    annotation = api.create_annotation(
        task_id, [{"from_name": "label", "to_name": "image", "type": "rectanglelabels", "value": dict(BOX)}]
    )
    deadline = time.monotonic() + 10
    while not stand_in.requests("/hook") and time.monotonic() < deadline:
        time.sleep(0.1)
    [sent] = stand_in.requests("/hook")
    assert sent.headers["X-Dinolabel-Secret"] == secret
    assert sent.body["action"] == "ANNOTATION_CREATED"
    assert sent.body["annotation"]["id"] == annotation["id"]
    assert sent.body["task"]["id"] == task_id
    assert sent.body["project"]["id"] == label_studio_project.id
