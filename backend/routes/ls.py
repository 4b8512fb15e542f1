"""The Label Studio ML-backend protocol: ``/health``, ``/setup``, ``/predict``, ``/webhook``.

``/predict`` never runs the model itself: up to ``interactive_max_tasks`` tasks go to the
interactive queue and the request waits for a worker, at most ``predict_deadline`` seconds. More
tasks, or a deadline that passes, hand the tasks to a bulk job that writes the predictions through
Label Studio's API, and the answer comes at once with ``results: []`` (Label Studio logs that the
backend returned no results and stores nothing; the predictions appear as the workers write them).
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import time
from dataclasses import asdict
from typing import Any

import anyio
import redis
from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.responses import JSONResponse

from backend.auth import basic_auth_valid
from backend.bulk import Marks, Workers
from backend.config import Settings
from backend.deps import MetricsDep, ServiceDep, SettingsDep
from backend.jobs import RESULT_TTL, cancel_if_queued, predict_tasks
from backend.labeling import LabelConfigError, LabelTarget, parse_label_config
from backend.metrics import Metrics
from backend.queues import Queues
from backend.schemas.ls import PredictRequest, PredictResponse, SetupRequest, SetupResponse
from backend.state import NoLabelStudio, Service, project_id

log = logging.getLogger(__name__)
router = APIRouter(tags=["label-studio"])

MODEL_CLASS = "GroundingDINO"
SECRET_HEADER = "X-Dinolabel-Secret"
ANONYMOUS_WEBHOOK_BYTES = 1024 * 1024
"""Most bytes read from a webhook without the secret or credentials: enough for Label Studio's other
events (an annotation with its task and project), which are only acknowledged."""
_ANONYMOUS_LIMIT = f"webhooks without {SECRET_HEADER} or basic-auth credentials"


@router.get("/health")
def health(service: ServiceDep) -> JSONResponse:
    """At once: ``UP`` with a ready worker, ``DEGRADED`` (200) without one, ``DOWN`` (503) without Redis.

    Also ``DEGRADED`` while a worker has been busy on one job longer than that job's time-out: it is
    stuck (a wait that RQ's timer cannot interrupt), and what it holds waits behind it.
    """
    try:
        depths = Queues.on(service.health_connection).depths()
        workers = Workers.all(service.health_connection)
    except redis.RedisError as exc:
        body = {"status": "DOWN", "model_class": MODEL_CLASS, "reason": f"Redis is unreachable: {exc}"}
        return JSONResponse(body, status_code=503)
    ready = [w for w in workers.values() if w.get("state") == "ready"]
    stuck = [reason for w in workers.values() if (reason := _stuck(w, time.time()))]
    body: dict[str, Any] = {
        "status": "UP" if ready and not stuck else "DEGRADED",
        "model_class": MODEL_CLASS,
        "redis": "ok",
        "queues": depths,
        "workers": {"live": len(workers), "ready": len(ready), "details": list(workers.values())},
    }
    if not ready:
        failed = [w.get("error") for w in workers.values() if w.get("state") == "failed"]
        loading = sum(1 for w in workers.values() if w.get("state") == "loading")
        body["reason"] = (
            f"model failed to load: {failed[0]}" if failed
            else f"{loading} worker(s) loading the model" if loading
            else "no live worker: start `dinolabel worker`"
        )  # fmt: skip
    elif stuck:
        body["reason"] = "; ".join(stuck)
    return JSONResponse(body)


def _stuck(worker: dict[str, Any], now: float) -> str | None:
    """Why a worker counts as stuck (busy on one job past its time-out), or None."""
    busy = worker.get("busy")
    if not isinstance(busy, dict) or not busy.get("timeout"):
        return None
    seconds = now - float(busy.get("since") or now)
    if seconds <= busy["timeout"]:
        return None
    return (
        f"worker {worker.get('name')} has been busy on job {busy.get('job')} for {seconds:.0f} s, "
        f"past its time-out of {busy['timeout']} s"
    )


@router.post("/setup", response_model=SetupResponse)
def setup(body: SetupRequest, service: ServiceDep) -> SetupResponse:
    """Remember the project's config and Label Studio address; answer the model version it will get."""
    projects = service.projects
    overrides = body.extra_params.changes() if body.extra_params else {}
    try:
        params = projects.params_with(overrides)
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=f"extra_params: {exc}") from exc
    if body.label_config:
        _parse(body.label_config)  # refuse a config we cannot serve now, not at the first prediction
    project = projects.update(
        body.project,
        label_config=body.label_config,
        hostname=body.hostname,
        access_token=body.access_token,
        params=params,
    )
    return SetupResponse(model_version=projects.model_version(project.params))


