"""Detections in pixels -> Label Studio regions in percent of the displayed image."""

from __future__ import annotations

import pytest

from backend.labeling import parse_label_config
from backend.results import prediction, region
from model import Detection

TARGET = parse_label_config(
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/></RectangleLabels></View>'
)


def test_region_is_in_percent_of_a_non_square_image() -> None:
    r = region(Detection(x0=20, y0=10, x1=60, y1=40, score=0.87654321, phrase=0), "cat", TARGET, 200, 50)
    assert r["from_name"] == "label" and r["to_name"] == "image" and r["type"] == "rectanglelabels"
    assert r["value"]["x"] == pytest.approx(10.0)
    assert r["value"]["y"] == pytest.approx(20.0)
    assert r["value"]["width"] == pytest.approx(20.0)
    assert r["value"]["height"] == pytest.approx(60.0)
    assert r["value"]["rectanglelabels"] == ["cat"] and r["value"]["rotation"] == 0
    assert (r["original_width"], r["original_height"]) == (200, 50)
    assert r["score"] == pytest.approx(0.876543)


def test_region_is_clipped_inside_the_image() -> None:
    r = region(Detection(x0=-5, y0=40, x1=120, y1=80, score=0.5, phrase=0), "cat", TARGET, 100, 50)
    assert (r["value"]["x"], r["value"]["y"], r["value"]["width"], r["value"]["height"]) == pytest.approx(
        (0.0, 80.0, 100.0, 20.0)
    )


def test_region_ids_are_unique_and_notes_go_to_meta() -> None:
    d = Detection(x0=0, y0=0, x1=1, y1=1, score=0.5, phrase=0)
    ids = {region(d, "cat", TARGET, 10, 10)["id"] for _ in range(50)}
    assert len(ids) == 50
    assert region(d, "cat", TARGET, 10, 10, "prompt: kitty")["meta"] == {"text": ["prompt: kitty"]}


def test_prediction_score_is_the_mean_and_version_is_carried() -> None:
    d = Detection(x0=0, y0=0, x1=1, y1=1, score=0.5, phrase=0)
    regions = [region(d, "cat", TARGET, 10, 10), region(Detection(0, 0, 2, 2, 0.9, 0), "cat", TARGET, 10, 10)]
    p = prediction(regions, "v1")
    assert p["score"] == pytest.approx(0.7) and p["model_version"] == "v1" and len(p["result"]) == 2
    assert prediction([], "v1") == {"result": [], "score": 0.0, "model_version": "v1"}
