"""Bulk pre-annotation jobs: start one for a project, follow it, cancel it."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query

from backend.bulk import BulkJob, NoSuchJob
from backend.deps import ServiceDep
from backend.jobs import cancel_queued
from backend.schemas.jobs import JobPublic, PreannotateRequest
from backend.state import NoLabelStudio

router = APIRouter(prefix="/v1", tags=["jobs"])


@router.post("/projects/{project}/preannotate", response_model=JobPublic, status_code=202)
def preannotate(project: int, service: ServiceDep, body: PreannotateRequest | None = None) -> JobPublic:
    """Queue pre-annotation of the project's tasks (all, or ``task_ids``); returns the job at once.

    Tasks that already hold a prediction of the current model version are skipped, so running it
    twice writes nothing twice.
    """
    try:
        job = service.submit(project, task_ids=body.task_ids if body else None, source="api")
    except NoLabelStudio as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    return JobPublic(**job.summary())


@router.get("/jobs/{job_id}", response_model=JobPublic)
def get_job(job_id: str, service: ServiceDep, failures: int = Query(default=100, ge=0, le=10_000)) -> JobPublic:
    """Progress (done/skipped/failed/total), status and the latest failures with their reasons."""
    try:
        return JobPublic(**BulkJob.fetch(service.connection, job_id).summary(failures=failures))
    except NoSuchJob as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc


@router.delete("/jobs/{job_id}", response_model=JobPublic)
def cancel_job(job_id: str, service: ServiceDep) -> JobPublic:
    """Cancel what has not started; batches already running finish and are counted."""
    try:
        job = BulkJob.fetch(service.connection, job_id)
    except NoSuchJob as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    if job.cancel():
        cancel_queued(service.queues, job)
    return JobPublic(**job.summary())
