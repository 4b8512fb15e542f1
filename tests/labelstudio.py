"""A real Label Studio server for end-to-end tests, a small client for its HTTP API, and a proxy
that loses answers on purpose.

Label Studio lives in its own virtualenv (``make .venv-ls/.installed``); tests find its executable
through ``DINOLABEL_LABEL_STUDIO_BIN`` (default ``<repo>/.venv-ls/bin/label-studio``).

The server runs offline on loopback with SQLite, a legacy API token (``Authorization: Token ...``;
``Bearer`` is for JWT access tokens and answers 401 with this one), local-files serving from
``document_root``, and with the address checks off that would otherwise refuse a backend or a
webhook on 127.0.0.1 (``ML_BLOCK_LOCAL_IP``, ``SSRF_PROTECTION_ENABLED``).
"""

from __future__ import annotations

import atexit
import contextlib
import mimetypes
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_ENV = "DINOLABEL_LABEL_STUDIO_BIN"
DEFAULT_BIN = REPO_ROOT / ".venv-ls" / "bin" / "label-studio"
INSTALL_HINT = (
    "Install it with `make .venv-ls/.installed` (run in the repository root; it creates .venv-ls with "
    "label-studio==1.23.2, about a minute), or point DINOLABEL_LABEL_STUDIO_BIN at a label-studio "
    "executable. `make test` does both."
)
# What a local-files storage imports by default: image files only.
IMAGE_REGEX = r"(?i).*\.(png|jpe?g|gif|bmp|webp|tiff?)$"

_STARTED_RE = re.compile(r"Starting development server at https?://[^:/\s]+:(\d+)/")
# Inherited variables Label Studio would read in place of, or next to, ours.
_STRIPPED_ENV_PREFIXES = ("LABEL_STUDIO_", "HEARTEX_", "DJANGO_")
_STRIPPED_ENV = frozenset({"HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN", "PYTHONPATH", "PYTHONHOME"})


class LabelStudioNotInstalled(RuntimeError):
    """The Label Studio executable is missing."""


class LabelStudioStartError(RuntimeError):
    """The server did not come up; the message ends with the tail of its log."""


class LabelStudioAPIError(RuntimeError):
    """An API call answered with an unexpected status; carries the response body."""

    def __init__(self, response: httpx.Response, expected: Iterable[int]) -> None:
        self.status_code = response.status_code
        self.body = response.text
        body = self.body if len(self.body) <= 4000 else self.body[:4000] + f"... ({len(self.body)} chars)"
        super().__init__(
            f"{response.request.method} {response.request.url} -> {response.status_code} "
            f"(expected {', '.join(map(str, expected))}): {body}"
        )


