"""The duplicate report as one self-contained HTML page: a gallery of thumbnails a person can scan.

Thumbnails are embedded as JPEG data URIs, so the file can be mailed or opened from disk and loads
nothing from anywhere (its Content-Security-Policy allows images from ``data:`` only, and no script).
Every text that comes from a project is escaped.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Collection, Mapping

from PIL import Image

from indexer.duplicates import DuplicateReport

__all__ = ["render_html", "thumbnail"]

THUMBNAIL_SIDE = 160

_STAGE_TITLES = {
    "bytes": "Exact duplicates (same file bytes)",
    "pixels": "Exact duplicates (same decoded pixels)",
    "perceptual": "Near-exact copies (perceptual hash)",
    "embedding": "Near duplicates (DINOv2 embedding)",
}

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 32px; border-bottom: 1px solid #ccc; }
.group { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px; margin: 12px 0; }
.group h3 { font-size: 14px; margin: 0 0 8px; font-weight: 600; }
.tiles { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 170px; }
figure img, figure .missing { width: 160px; height: 160px; object-fit: contain; background: #eee;
  border: 3px solid transparent; display: block; }
figure.keeper img, figure.keeper .missing { border-color: #2a9d4b; }
figure .missing { display: flex; align-items: center; justify-content: center; color: #888; }
figcaption { font-size: 12px; color: #555; }
.badge { display: inline-block; padding: 0 5px; border-radius: 3px; font-size: 11px; color: #fff; }
.keep { background: #2a9d4b; } .labeled { background: #3b6fd1; }
"""


def thumbnail(image: Image.Image, *, side: int = THUMBNAIL_SIDE, quality: int = 80) -> bytes:
    """A JPEG no larger than ``side`` x ``side`` (aspect kept) for the gallery."""
    small = image.convert("RGB")
    small.thumbnail((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, "JPEG", quality=quality)
    return out.getvalue()


def render_html(
    report: DuplicateReport,
    thumbnails: Mapping[int, bytes],
    *,
    title: str = "Duplicate images",
    sizes: Mapping[int, tuple[int, int]] | None = None,
    labeled: Collection[int] = (),
) -> str:
    """The report as HTML. ``thumbnails`` maps task id -> JPEG bytes (see :func:`thumbnail`); a task
    without one gets a "no preview" box. ``sizes`` (task id -> width, height) and ``labeled`` add captions."""
    sizes = sizes or {}
    labeled = set(labeled)
    parts = [
        *page_head(title, _STYLE),
        f"<p>{_count(len(report.duplicate_ids), 'image')} could be removed; the suggested keeper of each group is "
        "framed in green (already labeled first, then the larger image, then the lower task id).</p>",
    ]
    for result in report.stages:
        parts.append(
            f'<section class="stage" data-stage="{html.escape(result.stage)}">'
            f"<h2>{html.escape(_STAGE_TITLES.get(result.stage, result.stage))}: {_count(len(result.groups), 'group')}, "
            f"threshold {_similarity_text(result.stage, result.threshold)}</h2>"
        )
        if not result.groups:
            parts.append("<p>None found.</p>")
        for number, group in enumerate(result.groups, start=1):
            parts.append(
                f'<div class="group"><h3>Group {number}: {len(group.members)} images, lowest pair similarity '
                f'{_similarity_text(result.stage, group.min_similarity)}</h3><div class="tiles">'
            )
            for task, similarity in zip(group.members, group.similarities, strict=True):
                parts.append(
                    _tile(
                        int(task),
                        thumbnails.get(task),
                        keeper=task == group.keeper,
                        similarity=_similarity_text(result.stage, similarity),
                        size=sizes.get(task),
                        is_labeled=task in labeled,
                    )
                )
            parts.append("</div></div>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _tile(
    task: int, jpeg: bytes | None, *, keeper: bool, similarity: str, size: tuple[int, int] | None, is_labeled: bool
) -> str:
    if jpeg:
        picture = (
            f'<img alt="task {task}" data-task="{task}" '
            f'src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode("ascii")}">'
        )
    else:
        picture = f'<div class="missing" data-task="{task}">no preview</div>'
    badges = ('<span class="badge keep">keep</span> ' if keeper else "") + (
        '<span class="badge labeled">labeled</span> ' if is_labeled else ""
    )
    details = [f"task {task}"]
    if size:
        details.append(f"{size[0]}\u00d7{size[1]}")
    if not keeper:
        details.append(f"similarity {similarity}")
    return (
        f'<figure class="{"keeper" if keeper else "duplicate"}">{picture}'
        f"<figcaption>{badges}{html.escape(', '.join(details))}</figcaption></figure>"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _similarity_text(stage: str, similarity: float) -> str:
    if stage == "perceptual":
        bits = round((1.0 - similarity) * 64)
        return f"{similarity:.3f} ({bits} of 64 bits differ)"
    return f"{similarity:.3f}"


def page_head(title: str, style: str) -> list[str]:
    """The opening of a self-contained report page: no script, nothing fetched (a CSP that allows only
    inline styles and data: images), so a report opened from disk or served by the API shows the same."""
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">",
        f"<title>{html.escape(title)}</title><style>{style}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
