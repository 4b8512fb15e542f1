"""The Label Studio API calls the bulk jobs need, with a retry policy per kind of call.

- Reads (``GET``) are retried on transient failures (connection errors, time-outs, 429 and 5xx) with
  exponential back-off, waiting at least what a ``Retry-After`` header asks.
- Writes are never sent twice blindly. One that surely did not reach Label Studio (the connection
  could not be opened, or a 429 said it was not processed) is sent again; one whose answer was lost
  (a read time-out, a dropped connection, a 5xx from Label Studio or a proxy) may have been committed,
  and raises ``WriteUncertain``. ``import_predictions`` then asks Label Studio which of its tasks now
  hold a prediction of the model version and writes only the others.
- Other 4xx answers are not retried (they will not get better) and raise ``LabelStudioError``. Its
  message names the status but never quotes the body (it reaches job records, and the URL may not be
  Label Studio's): the body goes to this process's log.

Tokens of both kinds work (``LabelStudioAuth``).
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import httpx

from backend.ls_auth import LabelStudioAuth

log = logging.getLogger(__name__)

READS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_WAIT = 60.0
"""Seconds at most between two tries, whatever a ``Retry-After`` header asks."""
PAGE_SIZE = 1000
"""Tasks per page when listing a project (~1,500 tasks/s from Label Studio 1.23 on SQLite)."""
PREDICTION_PAGE_SIZE = 500
"""Tasks per page when listing predictions with their boxes (up to ~30 KB a task at 100 boxes)."""
ANNOTATION_PAGE_SIZE = 100
"""Tasks per page when listing annotations with their regions (``annotated_with``)."""
MAX_IDS_PER_QUERY = 200
"""Task ids named in one ``GET /api/tasks`` query: they travel in the URL, which proxies limit (8 KB)."""
MAX_IDS_PER_ACTION = 10_000
"""Task ids named in one Data Manager action (in the body). Label Studio filters them with one SQL
``IN`` list: SQLite refuses more than 32,766 variables in a statement."""
# Failures where the request never reached Label Studio: safe to send again, writes included.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _version_filter(model_version: str) -> dict[str, Any]:
    """The Data Manager's filter item on predictions' model versions (it matches a part of a version:
    callers compare the versions they get back exactly)."""
    return {
        "filter": "filter:tasks:predictions_model_versions",
        "operator": "contains",
        "type": "List",
        "value": [model_version],
    }


def _id_after(task_id: int) -> dict[str, Any]:
    """A Data Manager filter: tasks whose id is greater than ``task_id``."""
    return {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": task_id}


_MEDIA_TYPE = re.compile(r"[\w.+-]{1,40}/[\w.+-]{1,60}")


class LabelStudioError(RuntimeError):
    """A Label Studio API call failed for good (after retries, or with a 4xx)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class WriteUncertain(LabelStudioError):
    """A write whose answer was lost: Label Studio may have committed it. Check before writing again."""


def retry_after(response: httpx.Response, *, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date), None without one."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


