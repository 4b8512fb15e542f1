"""Which Label Studio gets which key (backend/ls_credentials.py), proved on real sockets.

The real app runs with its embedded Redis and worker (or a ``dinolabel worker`` process); a fake
Label Studio and a stranger host (tests/backend/conftest.py) record every request they receive,
Authorization header included.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

from backend.config import Settings
from backend.ls_credentials import label_studio_access
from backend.main import create_app
from tests.backend.conftest import LEGACY_TOKEN, FakeBucket, FakeLabelStudio
from tests.images import png
from tests.processes import DINOLABEL, Service, wait_for

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/><Label value="dog"/></RectangleLabels></View>'
)
SETUP_TOKEN = "setup-token-from-an-untrusted-caller"
HOOK_SECRET = "webhook-secret-of-this-test"
OPERATOR = "http://ls.internal:8080"


@pytest.mark.parametrize(
    ("configured", "setup", "expected"),
    [
        ((OPERATOR, "op-key"), ("http://attacker", "tok"), (OPERATOR, "op-key")),
        ((OPERATOR, "op-key"), (None, None), (OPERATOR, "op-key")),
        ((OPERATOR, None), ("http://attacker", "tok"), (OPERATOR, None)),
        ((OPERATOR, None), ("http://ls.internal:8080/", "tok"), (OPERATOR, "tok")),
        ((OPERATOR, None), ("https://ls.internal:8080", "tok"), (OPERATOR, None)),  # other scheme
        ((OPERATOR, None), ("http://ls.internal:8081", "tok"), (OPERATOR, None)),  # other port
        ((OPERATOR, None), ("ls.internal:8080", "tok"), (OPERATOR, None)),  # no scheme: no origin
        ((None, None), ("http://ls:8080", "tok"), ("http://ls:8080", "tok")),
        ((None, None), (None, None), (None, None)),
    ],
)
def test_one_rule_pairs_url_and_key(
    configured: tuple[str | None, str | None], setup: tuple[str | None, str | None], expected: tuple
) -> None:
    url, key = configured
    settings = Settings(label_studio_url=url, label_studio_api_key=SecretStr(key) if key else None)
    access = label_studio_access(settings, *setup)
    assert (access.url, access.api_key) == expected
    assert "op-key" not in repr(access) and "tok" not in repr(access)


def test_a_key_without_its_url_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="DINOLABEL_LABEL_STUDIO_URL"):
        Settings(label_studio_api_key=SecretStr("key-without-url"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINOLABEL_")}
    env |= {"DINOLABEL_LABEL_STUDIO_API_KEY": "key-without-url", "DINOLABEL_DATA_DIR": str(tmp_path)}
    for command in (["serve"], ["worker"]):
        done = subprocess.run([DINOLABEL, *command], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "DINOLABEL_LABEL_STUDIO_URL" in done.stderr and "Traceback" not in done.stderr
        assert "key-without-url" not in done.stderr, "pydantic quotes the input: never print its message"


@pytest.fixture
def settings(tiny_checkpoint: Path, tmp_path: Path) -> Settings:
    return Settings(
        detector_checkpoint=str(tiny_checkpoint),
        device="cpu",
        data_dir=tmp_path / "data",
        box_threshold=0.3,
        webhook_secret=SecretStr(HOOK_SECRET),
    )


@pytest.fixture
def client_for(settings: Settings) -> Iterator:
    """The real app (embedded Redis and worker) with Label Studio settings of the test's choice."""
    clients: list[TestClient] = []

    def start(**label_studio: object) -> TestClient:
        client = TestClient(create_app(settings.model_copy(update=label_studio)))
        clients.append(client.__enter__())
        wait_for(lambda: client.get("/health").json()["status"] == "UP", 60, "the embedded worker")
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def stored_values(connection: redis.Redis) -> list[bytes]:
    """Every value in Redis but the ``/setup`` records (which keep ``/setup``'s token by design),
    RQ's compressed job data unpacked."""
    values: list[bytes] = []
    for key in connection.scan_iter(count=1000):
        if key.startswith(b"dinolabel:project:"):
            continue
        kind = connection.type(key)
        if kind == b"string":
            found = [connection.get(key)]
        elif kind == b"hash":
            found = [part for item in connection.hgetall(key).items() for part in item]
        elif kind == b"list":
            found = connection.lrange(key, 0, -1)
        elif kind == b"set":
            found = list(connection.smembers(key))
        elif kind == b"zset":
            found = connection.zrange(key, 0, -1)
        elif kind == b"stream":
            found = [part for _, fields in connection.xrange(key) for item in fields.items() for part in item]
        else:
            raise AssertionError(f"unexpected Redis type {kind!r} of {key!r}")
        for value in found:
            values.append(value)
            with contextlib.suppress(zlib.error):
                values.append(zlib.decompress(value))
    assert values, "Redis holds the jobs of the test"
    return values


