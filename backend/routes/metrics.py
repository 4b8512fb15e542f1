"""``GET /metrics`` in Prometheus' text format."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backend.deps import MetricsDep, ModelDep

router = APIRouter(tags=["operations"])


@router.get("/metrics")
def metrics(metrics: MetricsDep, model: ModelDep) -> Response:
    metrics.model_ready.set(1 if model.state == "ready" else 0)
    if model.load_seconds is not None:
        metrics.model_load_seconds.set(model.load_seconds)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
