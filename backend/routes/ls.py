"""The Label Studio ML-backend protocol: ``/health``, ``/setup``, ``/predict``, ``/webhook``.

``/predict`` never runs the model itself: the first ``interactive_max_tasks`` tasks go to the
interactive queue and the request waits for a worker, at most ``predict_deadline`` seconds. The tasks
past that count, and those the worker did not reach by the deadline, are handed to a bulk job that
writes their predictions through Label Studio's API; the answer holds ``[]`` in their place.

What Label Studio 1.23 does with the answer (``label_studio/ml/models.py``): "Retrieve predictions"
(``data_manager/actions/basic.py:24-31``), the Data Manager's automatic predictions
(``data_manager/api.py:403-418``) and opening a task (``tasks/api.py:335-339``) all end in
``MLBackend.predict_tasks`` (``ml/models.py:342-366``), which drops the tasks that already hold a
prediction of the current version and sends the rest in **one** ``/predict`` call (no chunks; its
time-out is ``ML_TIMEOUT_PREDICT``, 100 s, ``ml/api_connector.py:29``). ``_get_predictions_from_ml_backend``
(``ml/models.py:292-340``) then matches ``results`` to the tasks **by position**; each entry may be one
prediction or a list of them, and every item with a ``result`` is stored. So:

- ``results: []`` stores nothing and logs "results field must be a list with at least one item"
  (``ml/models.py:302-306``);
- fewer or more results than tasks store nothing (``ml/models.py:311-315, 261-290``), except exactly
  one result for several tasks, which makes Label Studio ask again task by task;
- an empty list in a task's place stores nothing for that task, silently, and the others are stored.

Hence one entry per task, in order: the prediction of each task answered in time, ``[]`` for a task
handed off (or left to a bulk job that is writing it: ``backend.marks``). Label Studio stores the
answered ones at once; the bulk job writes the others, which show after a reload.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import time
from dataclasses import asdict
from typing import Any, TypeVar

import anyio
import redis
from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from backend.auth import basic_auth_valid
from backend.bulk import Workers
from backend.config import Settings
from backend.deps import MetricsDep, ServiceDep, SettingsDep
from backend.errors import responses
from backend.jobs import RESULT_TTL, cancel_if_queued, predict_tasks
from backend.json_body import StrictJSONRoute, parse_json
from backend.labeling import LabelConfigError, LabelLimits, LabelTarget, parse_label_config, typed_prompt
from backend.marks import ANSWER_WINDOW, Marks
from backend.metrics import Metrics
from backend.prioritize import after_annotations
from backend.queues import Queues
from backend.schemas.ls import (
    AnnotationsChanged,
    Health,
    PredictRequest,
    PredictResponse,
    SetupRequest,
    SetupResponse,
    TasksCreated,
    TasksDeleted,
    WebhookEvent,
    WebhookResponse,
)
from backend.state import NoLabelStudio, Service, project_id
from backend.store_writer import ROLE as STORE_WRITER
from backend.tasks import check_tasks, usable_id

log = logging.getLogger(__name__)
router = APIRouter(tags=["label-studio"], route_class=StrictJSONRoute)

MODEL_CLASS = "GroundingDINO"
SECRET_HEADER = "X-Dinolabel-Secret"
SECRET_ACTIONS = ("TASKS_CREATED", "TASKS_DELETED")
"""The events that need the shared secret (or basic-auth credentials): they make us write into Label Studio
with our key, or remove vectors."""
ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED")
"""Label Studio 1.23's events that may change which tasks are labeled (``webhooks/models.py``; an update can
turn a skipped task into a labeled one): a prioritized project is ranked again, debounced. Open: Label
Studio's own hook for a connected model sends them without the secret, and the worst a fake one can do is
one re-ranking per ``DINOLABEL_PRIORITY_RERANK_DELAY`` of a project that was prioritized."""
WEBHOOK_ACTIONS = (*SECRET_ACTIONS, *ANNOTATION_ACTIONS)
"""The webhook events acted on (``dinolabel register-webhook`` registers these); others are acknowledged."""
ANONYMOUS_WEBHOOK_BYTES = 1024 * 1024
"""Most bytes read from a webhook without the secret or credentials: enough for Label Studio's other
events (an annotation with its task and project), which schedule a re-ranking or are acknowledged."""
_ANONYMOUS_LIMIT = f"webhooks without {SECRET_HEADER} or basic-auth credentials"
WebhookEventT = TypeVar("WebhookEventT", bound=WebhookEvent)


@router.get("/health", response_model=None, responses={**responses(), 200: {"model": Health}, 503: {"model": Health}})
def health(service: ServiceDep) -> JSONResponse:
    """At once: ``UP`` with a ready worker, ``DEGRADED`` (200) without one, ``DOWN`` (503) without Redis.

    Also ``DEGRADED`` while a worker has been busy on one job longer than that job's time-out: it is
    stuck (a wait that RQ's timer cannot interrupt), and what it holds waits behind it.
    """
    try:
        depths = Queues.on(service.health_connection).depths()
        workers = Workers.all(service.health_connection)
        store_writers = Workers.all(service.health_connection, role=STORE_WRITER)
    except redis.RedisError as exc:
        log.warning("/health: Redis unreachable: %s", exc)
        body = {"status": "DOWN", "model_class": MODEL_CLASS, "reason": "Redis is unreachable (see the log)"}
        return JSONResponse(body, status_code=503)
    ready = [w for w in workers.values() if w.get("state") == "ready"]
    stuck = [reason for w in workers.values() if (reason := _stuck(w, time.time()))]
    body: dict[str, Any] = {
        "status": "UP" if ready and not stuck else "DEGRADED",
        "model_class": MODEL_CLASS,
        "redis": "ok",
        "queues": depths,
        "workers": {"live": len(workers), "ready": len(ready), "details": list(workers.values())},
        "store_writers": len(store_writers),  # index jobs and deletions wait while there is none
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
    """Why a worker counts as stuck (one of its threads busy on one job past its time-out: ``busy`` for
    the model's thread, ``busy_<queue>`` for the threads taking /predict and plan steps), or None."""
    for key in sorted(k for k in worker if k == "busy" or k.startswith("busy_")):
        busy = worker[key]
        if not isinstance(busy, dict) or not busy.get("timeout"):
            continue
        seconds = now - float(busy.get("since") or now)
        if seconds > busy["timeout"]:
            return (
                f"worker {worker.get('name')} has been busy on job {busy.get('job')} for {seconds:.0f} s, "
                f"past its time-out of {busy['timeout']} s"
            )
    return None


@router.post("/setup", response_model=SetupResponse, responses=responses(422, 503))
def setup(body: SetupRequest, service: ServiceDep, settings: SettingsDep) -> SetupResponse:
    """Remember the project's config and Label Studio address; answer the model version it will get."""
    projects = service.projects
    overrides = body.extra_params.changes() if body.extra_params else {}
    try:
        params = projects.params_with(overrides)
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=f"extra_params: {exc}") from exc
    if body.label_config:
        _parse(body.label_config, settings)  # refuse a config we cannot serve now, not at the first prediction
    project = projects.update(
        body.project,
        label_config=body.label_config,
        hostname=body.hostname,
        access_token=body.access_token,
        params=params,
    )
    return SetupResponse(model_version=projects.model_version(project.params))


@router.post(
    "/predict", response_model=PredictResponse, response_model_exclude_none=True, responses=responses(422, 500, 503)
)
async def predict(
    body: PredictRequest, request: Request, service: ServiceDep, settings: SettingsDep, metrics: MetricsDep
) -> PredictResponse:
    """One entry per task, same order: its prediction, or ``[]`` where a bulk job writes it instead.

    The wait for the worker blocks a thread for up to ``predict_deadline``: those threads come from a
    limiter of their own, so waiting requests never starve ``/health`` and ``/setup`` of the shared pool.
    """
    work = functools.partial(_predict, body, service, settings, metrics)
    return await anyio.to_thread.run_sync(work, limiter=request.app.state.predict_limiter)


def _predict(body: PredictRequest, service: Service, settings: Settings, metrics: Metrics) -> PredictResponse:
    _check_task_count(len(body.tasks), settings)
    project = service.projects.get(body.project)
    label_config = body.label_config or project.label_config
    if not label_config:
        raise HTTPException(status_code=422, detail="no label_config in the request and none from /setup")
    target = _parse(label_config, settings)
    context = body.params.context if body.params else None
    try:
        typed_prompt(context, target, _limits(settings))  # the worker reads it again; here only its size counts
    except LabelConfigError as exc:
        raise HTTPException(status_code=422, detail=f"params.context: {exc}") from exc
    version = service.projects.model_version(project.params)
    tasks = [{"id": t.id, "data": t.data} for t in body.tasks]
    number = project_id(body.project)
    if number is None and len(tasks) > settings.interactive_max_tasks:
        raise HTTPException(status_code=422, detail="no project id in the request: cannot write predictions back")
    marks = Marks(service.connection, number, version) if number is not None else None
    head = min(len(tasks), settings.interactive_max_tasks)
    too_many = list(range(head, len(tasks)))  # never sent to a worker: handed to a bulk job
    payload = {  # stored in Redis: the project id, never a key (the worker resolves it)
        "label_config": label_config,
        "params": asdict(project.params),
        "model_version": version,
        "project": number,
        "context": context,
    }
    answers, late = _answer_in_time(service, settings, metrics, marks, tasks, list(range(head)), payload)
    job_id = None
    if too_many or late:
        handed = sorted(too_many + late)
        metrics.handed_off.labels("too_many_tasks").inc(len(too_many))
        metrics.handed_off.labels("deadline").inc(len(late))
        reason = "deadline" if late else "too_many_tasks"
        job_id = _hand_off(service, number, [tasks[i] for i in handed], label_config, reason)
    # One entry per task, in order: Label Studio matches them by position and stores nothing for an
    # empty list (see the module's docstring).
    results: list[dict[str, Any] | list[Any]] = [answers.get(i, []) for i in range(len(tasks))]
    return PredictResponse(results=results, model_version=version, job_id=job_id)


def _answer_in_time(
    service: Service,
    settings: Settings,
    metrics: Metrics,
    marks: Marks | None,
    tasks: list[dict[str, Any]],
    positions: list[int],
    payload: dict[str, Any],
) -> tuple[dict[int, dict[str, Any]], list[int]]:
    """Have a worker predict the tasks at ``positions`` by the deadline: the predictions by position,
    and the positions to hand to a bulk job (not reached in time). Tasks a bulk job is writing, or
    has just written, are in neither: the job's prediction is theirs (``backend.marks``)."""
    deadline = time.time() + settings.predict_deadline  # the worker stops when this request stops waiting
    ours = _take(marks, tasks, positions, deadline + ANSWER_WINDOW)
    if not ours:
        return {}, []
    job = {**payload, "tasks": [tasks[i] for i in ours], "deadline": deadline}
    try:
        value = _wait_for_worker(service, settings, job)
    except HTTPException:
        _untake(marks, tasks, ours)
        raise
    if value is None or "refused" in value:
        _untake(marks, tasks, ours)
    if value is None:
        return {}, ours
    if "refused" in value:  # the model cannot take this config or prompt (the worker says why)
        raise HTTPException(status_code=422, detail=f"the model cannot take this request: {value['refused']}")
    unfinished = set(value.get("late", []))  # a worker of an older version says none
    late = [i for i in ours if tasks[i]["id"] in unfinished]
    _untake(marks, tasks, late)
    predicted = dict(zip(ours, value["predictions"], strict=True))
    kept = _take(marks, tasks, [i for i in ours if i not in late], time.time() + ANSWER_WINDOW)
    failed = {f["task_id"] for f in value["failures"]} - unfinished
    metrics.tasks.labels("failed").inc(sum(1 for i in kept if tasks[i]["id"] in failed))
    metrics.tasks.labels("ok").inc(sum(1 for i in kept if tasks[i]["id"] not in failed))
    metrics.boxes.inc(sum(len(predicted[i]["result"]) for i in kept))
    return {i: predicted[i] for i in kept}, late


def _take(marks: Marks | None, tasks: list[dict[str, Any]], positions: list[int], until: float) -> list[int]:
    """The positions this request answers (``Marks.answering``): all of them without a project, else
    those no bulk job is writing or has just written."""
    if marks is None:
        return positions
    ids = [tasks[i]["id"] for i in positions if tasks[i]["id"] is not None]
    taken = set(marks.answering(ids, until, request_size=len(tasks))) if ids else set()
    return [i for i in positions if tasks[i]["id"] is None or tasks[i]["id"] in taken]


def _untake(marks: Marks | None, tasks: list[dict[str, Any]], positions: list[int]) -> None:
    if marks is not None:
        marks.unanswer([tasks[i]["id"] for i in positions if tasks[i]["id"] is not None])


def _wait_for_worker(service: Service, settings: Settings, payload: dict[str, Any]) -> dict[str, Any] | None:
    """Queue the tasks for a worker and wait for its answer until the deadline; None if none came."""
    job = service.queues.interactive.enqueue(
        predict_tasks,
        payload,
        result_ttl=RESULT_TTL,
        job_timeout=int(settings.predict_deadline) + 60,
        # RQ's default description is the call with its arguments, logged as the job starts: image
        # URLs there may carry credentials.
        description=f"predict {len(payload['tasks'])} tasks of project {payload['project']}",
    )
    result = job.latest_result(timeout=max(1, int(settings.predict_deadline)))
    if result is None:
        cancel_if_queued(job)
        return None
    if result.type != result.Type.SUCCESSFUL:
        log.error("prediction job %s failed: %s", job.id, result.exc_string)
        raise HTTPException(status_code=500, detail="the prediction failed in the worker; see the service log")
    return result.return_value


@router.post(
    "/webhook",
    response_model=WebhookResponse,
    response_model_exclude_none=True,
    responses=responses(400, 409, 422, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [
                            TasksCreated.model_json_schema(),
                            TasksDeleted.model_json_schema(),
                            AnnotationsChanged.model_json_schema(),
                            WebhookEvent.model_json_schema(),
                        ]
                    }
                }
            },
        }
    },
)
async def webhook(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    secret: str | None = Header(default=None, alias=SECRET_HEADER),
) -> WebhookResponse:
    """``TASKS_CREATED`` queues pre-annotation of the new tasks (and their indexing, when the project is
    indexed: two jobs planned together, so that each image is fetched once, ``backend.combined``);
    ``TASKS_DELETED`` removes the tasks' vectors; annotation events (``ANNOTATION_ACTIONS``) of a project
    prioritized before schedule its re-ranking (``backend.prioritize.after_annotations``); other events are
    acknowledged only.

    Label Studio cannot send basic auth with webhooks, and it posts every event of a project to
    ``<backend>/webhook`` once the model is connected. So the route is open, but ``TASKS_CREATED``
    (which makes us write into Label Studio with our key) and ``TASKS_DELETED`` (which removes vectors)
    need ``DINOLABEL_WEBHOOK_SECRET`` in the ``X-Dinolabel-Secret`` header, or this service's basic-auth
    credentials. Both are checked before
    the body is read: without them at most ``ANONYMOUS_WEBHOOK_BYTES`` are read, to learn the action.
    Each task is checked on its own: a malformed one is recorded as a failure of the job, with its
    reason, and the others are queued.
    """
    authorised = _webhook_secret_matches(settings, secret) or basic_auth_valid(settings, request.scope["headers"])
    limit = settings.max_request_bytes if authorised else ANONYMOUS_WEBHOOK_BYTES
    raw = await _read_body(request, limit, "DINOLABEL_MAX_REQUEST_BYTES" if authorised else _ANONYMOUS_LIMIT)
    try:
        payload = parse_json(raw)
    except json.JSONDecodeError as exc:  # strict JSON: see backend/json_body.py
        raise HTTPException(status_code=400, detail=f"the webhook body is not JSON: {exc.msg}") from exc
    action = _validated(WebhookEvent, payload).action
    if action not in WEBHOOK_ACTIONS:
        return WebhookResponse(status="ignored", action=action)
    if action in ANNOTATION_ACTIONS:
        return _annotations_changed(_validated(AnnotationsChanged, payload), service, settings)
    if not authorised:
        raise HTTPException(
            status_code=401,
            detail=f"{action} needs the shared secret (DINOLABEL_WEBHOOK_SECRET) in {SECRET_HEADER}",
        )
    if action == "TASKS_DELETED":
        return _tasks_deleted(_validated(TasksDeleted, payload), service, settings)
    event = _validated(TasksCreated, payload)
    _check_task_count(len(event.tasks), settings)
    checked = check_tasks(event.tasks)
    if not checked.tasks:
        reasons = "; ".join(r.reason for r in checked.rejected[:3])
        raise HTTPException(status_code=422, detail=f"TASKS_CREATED without a usable task: {reasons}")
    number, config, tasks, rejected = event.project_number, event.label_config, checked.tasks, checked.rejected
    index_job = None
    try:
        if settings.index_new_tasks or service.indexed(number):
            job, index_job = service.submit_pair(number, tasks=tasks, label_config=config, rejected=rejected)
        else:
            job = service.submit(number, tasks=tasks, label_config=config, source="webhook", rejected=rejected)
    except NoLabelStudio as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    log.info(
        "webhook: %d new tasks of project %s -> job %s, index job %s (%d refused)",
        len(checked.tasks), event.project_number, job.id, index_job.id if index_job else None, len(checked.rejected),
    )  # fmt: skip
    return WebhookResponse(
        status="queued",
        action=action,
        job_id=job.id,
        index_job_id=index_job.id if index_job else None,
        tasks=len(checked.tasks),
        rejected=len(checked.rejected),
    )


