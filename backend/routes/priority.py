"""Labeling priority: rank a project's unlabeled tasks into Label Studio (``backend.prioritize``), follow
the run, read the last ranking with its reasons."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import HTMLResponse

from backend.deps import ServiceDep
from backend.errors import responses
from backend.json_body import StrictJSONRoute
from backend.prioritize import NoSuchPriorityJob, last_ranking, last_report, read_job, submit
from backend.routes.jobs import ProjectPath
from backend.schemas.priority import PrioritizeRequest, PriorityJobPublic, PriorityRanking
from indexer.store import STORE_FILE, project_dir

router = APIRouter(prefix="/v1", tags=["priority"], route_class=StrictJSONRoute)

PriorityJobPath = Annotated[str, Path(max_length=64, description="the id `POST .../prioritize` returned")]


@router.post(
    "/projects/{project}/prioritize",
    response_model=PriorityJobPublic,
    status_code=202,
    responses=responses(404, 409, 422, 503),
)
def prioritize(project: ProjectPath, service: ServiceDep, body: PrioritizeRequest | None = None) -> PriorityJobPublic:
    """Queue a ranking of the project's unlabeled tasks (from its indexed vectors) into Label Studio.

    Every unlabeled task gets a rank and a reason in its data, and the "dinolabel priority" Data Manager
    tab orders by the rank. Returns the run at once; follow it with ``GET /v1/priority-jobs/{id}``.
    """
    if not (project_dir(service.settings.index_dir, project) / STORE_FILE).is_file():
        raise HTTPException(
            status_code=404,
            detail=f"project {project} has no vectors to rank: index it first (POST /v1/projects/{project}/index)",
        )
    if not service.projects.label_studio(project).url:
        raise HTTPException(
            status_code=409,
            detail=f"no Label Studio address for project {project}: connect the model to the project in Label "
            "Studio (it then calls /setup) or set DINOLABEL_LABEL_STUDIO_URL and _API_KEY",
        )
    job = submit(
        service.connection,
        project,
        like_task_ids=(body.like_task_ids or []) if body else [],
        uncertainty_weight=body.uncertainty_weight if body else None,
    )
    return PriorityJobPublic(**job)


@router.get("/priority-jobs/{job_id}", response_model=PriorityJobPublic, responses=responses(404, 422, 503))
def get_priority_job(job_id: PriorityJobPath, service: ServiceDep) -> PriorityJobPublic:
    """A prioritize run's status, counts, tab id, and on failure the reason."""
    try:
        return PriorityJobPublic(**read_job(service.connection, job_id))
    except NoSuchPriorityJob as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from exc


@router.get(
    "/projects/{project}/priority",
    response_model=PriorityRanking,
    responses={**responses(404, 422, 503), 200: {"content": {"text/html": {}}}},
)
def get_priority(
    project: ProjectPath,
    service: ServiceDep,
    format: Literal["json", "html"] = Query(default="json", description="`json`, or `html`: the report page"),
) -> PriorityRanking | HTMLResponse:
    """The last ranking's head, each task with why it ranks there (json), or its HTML report."""
    missing = HTTPException(status_code=404, detail=f"project {project} was not prioritized (or it expired)")
    if format == "html":
        page = last_report(service.connection, project)
        if page is None:
            raise missing
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'none'; img-src data:; "
                                           "style-src 'unsafe-inline'"})  # fmt: skip
    ranking = last_ranking(service.connection, project)
    if ranking is None:
        raise missing
    return PriorityRanking(**ranking)
