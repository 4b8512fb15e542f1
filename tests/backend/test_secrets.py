"""No secret in the logs, none readable at rest (issue 6, item 5).

``dinolabel serve`` runs as a child process at log level debug, its log in a file, through requests
that use every kind of secret; then the whole log is searched for each of them.
"""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from backend.config import Settings
from backend.main import create_app
from tests.backend.conftest import LEGACY_TOKEN, FakeBucket, FakeLabelStudio
from tests.images import png
from tests.labelstudio import free_port
from tests.processes import Service, wait_for

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/><Label value="dog"/></RectangleLabels></View>'
)
PASSWORD = "basic-auth-password-4f1c"
HOOK_SECRET = "webhook-secret-9a7e"
SETUP_TOKEN = "setup-access-token-2d6b"
USERINFO = "userinfo-password-77d2"
QUERY_TOKEN = "query-token-5b3a"
SIGNATURE = "signature-value-c0ff"
PRESIGNED_SIGNATURE = "topsecret-sig"  # what the fake Label Studio puts in its presigned redirects


@pytest.mark.slow
@pytest.mark.parametrize("keys", ["operator", "setup"])
def test_no_secret_reaches_the_log(
    keys: str, tiny_checkpoint: Path, fake_ls: FakeLabelStudio, fake_bucket: FakeBucket, tmp_path: Path
) -> None:
    """``operator``: DINOLABEL_LABEL_STUDIO_URL and _API_KEY; ``setup``: the hostname and token of /setup."""
    fake_ls.uploads["/data/upload/5/a.png"] = png(64, 48, 1)
    fake_ls.cloud["s3://bucket/b.png"] = "/b.png"
    fake_bucket.objects["/b.png"] = png(72, 48, 2)
    fake_bucket.objects["/c.png"] = png(48, 64, 3)
    port = free_port()
    env = {
        "DINOLABEL_HOST": "127.0.0.1",
        "DINOLABEL_PORT": str(port),
        "DINOLABEL_LOG_LEVEL": "debug",
        "DINOLABEL_DATA_DIR": str(tmp_path / "data"),
        "DINOLABEL_DETECTOR_CHECKPOINT": str(tiny_checkpoint),
        "DINOLABEL_DEVICE": "cpu",
        "DINOLABEL_BOX_THRESHOLD": "0.3",
        "DINOLABEL_BASIC_AUTH_USER": "ls",
        "DINOLABEL_BASIC_AUTH_PASS": PASSWORD,
        "DINOLABEL_WEBHOOK_SECRET": HOOK_SECRET,
        "DINOLABEL_FETCH_ALLOW": "127.0.0.1",  # the bucket is a loopback server too
    }
    if keys == "operator":
        env |= {"DINOLABEL_LABEL_STUDIO_URL": fake_ls.url, "DINOLABEL_LABEL_STUDIO_API_KEY": LEGACY_TOKEN}
        setup = {"hostname": fake_ls.url, "access_token": SETUP_TOKEN}  # stored, never used
    else:
        fake_ls.legacy_token = SETUP_TOKEN
        setup = {"hostname": fake_ls.url, "access_token": SETUP_TOKEN}
    service = Service(["serve"], env, tmp_path / "serve.log").start()
    url = f"http://127.0.0.1:{port}"
    auth = ("ls", PASSWORD)
    try:
        wait_for(lambda: _status(url, auth) == "UP", 120, f"the service\n{service.log_tail()}")
        assert httpx.get(url + "/health", auth=("ls", "wrong"), timeout=10).status_code == 401
        response = httpx.post(url + "/setup", json={"project": "5.1", "schema": CONFIG, **setup}, auth=auth)
        assert response.status_code == 200, response.text

        bucket = fake_bucket.url.removeprefix("http://")
        images = [
            "/data/upload/5/a.png",  # Label Studio, with the key
            "s3://bucket/b.png",  # presigned by Label Studio, then the bucket with a signature
            f"http://user:{USERINFO}@{bucket}/c.png",
            f"http://{bucket}/c.png?token={QUERY_TOKEN}&X-Amz-Signature={SIGNATURE}",
            f"http://user:{USERINFO}@{bucket}/missing.png",  # failures are logged with their URL
            f"http://{bucket}/missing.png?token={QUERY_TOKEN}&X-Amz-Signature={SIGNATURE}",
        ]
        tasks = [{"id": i, "data": {"image": image}} for i, image in enumerate(images, start=1)]
        predicted = httpx.post(
            url + "/predict", json={"tasks": tasks, "project": "5.1", "label_config": CONFIG}, auth=auth, timeout=60
        )
        assert predicted.status_code == 200 and len(predicted.json()["results"]) == 6, predicted.text
        fetched = [bool(r["result"]) for r in predicted.json()["results"]]
        assert fetched == [True, True, True, True, False, False], "every URL with a secret was fetched"

        event = {"action": "TASKS_CREATED", "project": {"id": 5, "label_config": CONFIG},
                 "tasks": [{"id": 10 + t["id"], "data": t["data"]} for t in tasks]}  # fmt: skip
        fake_ls.tasks.update({t["id"]: t["data"] for t in event["tasks"]})  # Label Studio holds what it announces
        queued = httpx.post(url + "/webhook", json=event, headers={"X-Dinolabel-Secret": HOOK_SECRET}, timeout=30)
        assert queued.status_code == 200, queued.text
        job_url = f"{url}/v1/jobs/{queued.json()['job_id']}"
        job = wait_for(
            lambda: (j := httpx.get(job_url, auth=auth, timeout=10).json())["status"] == "done" and j, 60, "the job"
        )
        assert (job["done"], job["failed"]) == (4, 2), job
    finally:
        service.stop()
    assert fake_ls.predictions, "the bulk job wrote through Label Studio's API"
    assert {r.authorization for r in fake_ls.seen("/data/upload/")} == {f"Token {fake_ls.legacy_token}"}

    log = service.log.read_text(encoding="utf-8", errors="replace")
    secrets = [PASSWORD, HOOK_SECRET, SETUP_TOKEN, USERINFO, QUERY_TOKEN, SIGNATURE, PRESIGNED_SIGNATURE]
    secrets += [LEGACY_TOKEN, base64.b64encode(f"ls:{PASSWORD}".encode()).decode()]
    assert [s for s in secrets if s in log] == []
    assert "DEBUG" in log and "token=***" in log and "X-Amz-Signature=***" in log, "failures logged, redacted"


def _status(url: str, auth: tuple[str, str]) -> str | None:
    try:
        return httpx.get(url + "/health", auth=auth, timeout=2).json().get("status")
    except (httpx.HTTPError, ValueError):
        return None


def test_embedded_redis_files_are_private(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A data folder we create, and one left open by an earlier version: both end up private."""
    earlier = tmp_path / "earlier"
    (earlier / "redis").mkdir(parents=True, mode=0o755)
    settings = Settings(detector_checkpoint=str(tiny_checkpoint), data_dir=earlier, embedded_worker=False)
    for data_dir in (tmp_path / "fresh", earlier):
        with TestClient(create_app(settings.model_copy(update={"data_dir": data_dir}))) as client:
            setup = {"project": "1.1", "schema": CONFIG, "hostname": "http://ls:8080", "access_token": SETUP_TOKEN}
            assert client.post("/setup", json=setup).status_code == 200
        # The service stopped: the embedded Redis saved its data (the /setup record and its token) on the way out.
        folder = data_dir / "redis"
        assert b"dinolabel:project:1" in (folder / "redis.db").read_bytes()
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}
        assert modes == dict.fromkeys(modes, 0o600) and "redis.db" in modes, modes
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700, "created by us: private too"
