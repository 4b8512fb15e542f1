"""The Label Studio API calls the bulk jobs need, with retries and back-off.

Transient failures (connection errors, time-outs, 429 and 5xx) are retried with exponential back-off;
4xx answers are not (they will not get better) and raise ``LabelStudioError``. Its message names the
status but never quotes the body (it reaches job records, and the URL may not be Label Studio's):
the body goes to this process's log. Tokens of both kinds work (``LabelStudioAuth``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from backend.ls_auth import LabelStudioAuth

log = logging.getLogger(__name__)

_MEDIA_TYPE = re.compile(r"[\w.+-]{1,40}/[\w.+-]{1,60}")


class LabelStudioError(RuntimeError):
    """A Label Studio API call failed for good (after retries, or with a 4xx)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LabelStudioClient:
    """A small synchronous client over one Label Studio and token."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not url:
            raise LabelStudioError("no Label Studio URL: set DINOLABEL_LABEL_STUDIO_URL or connect the model")
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        auth = LabelStudioAuth(self.url, api_key, transport=transport) if api_key else None
        self._http = httpx.Client(base_url=self.url, auth=auth, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call, retried on transient failures; returns the decoded JSON (or None)."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                reason, status = f"{type(exc).__name__}: {exc}", None
            else:
                if response.status_code < 400:
                    return response.json() if response.content else None
                reason, status = _status_reason(method, path, response), response.status_code
                if status < 500 and status != 429:
                    raise LabelStudioError(f"{method} {path} failed: {reason}", status=status)
            if attempt < self.retries:
                log.warning("%s %s failed (%s); retry %d in %.1f s", method, path, reason, attempt + 1, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        raise LabelStudioError(f"{method} {path} failed after {self.retries + 1} tries: {reason}", status=status)

    def project(self, project_id: int) -> dict[str, Any]:
        return self.request("GET", f"/api/projects/{project_id}")

    def iter_tasks(self, project_id: int, *, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every task of a project as ``{id, data}``, page by page."""
        page, seen = 1, 0
        while True:
            try:
                body = self.request(
                    "GET", "/api/tasks", params={"project": project_id, "page": page, "page_size": page_size}
                )
            except LabelStudioError as exc:
                if exc.status == 404 and page > 1:  # past the last page
                    return
                raise
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            for task in tasks:
                yield {"id": task["id"], "data": task.get("data") or {}}
            seen += len(tasks)
            total = body.get("total") if isinstance(body, dict) else None
            if not tasks or (total is not None and seen >= total):
                return
            page += 1

    def predicted_task_ids(self, project_id: int, model_version: str) -> set[int]:
        """Tasks of the project that already hold a prediction of ``model_version``."""
        predictions = self.request("GET", "/api/predictions", params={"project": project_id})
        return {p["task"] for p in predictions or [] if p.get("model_version") == model_version}

    def task_predictions(self, task_id: int) -> list[dict[str, Any]]:
        return self.request("GET", "/api/predictions", params={"task": task_id}) or []

    def import_predictions(self, project_id: int, predictions: Sequence[dict[str, Any]]) -> None:
        """Create predictions (``{task, result, score, model_version}``) in one call."""
        if predictions:
            self.request("POST", f"/api/projects/{project_id}/import/predictions", json=list(predictions))

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
