"""``dinolabel preannotate`` when its API is lost, unreachable or answers an error (issue 6, item 9).

The command runs as a child process, as a user runs it; the API is a real ``dinolabel serve`` killed
mid-job, or a small local server answering what a proxy in front of it might.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.backend.conftest import _FakeServer, _Handler, _serve
from tests.labelstudio import free_port
from tests.processes import DINOLABEL, Service, health, wait_for

LOGIN_PAGE = b"<!doctype html><title>Sign in</title><p>secret-looking-html-body</p>"


def preannotate(api: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [DINOLABEL, "preannotate", "--project", "4", "--api", api, "--interval", "0.2", "--quiet", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_an_api_that_goes_away_mid_job_gets_one_line_and_a_non_zero_status(
    tiny_checkpoint: Path, tmp_path: Path, redis_url: str
) -> None:
    port = free_port()
    env = {
        "DINOLABEL_DETECTOR_CHECKPOINT": str(tiny_checkpoint),
        "DINOLABEL_DEVICE": "cpu",
        "DINOLABEL_DATA_DIR": str(tmp_path / "data"),
        "DINOLABEL_HOST": "127.0.0.1",
        "DINOLABEL_PORT": str(port),
        # The session's Redis, and no worker: the job stays planning and the command keeps polling. (An
        # embedded Redis would outlive the SIGKILL below: it runs in a session of its own.)
        "DINOLABEL_REDIS_URL": redis_url,
        "DINOLABEL_LABEL_STUDIO_URL": "http://127.0.0.1:9",
    }
    api = Service(["serve"], env, tmp_path / "serve.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: health(url).get("status"), 90, f"the API\n{api.log_tail()}")
        cli = preannotate(url)
        assert cli.stderr is not None
        started = cli.stderr.readline()  # the job exists once this line is out
        job = re.fullmatch(r"job ([0-9a-f]+) for project 4, model version \S+\n", started)
        assert job, started
        api.kill()  # gone without a goodbye, as a crashed or restarted API
        out, err = cli.communicate(timeout=60)
    finally:
        api.kill()
    assert cli.returncode == 3
    assert out == ""
    (line,) = err.splitlines()
    job_id = job.group(1)
    assert re.fullmatch(
        rf"dinolabel preannotate: the API at {re.escape(url)} stopped answering \((ConnectError|ReadError|"
        rf"RemoteProtocolError)\); job {job_id} goes on in the workers: follow it with `GET /v1/jobs/{job_id}` "
        r"when the API is back, or rerun `dinolabel preannotate --project 4` \(it only predicts what is missing\)",
        line,
    ), line


def test_an_api_unreachable_at_start_gets_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out, err = preannotate(url).communicate(timeout=60)
    assert (out, err) == (
        "",
        f"dinolabel preannotate: cannot reach the API at {url} (ConnectError); is `dinolabel serve` running there?\n",
    )


class _ProxyHandler(_Handler):
    """Plays what may stand in front of the API: an error page, a login page, the API's own 409."""

    server: object

    def do_POST(self) -> None:
        state: _FakeServer = self.server.state  # type: ignore[attr-defined]
        seen = state.record(self)
        if seen.path == "/conflict/v1/projects/4/preannotate":
            self.answer(409, b'{"detail": "no Label Studio address for project 4"}')
        elif seen.path == "/login/v1/projects/4/preannotate":
            self.answer(200, LOGIN_PAGE, "text/html; charset=utf-8")
        else:
            self.answer(502, LOGIN_PAGE, "text/html")


@pytest.fixture
def proxy() -> Iterator[_FakeServer]:
    state = _FakeServer()
    with _serve(_ProxyHandler, state):
        yield state


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", f"POST /v1/projects/4/preannotate: HTTP 502: no reason given (text/html, {len(LOGIN_PAGE)} bytes)"),
        ("/conflict", "POST /v1/projects/4/preannotate: HTTP 409: no Label Studio address for project 4"),
        (
            "/login",
            f"POST /v1/projects/4/preannotate: the answer is not the API's JSON (text/html, {len(LOGIN_PAGE)} bytes); "
            "is --api right?",
        ),
    ],
)
def test_http_errors_are_said_in_one_line_without_the_page(proxy: _FakeServer, path: str, message: str) -> None:
    cli = preannotate(proxy.url + path)
    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 3
    assert (out, err) == ("", f"dinolabel preannotate: {message}\n")


# --- register-webhook ---------------------------------------------------------------------------------------


@dataclass
class _Hooks(_FakeServer):
    """Label Studio's webhooks API (``GET``/``POST /api/webhooks``): the hooks it holds, and the ones posted."""

    hooks: list[dict[str, Any]] = field(default_factory=list)
    posted: list[dict[str, Any]] = field(default_factory=list)


class _HooksHandler(_Handler):
    server: object

    def do_GET(self) -> None:
        state: _Hooks = self.server.state  # type: ignore[attr-defined]
        state.record(self)
        self.answer(200, json.dumps(state.hooks).encode())

    def do_POST(self) -> None:
        state: _Hooks = self.server.state  # type: ignore[attr-defined]
        state.record(self)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        hook = {**body, "id": len(state.hooks) + 1}
        state.posted.append(body)
        state.hooks.append(hook)
        self.answer(201, json.dumps(hook).encode())


ANNOTATIONS = ["ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"]


def test_register_webhook_adds_only_the_events_no_hook_with_the_secret_sends_yet() -> None:
    target = "http://backend:9090/webhook"
    state = _Hooks(
        hooks=[
            # Registered by an older version: TASKS_CREATED only, with the secret.
            {"id": 1, "url": target, "actions": ["TASKS_CREATED"], "headers": {"X-Dinolabel-Secret": "s3"}},
            # Without the secret (made in Label Studio's UI): /webhook would refuse its TASKS_DELETED.
            {"id": 2, "url": target, "actions": ["TASKS_DELETED"], "headers": {}},
            # With the secret, but switched off in Label Studio.
            {
                "id": 3,
                "url": target,
                "actions": ["TASKS_DELETED"],
                "headers": {"X-Dinolabel-Secret": "s3"},
                "is_active": False,
            },
        ]
    )
    env = {**os.environ, "DINOLABEL_WEBHOOK_SECRET": "s3"}

    def register() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DINOLABEL, "register-webhook", "--project", "4", "--backend-url", "http://backend:9090/",
             "--label-studio-url", state.url, "--api-key", "legacy-token-0123456789"],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip

    with _serve(_HooksHandler, state):
        first = register()
        assert first.returncode == 0, first.stderr
        assert state.posted == [
            {"project": 4, "url": target, "send_payload": True, "send_for_all_actions": False,
             "headers": {"X-Dinolabel-Secret": "s3"}, "actions": ["TASKS_DELETED", *ANNOTATIONS], "is_active": True}
        ]  # fmt: skip
        assert first.stdout == (
            "webhook 4: project 4 sends TASKS_DELETED, ANNOTATION_CREATED, ANNOTATIONS_CREATED, ANNOTATION_UPDATED "
            f"and ANNOTATIONS_DELETED to {target}\n"
        )
        again = register()
        assert again.returncode == 0, again.stderr
        assert again.stdout == (
            "project 4 already sends TASKS_CREATED, TASKS_DELETED, ANNOTATION_CREATED, ANNOTATIONS_CREATED, "
            f"ANNOTATION_UPDATED and ANNOTATIONS_DELETED to {target}\n"
        )
        assert len(state.posted) == 1
    (listing, *_) = state.seen("/api/webhooks")
    assert listing.query == {"project": ["4"]} and listing.authorization == "Token legacy-token-0123456789"