@router.post("/predict", response_model=PredictResponse, response_model_exclude_none=True)
async def predict(
    body: PredictRequest, request: Request, service: ServiceDep, settings: SettingsDep, metrics: MetricsDep
) -> PredictResponse:
    """One prediction per task, same order; or a hand-off to a bulk job (``results: []``).

    The wait for the worker blocks a thread for up to ``predict_deadline``: those threads come from a
    limiter of their own, so waiting requests never starve ``/health`` and ``/setup`` of the shared pool.
    """
    work = functools.partial(_predict, body, service, settings, metrics)
    return await anyio.to_thread.run_sync(work, limiter=request.app.state.predict_limiter)


def _predict(body: PredictRequest, service: Service, settings: Settings, metrics: Metrics) -> PredictResponse:
    project = service.projects.get(body.project)
    label_config = body.label_config or project.label_config
    if not label_config:
        raise HTTPException(status_code=422, detail="no label_config in the request and none from /setup")
    _parse(label_config)
    version = service.projects.model_version(project.params)
    tasks = [{"id": t.id, "data": t.data} for t in body.tasks]
    number = project_id(body.project)
    if len(tasks) > settings.interactive_max_tasks:
        return _hand_off(service, metrics, number, tasks, label_config, version, "too_many_tasks")
    deadline = time.time() + settings.predict_deadline  # the worker stops when this request stops waiting
    payload = {  # stored in Redis: the project id, never a key (the worker resolves it)
        "tasks": tasks,
        "label_config": label_config,
        "params": asdict(project.params),
        "model_version": version,
        "project": number,
        "context": body.params.context if body.params else None,
        "deadline": deadline,
    }
    job = service.queues.interactive.enqueue(
        predict_tasks,
        payload,
        result_ttl=RESULT_TTL,
        job_timeout=int(settings.predict_deadline) + 60,
        # RQ's default description is the call with its arguments, logged as the job starts: image
        # URLs there may carry credentials.
        description=f"predict {len(tasks)} tasks of project {number}",
    )
    result = job.latest_result(timeout=max(1, int(settings.predict_deadline)))
    if result is None:
        cancel_if_queued(job)
        return _hand_off(service, metrics, number, tasks, label_config, version, "deadline")
    if result.type != result.Type.SUCCESSFUL:
        reason = (result.exc_string or "").strip().splitlines()[-1:] or ["unknown error"]
        status = 422 if "PromptError" in reason[0] or "LabelConfigError" in reason[0] else 500
        log.error("prediction job %s failed: %s", job.id, result.exc_string)
        raise HTTPException(status_code=status, detail=f"prediction failed: {reason[0]}")
    value = result.return_value
    if number is not None:  # a bulk job started later skips what Label Studio now stores from us
        Marks(service.connection, number, version).finish([t["id"] for t in tasks if t["id"] is not None], "predict")
    metrics.tasks.labels("failed").inc(len(value["failures"]))
    metrics.tasks.labels("ok").inc(len(tasks) - len(value["failures"]))
    metrics.boxes.inc(sum(len(p["result"]) for p in value["predictions"]))
    return PredictResponse(results=value["predictions"], model_version=version)


