"""The labeling priority as one self-contained HTML page: what annotators get first, and what was pushed
back as a duplicate of what, each with its reason.

Like the duplicate gallery (:mod:`indexer.gallery`), thumbnails are JPEG data URIs, the page's
Content-Security-Policy allows images from ``data:`` only and no script, and every text from a project
is escaped, so the file can be mailed or opened from disk.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping

import numpy as np

from indexer.gallery import _STYLE as GALLERY_STYLE
from indexer.gallery import page_head
from indexer.priority import DUPLICATE, Ranking

__all__ = ["REPORT_DUPLICATES", "REPORT_HEAD", "render_priority_html", "report_tasks"]

REPORT_HEAD = 60
"""Tasks of the head of the queue the page shows."""
REPORT_DUPLICATES = 60
"""Pushed-back duplicates the page shows, each beside its original."""

_STYLE = (
    GALLERY_STYLE
    + """
.pair { display: flex; gap: 6px; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
figure.original img, figure.original .missing { border-color: #3b6fd1; }
.reason { display: block; color: #333; }
"""
)


def render_priority_html(
    ranking: Ranking,
    thumbnails: Mapping[int, bytes],
    *,
    title: str = "Labeling priority",
    head: int = REPORT_HEAD,
    duplicates: int = REPORT_DUPLICATES,
) -> str:
    """The first ``head`` tasks of the queue and the first ``duplicates`` pushed-back duplicates (each beside
    the task it duplicates). ``thumbnails``: task id -> JPEG bytes (:func:`indexer.gallery.thumbnail`);
    a task without one gets a "no preview" box."""
    is_dup = ranking.reason == DUPLICATE
    queue = np.flatnonzero(~is_dup)[:head].tolist()
    pushed = np.flatnonzero(is_dup).tolist()
    parts = [
        *page_head(title, _STYLE),
        f"<p>{len(ranking)} unlabeled tasks ranked ({len(ranking.labeled)} labeled); the first "
        f"{ranking.exact_head} by exact farthest-first, {int(is_dup.sum())} pushed to the end as duplicates.</p>",
        f'<section class="queue"><h2>Head of the queue: the first {len(queue)} tasks</h2><div class="tiles">',
    ]
    for position in queue:
        parts.append(_tile(ranking, position, thumbnails.get(int(ranking.task_ids[position])), "ranked"))
    parts.append("</div></section>")
    parts.append(
        f'<section class="duplicates"><h2>Pushed back as duplicates: {len(pushed)}'
        f"{f' (the first {duplicates} shown)' if len(pushed) > duplicates else ''}</h2>"
        '<p>Each beside the labeled or higher-ranked task it duplicates (framed in blue).</p><div class="tiles">'
    )
    for position in pushed[:duplicates]:
        original = int(ranking.duplicate_of[position])
        parts.append(
            '<div class="pair">'
            + _tile(ranking, position, thumbnails.get(int(ranking.task_ids[position])), "duplicate")
            + _original(original, thumbnails.get(original), original in ranking.labeled)
            + "</div>"
        )
    parts.append("</div></section></body></html>")
    return "\n".join(parts)


def report_tasks(ranking: Ranking, *, head: int = REPORT_HEAD, duplicates: int = REPORT_DUPLICATES) -> list[int]:
    """The tasks whose pictures the page shows, in page order, each once: the head of the queue, then each
    shown duplicate and its original. What a caller fetches thumbnails for."""
    is_dup = ranking.reason == DUPLICATE
    shown = ranking.task_ids[np.flatnonzero(~is_dup)[:head]].tolist()
    for position in np.flatnonzero(is_dup)[:duplicates].tolist():
        shown += [int(ranking.task_ids[position]), int(ranking.duplicate_of[position])]
    return list(dict.fromkeys(int(task) for task in shown))


def _picture(task: int, jpeg: bytes | None) -> str:
    if jpeg:
        return (
            f'<img alt="task {task}" data-task="{task}" '
            f'src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode("ascii")}">'
        )
    return f'<div class="missing" data-task="{task}">no preview</div>'


def _tile(ranking: Ranking, position: int, jpeg: bytes | None, kind: str) -> str:
    task = int(ranking.task_ids[position])
    return (
        f'<figure class="{kind}" data-rank="{position}">{_picture(task, jpeg)}<figcaption>'
        f"<b>#{position}</b> task {task}"
        f'<span class="reason">{html.escape(ranking.text(position))}</span></figcaption></figure>'
    )


def _original(task: int, jpeg: bytes | None, labeled: bool) -> str:
    badge = '<span class="badge labeled">labeled</span> ' if labeled else ""
    return (
        f'<figure class="original">{_picture(task, jpeg)}<figcaption>{badge}original: task {task}</figcaption></figure>'
    )
