"""The labeling priority report, opened in a real headless Chromium: the queue's head and the pushed-back
duplicates show their thumbnails and reasons."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.gallery import thumbnail
from indexer.priority import rank
from indexer.priority_report import render_priority_html
from tests.browser import BrowserNotInstalled, Chromium, chromium_binary
from tests.indexer.vectors import clustered_with_members, near_copies

# One solid colour per cluster, so a screenshot can tell that the head of the queue is varied.
PALETTE = [(220, 30, 30), (30, 200, 40), (30, 60, 220), (240, 200, 20), (200, 40, 200), (20, 200, 210)]


def _project():
    base, cluster = clustered_with_members(120, 32, clusters=6, spread=0.6, seed=3)
    copies, originals = near_copies(base, count=4, noise=0.05, seed=4)
    vectors = np.concatenate([base, copies])
    cluster = np.concatenate([cluster, cluster[originals]])
    ids = np.arange(len(vectors), dtype=np.int64) + 500
    labeled = [int(ids[originals[0]]), int(ids[originals[1]])]  # copies 620 and 621 duplicate labeled tasks
    ranking = rank(ids, vectors, labeled)
    thumbs = {int(t): thumbnail(Image.new("RGB", (240, 160), PALETTE[c])) for t, c in zip(ids, cluster, strict=True)}
    del thumbs[int(ranking.task_ids[1])]  # its image could not be fetched
    return ranking, thumbs, labeled


def test_the_page_escapes_project_text_and_allows_no_script() -> None:
    ranking, thumbs, _ = _project()
    page = render_priority_html(ranking, thumbs, title="<script>alert(1)</script>")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "default-src 'none'; img-src data:" in page


def test_the_report_shows_the_queue_and_the_duplicates_in_headless_chromium(tmp_path: Path) -> None:
    try:
        chromium_binary()
    except BrowserNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    ranking, thumbs, labeled = _project()
    page = tmp_path / "priority.html"
    page.write_text(render_priority_html(ranking, thumbs, title="Project 12", head=12))
    with Chromium(tmp_path, width=1300, height=1600) as browser:
        browser.open(page.as_uri())
        head = browser.evaluate(
            "Array.from(document.querySelectorAll('section.queue figure')).map(f => ({rank: Number(f.dataset.rank),"
            " text: f.innerText, img: (i => i && {complete: i.complete, width: i.naturalWidth,"
            " shown: i.getBoundingClientRect().width})(f.querySelector('img'))}))"
        )
        pairs = browser.evaluate(
            "Array.from(document.querySelectorAll('section.duplicates .pair')).map(p => ({"
            " copy: Number(p.querySelector('figure.duplicate [data-task]').dataset.task),"
            " original: Number(p.querySelector('figure.original [data-task]').dataset.task),"
            " text: p.innerText,"
            " loaded: Array.from(p.querySelectorAll('img')).every(i => i.complete && i.naturalWidth > 0)}))"
        )
        shot = Image.open(io.BytesIO(browser.screenshot())).convert("RGB")
    shot.save(tmp_path / "priority.png")  # kept with the test's files for a person to look at

    # The head: 12 tasks in rank order, every thumbnail decoded and laid out, but the one without a picture.
    assert [tile["rank"] for tile in head] == list(range(12))
    assert head[1]["img"] is None and "no preview" in head[1]["text"]
    for tile in head[:1] + head[2:]:
        assert tile["img"]["complete"] and tile["img"]["width"] == 160 and tile["img"]["shown"] > 100, tile
    assert "#0 task" in head[0]["text"] and "labeled" in head[0]["text"]  # its reason names a labeled task
    # The duplicates: each copy of a labeled task beside its original, both pictures loaded.
    expected = {(int(t), int(o)) for t, o in zip(ranking.task_ids, ranking.duplicate_of, strict=True) if o >= 0}
    assert {(p["copy"], p["original"]) for p in pairs} == expected
    assert {p["original"] for p in pairs} >= set(labeled)
    for pair in pairs:
        assert pair["loaded"] and "duplicate of" in pair["text"], pair
    # And painted: the first six of the queue come from six clusters, so all six colours are on screen.
    pixels = np.asarray(shot, dtype=np.int16)
    for colour in PALETTE:
        close = np.abs(pixels - np.array(colour, dtype=np.int16)).max(axis=2) <= 12
        assert close.sum() >= 0.8 * 160 * 107, (colour, int(close.sum()))
