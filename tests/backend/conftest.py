"""Real HTTP servers on loopback standing in for Label Studio and for a cloud bucket.

They speak plain HTTP through ``http.server`` so the code under test runs its real httpx stack:
what gets asserted is what actually crossed a socket (paths, Authorization headers, redirects).
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"
HUGE_SIZE = 8 * 1024 * 1024
TRICKLE_SIZE = 100_000
"""What ``/trickle`` declares in Content-Length before sending one byte a second."""


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def make_jwt(payload: dict[str, Any]) -> str:
    """A JWT-shaped token (header.payload.signature); the fakes never check signatures."""
    header = {"alg": "HS256", "typ": "JWT"}
    return ".".join([_b64url(json.dumps(header).encode()), _b64url(json.dumps(payload).encode()), _b64url(b"sig")])


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a token made by :func:`make_jwt`."""
    segment = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def png_bytes(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A real PNG, so the bytes that travel are what Label Studio would serve."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


def wait_for_answer(url: str) -> int:
    """An RQ job function for tests: holds its worker until ``url`` answers (e.g. ``/slow``)."""
    return httpx.get(url, timeout=30).status_code


@dataclass
class _FakeServer:
    url: str = ""
    requests: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)  # set: slow answers end

    def record(self, handler: BaseHTTPRequestHandler) -> Seen:
        parts = urlsplit(handler.path)
        seen = Seen(
            method=handler.command,
            path=parts.path,
            query=parse_qs(parts.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in handler.headers.items()},
        )
        with self.lock:
            self.requests.append(seen)
        return seen

    def seen(self, path_prefix: str = "/") -> list[Seen]:
        with self.lock:
            return [r for r in self.requests if r.path.startswith(path_prefix)]


@dataclass
class FakeBucket(_FakeServer):
    """A "cloud bucket" (or any other web server) on a second port: never needs auth.

    ``/trickle`` declares ``TRICKLE_SIZE`` bytes and sends one a second until ``release`` is set.
    """

    objects: dict[str, bytes] = field(default_factory=dict)
    forbidden: set[str] = field(default_factory=set)
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location