def _tasks_deleted(event: TasksDeleted, service: Service, settings: Settings) -> WebhookResponse:
    """Queue the removal of the deleted tasks' vectors on the store writer (the one writer of the stores)."""
    from backend.index_jobs import enqueue_delete

    _check_task_count(len(event.tasks), settings)
    ids = sorted({i for i in (usable_id(t) for t in event.tasks) if i is not None})
    if not ids:
        raise HTTPException(status_code=422, detail="TASKS_DELETED without a usable task id")
    enqueue_delete(service.queues, event.project_number, ids)
    log.info("webhook: %d tasks of project %s deleted: their vectors are removed", len(ids), event.project_number)
    return WebhookResponse(status="queued", action=event.action, tasks=len(ids))


def _annotations_changed(event: AnnotationsChanged, service: Service, settings: Settings) -> WebhookResponse:
    """Schedule the project's re-ranking, or join the one scheduled; only acknowledged for a project never
    prioritized, or with ``DINOLABEL_PRIORITY_RERANK_DELAY`` 0."""
    due = after_annotations(service.connection, event.project_number, settings.priority_rerank_delay)
    if due is None:
        return WebhookResponse(status="ignored", action=event.action)
    return WebhookResponse(status="scheduled", action=event.action, rerank_at=due)


def _validated(model: type[WebhookEventT], payload: Any) -> WebhookEventT:
    """The webhook body as ``model``, or the same 422 FastAPI gives for a declared body."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


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


def _check_task_count(count: int, settings: Settings) -> None:
    if count > settings.max_tasks_per_request:
        raise HTTPException(
            status_code=422,
            detail=f"tasks: {count} in one request; at most {settings.max_tasks_per_request} are taken "
            "(DINOLABEL_MAX_TASKS_PER_REQUEST)",
        )


def _hand_off(service: Service, number: int | None, tasks: list[dict[str, Any]], config: str, reason: str) -> str:
    """Give the tasks to a bulk job that writes through Label Studio's API; its id."""
    if number is None:
        raise HTTPException(status_code=422, detail="no project id in the request: cannot write predictions back")
    try:
        job = service.submit(number, tasks=tasks, label_config=config, source=f"predict:{reason}")
    except NoLabelStudio as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    log.info("/predict: %d tasks handed to job %s (%s)", len(tasks), job.id, reason)
    return job.id


def _parse(label_config: str, settings: Settings) -> LabelTarget:
    try:
        return parse_label_config(label_config, _limits(settings))
    except LabelConfigError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc


def _limits(settings: Settings) -> LabelLimits:
    return LabelLimits(
        labels=settings.max_labels,
        phrases=settings.max_phrases,
        prompt_phrases=settings.max_prompt_phrases,
        phrase_length=settings.max_phrase_length,
    )
