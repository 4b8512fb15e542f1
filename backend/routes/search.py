"""Similar-image search and duplicates over a project's index (the read path of issue 9)."""

from __future__ import annotations

import base64
import functools
import io
import logging
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile

from backend.config import Settings
from backend.deps import IndexCacheDep, ServiceDep, SettingsDep
from backend.duplicates_report import find_project_duplicates, to_html
from backend.errors import responses
from backend.index_cache import IndexCache
from backend.jobs import RESULT_TTL, cancel_if_queued
from backend.json_body import StrictJSONRoute, read_model
from backend.ls_auth import same_origin
from backend.schemas.search import DuplicatesResponse, SearchByURL, SearchHit, SearchResponse
from backend.schemas.tasks import MAX_ID
from backend.search import Hit, embed_query, nearest, task_vector, vector_of, with_label_studio
from backend.state import Service
from indexer.duplicates import DEFAULT_EMBEDDING_THRESHOLD, DEFAULT_PHASH_DISTANCE, MAX_PHASH_DISTANCE

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["search"], route_class=StrictJSONRoute)

ProjectPath = Annotated[int, Path(ge=0, le=MAX_ID, description="Label Studio project id")]
K = Annotated[int, Query(ge=1, description="results wanted; at most DINOLABEL_SEARCH_MAX_K")]
MIN_THRESHOLD = 0.5
"""Lowest embedding threshold a duplicate report takes: below it nearly every pair of a project's images
matches, and the range search returns (and holds) up to every vector for every image."""
IMAGE_TYPES = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
"""What a query upload may be (what Pillow decodes for the workers, as Label Studio's images are)."""

_SEARCH_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {"image": {"type": "string", "format": "binary", "description": "the query image"}},
            }
        },
        "application/json": {"schema": SearchByURL.model_json_schema()},
    },
}
_REPORT_FORMATS = {
    200: {
        "content": {
            "text/csv": {"schema": {"type": "string"}},
            "text/html": {"schema": {"type": "string"}},
        },
        "description": "The report: JSON (format=json), CSV (one row per grouped image) or an HTML gallery.",
    }
}
# The HTML report loads nothing: thumbnails are data URIs, and it runs no script.
_HTML_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
}


def _check_k(k: int, settings: Settings) -> None:
    if k > settings.search_max_k:
        raise HTTPException(
            status_code=422,
            detail=f"k: {k} results asked; at most {settings.search_max_k} per search (DINOLABEL_SEARCH_MAX_K)",
        )


def _answer(
    service: Service, settings: Settings, cache: IndexCache, project: int, task_id: int | None, k: int, hits: list[Hit]
) -> SearchResponse:
    """The hits with their image URLs and labeled state, from one Label Studio listing."""
    record = service.projects.get(project)
    found = with_label_studio(hits, project, service.projects.label_studio(project), record.label_config, settings)
    return SearchResponse(
        project=project,
        task_id=task_id,
        k=k,
        embedder=cache.version,
        label_studio=found.label_studio,
        warning=found.warning,
        results=[SearchHit(task_id=h.task_id, score=h.score, image=h.image, labeled=h.labeled) for h in found.hits],
    )


@router.get("/projects/{project}/similar", response_model=SearchResponse, responses=responses(404, 422, 503))
def similar(
    project: ProjectPath,
    service: ServiceDep,
    cache: IndexCacheDep,
    settings: SettingsDep,
    task_id: Annotated[int, Query(ge=0, le=MAX_ID, description="the query task")],
    k: K = 20,
) -> SearchResponse:
    """The ``k`` tasks whose images are most similar to the task's own (itself excluded), with scores,
    image URLs and whether each is labeled (from one Label Studio listing; without it when Label Studio
    does not answer: ``label_studio`` and ``warning`` say so)."""
    _check_k(k, settings)
    hits = nearest(cache, project, task_vector(cache, project, task_id), k, exclude=task_id)
    return _answer(service, settings, cache, project, task_id, k, hits)


@router.post(
    "/projects/{project}/search",
    response_model=SearchResponse,
    responses=responses(400, 404, 409, 415, 422, 500, 503),
    openapi_extra={"requestBody": _SEARCH_BODY},
)
async def search(
    project: ProjectPath, request: Request, service: ServiceDep, cache: IndexCacheDep, settings: SettingsDep, k: K = 20
) -> SearchResponse:
    """Search by an image: uploaded (``multipart/form-data``, a file part ``image``) or named by URL
    (``{"url": ...}``, only on Label Studio's own origin). A worker serving the embedder embeds it."""
    _check_k(k, settings)
    await anyio.to_thread.run_sync(cache.get, project)  # a project with nothing to search: 404 before the body
    payload = await _query(request, project, service, settings)
    work = functools.partial(_search_by_image, payload, project, k, service, cache, settings)
    return await anyio.to_thread.run_sync(work, limiter=request.app.state.predict_limiter)


