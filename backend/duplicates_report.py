"""A project's duplicate report (``indexer.find_duplicates`` over its store), as JSON, CSV or HTML.

The passes run over the store the API keeps (hashes of every task, vectors of the current embedder)
and its cached index. Which tasks are already labeled, so that a labeled copy is the suggested keeper,
comes from Label Studio, listed in pages of 1,000 tasks (only ids and ``is_labeled`` travel). When
Label Studio cannot be asked the report is made all the same without that preference, and says so.

The HTML gallery needs thumbnails the browser can show without Label Studio's key: the server fetches
each grouped task's image (``backend.thumbnails``) and embeds it as a data URI, so the page loads nothing
from anywhere. At most ``MAX_THUMBNAILS`` images are fetched for one page; the others show "no preview".
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass

import httpx

from backend.config import Settings
from backend.image_source import redact_url
from backend.index_cache import IndexCache
from backend.ls_auth import LabelStudioAuthError
from backend.ls_client import LabelStudioClient, LabelStudioError
from backend.ls_credentials import LabelStudioAccess
from backend.thumbnails import fetch_thumbnails
from indexer import DuplicateReport, find_duplicates, render_html

log = logging.getLogger(__name__)

MAX_THUMBNAILS = 2000
"""Images fetched for one HTML report (~8 KB each in the page); the rest of the groups show no preview."""
CSV_FIELDS = ("stage", "group", "task_id", "keeper", "is_keeper", "similarity_to_keeper", "group_min_similarity")


@dataclass(frozen=True)
class Duplicates:
    """A project's report with what Label Studio told about it."""

    project: int
    report: DuplicateReport
    labeled: frozenset[int]
    sizes: dict[int, tuple[int, int]]
    label_studio: str  # "ok", "unreachable", "unknown" (no address known)
    warning: str | None = None

    def to_dict(self) -> dict:
        return {
            "project": self.project,
            "label_studio": self.label_studio,
            "warning": self.warning,
            "duplicate_ids": self.report.duplicate_ids,
            **self.report.to_dict(),
        }

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.report.rows())
        return out.getvalue()


def find_project_duplicates(
    cache: IndexCache, project: int, access: LabelStudioAccess, *, threshold: float, phash_distance: int
) -> Duplicates:
    """Run the exact, perceptual and embedding passes over the project's store and index."""
    store, index = cache.get(project)
    labeled, status, warning = _labeled(project, access)
    table = store.hash_table()
    report = find_duplicates(
        table,
        labeled=labeled,
        index=index,
        vector_blocks=store.iter_vectors(cache.version),
        embedding_threshold=threshold,
        phash_distance=phash_distance,
    )
    grouped = {task for result in report.stages for group in result.groups for task in group.members}
    sizes = {
        int(task): (int(w), int(h))
        for task, w, h in zip(table.task_ids, table.width, table.height, strict=True)
        if int(task) in grouped
    }
    return Duplicates(project, report, frozenset(labeled), sizes, status, warning)


def _labeled(project: int, access: LabelStudioAccess) -> tuple[set[int], str, str | None]:
    if not access.url:
        return (
            set(),
            "unknown",
            (
                f"no Label Studio address is known for project {project}: keepers were chosen without knowing "
                "which tasks are labeled"
            ),
        )
    try:
        with LabelStudioClient(access.url, access.api_key, retries=1) as client:
            return client.labeled_task_ids(project), "ok", None
    except (LabelStudioError, LabelStudioAuthError, httpx.HTTPError, ValueError) as exc:
        log.warning("project %d: listing labeled tasks failed: %s", project, exc)
        return (
            set(),
            "unreachable",
            (
                f"Label Studio at {redact_url(access.url)} did not list the labeled tasks ({type(exc).__name__}): "
                "keepers were chosen without knowing which tasks are labeled"
            ),
        )


def to_html(found: Duplicates, access: LabelStudioAccess, label_config: str | None, settings: Settings) -> str:
    """The gallery page, with thumbnails fetched here (at most ``MAX_THUMBNAILS``)."""
    wanted = list(dict.fromkeys(t for r in found.report.stages for g in r.groups for t in g.members))
    thumbnails = fetch_thumbnails(found.project, wanted[:MAX_THUMBNAILS], access, label_config, settings)
    return render_html(
        found.report,
        thumbnails,
        title=f"Project {found.project}: duplicate images",
        sizes=found.sizes,
        labeled=found.labeled,
    )
