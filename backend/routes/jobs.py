"""Bulk pre-annotation jobs: start one for a project, follow it, cancel it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query

from backend.bulk import BulkJob, NoSuchJob
from backend.deps import ServiceDep, SettingsDep
from backend.errors import responses
from backend.jobs import cancel_queued
from backend.json_body import StrictJSONRoute
from backend.schemas.jobs import JobPublic, PreannotateRequest
from backend.schemas.tasks import MAX_ID
from backend.state import NoLabelStudio

router = APIRouter(prefix="/v1", tags=["jobs"], route_class=StrictJSONRoute)

ProjectPath = Annotated[int, Path(ge=0, le=MAX_ID, description="Label Studio project id")]
JobIdPath = Annotated[str, Path(max_length=64, description="the id `POST .../preannotate` returned")]


@router.post(
    "/projects/{project}/preannotate", response_model=JobPublic, status_code=202, responses=responses(409, 422, 503)
)
def preannotate(
    project: ProjectPath, service: ServiceDep, settings: SettingsDep, body: PreannotateRequest | None = None
) -> JobPublic:
    """Queue pre-annotation of the project's tasks (all, or ``task_ids``); returns the job at once.

    Tasks that already hold a prediction of the current model version are skipped, so running it
    twice writes nothing twice.
    """
    task_ids = body.task_ids if body else None
    if task_ids is not None and len(task_ids) > settings.max_tasks_per_request:
        raise HTTPException(
            status_code=422,
            detail=f"task_ids: {len(task_ids)} in one request; at most {settings.max_tasks_per_request} are taken "
            "(DINOLABEL_MAX_TASKS_PER_REQUEST)",
        )
    try:
        job = service.submit(project, task_ids=task_ids, source="api")
    except NoLabelStudio as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    return JobPublic(**job.summary())


@router.get("/jobs/{job_id}", response_model=JobPublic, responses=responses(404, 422, 503))
def get_job(job_id: JobIdPath, service: ServiceDep, failures: int = Query(default=100, ge=0, le=10_000)) -> JobPublic:
    """Progress (done/skipped/failed/total), status and the latest failures with their reasons."""
    try:
        return JobPublic(**BulkJob.fetch(service.connection, job_id).summary(failures=failures))
    except NoSuchJob as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc


@router.delete("/jobs/{job_id}", response_model=JobPublic, responses=responses(404, 422, 503))
def cancel_job(job_id: JobIdPath, service: ServiceDep) -> JobPublic:
    """Cancel what has not started; batches already running finish and are counted."""
    try:
        job = BulkJob.fetch(service.connection, job_id)
    except NoSuchJob as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    if job.cancel():
        cancel_queued(service.queues, job)
    return JobPublic(**job.summary())
