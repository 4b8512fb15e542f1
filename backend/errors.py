"""Errors as HTTP answers: the one place that picks status codes and the reasons a client reads.

A client gets a reason we wrote, never exception text or a traceback (those go to the log), and every
error body has the same shape (``schemas.errors.ErrorResponse``): ``{"detail": "..."}``, or for a
malformed request ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`` without the input that
was refused. Bodies are rendered as ASCII JSON, so no input can make an answer fail to encode.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend.index_cache import NotIndexed
from backend.schemas.errors import ErrorResponse
from backend.search import TaskNotIndexed

log = logging.getLogger(__name__)

REDIS_DOWN = "Redis is unreachable; nothing was queued, try again when it is back"
"""The reason every route gives while Redis cannot be reached (the details go to the log)."""

_DESCRIPTIONS = {
    400: "The body is not what the route reads (the reason says what).",
    401: "Basic auth or an API key is configured and the request lacks the right credentials.",
    404: "No such job (unknown, or expired), or nothing indexed or ranked for the project or task (the reason "
    "says which).",
    409: "No Label Studio address is known for the project.",
    413: "The body is larger than DINOLABEL_MAX_REQUEST_BYTES (or, on /webhook without credentials, 1 MiB).",
    415: "The body is of a type the route does not read (the reason names the types it takes).",
    422: "A malformed request or one past a limit: the reason names the field or the limit (and its setting).",
    500: "The model failed inside the worker; the reason is fixed, the details are in the service log.",
    503: "Redis is unreachable (nothing was queued); for a /predict hand-off also: no Label Studio address known; "
    "for a search by image: no worker serving the embedder answered in time.",
}


class SafeJSONResponse(JSONResponse):
    """JSON escaped to ASCII, so that any string (a refused key, a header value) can be rendered."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entries of the error answers a route gives; every route may answer 401 (basic auth may be
    on) and 413 (the body cap)."""
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]} for code in sorted({401, 413, *codes})}


def install(app: FastAPI) -> None:
    """Register the handlers that turn exceptions into answers."""
    app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(redis.ConnectionError, _redis_down)
    app.add_exception_handler(redis.TimeoutError, _redis_down)
    app.add_exception_handler(NotIndexed, _not_found)
    app.add_exception_handler(TaskNotIndexed, _not_found)


async def _invalid_request(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
    """A 422 naming each refused field; the refused values are not echoed (they may be huge, or NaN)."""
    return SafeJSONResponse({"detail": [_problem(error) for error in exc.errors()]}, status_code=422)


def _problem(error: dict[str, Any]) -> dict[str, Any]:
    msg = str(error.get("msg", "invalid"))
    reason = (error.get("ctx") or {}).get("error")
    if error.get("type") == "json_invalid" and isinstance(reason, str):
        msg = f"{msg}: {reason}"  # what our strict parser or json said about the body
    loc = [part if isinstance(part, str | int) else str(part) for part in error.get("loc", ())]
    return {"loc": loc, "msg": msg, "type": str(error.get("type", "invalid"))}


async def _http_error(request: Request, exc: StarletteHTTPException) -> SafeJSONResponse:
    return SafeJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _not_found(request: Request, exc: Exception) -> SafeJSONResponse:
    """Nothing indexed to search: the reason (ours) names the project or task and what to run."""
    return SafeJSONResponse({"detail": str(exc)}, status_code=404)


async def _redis_down(request: Request, exc: Exception) -> SafeJSONResponse:
    log.warning("Redis unreachable on %s: %s", request.url.path, exc)
    return SafeJSONResponse({"detail": REDIS_DOWN}, status_code=503)
