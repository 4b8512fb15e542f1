"""Index jobs: fill a project's vector store with the DINOv2 embeddings of its task images.

Progress and cancel go through the job routes (``/v1/jobs/{id}``), as for pre-annotation.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from backend.deps import ServiceDep, SettingsDep
from backend.errors import responses
from backend.json_body import StrictJSONRoute
from backend.routes.jobs import ProjectPath
from backend.schemas.jobs import IndexRequest, JobPublic
from backend.state import NoLabelStudio

router = APIRouter(prefix="/v1", tags=["index"], route_class=StrictJSONRoute)


@router.post("/projects/{project}/index", response_model=JobPublic, status_code=202, responses=responses(409, 422, 503))
def index(
    project: ProjectPath, service: ServiceDep, settings: SettingsDep, body: IndexRequest | None = None
) -> JobPublic:
    """Queue embedding of the project's task images (all, or ``task_ids``); returns the job at once.

    Tasks whose stored vector is of the current embedder version are skipped, so running it twice
    embeds nothing twice. ``sync`` re-checks every image (a changed one is embedded again) and removes
    the vectors of tasks deleted from the project.
    """
    task_ids = body.task_ids if body else None
    sync = body.sync if body else False
    if task_ids is not None and sync:
        raise HTTPException(status_code=422, detail="sync covers the whole project: give task_ids or sync, not both")
    if task_ids is not None and len(task_ids) > settings.max_tasks_per_request:
        raise HTTPException(
            status_code=422,
            detail=f"task_ids: {len(task_ids)} in one request; at most {settings.max_tasks_per_request} are taken "
            "(DINOLABEL_MAX_TASKS_PER_REQUEST)",
        )
    try:
        job = service.submit_index(project, task_ids=task_ids, sync=sync, source="api")
    except NoLabelStudio as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from exc
    return JobPublic(**job.summary())
