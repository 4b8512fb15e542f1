"""Thumbnails of a project's task images for the HTML reports (duplicates, labeling priority).

The pages must show pictures without Label Studio's key, so the server fetches each image under the
workers' rules (``backend.image_source.fetcher_for``: address policy, key only to Label Studio's file
routes, size and time limits), shrinks it to a 160 px JPEG and the page embeds it as a data URI. Which
image a task has comes from Label Studio (one listing per 200 tasks); a task whose image cannot be
listed, fetched or decoded simply has no thumbnail ("no preview" on the page).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from backend.config import Settings
from backend.image_source import ImageFetchError, fetcher_for
from backend.ls_auth import LabelStudioAuthError
from backend.ls_client import LabelStudioClient, LabelStudioError
from backend.ls_credentials import LabelStudioAccess
from backend.search import image_key, image_value
from indexer import thumbnail

log = logging.getLogger(__name__)


def fetch_thumbnails(
    project: int,
    task_ids: Sequence[int],
    access: LabelStudioAccess,
    label_config: str | None,
    settings: Settings,
    *,
    budget_s: float | None = None,
) -> dict[int, bytes]:
    """Task id -> 160 px JPEG, for the tasks whose image could be fetched and decoded.

    The caller bounds the count. ``budget_s`` bounds the time: no fetch starts after it, and those under
    way end within the fetcher's own total time-out, so the whole call takes at most ``budget_s`` plus
    ``DINOLABEL_IMAGE_TOTAL_TIMEOUT``.
    """
    if not task_ids or not access.url:
        return {}
    from model.images import ImageDecodeError, decode_image

    deadline = None if budget_s is None else time.monotonic() + budget_s
    try:
        with LabelStudioClient(access.url, access.api_key, retries=1) as client:
            tasks = client.tasks_by_id(project, task_ids)
    except (LabelStudioError, LabelStudioAuthError, httpx.HTTPError, ValueError) as exc:
        log.warning("project %d: listing the tasks to show failed: %s", project, exc)
        return {}
    key = image_key(label_config)
    sources = {task: url for task in task_ids if task in tasks and (url := image_value(tasks[task]["data"], key))}

    def one(task: int) -> tuple[int, bytes | None]:
        if deadline is not None and time.monotonic() > deadline:
            return task, None
        try:
            data = fetcher.fetch(sources[task], task_id=task)
            return task, thumbnail(decode_image(data, max_pixels=settings.image_max_pixels))
        except (ImageFetchError, ImageDecodeError) as exc:
            log.info("project %d task %d: no thumbnail: %s", project, task, exc)
            return task, None

    with fetcher_for(settings, access) as fetcher, ThreadPoolExecutor(settings.image_download_threads) as pool:
        found = {task: jpeg for task, jpeg in pool.map(one, sources) if jpeg is not None}
    if len(found) < len(task_ids):
        log.info("project %d: %d of %d thumbnails made", project, len(found), len(task_ids))
    return found