def label_studio_binary() -> Path:
    """The label-studio executable to run, or LabelStudioNotInstalled saying how to install it."""
    configured = os.environ.get(BIN_ENV)
    path = Path(configured).expanduser() if configured else DEFAULT_BIN
    if not (path.is_file() and os.access(path, os.X_OK)):
        source = f"${BIN_ENV}" if configured else f"the default (${BIN_ENV} is not set)"
        raise LabelStudioNotInstalled(f"Label Studio executable not found at {path} ({source}). {INSTALL_HINT}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


class LabelStudioServer:
    """``label-studio start`` on 127.0.0.1 in its own process group, logging to ``log_path``.

    ``base_dir`` holds ``data/`` (SQLite, uploads; ``data_dir``), ``files/`` (``document_root``, what
    local-files storages may read) and ``label-studio.log``. Reusing a ``base_dir`` skips the
    migrations (first start about 20-45 s, later ones 3-5 s).
    """

    HOST = "127.0.0.1"

    def __init__(
        self,
        base_dir: Path,
        *,
        binary: Path | None = None,
        port: int | None = None,
        username: str = "dinolabel-tests@example.com",
        password: str | None = None,
        token: str | None = None,
        startup_timeout: float = 240.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.binary = binary if binary is not None else label_studio_binary()
        self.base_dir = Path(base_dir).resolve()
        self.data_dir = self.base_dir / "data"
        self.document_root = self.base_dir / "files"
        self.log_path = self.base_dir / "label-studio.log"
        self.username = username
        self.password = password or secrets.token_urlsafe(12)
        # Legacy tokens are at most 40 characters (and Label Studio ignores fewer than 6).
        self.token = token or secrets.token_hex(20)
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self._requested_port = port
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.HOST}:{self.port}"

    def absolute(self, url: str) -> str:
        """A task URL as stored (``/data/upload/...`` or absolute) made absolute."""
        return url if "://" in url else self.url + "/" + url.lstrip("/")

    def environment(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in _STRIPPED_ENV and not key.startswith(_STRIPPED_ENV_PREFIXES)
        }
        env.update(
            {
                "DJANGO_DB": "sqlite",
                "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
                "LABEL_STUDIO_USERNAME": self.username,
                "LABEL_STUDIO_PASSWORD": self.password,
                "LABEL_STUDIO_USER_TOKEN": self.token,
                "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
                # Sent to backends as `hostname` in /setup and prefixed to local-files task URLs;
                # without it /setup says http://localhost:PORT while the server listens on 127.0.0.1.
                "LABEL_STUDIO_HOST": self.url,
                "LATEST_VERSION_CHECK": "false",
                "COLLECT_ANALYTICS": "false",
                "SENTRY_DSN": "",
                "FRONTEND_SENTRY_DSN": "",
                "FEATURE_FLAGS_OFFLINE": "true",
                "ML_BLOCK_LOCAL_IP": "false",
                # Without this, POST /api/ml with a 127.0.0.1 backend answers 403 (the backend is saved
                # all the same: its auto-created <url>/webhook fails the check), and webhooks to
                # 127.0.0.1 are refused when created and when sent.
                "SSRF_PROTECTION_ENABLED": "false",
                "LOCAL_FILES_SERVING_ENABLED": "true",
                "LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self) -> Self:
        if self.process is not None:
            raise RuntimeError("Label Studio is already running")
        for directory in (self.data_dir, self.document_root):
            directory.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        # It silently moves to the next port when the one asked for is busy: then try another.
        for attempt in range(3):
            self.port = self._requested_port or free_port(self.HOST)
            if self._launch_and_wait(last_attempt=attempt == 2 or self._requested_port is not None):
                break
        self.startup_seconds = time.monotonic() - started
        atexit.register(self.stop)
        return self

    def _launch_and_wait(self, *, last_attempt: bool) -> bool:
        command = [
            str(self.binary),
            "start",
            "--no-browser",
            "--internal-host",
            self.HOST,
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
        ]
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {' '.join(command)}\n".encode())
            log.flush()
            log_start = log.tell()
            self.process = subprocess.Popen(
                command,
                cwd=self.base_dir,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self.process.poll() is not None:
                    code = self.process.returncode
                    self.process = None
                    self._fail(f"label-studio exited with code {code} while starting")
                match = _STARTED_RE.search(self._log_since(log_start))
                if match and int(match.group(1)) != self.port:
                    self.stop()
                    if last_attempt:
                        self._fail(f"port {self.port} was busy, label-studio took {match.group(1)} instead")
                    return False
                if match and self._answers(client):
                    break
                if time.monotonic() > deadline:
                    self.stop()
                    self._fail(f"label-studio did not answer on {self.url} within {self.startup_timeout:.0f} s")
                time.sleep(0.25)
            self._check_token(client)
        return True

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _answers(self, client: httpx.Client) -> bool:
        try:
            response = client.get(f"{self.url}/health")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def _check_token(self, client: httpx.Client) -> None:
        response = client.get(f"{self.url}/api/current-user/whoami", headers={"Authorization": f"Token {self.token}"})
        if response.status_code != 200 or response.json().get("email") != self.username:
            self.stop()
            self._fail(
                f"the legacy token is not accepted (GET /api/current-user/whoami -> {response.status_code}: "
                f"{response.text[:500]}); a data dir from an earlier run keeps its first user and token"
            )

    def _fail(self, reason: str) -> NoReturn:
        raise LabelStudioStartError(
            f"Label Studio ({self.binary}) failed to start: {reason}.\n"
            f"--- last lines of {self.log_path} ---\n{tail(self.log_path)}"
        )

    def stop(self) -> None:
        """Terminate the whole process group (SIGTERM, then SIGKILL after 10 s)."""
        atexit.unregister(self.stop)
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def __enter__(self) -> Self:
        return self.start() if self.process is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class LabelStudioAPI:
    """The few Label Studio API calls the tests need, authenticated with the legacy token."""

    def __init__(self, url: str, token: str, *, timeout: float = 180.0) -> None:
        # The timeout covers calls that wait on an ML backend (Label Studio gives /predict 100 s).
        self.url = url.rstrip("/")
        self.token = token
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"Token {token}"}, timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- plumbing

    def request(self, method: str, url: str, *, expected: Sequence[int] = (200, 201), **kwargs: Any) -> Any:
        """Send a request (``url`` relative to the server, or absolute) and return its JSON."""
        response = self.client.request(method, url, **kwargs)
        if response.status_code not in expected:
            raise LabelStudioAPIError(response, expected)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def get(self, url: str, **params: Any) -> Any:
        return self.request("GET", url, params=params or None)

    def download(self, url: str) -> httpx.Response:
        """GET a task's file URL (relative or absolute) with the token; the response, whatever its status."""
        return self.client.get(url)

    # -- projects and tasks

    def create_project(self, title: str, label_config: str, **fields: Any) -> dict[str, Any]:
        """POST /api/projects (title needs at least 3 characters)."""
        return self.request("POST", "/api/projects", json={"title": title, "label_config": label_config, **fields})

    def project(self, project_id: int) -> dict[str, Any]:
        return self.get(f"/api/projects/{project_id}")

    def list_tasks(self, project_id: int, *, page_size: int = 100) -> list[dict[str, Any]]:
        """All tasks of a project (GET /api/tasks, page by page; a page past the end answers 404)."""
        tasks: list[dict[str, Any]] = []
        page = 1
        while True:
            body = self.get("/api/tasks", project=project_id, page=page, page_size=page_size)
            tasks.extend(body["tasks"])
            if not body["tasks"] or len(tasks) >= body["total"]:
                return tasks
            page += 1

    def _task_ids(self, project_id: int) -> set[int]:
        return {task["id"] for task in self.list_tasks(project_id)}

    def _import(self, project_id: int, count: int, **kwargs: Any) -> list[int]:
        # Community edition imports synchronously and, asked to, lists the new task ids; otherwise
        # (an async import) the ids are what /api/tasks lists afterwards that it did not before.
        before = self._task_ids(project_id)
        body = self.request("POST", f"/api/projects/{project_id}/import", params={"return_task_ids": "true"}, **kwargs)
        if "task_ids" in body:
            ids = [int(task_id) for task_id in body["task_ids"]]
        else:
            ids = sorted(self._task_ids(project_id) - before)
        if len(ids) != count:
            raise AssertionError(f"import into project {project_id} made {len(ids)} tasks, not {count}: {body}")
        return ids

    def import_uploaded_images(self, project_id: int, files: Sequence[Path]) -> list[int]:
        """Upload image files as new tasks (``data.image = /data/upload/<project>/<prefix>-<name>``).

        Each file goes in its own multipart field: with one field name repeated only one file is kept.
        """
        parts = {
            f"file{index}": (
                path.name,
                path.read_bytes(),
                mimetypes.guess_type(path.name)[0] or "application/octet-stream",
            )
            for index, path in enumerate(files)
        }
        return self._import(project_id, len(files), files=parts)

    def import_tasks(self, project_id: int, tasks: Sequence[dict[str, Any]]) -> list[int]:
        """Import JSON tasks, e.g. ``{"data": {"image": "/data/local-files/?d=dir/a.png"}}``."""
        return self._import(project_id, len(tasks), json=list(tasks))

    def create_annotation(self, task_id: int, result: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        return self.request("POST", f"/api/tasks/{task_id}/annotations", json={"result": result, **fields})

    def update_task(self, task_id: int, data: dict[str, Any]) -> dict[str, Any]:
        """PATCH /api/tasks/{id} with new data (Label Studio 1.23 has no webhook event for a changed task)."""
        return self.request("PATCH", f"/api/tasks/{task_id}", json={"data": data})

    def delete_task(self, task_id: int) -> None:
        """DELETE /api/tasks/{id}; sends ``TASKS_DELETED`` (``tasks: [{"id": ...}]`` and the project)."""
        self.request("DELETE", f"/api/tasks/{task_id}", expected=(204,))

    def delete_tasks(self, project_id: int, task_ids: Sequence[int]) -> dict[str, Any]:
        """Data Manager action "Delete tasks"; sends ``TASKS_DELETED`` with the ids and the project."""
        return self.request(
            "POST",
            "/api/dm/actions",
            params={"id": "delete_tasks", "project": project_id},
            json={"selectedItems": {"all": False, "included": list(task_ids)}},
        )

    # -- local-files storage

    def add_local_storage(
        self, project_id: int, path: Path, *, regex_filter: str = IMAGE_REGEX, title: str | None = None
    ) -> int:
        """A local-files import storage on ``path`` (inside the server's document_root) serving
        ``/data/local-files/?d=<path relative to document_root>`` URLs (use_blob_urls: one task per file)."""
        body = self.request(
            "POST",
            "/api/storages/localfiles",
            json={
                "project": project_id,
                "path": str(path),
                "use_blob_urls": True,
                "regex_filter": regex_filter,
                "title": title or path.name,
            },
        )
        return int(body["id"])

    def sync_storage(self, storage_id: int, *, timeout: float = 120.0) -> dict[str, Any]:
        """Sync a local-files storage and wait until it completed (it does so within the call in
        Community edition); returns the storage, with ``last_sync_count``."""
        body = self.request("POST", f"/api/storages/localfiles/{storage_id}/sync")
        deadline = time.monotonic() + timeout
        while body.get("status") not in ("completed", "failed"):
            if time.monotonic() > deadline:
                raise AssertionError(f"storage {storage_id} sync did not finish in {timeout:.0f} s: {body}")
            time.sleep(0.5)
            body = self.get(f"/api/storages/localfiles/{storage_id}")
        if body["status"] == "failed":
            raise AssertionError(f"storage {storage_id} sync failed: {body.get('traceback') or body}")
        return body

    # -- ML backends, predictions, webhooks

    def connect_ml_backend(self, project_id: int, url: str, title: str = "dinolabel", **fields: Any) -> dict[str, Any]:
        """POST /api/ml: Label Studio calls the backend's /health and /setup (twice) before answering;
        ``state`` is ``CO`` when connected, ``model_version`` what /setup returned."""
        return self.request("POST", "/api/ml", json={"url": url, "project": project_id, "title": title, **fields})

    def ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        return self.get("/api/ml", project=project_id)

    def retrieve_predictions(self, project_id: int, task_ids: Sequence[int]) -> dict[str, Any]:
        """Data Manager action "Retrieve predictions". Synchronous: /health, /setup, then one /predict
        with the selected tasks lacking a prediction of the current model version. Answers 200
        "Retrieved N predictions" even when the backend failed and nothing was stored."""
        return self.request(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project_id},
            json={"selectedItems": {"all": False, "included": list(task_ids)}},
        )

    def predictions(self, task_id: int) -> list[dict[str, Any]]:
        return self.get("/api/predictions", task=task_id)

    def add_webhook(
        self,
        project_id: int,
        url: str,
        headers: dict[str, str] | None = None,
        actions: Sequence[str] | None = None,
        *,
        send_payload: bool = True,
    ) -> dict[str, Any]:
        """POST /api/webhooks. ``actions`` None: every action (``send_for_all_actions``); otherwise only
        those, e.g. ``ANNOTATION_CREATED``, ``ANNOTATION_UPDATED``, ``ANNOTATIONS_DELETED``,
        ``TASKS_CREATED``. Header names may use letters, digits, ``-`` and ``_`` (at most 10)."""
        payload: dict[str, Any] = {
            "project": project_id,
            "url": url,
            "headers": dict(headers or {}),
            "send_payload": send_payload,
            "send_for_all_actions": actions is None,
            "actions": list(actions or []),
            "is_active": True,
        }
        return self.request("POST", "/api/webhooks", json=payload)

    def webhooks(self, project_id: int) -> list[dict[str, Any]]:
        return self.get("/api/webhooks", project=project_id)


class DroppingProxy:
    """An HTTP proxy on loopback in front of a real Label Studio that loses answers on purpose.

    Every request is forwarded. For the first ``drops`` requests that ``should_drop(method, path)``
    selects, Label Studio's answer is read (the write is committed) and then the client's connection
    is closed without a byte of it: what a read time-out or a proxy reset does to a write.
    """

    HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})

    def __init__(self, upstream: str, *, drops: int, should_drop: Callable[[str, str], bool]) -> None:
        self.upstream = upstream.rstrip("/")
        self.should_drop = should_drop
        self.drops_left = drops
        self.dropped: list[tuple[str, str, int]] = []  # method, path, Label Studio's status
        self.forwarded: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        self._client = httpx.Client(timeout=300.0)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def _take_drop(self, method: str, path: str) -> bool:
        with self.lock:
            if self.drops_left > 0 and self.should_drop(method, path):
                self.drops_left -= 1
                return True
            return False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in proxy.HOP_BY_HOP}
                drop = proxy._take_drop(self.command, self.path.split("?", 1)[0])
                answer = proxy._client.request(
                    self.command, proxy.upstream + self.path, content=body or None, headers=headers
                )
                entry = (self.command, self.path.split("?", 1)[0], answer.status_code)
                with proxy.lock:
                    (proxy.dropped if drop else proxy.forwarded).append(entry)
                if drop:
                    self.close_connection = True
                    return
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in proxy.HOP_BY_HOP and key.lower() != "content-encoding":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

        return Handler