class LabelStudioClient:
    """A small synchronous client over one Label Studio and token."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        *,
        timeout: float = 30.0,
        write_timeout: float = 300.0,
        retries: int = 5,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``write_timeout`` bounds a write's wait for its answer: long, since an import into a big
        project takes seconds, and a write that times out must be verified before anything else."""
        if not url:
            raise LabelStudioError("no Label Studio URL: set DINOLABEL_LABEL_STUDIO_URL or connect the model")
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.write_timeout = write_timeout
        self.sleep = sleep
        auth = LabelStudioAuth(self.url, api_key, transport=transport) if api_key else None
        self._http = httpx.Client(base_url=self.url, auth=auth, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call under the policy of its method; returns the decoded JSON (or None)."""
        read = method.upper() in READS
        if not read:
            kwargs.setdefault("timeout", httpx.Timeout(self._http.timeout.connect, read=self.write_timeout))
        for attempt in range(self.retries + 1):
            wait: float | None = None
            try:
                response = self._http.request(method, path, **kwargs)
            except _NOT_SENT as exc:
                reason, status = f"{type(exc).__name__}: {exc}", None
            except httpx.TransportError as exc:
                reason, status = f"{type(exc).__name__}: {exc}", None
                if not read:
                    raise WriteUncertain(f"{method} {path}: no answer ({reason})") from exc
            else:
                if response.status_code < 400:
                    return response.json() if response.content else None
                reason, status = _status_reason(method, path, response), response.status_code
                if status == 429:
                    wait = retry_after(response)
                elif status >= 500 and not read:
                    raise WriteUncertain(f"{method} {path} failed: {reason}", status=status)
                elif status < 500:
                    raise LabelStudioError(f"{method} {path} failed: {reason}", status=status)
                else:
                    wait = retry_after(response)
            if attempt < self.retries:
                delay = min(max(self.delay(attempt), wait or 0.0), MAX_WAIT)
                log.warning("%s %s failed (%s); retry %d in %.1f s", method, path, reason, attempt + 1, delay)
                self.sleep(delay)
        raise LabelStudioError(f"{method} {path} failed after {self.retries + 1} tries: {reason}", status=status)

    def delay(self, attempt: int) -> float:
        """Exponential back-off: ``backoff`` seconds before the first retry, doubling, at most 30 s."""
        return min(self.backoff * 2**attempt, 30.0)

    def project(self, project_id: int) -> dict[str, Any]:
        return self.request("GET", f"/api/projects/{project_id}")

    def task_page(
        self, project_id: int, *, after: int = 0, ids: Sequence[int] | None = None, page_size: int = PAGE_SIZE
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of a project's tasks as ``{id, data}``, in id order, and how many match in all.

        The page holds the tasks after task ``after`` (a cursor: pages do not shift when tasks are
        added or deleted meanwhile, and a page costs the same at the end of a big project as at its
        start), or those of ``ids`` that exist. Only ``id`` and ``data`` are asked for.
        """
        query: dict[str, Any]
        if ids is not None:
            query = {"selectedItems": {"all": False, "included": list(ids)}}
            page_size = max(len(ids), 1)
        else:
            query = {"filters": {"conjunction": "and", "items": [_id_after(after)]}}
        params = {"project": project_id, "page_size": page_size, "include": "id,data", "query": json.dumps(query)}
        body = self.request("GET", "/api/tasks", params=params)
        tasks = body.get("tasks", []) if isinstance(body, dict) else body or []
        total = int(body.get("total", len(tasks))) if isinstance(body, dict) else len(tasks)
        return [{"id": t["id"], "data": t.get("data") or {}} for t in tasks], total

    def tasks_by_id(self, project_id: int, task_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """``{id: {id, data, is_labeled}}`` of those of ``task_ids`` that exist in the project: one listing
        per 200 ids (they travel in the URL), never one call per task."""
        ids = list(dict.fromkeys(task_ids))
        found: dict[int, dict[str, Any]] = {}
        for start in range(0, len(ids), MAX_IDS_PER_QUERY):
            chunk = ids[start : start + MAX_IDS_PER_QUERY]
            query = {"selectedItems": {"all": False, "included": chunk}}
            params = {
                "project": project_id,
                "page_size": len(chunk),
                "include": "id,data,is_labeled",
                "query": json.dumps(query),
            }
            body = self.request("GET", "/api/tasks", params=params)
            for task in body.get("tasks", []) if isinstance(body, dict) else body or []:
                found[int(task["id"])] = {
                    "id": int(task["id"]),
                    "data": task.get("data") or {},
                    "is_labeled": bool(task.get("is_labeled")),
                }
        return found

    def labeled_task_ids(self, project_id: int, *, page_size: int = PAGE_SIZE) -> set[int]:
        """Every task of the project that Label Studio counts as labeled (``is_labeled``: annotations up
        to the project's overlap), listed in pages of ``page_size`` after an id cursor (only ``id`` and
        ``is_labeled`` travel)."""
        labeled: set[int] = set()
        after = 0
        while True:
            query = {"filters": {"conjunction": "and", "items": [_id_after(after)]}}
            params = {
                "project": project_id,
                "page_size": page_size,
                "include": "id,is_labeled",
                "query": json.dumps(query),
            }
            body = self.request("GET", "/api/tasks", params=params)
            tasks = body.get("tasks", []) if isinstance(body, dict) else body or []
            labeled.update(int(t["id"]) for t in tasks if t.get("is_labeled"))
            if len(tasks) < page_size:
                return labeled
            after = max(int(t["id"]) for t in tasks)

    def tasks_holding(self, project_id: int, task_ids: Iterable[int], model_version: str) -> set[int]:
        """Which of ``task_ids`` hold a prediction of ``model_version``: one query per 200 tasks (their
        ids travel in the URL)."""
        ids = list(dict.fromkeys(task_ids))
        held: set[int] = set()
        for start in range(0, len(ids), MAX_IDS_PER_QUERY):
            chunk = ids[start : start + MAX_IDS_PER_QUERY]
            held |= self._holding(project_id, model_version, {"all": False, "included": chunk}, [], len(chunk))
        return held

    def tasks_holding_between(self, project_id: int, first: int, last: int, model_version: str) -> set[int]:
        """Tasks with ids from ``first`` to ``last`` that hold a prediction of ``model_version``: the
        check of a whole page of ``task_page`` in one query."""
        between = {"filter": "filter:tasks:id", "operator": "in", "type": "Number"}
        between["value"] = {"min": first, "max": last}
        return self._holding(project_id, model_version, None, [between], PAGE_SIZE)

    def _holding(
        self,
        project_id: int,
        model_version: str,
        selected: dict[str, Any] | None,
        items: list[dict[str, Any]],
        page_size: int,
    ) -> set[int]:
        """The Data Manager's filter on model versions matches a part of a version, so the versions
        each task holds (which the filter makes Label Studio list) are compared exactly. Label Studio
        joins them with commas: a version of another model that contains a comma could, in theory,
        look like ours."""
        version = _version_filter(model_version)
        query: dict[str, Any] = {"filters": {"conjunction": "and", "items": [*items, version]}}
        if selected is not None:
            query["selectedItems"] = selected
        held: set[int] = set()
        page = 1
        while True:
            params = {
                "project": project_id,
                "page": page,
                "page_size": page_size,
                "include": "id,predictions_model_versions",
                "query": json.dumps(query),
            }
            try:
                body = self.request("GET", "/api/tasks", params=params)
            except LabelStudioError as exc:
                if exc.status == 404 and page > 1:  # past the last page
                    return held
                raise
            tasks = body.get("tasks", []) if isinstance(body, dict) else []
            for task in tasks:
                if model_version in str(task.get("predictions_model_versions") or "").split(","):
                    held.add(int(task["id"]))
            if len(tasks) < page_size or page * page_size >= int(body.get("total", 0)):
                return held
            page += 1

    def predictions_of(
        self, project_id: int, model_version: str, *, page_size: int = PREDICTION_PAGE_SIZE
    ) -> dict[int, list[dict[str, Any]]]:
        """``{task id: result}`` of every task holding a prediction of ``model_version`` (the last one when it
        holds several): the tasks that hold one, in pages of ``page_size`` after an id cursor, with only
        ``id`` and ``predictions`` in each (``fields=all`` makes Label Studio serialise predictions at all)."""
        version = _version_filter(model_version)
        found: dict[int, list[dict[str, Any]]] = {}
        after = 0
        while True:
            query = {"filters": {"conjunction": "and", "items": [_id_after(after), version]}}
            params = {
                "project": project_id,
                "page_size": page_size,
                "fields": "all",
                "include": "id,predictions",
                "query": json.dumps(query),
            }
            body = self.request("GET", "/api/tasks", params=params)
            tasks = body.get("tasks", []) if isinstance(body, dict) else body or []
            for task in tasks:
                ours = [p for p in task.get("predictions") or [] if p.get("model_version") == model_version]
                if ours and isinstance(ours[-1].get("result"), list):
                    found[int(task["id"])] = ours[-1]["result"]
            last = max((int(t["id"]) for t in tasks), default=after)
            if len(tasks) < page_size or last <= after:  # the last page (or a server ignoring the cursor)
                return found
            after = last

    def annotated_with(self, project_id: int, label: str, *, limit: int = ANNOTATION_PAGE_SIZE) -> list[dict[str, Any]]:
        """Up to ``limit`` tasks whose annotations mention ``label``, the most recently completed first, as
        ``{id, data, annotations}``: one listing (``limit`` is one page), never one call per task.

        The Data Manager's filter on annotation results matches a substring of each annotation's JSON
        text, so it narrows the listing (a label that is a part of another label's name matches too);
        callers check the regions' labels exactly. A label with non-ASCII characters is not filtered on:
        SQLite stores them escaped (``\\u00e9``), PostgreSQL does not, so no one substring finds both;
        then the most recently completed annotated tasks are listed and checked.
        """
        if label.isascii():
            item = {"filter": "filter:tasks:annotations_results", "operator": "contains", "type": "String"}
            item["value"] = label
        else:
            item = {"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}
        query = {"filters": {"conjunction": "and", "items": [item]}, "ordering": ["-tasks:completed_at"]}
        params = {
            "project": project_id,
            "page": 1,
            "page_size": limit,
            "fields": "all",  # Label Studio serialises annotations only then
            # Its annotation serializer reads `include` too: the annotations' own fields are named here.
            "include": "id,data,annotations,result,was_cancelled,updated_at",
            "query": json.dumps(query),
        }
        body = self.request("GET", "/api/tasks", params=params)
        tasks = body.get("tasks", []) if isinstance(body, dict) else body or []
        return [
            {"id": int(t["id"]), "data": t.get("data") or {}, "annotations": t.get("annotations") or []}
            for t in tasks[:limit]
        ]

    def import_predictions(self, project_id: int, predictions: Sequence[dict[str, Any]]) -> None:
        """Create predictions (``{task, result, score, model_version}``, one version), never twice.

        When the answer to an import is lost, Label Studio is asked (after a back-off that lets a
        commit in progress land) which tasks now hold a prediction of the version, and only the
        others are written again. Each task has at most one prediction in ``predictions``.
        """
        rows = list(predictions)
        versions = {row["model_version"] for row in rows}
        if len(versions) > 1:
            raise ValueError(f"one model version per import, not {sorted(versions)}")
        for attempt in range(self.retries + 1):
            if not rows:
                return
            try:
                self.request("POST", f"/api/projects/{project_id}/import/predictions", json=rows)
                return
            except WriteUncertain as exc:
                if attempt == self.retries:
                    raise
                log.warning("import of %d predictions may have gone through (%s): checking", len(rows), exc)
                self.sleep(self.delay(attempt))
                held = self.tasks_holding(project_id, [row["task"] for row in rows], next(iter(versions)))
                rows = [row for row in rows if row["task"] not in held]
                log.warning("%d of them were stored; writing the %d others", len(held), len(rows))

    def count_tasks(self, project_id: int, filters: Sequence[dict[str, Any]]) -> int:
        """How many of a project's tasks match all of ``filters`` (Data Manager filter items)."""
        query = {"filters": {"conjunction": "and", "items": list(filters)}}
        params = {"project": project_id, "page_size": 1, "include": "id", "query": json.dumps(query)}
        body = self.request("GET", "/api/tasks", params=params)
        return int(body.get("total", 0)) if isinstance(body, dict) else len(body or [])

    def data_columns(self, project_id: int) -> set[str]:
        """The task data fields Label Studio has seen in a project (its summary's ``all_data_columns``)."""
        summary = self.request("GET", f"/api/projects/{project_id}/summary") or {}
        return set(summary.get("all_data_columns") or {})

    def set_data_field(
        self,
        project_id: int,
        field: str,
        value_type: str,
        value: str,
        *,
        ids: Sequence[int] | None = None,
        filters: Sequence[dict[str, Any]] = (),
    ) -> None:
        """The Data Manager's "Add Or Modify Data Field" action: one write over many tasks.

        Sets ``data[field]`` of the tasks of ``ids`` (at most ``MAX_IDS_PER_ACTION``), or of every task
        matching ``filters``: to ``value`` (``value_type`` ``String`` or ``Number``), or through an
        ``Expression`` such as ``replace("old", "new")`` (applied to tasks that hold the field). The
        action is marked experimental, so the Data Manager hides it; its API is there in every
        edition. A lost answer raises ``WriteUncertain`` like every write: the caller decides.
        """
        if ids is not None and not 0 < len(ids) <= MAX_IDS_PER_ACTION:
            raise ValueError(f"between 1 and {MAX_IDS_PER_ACTION} task ids per action, not {len(ids)}")
        if ids is None and not filters:
            raise ValueError("name the tasks: ids or filters (refusing to write every task of the project)")
        body: dict[str, Any] = {"value_name": field, "value_type": value_type, "value": value}
        if ids is not None:
            body["selectedItems"] = {"all": False, "included": list(ids)}
        else:
            body["selectedItems"] = {"all": True, "excluded": []}
            body["filters"] = {"conjunction": "and", "items": list(filters)}
        self.request("POST", "/api/dm/actions", params={"id": "add_data_field", "project": project_id}, json=body)

    def views(self, project_id: int) -> list[dict[str, Any]]:
        """The project's Data Manager tabs."""
        return self.request("GET", "/api/dm/views", params={"project": project_id}) or []

    def create_view(self, project_id: int, data: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/api/dm/views", json={"project": project_id, "data": data})

    def update_view(self, view_id: int, project_id: int, data: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", f"/api/dm/views/{view_id}", json={"project": project_id, "data": data})

    def delete_view(self, view_id: int) -> None:
        """Delete a tab; one already gone counts as deleted (a repeated delete, or a user's click)."""
        try:
            self.request("DELETE", f"/api/dm/views/{view_id}")
        except LabelStudioError as exc:
            if exc.status != 404:
                raise

    def webhooks(self, project_id: int) -> list[dict[str, Any]]:
        return self.request("GET", "/api/webhooks", params={"project": project_id}) or []

    def create_webhook(
        self, project_id: int, url: str, *, headers: dict[str, str], actions: Sequence[str]
    ) -> dict[str, Any]:
        """Register a webhook sending only ``actions``, with custom headers (our shared secret)."""
        return self.request(
            "POST",
            "/api/webhooks",
            json={
                "project": project_id,
                "url": url,
                "send_payload": True,
                "send_for_all_actions": False,
                "headers": headers,
                "actions": list(actions),
                "is_active": True,
            },
        )


def _status_reason(method: str, path: str, response: httpx.Response) -> str:
    """``HTTP 400 Bad Request (application/json body of 57 bytes, logged by this process)``."""
    status = response.status_code
    log.warning("%s %s answered HTTP %d: %.500r", method, path, status, response.text)
    kind = response.headers.get("content-type", "").split(";")[0].strip()
    kind = kind if _MEDIA_TYPE.fullmatch(kind) else "untyped"
    return (
        f"HTTP {status} {httpx.codes.get_reason_phrase(status)} "
        f"({kind} body of {len(response.content):,} bytes, logged by this process)"
    )