@router.post("/webhook")
async def webhook(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    secret: str | None = Header(default=None, alias=SECRET_HEADER),
) -> dict[str, Any]:
    """``TASKS_CREATED`` queues pre-annotation of the new tasks; other events are acknowledged only.

    Label Studio cannot send basic auth with webhooks, and it posts every event of a project to
    ``<backend>/webhook`` once the model is connected. So the route is open, but ``TASKS_CREATED``
    (which makes us write into Label Studio with our key) needs ``DINOLABEL_WEBHOOK_SECRET`` in the
    ``X-Dinolabel-Secret`` header, or this service's basic-auth credentials. Both are checked before
    the body is read: without them at most ``ANONYMOUS_WEBHOOK_BYTES`` are read, to learn the action.
    """
    authorised = _webhook_secret_matches(settings, secret) or basic_auth_valid(settings, request.scope["headers"])
    limit = settings.max_request_bytes if authorised else ANONYMOUS_WEBHOOK_BYTES
    raw = await _read_body(request, limit, "DINOLABEL_MAX_REQUEST_BYTES" if authorised else _ANONYMOUS_LIMIT)
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise HTTPException(status_code=400, detail="webhook body is not JSON") from exc
    if not isinstance(payload, dict):
        raise HTTPException(status_code=400, detail="webhook body must be a JSON object")
    action = payload.get("action")
    if action != "TASKS_CREATED":
        return {"status": "ignored", "action": action}
    if not authorised:
        raise HTTPException(
            status_code=401,
            detail=f"TASKS_CREATED needs the shared secret (DINOLABEL_WEBHOOK_SECRET) in {SECRET_HEADER}",
        )
    project = payload.get("project") or {}
    number = project.get("id") if isinstance(project, dict) else project
    tasks = [{"id": t["id"], "data": t.get("data") or {}} for t in payload.get("tasks") or [] if "id" in t]
    if not isinstance(number, int) or not tasks:
        raise HTTPException(status_code=422, detail="TASKS_CREATED without a project id or tasks")
    config = project.get("label_config") if isinstance(project, dict) else None
    try:
        job = service.submit(number, tasks=tasks, label_config=config, source="webhook")
    except NoLabelStudio as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    log.info("webhook: %d new tasks of project %s -> job %s", len(tasks), number, job.id)
    return {"status": "queued", "action": action, "job_id": job.id, "tasks": len(tasks)}


def _webhook_secret_matches(settings: Settings, sent: str | None) -> bool:
    """The header against ``DINOLABEL_WEBHOOK_SECRET``, in constant time; never true when unset.

    Starlette decodes header values as latin-1, so encoding them back gives the bytes that were sent.
    """
    if settings.webhook_secret is None or sent is None:
        return False
    return secrets.compare_digest(sent.encode("latin-1"), settings.webhook_secret.get_secret_value().encode())


async def _read_body(request: Request, limit: int, setting: str) -> bytes:
    """The request body, refused with a 413 naming the limit as soon as it passes ``limit`` bytes."""
    refusal = HTTPException(status_code=413, detail=f"request body too large: the limit is {limit:,} bytes ({setting})")
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise refusal
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise refusal
    return bytes(body)


def _hand_off(
    service: Service, metrics: Metrics, number: int | None, tasks: list[dict[str, Any]], config: str, version: str,
    reason: str,
) -> PredictResponse:  # fmt: skip
    """Give the tasks to a bulk job that writes through Label Studio's API; answer at once."""
    if number is None:
        raise HTTPException(status_code=422, detail="no project id in the request: cannot write predictions back")
    try:
        job = service.submit(number, tasks=tasks, label_config=config, source=f"predict:{reason}")
    except NoLabelStudio as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    metrics.handed_off.labels(reason).inc(len(tasks))
    log.info("/predict: %d tasks handed to job %s (%s)", len(tasks), job.id, reason)
    return PredictResponse(results=[], model_version=version, job_id=job.id)


def _parse(label_config: str) -> LabelTarget:
    try:
        return parse_label_config(label_config)
    except LabelConfigError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
