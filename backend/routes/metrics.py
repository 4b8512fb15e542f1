"""``GET /metrics`` in Prometheus' text format."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backend.bulk import STATS_KEY, BulkJob, NoSuchJob, Workers
from backend.deps import MetricsDep, ServiceDep
from backend.errors import responses
from backend.json_body import StrictJSONRoute

router = APIRouter(tags=["operations"], route_class=StrictJSONRoute)


_TEXT = {"description": "Prometheus' text format", "content": {"text/plain": {"schema": {"type": "string"}}}}


@router.get("/metrics", response_class=Response, responses={**responses(503), 200: _TEXT})
def metrics(metrics: MetricsDep, service: ServiceDep) -> Response:
    for name, depth in service.queues.depths().items():
        metrics.queue_depth.labels(name).set(depth)
    workers = Workers.all(service.connection)
    states = Counter(w.get("state", "unknown") for w in workers.values())
    for state in ("loading", "ready", "failed"):
        metrics.workers.labels(state).set(states.get(state, 0))
    metrics.model_load_seconds.clear()
    for name, worker in workers.items():
        if worker.get("load_seconds") is not None:
            metrics.model_load_seconds.labels(name).set(worker["load_seconds"])
    stats = {k.decode(): float(v) for k, v in service.connection.hgetall(STATS_KEY).items()}
    metrics.worker_tasks.labels("ok").set(stats.get("tasks_predicted", 0))
    metrics.worker_tasks.labels("failed").set(stats.get("tasks_failed", 0))
    metrics.batches.set(stats.get("batches", 0))
    metrics.batch_seconds.set(stats.get("batch_seconds", 0))
    metrics.job_progress.clear()
    metrics.job_rate.clear()
    for job in BulkJob.active(service.connection):
        try:
            summary = job.summary(failures=0)
        except NoSuchJob:  # expired between the listing and the read
            continue
        for state in ("done", "skipped", "failed", "remaining"):
            metrics.job_progress.labels(job.id, state).set(summary[state])
        metrics.job_rate.labels(job.id).set(summary["tasks_per_second"])
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
