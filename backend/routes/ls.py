"""The Label Studio ML-backend protocol: ``/health``, ``/setup``, ``/predict``, ``/webhook``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from backend.deps import MetricsDep, ModelDep, ProjectsDep, SettingsDep
from backend.labeling import LabelConfigError, LabelTarget, parse_label_config
from backend.schemas.ls import HealthResponse, PredictRequest, PredictResponse, SetupRequest, SetupResponse
from backend.state import ModelUnavailable
from model import PromptError

log = logging.getLogger(__name__)
router = APIRouter(tags=["label-studio"])

MODEL_CLASS = "GroundingDINO"


@router.get("/health", response_model=HealthResponse)
def health(model: ModelDep) -> JSONResponse:
    """Answers at once, also while the model loads; 503 ``DOWN`` only when the load failed."""
    body = HealthResponse(
        status="DOWN" if model.state == "failed" else "UP",
        model_class=MODEL_CLASS,
        model_state=model.state,
        model_error=model.error,
    )
    return JSONResponse(
        body.model_dump(exclude_none=True), status_code=503 if model.state == "failed" else 200
    )


@router.post("/setup", response_model=SetupResponse)
def setup(body: SetupRequest, projects: ProjectsDep, model: ModelDep) -> SetupResponse:
    """Remember the project's config and Label Studio address; answer the model version it will get."""
    model.start()
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


@router.post("/predict", response_model=PredictResponse)
def predict(
    body: PredictRequest, projects: ProjectsDep, model: ModelDep, settings: SettingsDep, metrics: MetricsDep
) -> PredictResponse:
    """One prediction per task, same order; a task whose image fails gets an empty prediction."""
    project = projects.get(body.project)
    label_config = body.label_config or project.label_config
    if not label_config:
        raise HTTPException(status_code=422, detail="no label_config in the request and none from /setup")
    target = _parse(label_config)
    version = projects.model_version(project.params)
    try:
        predictor = model.get(timeout=settings.model_load_timeout)
    except ModelUnavailable as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    tasks = [task.model_dump() for task in body.tasks]
    context = body.params.context if body.params else None
    try:
        outcome = predictor.predict(
            tasks, target, project.params, version, projects.fetcher(project), context
        )
    except PromptError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    metrics.tasks.labels("failed").inc(len(outcome.failures))
    metrics.tasks.labels("ok").inc(len(tasks) - len(outcome.failures))
    metrics.boxes.inc(sum(len(p["result"]) for p in outcome.predictions))
    return PredictResponse(results=outcome.predictions, model_version=version)


@router.post("/webhook")
async def webhook(request: Request) -> dict[str, Any]:
    """Label Studio registers ``<backend>/webhook`` itself and posts its events here; none acted on yet."""
    try:
        payload = await request.json()
    except ValueError as exc:
        raise HTTPException(status_code=400, detail="webhook body is not JSON") from exc
    action = payload.get("action") if isinstance(payload, dict) else None
    log.debug("webhook %s ignored", action)
    return {"status": "ok", "action": action}


def _parse(label_config: str) -> LabelTarget:
    try:
        return parse_label_config(label_config)
    except LabelConfigError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
