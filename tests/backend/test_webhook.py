"""``/webhook``: who may make the backend write into Label Studio, checked before the body is read."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from backend.config import Settings
from backend.main import create_app
from backend.queues import Queues
from tests.backend.conftest import serving
from tests.processes import DINOLABEL

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "label_studio"
CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/></RectangleLabels></View>'
)
SECRET = "the-webhook-secret"
EVENT = {
    "action": "TASKS_CREATED",
    "project": {"id": 3, "label_config": CONFIG},
    "tasks": [{"id": 1, "data": {"image": "/data/local-files/?d=a.png"}}],
}


@pytest.fixture
def settings(tiny_checkpoint: Path, tmp_path: Path) -> Settings:
    return Settings(
        detector_checkpoint=str(tiny_checkpoint),
        data_dir=tmp_path,
        embedded_worker=False,  # jobs stay queued: what is asserted is whether one was queued
        label_studio_url="http://127.0.0.1:9",
    )


def app_with(settings: Settings, **changes: object) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=changes)))


def planned(client: TestClient) -> int:
    """Bulk jobs queued for planning so far."""
    return Queues.on(client.app.state.service.connection).plan.count


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_without_a_secret_tasks_created_is_refused_and_other_events_acknowledged(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="backend.main"), app_with(settings) as client:
        refused = client.post("/webhook", json=EVENT)
        assert refused.status_code == 401 and "DINOLABEL_WEBHOOK_SECRET" in refused.json()["detail"]
        assert client.post("/webhook", json=EVENT, headers={"X-Dinolabel-Secret": ""}).status_code == 401
        annotation = json.loads((SAMPLES / "ls_to_backend_webhook.json").read_text())["body"]
        acknowledged = client.post("/webhook", json=annotation)
        assert acknowledged.status_code == 200 and acknowledged.json()["status"] == "ignored"
        assert planned(client) == 0
    assert "DINOLABEL_WEBHOOK_SECRET is not set" in caplog.text, "serve says so at start-up"


def test_the_secret_or_basic_auth_credentials_let_tasks_created_through(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    secured = {"webhook_secret": SecretStr(SECRET), "basic_auth_user": "ls", "basic_auth_pass": SecretStr("pw")}
    with caplog.at_level(logging.WARNING, logger="backend.main"), app_with(settings, **secured) as client:
        for refused in (
            {},
            {"X-Dinolabel-Secret": "wrong"},
            {"X-Dinolabel-Secret": "é-non-ascii".encode("latin-1")},  # a 401, not a 500
            basic("ls", "wrong"),
            {"Authorization": "Basic not-base64!"},
        ):
            assert client.post("/webhook", json=EVENT, headers=refused).status_code == 401, refused
        assert planned(client) == 0
        for accepted in ({"X-Dinolabel-Secret": SECRET}, basic("ls", "pw")):
            response = client.post("/webhook", json=EVENT, headers=accepted)
            assert response.status_code == 200 and response.json()["status"] == "queued", response.text
            job = client.get(f"/v1/jobs/{response.json()['job_id']}", headers=basic("ls", "pw")).json()
            assert (job["project"], job["source"], job["status"]) == (3, "webhook", "planning")
        assert planned(client) == 2
    assert "DINOLABEL_WEBHOOK_SECRET is not set" not in caplog.text


def test_basic_auth_credentials_count_only_where_basic_auth_is_configured(settings: Settings) -> None:
    with app_with(settings, webhook_secret=SecretStr(SECRET)) as client:
        assert client.post("/webhook", json=EVENT, headers=basic("ls", "pw")).status_code == 401


@pytest.fixture
def url(settings: Settings) -> Iterator[str]:
    with serving(create_app(settings.model_copy(update={"webhook_secret": SecretStr(SECRET)}))) as base:
        yield base


def test_credentials_are_checked_before_the_body_is_read(url: str) -> None:
    big = {**EVENT, "project": {**EVENT["project"], "description": "x" * (2 * 1024 * 1024)}}
    anonymous = httpx.post(url + "/webhook", json=big, timeout=30)
    assert anonymous.status_code == 413
    assert anonymous.json()["detail"] == (
        "request body too large: the limit is 1,048,576 bytes "
        "(webhooks without X-Dinolabel-Secret or basic-auth credentials)"
    )
    with_secret = httpx.post(url + "/webhook", json=big, headers={"X-Dinolabel-Secret": SECRET}, timeout=30)
    assert with_secret.status_code == 200 and with_secret.json()["status"] == "queued"


def test_an_anonymous_declared_length_is_refused_without_waiting_for_the_body(url: str) -> None:
    port = int(url.rsplit(":", 1)[1])
    head = b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)  # and no body: waiting for it would time out
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


def test_register_webhook_needs_the_secret(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINOLABEL_")}
    env |= {"DINOLABEL_LABEL_STUDIO_URL": "http://127.0.0.1:9", "DINOLABEL_LABEL_STUDIO_API_KEY": "k"}
    args = [DINOLABEL, "register-webhook", "--project", "1", "--backend-url", "http://backend:9090"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "DINOLABEL_WEBHOOK_SECRET" in done.stderr, done.stderr