def test_the_operators_key_never_goes_where_setup_points(
    client_for, fake_ls: FakeLabelStudio, stranger: FakeBucket
) -> None:
    """Issue 6 item 2: URL and key configured, /setup names another host with its own token."""
    for name, seed in (("a", 1), ("b", 2)):
        fake_ls.uploads[f"/data/upload/5/{name}.png"] = png(64 + 8 * seed, 48, seed)
    fake_ls.proxied["s3://bucket/c.png"] = png(48, 64, 3)  # presigning served by Label Studio itself
    client = client_for(label_studio_url=fake_ls.url, label_studio_api_key=SecretStr(LEGACY_TOKEN))
    setup = {"project": "5.1", "schema": CONFIG, "hostname": stranger.url, "access_token": SETUP_TOKEN}
    assert client.post("/setup", json=setup).status_code == 200

    tasks = [
        {"id": 1, "data": {"image": "/data/upload/5/a.png"}},
        {"id": 2, "data": {"image": "s3://bucket/c.png"}},
        {"id": 3, "data": {"image": f"{stranger.url}/data/upload/5/b.png"}},  # a foreign host: never a token
    ]
    body = client.post("/predict", json={"tasks": tasks, "project": "5.1", "label_config": CONFIG}).json()
    assert [r["result"][0]["original_width"] if r["result"] else None for r in body["results"]] == [72, 48, None]

    event = {
        "action": "TASKS_CREATED",
        "project": {"id": 5, "label_config": CONFIG},
        "tasks": [
            {"id": 11, "data": {"image": "/data/upload/5/a.png"}},
            {"id": 12, "data": {"image": "s3://bucket/c.png"}},
        ],
    }
    fake_ls.tasks.update({t["id"]: t["data"] for t in event["tasks"]})  # Label Studio holds what it announces
    queued = client.post("/webhook", json=event, headers={"X-Dinolabel-Secret": HOOK_SECRET}).json()
    job = wait_for(
        lambda: (j := client.get(f"/v1/jobs/{queued['job_id']}").json())["status"] not in ("planning", "running") and j,
        60,
        "the bulk job",
    )
    assert (job["status"], job["done"], job["failed"]) == ("done", 2, 0), job
    stored = stored_values(client.app.state.service.connection)

    assert sorted(p["task"] for p in fake_ls.predictions) == [11, 12] and all(p["result"] for p in fake_ls.predictions)
    paths = {r.path for r in fake_ls.requests}
    assert {"/data/upload/5/a.png", "/tasks/2/presign/", "/tasks/12/presign/", "/api/tasks",
            "/api/projects/5/import/predictions"} <= paths  # fmt: skip
    assert {r.authorization for r in fake_ls.requests} == {f"Token {LEGACY_TOKEN}"}
    assert [r.authorization for r in stranger.requests if r.authorization] == []
    for secret in (LEGACY_TOKEN, SETUP_TOKEN):
        assert not [v for v in stored if secret.encode() in v], f"{secret} is stored in a job record or payload"


def test_setups_token_goes_only_to_setups_own_origin(
    client_for, fake_ls: FakeLabelStudio, stranger: FakeBucket
) -> None:
    """Operator URL without a key: /setup's token rides along only when /setup names that same origin."""
    fake_ls.uploads["/data/upload/6/a.png"] = png(64, 48, 1)
    fake_ls.uploads["/data/upload/7/a.png"] = png(80, 48, 2)
    client = client_for(label_studio_url=fake_ls.url)
    elsewhere = {"project": "6.1", "schema": CONFIG, "hostname": stranger.url, "access_token": SETUP_TOKEN}
    same = {"project": "7.1", "schema": CONFIG, "hostname": fake_ls.url + "/", "access_token": LEGACY_TOKEN}
    assert client.post("/setup", json=elsewhere).status_code == client.post("/setup", json=same).status_code == 200

    task = [{"id": 1, "data": {"image": "/data/upload/6/a.png"}}]
    refused = client.post("/predict", json={"tasks": task, "project": "6.1", "label_config": CONFIG}).json()
    task = [{"id": 1, "data": {"image": "/data/upload/7/a.png"}}]
    served = client.post("/predict", json={"tasks": task, "project": "7.1", "label_config": CONFIG}).json()

    assert refused["results"][0]["result"] == [], "no key for Label Studio: its images cannot be fetched"
    assert not [r for r in fake_ls.requests if SETUP_TOKEN in (r.authorization or "")]
    assert served["results"][0]["result"][0]["original_width"] == 80
    assert {r.authorization for r in fake_ls.seen("/data/upload/7/")} == {f"Token {LEGACY_TOKEN}"}
    assert stranger.requests == []


@pytest.mark.redis
@pytest.mark.slow
def test_a_worker_pairs_url_and_key_from_its_own_settings(
    redis_url: str, settings: Settings, fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    """The API reaches Label Studio by one address and key, the worker by another: the queued job
    names neither, and the worker uses its own."""
    fake_ls.uploads["/data/upload/8/a.png"] = png(64, 48, 1)
    api = settings.model_copy(
        update={
            "redis_url": redis_url,
            "label_studio_url": "http://127.0.0.1:9",
            "label_studio_api_key": SecretStr("key-the-api-holds"),
        }
    )
    env = {
        "DINOLABEL_REDIS_URL": redis_url,
        "DINOLABEL_DETECTOR_CHECKPOINT": settings.detector_checkpoint,
        "DINOLABEL_DEVICE": "cpu",
        "DINOLABEL_BOX_THRESHOLD": "0.3",
        "DINOLABEL_LABEL_STUDIO_URL": fake_ls.url,
        "DINOLABEL_LABEL_STUDIO_API_KEY": LEGACY_TOKEN,
    }
    worker = Service(["worker"], env, tmp_path / "worker.log").start()
    try:
        with TestClient(create_app(api)) as client:
            wait_for(lambda: client.get("/health").json()["status"] == "UP", 90, f"the worker\n{worker.log_tail()}")
            task = [{"id": 1, "data": {"image": "/data/upload/8/a.png"}}]
            body = client.post("/predict", json={"tasks": task, "project": "8.1", "label_config": CONFIG}).json()
            stored = stored_values(redis.Redis.from_url(redis_url))
    finally:
        worker.stop()
    assert body["results"][0]["result"][0]["original_width"] == 64
    assert [r.authorization for r in fake_ls.seen("/data/upload/8/")] == [f"Token {LEGACY_TOKEN}"]
    assert not [v for v in stored if b"key-the-api-holds" in v or LEGACY_TOKEN.encode() in v]