@dataclass
class FakeLabelStudio(_FakeServer):
    """The parts of Label Studio 1.23 that an ML backend downloads images from and writes predictions to."""

    bucket: FakeBucket | None = None
    legacy_token: str = LEGACY_TOKEN
    personal_token: str = field(
        default_factory=lambda: make_jwt(
            {"token_type": "refresh", "exp": int(time.time()) + 86400, "jti": "pat-1", "user_id": 1}
        )
    )
    access_ttl: float = 3600.0
    uploads: dict[str, bytes] = field(default_factory=dict)
    local_files: dict[str, bytes] = field(default_factory=dict)
    storage_data: dict[str, bytes] = field(default_factory=dict)
    cloud: dict[str, str] = field(default_factory=dict)  # URI -> bucket path to redirect to
    proxied: dict[str, bytes] = field(default_factory=dict)  # URI -> bytes served by presign itself
    presign_calls: list[tuple[int, str]] = field(default_factory=list)
    predictions: list[dict[str, Any]] = field(default_factory=list)  # rows imported through the API
    tasks: dict[int, dict[str, Any]] = field(default_factory=dict)  # id -> data, for GET /api/tasks
    labeled: set[int] = field(default_factory=set)  # tasks listed with is_labeled true
    issued: list[str] = field(default_factory=list)
    valid_access: set[str] = field(default_factory=set)

    @property
    def refresh_count(self) -> int:
        with self.lock:
            return len(self.issued)

    def revoke_access_tokens(self) -> None:
        """Make every issued access token fail with 401, as after a server-side revocation."""
        with self.lock:
            self.valid_access.clear()

    def issue_access(self) -> str:
        with self.lock:
            token = make_jwt(
                {
                    "token_type": "access",
                    "exp": int(time.time() + self.access_ttl),
                    "jti": f"access-{len(self.issued) + 1}",
                    "user_id": 1,
                }
            )
            self.issued.append(token)
            self.valid_access.add(token)
        return token

    def authorised(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        if scheme == "Token":
            return value == self.legacy_token
        if scheme == "Bearer":
            with self.lock:
                if value not in self.valid_access:
                    return False
            return jwt_claims(value)["exp"] > time.time()
        return False


class _Handler(BaseHTTPRequestHandler):
    """Shared plumbing: quiet logs, helpers to answer, no tracebacks when a client hangs up."""

    server_version = "FakeServer/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        """Keep pytest output clean."""

    def answer(self, status: int, body: bytes = b"", content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str, status: int = 303, *, cookie: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        if cookie is not None:
            self.send_header("Set-Cookie", cookie)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def stream(self, total: int, *, declare_length: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if declare_length:
            self.send_header("Content-Length", str(total))
        self.end_headers()
        chunk = b"\0" * 65536
        try:
            for _ in range(total // len(chunk)):
                self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading: that is the behaviour under test

    def trickle(self, release: threading.Event) -> None:
        """Promise ``TRICKLE_SIZE`` bytes, then send one byte a second (each read sees data in time)."""
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(TRICKLE_SIZE))
        self.end_headers()
        try:
            while not release.wait(1.0):
                self.wfile.write(b"\0")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: that is the behaviour under test


class _BucketHandler(_Handler):
    server: Any

    def do_POST(self) -> None:
        self.do_GET()  # recorded like a GET: a write that reaches the wrong host must show up

    def do_GET(self) -> None:
        state: FakeBucket = self.server.state
        seen = state.record(self)
        if seen.path == "/trickle":
            self.trickle(state.release)
        elif seen.path in state.redirects:
            self.redirect(state.redirects[seen.path], 302)
        elif seen.path in state.forbidden:
            self.answer(403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>", "application/xml")
        elif seen.path in state.objects:
            self.answer(200, state.objects[seen.path], "image/png")
        else:
            self.answer(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")


class _LabelStudioHandler(_Handler):
    server: Any
    PRESIGN: ClassVar[re.Pattern[str]] = re.compile(r"/tasks/(\d+)/(?:presign|resolve)/")
    IMPORT_PREDICTIONS: ClassVar[re.Pattern[str]] = re.compile(r"/api/projects/(\d+)/import/predictions")

    def do_POST(self) -> None:
        state: FakeLabelStudio = self.server.state
        seen = state.record(self)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.IMPORT_PREDICTIONS.fullmatch(seen.path):
            if not state.authorised(seen.authorization):
                self.answer(401, b'{"detail": "Authentication credentials were not provided."}')
                return
            rows = json.loads(body)
            with state.lock:
                state.predictions.extend(rows)
            self.answer(201, json.dumps({"created": len(rows)}).encode())
            return
        if seen.path != "/api/token/refresh/":
            self.answer(404)
            return
        try:
            refresh = json.loads(body)["refresh"]
        except (ValueError, KeyError, TypeError):
            self.answer(400, b'{"refresh": ["This field is required."]}')
            return
        if refresh != state.personal_token:
            self.answer(401, b'{"detail": "Token is invalid or expired", "code": "token_not_valid"}')
            return
        self.answer(200, json.dumps({"access": state.issue_access()}).encode())

    def do_GET(self) -> None:
        state: FakeLabelStudio = self.server.state
        seen = state.record(self)
        path = seen.path
        if path == "/slow":
            state.release.wait(10)
            self.answer(200, b"late", "image/png")
            return
        if path == "/huge":
            self.stream(HUGE_SIZE, declare_length=True)
            return
        if path == "/huge-unsized":
            self.stream(HUGE_SIZE, declare_length=False)  # HTTP/1.0: body ends when the socket closes
            return
        if path == "/redirect-loop":
            self.redirect("/redirect-loop", 302)
            return
        if path == "/login-page":
            self.answer(200, b"<!doctype html><title>Login</title>", "text/html; charset=utf-8")
            return
        if not state.authorised(seen.authorization):
            self.answer(401, b'{"detail": "Authentication credentials were not provided."}')
            return
        if path.startswith("/data/upload/"):
            self.serve(state.uploads.get(path))
        elif path in ("/data/local-files", "/data/local-files/"):
            self.serve(state.local_files.get(seen.query.get("d", [""])[-1]))
        elif path in ("/storage-data/uploaded", "/storage-data/uploaded/"):
            self.serve(state.storage_data.get(seen.query.get("filepath", [""])[-1]))
        elif match := self.PRESIGN.fullmatch(path):
            self.presign(state, int(match.group(1)), seen.query.get("fileuri", [""])[-1])
        elif path == "/api/tasks":  # what bulk jobs list and check
            with state.lock:
                tasks, predictions, labeled = dict(state.tasks), list(state.predictions), set(state.labeled)
            self.answer(*task_listing(seen, tasks, predictions, labeled))
        elif path == "/api/predictions":  # what bulk jobs ask before writing (?project= or ?task=)
            task = seen.query.get("task", [None])[-1]
            with state.lock:
                rows = [p for p in state.predictions if task is None or str(p["task"]) == task]
            self.answer(200, json.dumps(rows).encode())
        elif path == "/api/projects/1/thumbnail.png":
            self.serve(b"thumbnail-bytes")
        elif path == "/api/current-user/token":  # what a token sent to the API could read
            self.answer(200, json.dumps({"token": state.legacy_token}).encode())
        else:
            self.answer(404)

    def serve(self, data: bytes | None) -> None:
        if data is None:
            self.answer(404, b'{"detail": "Not found."}')
        else:
            self.answer(200, data, "image/png")

    def presign(self, state: FakeLabelStudio, task_id: int, fileuri: str) -> None:
        # Label Studio decodes urlsafe base64 and falls back to the raw (unquoted) value.
        try:
            uri = base64.urlsafe_b64decode(fileuri.encode()).decode()
        except ValueError:
            uri = fileuri
        with state.lock:
            state.presign_calls.append((task_id, uri))
        if uri in state.proxied:
            self.serve(state.proxied[uri])
        elif uri in state.cloud and state.bucket is not None:
            target = state.cloud[uri]
            # Django may set a session cookie; it must not follow us to the bucket (same IP there).
            self.redirect(
                f"{state.bucket.url}{target}?X-Amz-Signature=topsecret-sig&X-Amz-Expires=60",
                cookie="sessionid=ls-session-secret; Path=/",
            )
        else:
            self.answer(404)


@dataclass
class FakeProjectAPI(_FakeServer):
    """Label Studio's task listing and prediction import over tasks kept here, with scripted faults.

    ``faults`` is consumed one per request, in order (``None``: answer normally):
    ``"500"`` / ``"429"`` / ``"429:<Retry-After>"`` answer that without doing anything; ``"stall"``
    waits (past the client's time-out) without doing anything; ``"commit-then-500"``,
    ``"commit-then-drop"`` (the connection closes without an answer) and ``"commit-then-stall"`` do
    the work first: the answer is what gets lost.
    """

    project: int = 1
    tasks: dict[int, dict[str, Any]] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    faults: list[str | None] = field(default_factory=list)
    posted: list[list[dict[str, Any]]] = field(default_factory=list)
    stall_seconds: float = 3.0
    import_seconds: float = 0.0  # how long an import takes before it commits
    listing_gate: threading.Event = field(default_factory=threading.Event)  # cleared: task listings wait
    import_gate: threading.Event = field(default_factory=threading.Event)  # cleared: imports wait
    labeled: set[int] = field(default_factory=set)  # tasks listed with is_labeled true
    views: dict[int, dict[str, Any]] = field(default_factory=dict)  # Data Manager tabs by id
    actions: list[dict[str, Any]] = field(default_factory=list)  # the Data Manager actions' bodies
    annotations: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # task -> its annotations
    label_config: str | None = None  # GET /api/projects/{project} answers it when set

    def __post_init__(self) -> None:
        self.listing_gate.set()
        self.import_gate.set()

    def next_fault(self) -> str | None:
        with self.lock:
            return self.faults.pop(0) if self.faults else None

    def per_task(self, model_version: str) -> dict[int, int]:
        """How many predictions of ``model_version`` each task holds."""
        with self.lock:
            counts: dict[int, int] = {}
            for p in self.predictions:
                if p["model_version"] == model_version:
                    counts[p["task"]] = counts.get(p["task"], 0) + 1
            return counts


def task_listing(
    seen: Seen,
    tasks: dict[int, dict[str, Any]],
    predictions: list[dict[str, Any]],
    labeled: set[int] | None = None,
    annotations: dict[int, list[dict[str, Any]]] | None = None,
) -> tuple[int, bytes]:
    """``GET /api/tasks`` as Label Studio answers it, for the Data Manager queries the bulk jobs send:
    ``selectedItems``, filters on id (greater, between), on model versions (contains), on data fields
    (regex, equal, contains), on annotation results (contains: a substring of their JSON) and on the number
    of annotations (greater), the ordering ``-tasks:completed_at`` (newest annotation first), pages; the
    ``is_labeled`` field of the ``labeled`` tasks; ``predictions`` (each task's, in the order imported) and
    ``annotations`` only with ``fields=all``, as Label Studio's serializer does."""
    annotations = annotations or {}
    query = json.loads(seen.query.get("query", ["{}"])[-1])
    ids = selected_ids(query, tasks, predictions, annotations)
    if query.get("ordering") == ["-tasks:completed_at"]:
        newest = {t: max((str(a["created_at"]) for a in annotations.get(t, [])), default="") for t in ids}
        ids.sort(key=lambda t: newest[t], reverse=True)
    elif query.get("ordering"):
        raise AssertionError(f"the fake does not know the ordering {query['ordering']}")
    versions: dict[int, list[str]] = {}
    for p in predictions:
        versions.setdefault(p["task"], []).append(p["model_version"])
    page, page_size = int(seen.query.get("page", ["1"])[-1]), int(seen.query.get("page_size", ["100"])[-1])
    chosen = ids[(page - 1) * page_size : page * page_size]
    if page > 1 and not chosen:
        return 404, b'{"detail": "Invalid page."}'
    fields = seen.query.get("include", ["id,data,predictions_model_versions"])[-1].split(",")
    listed = []
    for task_id in chosen:
        task = {"id": task_id, "data": tasks[task_id], "is_labeled": task_id in (labeled or ()),
                "predictions_model_versions": ",".join(sorted(set(versions.get(task_id, []))))}  # fmt: skip
        if seen.query.get("fields") == ["all"]:
            task["predictions"] = [p for p in predictions if p["task"] == task_id]
            task["annotations"] = annotations.get(task_id, [])
        listed.append({k: v for k, v in task.items() if k in fields})
    return 200, json.dumps({"total": len(ids), "tasks": listed}).encode()


def selected_ids(
    query: dict[str, Any],
    tasks: dict[int, dict[str, Any]],
    predictions: list[dict[str, Any]],
    annotations: dict[int, list[dict[str, Any]]] | None = None,
) -> list[int]:
    """The ids of the tasks a Data Manager query (``selectedItems`` and ``filters``) names, in id order."""
    selected = query.get("selectedItems") or {"all": True}
    versions: dict[int, list[str]] = {}
    for p in predictions:
        versions.setdefault(p["task"], []).append(p["model_version"])
    ids = sorted(tasks if selected.get("all") else [t for t in selected["included"] if t in tasks])
    for item in (query.get("filters") or {}).get("items", []):
        ids = [t for t in ids if _matches(t, item, versions.get(t, []), tasks[t], (annotations or {}).get(t, []))]
    return ids


def _matches(
    task_id: int, item: dict[str, Any], versions: list[str], data: dict[str, Any], annotations: list[dict[str, Any]]
) -> bool:
    value = item["value"]
    if item["filter"] == "filter:tasks:annotations_results" and item["operator"] == "contains":
        return any(value in json.dumps(a["result"]) for a in annotations)  # Label Studio: cast(result as text)
    if item["filter"] == "filter:tasks:total_annotations" and item["operator"] == "greater":
        return len(annotations) > value
    if item["filter"].startswith("filter:tasks:data."):
        held = data.get(item["filter"].removeprefix("filter:tasks:data."))
        text = "" if held is None else str(held)
        if item["operator"] == "regex":
            return held is not None and re.search(value, text) is not None
        if item["operator"] == "equal":
            return text == value
        if item["operator"] == "contains":
            return value in text
    if item["filter"] == "filter:tasks:id" and item["operator"] == "greater":
        return task_id > value
    if item["filter"] == "filter:tasks:id" and item["operator"] == "in":
        return value["min"] <= task_id <= value["max"]
    if item["filter"] == "filter:tasks:predictions_model_versions" and item["operator"] == "contains":
        return any(v in version for v in value for version in versions)
    raise AssertionError(f"the fake does not know the filter {item}")


def add_data_field(body: dict[str, Any], tasks: dict[int, dict[str, Any]], predictions: list[dict[str, Any]]) -> None:
    """Label Studio's "Add Or Modify Data Field" action (``data_manager/actions/experimental.py``): a
    ``String`` sets the value on the selected tasks, ``replace("a", "b")`` is ``str.replace`` on those
    that hold the field."""
    for task in selected_ids(body, tasks, predictions):
        data = tasks[task]
        if body["value_type"] == "String":
            data[body["value_name"]] = body["value"]
            continue
        command, args = body["value"].split("(", 1)
        assert command == "replace", body["value"]
        old, new = json.loads("[" + args.rstrip(")") + "]")
        if body["value_name"] in data:
            data[body["value_name"]] = str(data[body["value_name"]]).replace(old, new)


class _ProjectHandler(_Handler):
    server: Any

    def do_GET(self) -> None:
        state: FakeProjectAPI = self.server.state
        seen = state.record(self)
        fault = state.next_fault()
        if self.fail_before(state, fault):
            return
        if seen.path == "/api/dm/views" and seen.query.get("project") == [str(state.project)]:
            with state.lock:
                views = [{"id": i, "project": state.project, "data": d} for i, d in sorted(state.views.items())]
            self.answer(200, json.dumps(views).encode())
            return
        if seen.path == f"/api/projects/{state.project}" and state.label_config is not None:
            self.answer(200, json.dumps({"id": state.project, "label_config": state.label_config}).encode())
            return
        if seen.path != "/api/tasks" or seen.query.get("project") != [str(state.project)]:
            self.answer(404, b'{"detail": "Not found."}')
            return
        if seen.query.get("include") == ["id,data"]:
            state.listing_gate.wait(30)
        with state.lock:
            tasks, predictions, labeled = dict(state.tasks), list(state.predictions), set(state.labeled)
            annotations = {task: list(rows) for task, rows in state.annotations.items()}
        status, body = task_listing(seen, tasks, predictions, labeled, annotations)
        if status != 200:
            self.answer(status, body)
            return
        self.finish_with(state, fault, body)

    def do_POST(self) -> None:
        state: FakeProjectAPI = self.server.state
        seen = state.record(self)
        try:
            rows = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        except ValueError:  # the client died while sending
            self.close_connection = True
            return
        fault = state.next_fault()
        if self.fail_before(state, fault):
            return
        if seen.path == "/api/dm/actions" and seen.query.get("id") == ["add_data_field"]:
            with state.lock:
                state.actions.append(rows)
                add_data_field(rows, state.tasks, state.predictions)
            self.finish_with(state, fault, b'{"processed_items": 0}')
            return
        if seen.path == "/api/dm/views":
            with state.lock:
                number = max(state.views, default=0) + 1
                state.views[number] = rows["data"]
            self.finish_with(state, fault, json.dumps({"id": number, **rows}).encode())
            return
        if seen.path != f"/api/projects/{state.project}/import/predictions":
            self.answer(404, b'{"detail": "Not found."}')
            return
        unknown = [row["task"] for row in rows if row["task"] not in state.tasks]
        if unknown:
            self.answer(400, json.dumps({"detail": f"tasks {unknown} are not in the project"}).encode())
            return
        state.import_gate.wait(30)
        time.sleep(state.import_seconds)
        with state.lock:
            state.posted.append(rows)
            state.predictions.extend(rows)
        self.finish_with(state, fault, json.dumps({"created": len(rows)}).encode())

    def do_PATCH(self) -> None:
        """A tab's update (``PATCH /api/dm/views/{id}``)."""
        state: FakeProjectAPI = self.server.state
        seen = state.record(self)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        number = int(seen.path.rsplit("/", 1)[-1]) if seen.path.startswith("/api/dm/views/") else None
        with state.lock:
            if number not in state.views:
                self.answer(404, b'{"detail": "Not found."}')
                return
            state.views[number] = body["data"]
        self.answer(200, json.dumps({"id": number, **body}).encode())

    def do_DELETE(self) -> None:
        state: FakeProjectAPI = self.server.state
        seen = state.record(self)
        number = int(seen.path.rsplit("/", 1)[-1]) if seen.path.startswith("/api/dm/views/") else None
        with state.lock:
            found = state.views.pop(number, None) if number is not None else None  # type: ignore[arg-type]
        self.answer(204 if found is not None else 404)

    def fail_before(self, state: FakeProjectAPI, fault: str | None) -> bool:
        """Faults that answer before any work is done; True when one did."""
        if fault == "500":
            self.answer(500, b'{"detail": "Internal Server Error"}')
        elif fault is not None and fault.startswith("429"):
            _, _, after = fault.partition(":")
            self.send_response(429)
            if after:
                self.send_header("Retry-After", after)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif fault == "stall":
            time.sleep(state.stall_seconds)
            self.close_connection = True
        else:
            return False
        return True

    def finish_with(self, state: FakeProjectAPI, fault: str | None, body: bytes) -> None:
        """The work is done: answer, or lose the answer as ``fault`` says."""
        if fault == "commit-then-500":
            self.answer(500, b'{"detail": "Internal Server Error"}')
        elif fault == "commit-then-drop":
            self.close_connection = True  # no status line: the client sees the connection close
        elif fault == "commit-then-stall":
            time.sleep(state.stall_seconds)
            self.close_connection = True
        else:
            self.answer(200, body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the default backlog of 5 drops SYNs under 8 parallel downloads


@contextmanager
def _serve(handler: type[BaseHTTPRequestHandler], state: _FakeServer) -> Iterator[None]:
    server = _Server(("127.0.0.1", 0), handler)
    server.state = state  # type: ignore[attr-defined]
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def fake_bucket() -> Iterator[FakeBucket]:
    """A second server, on another port, that plays the cloud bucket behind presigned URLs."""
    state = FakeBucket()
    with _serve(_BucketHandler, state):
        yield state


@pytest.fixture
def stranger() -> Iterator[FakeBucket]:
    """Another host that records whatever reaches it: the address an untrusted ``/setup`` names."""
    state = FakeBucket()
    with _serve(_BucketHandler, state):
        yield state


@pytest.fixture
def fake_ls(fake_bucket: FakeBucket) -> Iterator[FakeLabelStudio]:
    """A fake Label Studio: 401 without a valid Token/Bearer, JWT refresh, presign redirects."""
    state = FakeLabelStudio(bucket=fake_bucket)
    with _serve(_LabelStudioHandler, state):
        yield state


@pytest.fixture
def fake_project() -> Iterator[FakeProjectAPI]:
    """A fake Label Studio project API (task listing, prediction import) with scripted faults."""
    state = FakeProjectAPI()
    with _serve(_ProjectHandler, state):
        yield state


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """An ASGI app served by uvicorn on a loopback port (a thread of the test); yields its base URL.

    For what TestClient cannot show: raw sockets, chunked uploads, what is read before answering.
    """
    import uvicorn

    from tests.labelstudio import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
