"""The HTML duplicate report, opened in a real headless Chromium: the thumbnails load and show."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.duplicates import DuplicateGroup, DuplicateReport, DuplicateResult
from indexer.gallery import render_html, thumbnail
from tests.browser import BrowserNotInstalled, Chromium, chromium_binary
from tests.images import scene

# Solid colours that a screenshot can count, one per thumbnail that should be on screen.
COLOURS = {11: (220, 30, 30), 12: (30, 200, 40), 13: (30, 60, 220), 21: (240, 200, 20)}


def _report() -> DuplicateReport:
    return DuplicateReport(
        (
            DuplicateResult("bytes", 1.0, (DuplicateGroup((11, 12), (1.0, 1.0), 1.0),)),
            DuplicateResult(
                "perceptual",
                1 - 6 / 64,
                (DuplicateGroup((13, 14, 15), (1.0, 1 - 2 / 64, 1 - 4 / 64), 1 - 5 / 64),),
            ),
            DuplicateResult("embedding", 0.9, (DuplicateGroup((21, 22), (1.0, 0.93), 0.93),)),
        )
    )


def _thumbnails() -> dict[int, bytes]:
    thumbs = {task: thumbnail(Image.new("RGB", (300, 200), colour)) for task, colour in COLOURS.items()}
    thumbs[14] = thumbnail(scene(640, 480, seed=1))
    thumbs[15] = thumbnail(scene(480, 640, seed=2))
    return thumbs  # 22 has none: its image could not be fetched


def test_thumbnails_are_small_jpegs_with_the_aspect_kept() -> None:
    data = thumbnail(scene(640, 480, seed=3))
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.size == (160, 120)
    assert Image.open(io.BytesIO(thumbnail(Image.new("L", (50, 400))))).size == (20, 160)


def test_the_page_escapes_project_text_and_allows_no_script() -> None:
    page = render_html(_report(), _thumbnails(), title="<script>alert(1)</script> & co")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    assert "default-src 'none'; img-src data:" in page
    assert "(2 of 64 bits differ)" in page  # perceptual similarity also in bits


def test_the_report_shows_its_thumbnails_in_headless_chromium(tmp_path: Path) -> None:
    try:
        chromium_binary()
    except BrowserNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    page = tmp_path / "report.html"
    page.write_text(
        render_html(
            _report(),
            _thumbnails(),
            title="Project 12",
            sizes={11: (300, 200), 12: (300, 200), 21: (640, 480)},
            labeled=[21],
        )
    )
    with Chromium(tmp_path, width=1200, height=1400) as browser:
        browser.open(page.as_uri())
        images = browser.evaluate(
            "Array.from(document.images).map(i => ({task: Number(i.dataset.task), complete: i.complete,"
            " width: i.naturalWidth, height: i.naturalHeight, shown: i.getBoundingClientRect().width}))"
        )
        missing = browser.evaluate("Array.from(document.querySelectorAll('.missing')).map(e => e.dataset.task)")
        stages = browser.evaluate("Array.from(document.querySelectorAll('section.stage')).map(s => s.dataset.stage)")
        keepers = browser.evaluate(
            "Array.from(document.querySelectorAll('figure.keeper [data-task]')).map(e => Number(e.dataset.task))"
        )
        text = browser.evaluate("document.body.innerText")
        shot = Image.open(io.BytesIO(browser.screenshot())).convert("RGB")
    shot.save(tmp_path / "report.png")  # kept with the test's files for a person to look at

    # Every thumbnail decoded, at its own size, and is laid out on the page.
    assert sorted(image["task"] for image in images) == [11, 12, 13, 14, 15, 21]
    for image in images:
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image
        assert image["shown"] > 100
    assert {(i["task"], i["width"], i["height"]) for i in images} >= {(11, 160, 107), (14, 160, 120), (15, 120, 160)}
    assert missing == ["22"]
    assert stages == ["bytes", "perceptual", "embedding"]
    assert keepers == [11, 13, 21]
    assert "labeled" in text and "300\u00d7200" in text and "4 images could be removed" in text

    # And they are really painted: each solid thumbnail's colour covers most of a 160x107 tile.
    pixels = np.asarray(shot, dtype=np.int16)
    for task, colour in COLOURS.items():
        close = np.abs(pixels - np.array(colour, dtype=np.int16)).max(axis=2) <= 12
        assert close.sum() >= 0.8 * 160 * 107, (task, int(close.sum()))
    keeper_green = np.abs(pixels - np.array((0x2A, 0x9D, 0x4B), dtype=np.int16)).max(axis=2) <= 3
    assert keeper_green.sum() >= 3 * 4 * 150  # three keepers framed by a 3 px border
