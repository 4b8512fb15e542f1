"""Labeling priority: rank a project's unlabeled tasks into Label Studio (``backend.prioritize``), follow
the run, read the last ranking with its reasons."""

from __future__ import annotations

import base64
import functools
import logging
from typing import Annotated, Any, Literal

import anyio
import httpx
import numpy as np
from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend.config import Settings
from backend.deps import ServiceDep
from backend.errors import responses
from backend.json_body import StrictJSONRoute, read_model
from backend.labeling import LabelConfigError, LabelTarget, parse_label_config
from backend.like_examples import submit_by_label
from backend.ls_auth import LabelStudioAuthError
from backend.ls_client import LabelStudioClient, LabelStudioError
from backend.prioritize import Examples, NoSuchPriorityJob, last_ranking, last_report, read_job, submit
from backend.project_vectors import embedder_version_of
from backend.routes.jobs import ProjectPath
from backend.routes.search import check_image, embed_by_worker
from backend.schemas.priority import MAX_LIKE_IMAGES, PrioritizeRequest, PriorityJobPublic, PriorityRanking
from backend.search import LS_TIMEOUT
from backend.state import Service
from indexer.store import STORE_FILE, project_dir

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["priority"], route_class=StrictJSONRoute)

PriorityJobPath = Annotated[str, Path(max_length=64, description="the id `POST .../prioritize` returned")]


_PRIORITIZE_BODY = {
    "required": False,
    "content": {
        "application/json": {"schema": PrioritizeRequest.model_json_schema()},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "minItems": 1,
                        "maxItems": MAX_LIKE_IMAGES,
                        "description": "example images (file parts named `image`): more like these first",
                    }
                },
            }
        },
    },
}


@router.post(
    "/projects/{project}/prioritize",
    response_model=PriorityJobPublic,
    status_code=202,
    responses=responses(400, 404, 409, 415, 422, 500, 503),
    openapi_extra={"requestBody": _PRIORITIZE_BODY},
)
async def prioritize(project: ProjectPath, request: Request, service: ServiceDep) -> PriorityJobPublic:
    """Queue a ranking of the project's unlabeled tasks (from its indexed vectors) into Label Studio.

    Every unlabeled task gets a rank and a reason in its data, and the "dinolabel priority" Data Manager
    tab orders by the rank. Returns the run at once; follow it with ``GET /v1/priority-jobs/{id}``.

    "More like these" examples, whose nearest unlabeled tasks go to the front: example tasks or a label's
    annotated boxes (JSON ``like_task_ids``, ``like_label``), or up to 16 uploaded images
    (``multipart/form-data``, file parts ``image``: a worker serving the embedder embeds them while the
    request waits; only their vectors are kept).
    """
    await anyio.to_thread.run_sync(_check_project, project, service)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        uploads = await _uploads(request, service.settings)
        work = functools.partial(_like_images, project, uploads, service)
        job = await anyio.to_thread.run_sync(work, limiter=request.app.state.predict_limiter)
    elif kind in ("", "application/json"):
        body = await read_model(request, PrioritizeRequest) if await request.body() else PrioritizeRequest()
        job = await anyio.to_thread.run_sync(_submit, project, body, service)
    else:
        raise HTTPException(
            status_code=415,
            detail="send JSON (or nothing), or example images as multipart/form-data (file parts named 'image')",
        )
    return PriorityJobPublic(**job)


def _check_project(project: int, service: Service) -> None:
    """404 without vectors to rank, 409 without a Label Studio to write the ranking into."""
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


def _submit(project: int, body: PrioritizeRequest, service: Service) -> dict[str, Any]:
    if body.like_label is not None:
        target = _label_target(project, service)
        if body.like_label not in target.labels:
            shown = ", ".join(repr(label) for label in target.labels[:50])
            raise HTTPException(
                status_code=422,
                detail=f"like_label: {body.like_label!r} is not a label of project {project}'s labeling config "
                f"(its labels: {shown}{', ...' if len(target.labels) > 50 else ''})",
            )
        job_id = submit_by_label(
            service.connection,
            project,
            body.like_label,
            to_name=target.to_name,
            image_key=target.value_key,
            uncertainty_weight=body.uncertainty_weight,
        )
        return read_job(service.connection, job_id)
    return submit(
        service.connection,
        project,
        like_task_ids=body.like_task_ids or [],
        uncertainty_weight=body.uncertainty_weight,
    )


def _label_target(project: int, service: Service) -> LabelTarget:
    """The boxes of the project's labeling config (its ``/setup`` record's, else Label Studio's own)."""
    config = service.projects.get(project).label_config
    if not config:
        access = service.projects.label_studio(project)
        try:
            with LabelStudioClient(access.url or "", access.api_key, timeout=LS_TIMEOUT, retries=1) as client:
                config = str(client.project(project).get("label_config") or "")
        except (LabelStudioError, LabelStudioAuthError, httpx.HTTPError, ValueError, AttributeError) as exc:
            log.warning("project %d: reading the labeling config failed: %s", project, exc)
            raise HTTPException(
                status_code=503,
                detail=f"like_label: Label Studio did not give project {project}'s labeling config "
                f"({type(exc).__name__}); connect the model to the project in Label Studio (its /setup sends it)",
            ) from None
    try:
        return parse_label_config(config)
    except LabelConfigError as exc:
        raise HTTPException(status_code=422, detail=f"like_label: {exc}") from None


async def _uploads(request: Request, settings: Settings) -> list[bytes]:
    """The example images of a multipart body (1 to ``MAX_LIKE_IMAGES`` file parts ``image``), each checked
    like a search upload (size, type, pixels)."""
    wanted = f"1 to {MAX_LIKE_IMAGES} example images as file parts named 'image'"
    try:
        async with request.form(max_files=MAX_LIKE_IMAGES, max_fields=MAX_LIKE_IMAGES) as form:
            others = sorted({name for name in form if name != "image"})
            uploads = form.getlist("image")
            if others or not uploads or not all(isinstance(upload, UploadFile) for upload in uploads):
                raise HTTPException(status_code=422, detail=f"image: send {wanted} (and no other field)")
            images = []
            for number, upload in enumerate(uploads, start=1):
                data = await upload.read(settings.image_max_bytes + 1)  # type: ignore[union-attr]
                check_image(data, settings, f"image {number}" if len(uploads) > 1 else "image")
                images.append(data)
    except StarletteHTTPException as exc:
        if exc.status_code != 400:
            raise
        raise HTTPException(status_code=422, detail=f"image: {exc.detail} (send {wanted})") from None
    return images


def _like_images(project: int, uploads: list[bytes], service: Service) -> dict[str, Any]:
    """Embed the uploads on a worker serving the embedder, then queue the run with their vectors."""
    version = embedder_version_of(service.settings)
    payload = {"project": project, "images": [base64.b64encode(data).decode("ascii") for data in uploads]}
    value = embed_by_worker(payload, version, service, f"embed {len(uploads)} example images of project {project}")
    if "refused" in value:
        name = f"image {value['index'] + 1}" if len(uploads) > 1 else "image"
        raise HTTPException(status_code=422, detail=f"{name}: {value['refused']}")
    examples = Examples(np.asarray(value["vectors"], dtype=np.float32), value["embedder"])
    return submit(service.connection, project, like_images=examples)


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
