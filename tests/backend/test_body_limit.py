"""``DINOLABEL_MAX_REQUEST_BYTES`` on every route, over real HTTP (uvicorn on a loopback port)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from backend.config import Settings
from backend.main import create_app
from tests.backend.conftest import serving

LIMIT = 64 * 1024
SECRET = "body-limit-secret"
CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/></RectangleLabels></View>'
)


@pytest.fixture(scope="module")
def url(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(
        detector_checkpoint=str(tiny_checkpoint),
        data_dir=tmp_path_factory.mktemp("data"),
        embedded_worker=False,
        max_request_bytes=LIMIT,
        webhook_secret=SecretStr(SECRET),
        label_studio_url="http://127.0.0.1:9",
    )
    with serving(create_app(settings)) as base:
        yield base


def raw_request(url: str, head: str, body: bytes = b"") -> bytes:
    """Send ``head`` (and ``body``) on a plain socket; the whole answer, up to the server's close."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read(url: str) -> None:
    # The body never comes: if the server waited for it, recv() would time out.
    head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
    answer = raw_request(url, head)
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert json.loads(body)["detail"] == (
        "request body too large: the limit is 65,536 bytes (DINOLABEL_MAX_REQUEST_BYTES)"
    )


def chunks(total: int, size: int = 16 * 1024) -> Iterator[bytes]:
    """A JSON object of about ``total`` bytes, sent without Content-Length (chunked)."""
    yield b'{"project": "1.1", "padding": "'
    for _ in range(total // size):
        yield b"x" * size
    yield b'"}'


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/predict", {}),
        ("/setup", {}),
        ("/webhook", {"X-Dinolabel-Secret": SECRET}),  # authorised: the service-wide limit applies
        ("/v1/projects/1/preannotate", {}),
    ],
)
def test_a_chunked_body_is_cut_off_once_past_the_limit(url: str, path: str, headers: dict[str, str]) -> None:
    response = httpx.post(url + path, content=chunks(4 * 1024 * 1024), headers=headers, timeout=30)
    assert response.status_code == 413, response.text
    assert "65,536 bytes (DINOLABEL_MAX_REQUEST_BYTES)" in response.json()["detail"]


def test_bodies_under_the_limit_pass_chunked_or_not(url: str) -> None:
    setup = {"project": "2.1", "schema": CONFIG, "padding": "x" * (LIMIT - 1000)}
    declared = httpx.post(url + "/setup", json=setup, timeout=30)
    assert declared.status_code == 200 and declared.json()["model_version"]
    chunked = httpx.post(
        url + "/setup",
        content=iter([json.dumps(setup).encode()]),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    assert chunked.status_code == 200 and chunked.json() == declared.json()


def test_refusals_are_counted_per_route(url: str) -> None:
    assert httpx.post(url + "/setup", content=chunks(LIMIT * 2), timeout=30).status_code == 413
    metrics = httpx.get(url + "/metrics", timeout=30).text
    assert 'dinolabel_http_requests_total{method="POST",route="/setup",status="413"}' in metrics