async def _query(request: Request, project: int, service: Service, settings: Settings) -> dict[str, Any]:
    """The worker's payload from the request body: the uploaded bytes, or a URL on Label Studio's origin."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise HTTPException(status_code=422, detail="image: send the query image as a file part named 'image'")
        data = await upload.read(settings.image_max_bytes + 1)
        check_image(data, settings)
        return {"project": project, "images": [base64.b64encode(data).decode("ascii")]}
    if kind == "application/json":
        body = await read_model(request, SearchByURL)
        return {"project": project, "url": _label_studio_url(body.url, project, service)}
    raise HTTPException(
        status_code=415,
        detail="send the query image as multipart/form-data (a file part named 'image') or JSON {\"url\": ...}",
    )


def check_image(data: bytes, settings: Settings, name: str = "image") -> None:
    """Size, type and pixel count of an upload, from its header (nothing is decoded here); ``name`` starts
    the reason of a refusal."""
    if len(data) > settings.image_max_bytes:
        raise HTTPException(
            status_code=413,
            detail=f"{name}: larger than {settings.image_max_bytes:,} bytes (DINOLABEL_IMAGE_MAX_BYTES)",
        )
    from model.images import content_kind

    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, (width, height) = image.format, image.size
    except (UnidentifiedImageError, OSError, ValueError):
        kind, width, height = None, 0, 0
    if kind not in IMAGE_TYPES:
        raise HTTPException(
            status_code=415,
            detail=f"{name}: {content_kind(data) if kind is None else kind + ' image'} is not a type searched "
            "(JPEG, PNG, WebP, GIF, BMP, TIFF)",
        )
    if width * height > settings.image_max_pixels:
        raise HTTPException(
            status_code=422,
            detail=f"{name}: {width}x{height} pixels; at most {settings.image_max_pixels:,} "
            "(DINOLABEL_IMAGE_MAX_PIXELS)",
        )


def _label_studio_url(url: str, project: int, service: Service) -> str:
    """``url`` when it is on the project's Label Studio origin (a path is taken as one); else a 422."""
    access = service.projects.label_studio(project)
    if not access.url:
        raise HTTPException(
            status_code=409,
            detail=f"no Label Studio address for project {project}: connect the model to the project in Label "
            "Studio (it then calls /setup) or set DINOLABEL_LABEL_STUDIO_URL",
        )
    if url.startswith("/") and not url.startswith("//"):
        return url
    if not same_origin(url, access.url):
        raise HTTPException(
            status_code=422,
            detail="url: only images on Label Studio's own origin (scheme, host and port of "
            "DINOLABEL_LABEL_STUDIO_URL or the project's /setup hostname) are fetched for a search; upload "
            "other images as multipart/form-data",
        )
    return url


def _search_by_image(
    payload: dict[str, Any], project: int, k: int, service: Service, cache: IndexCache, settings: Settings
) -> SearchResponse:
    value = embed_by_worker(payload, cache.version, service, f"embed a query image of project {project}")
    if "refused" in value:
        raise HTTPException(status_code=422, detail=f"image: {value['refused']}")
    _, index = cache.get(project)
    hits = nearest(cache, project, vector_of(value["vectors"][0], index.info.dim), k)
    return _answer(service, settings, cache, project, None, k, hits)


def embed_by_worker(payload: dict[str, Any], version: str, service: Service, description: str) -> dict[str, Any]:
    """``embed_query``'s answer to ``payload`` from a worker serving the embedder, waited for up to
    ``DINOLABEL_PREDICT_DEADLINE``; its job (with the uploads it carries) is deleted from Redis either way.

    503 when no worker answers in time or it embeds with another version than ``version``; 500 when the
    job failed (the log says why). A refusal (``{"refused": ...}``) is the caller's to answer.
    """
    settings = service.settings
    job = service.queues.embed.enqueue(
        embed_query,
        payload,
        at_front=True,  # before queued index batches: a person is waiting
        result_ttl=RESULT_TTL,
        job_timeout=int(settings.predict_deadline) + 60,
        description=description,  # not the arguments: uploads, a URL
    )
    result = job.latest_result(timeout=max(1, int(settings.predict_deadline)))
    if result is None:
        if cancel_if_queued(job):
            job.delete()  # with the uploads it carries
        raise HTTPException(
            status_code=503,
            detail=f"no worker serving the embedder answered within {settings.predict_deadline:g} s "
            "(DINOLABEL_PREDICT_DEADLINE): is a worker with DINOLABEL_WORKER_MODELS including embedder running?",
        )
    job.delete()  # the uploads (up to DINOLABEL_MAX_REQUEST_BYTES) leave Redis now
    if result.type != result.Type.SUCCESSFUL:
        log.error("query embedding job %s failed: %s", job.id, result.exc_string)
        raise HTTPException(status_code=500, detail="embedding the query image failed in the worker; see the log")
    value = result.return_value
    if "refused" not in value and value["embedder"] != version:
        raise HTTPException(
            status_code=503,
            detail=f"the worker embeds with {value['embedder']} but the index holds {version} vectors: give "
            "the API and the workers the same DINOLABEL_EMBEDDER_* settings",
        )
    return value


@router.get(
    "/projects/{project}/duplicates",
    response_model=DuplicatesResponse,
    responses={**responses(404, 422, 503), **_REPORT_FORMATS},
)
def duplicates(
    project: ProjectPath,
    service: ServiceDep,
    cache: IndexCacheDep,
    settings: SettingsDep,
    threshold: Annotated[
        float, Query(ge=MIN_THRESHOLD, le=1.0, description="cosine above which embeddings are near duplicates")
    ] = DEFAULT_EMBEDDING_THRESHOLD,
    phash_distance: Annotated[
        int, Query(ge=0, le=MAX_PHASH_DISTANCE, description="most differing perceptual-hash bits of 64")
    ] = DEFAULT_PHASH_DISTANCE,
    format: Literal["json", "csv", "html"] = "json",
) -> Any:
    """Exact (same bytes, same pixels), near-exact (perceptual hash) and near (embedding) duplicates, in
    groups whose every pair is above the threshold; each group's suggested keeper first (labeled, then
    larger, then lower id)."""
    access = service.projects.label_studio(project)
    found = find_project_duplicates(cache, project, access, threshold=threshold, phash_distance=phash_distance)
    if format == "csv":
        return Response(
            found.to_csv(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="project-{project}-duplicates.csv"'},
        )
    if format == "html":
        page = to_html(found, access, service.projects.get(project).label_config, settings)
        return HTMLResponse(page, headers=_HTML_HEADERS)
    return DuplicatesResponse(**found.to_dict())
