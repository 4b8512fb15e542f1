"""The predictor with the tiny model and real downloads: it never waits on a download without end."""

from __future__ import annotations

import threading
import time
from typing import Any

from backend.image_source import ImageFetcher
from backend.labeling import parse_label_config
from backend.predictor import DEADLINE_PASSED, ModelTurns, Predictor
from model import DetectionParams, GroundingDinoDetector
from tests.backend.conftest import FakeBucket
from tests.images import jpeg, png
from tests.processes import wait_for

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/><Label value="dog"/></RectangleLabels></View>'
)
PARAMS = DetectionParams(box_threshold=0.3, text_threshold=0.25)


def boxes(prediction: dict[str, Any]) -> list[tuple]:
    """Label, box and score of each region (region ids are random)."""
    keys = ("rectanglelabels", "x", "y", "width", "height")
    return [(*(str(r["value"][k]) for k in keys), r["score"]) for r in prediction["result"]]


def test_a_call_stops_at_its_deadline_and_cancels_downloads_not_started(
    tiny_detector: GroundingDinoDetector, fake_bucket: FakeBucket
) -> None:
    for i in (1, 2, 3, 4, 6, 7):
        fake_bucket.objects[f"/img/{i}.png"] = png(64 + 8 * i, 48, i)
    tasks = [{"id": i, "data": {"image": f"{fake_bucket.url}/img/{i}.png"}} for i in (1, 2, 3, 4, 6, 7)]
    tasks.insert(4, {"id": 5, "data": {"image": f"{fake_bucket.url}/trickle"}})
    target = parse_label_config(CONFIG)
    # One download thread: 1-4 load, then the trickle holds it while 6 and 7 wait in the queue. Batches
    # of one, chunks of four: 1-4 are the first chunk, 5-7 the second.
    predictor = Predictor(tiny_detector, batch_size=1, download_threads=1)
    with ImageFetcher(label_studio_url=None, api_key=None, total_timeout=600, allow=["127.0.0.1"]) as fetcher:
        first_chunk = predictor.predict(tasks[:4], target, PARAMS, "v1", fetcher)
        fake_bucket.requests.clear()
        outcome = predictor.predict(tasks, target, PARAMS, "v1", fetcher, deadline=time.time() + 10)

    assert first_chunk.failures == [] and all(p["result"] for p in first_chunk.predictions)
    kept = [boxes(p) for p in outcome.predictions[:4]]
    assert kept == [boxes(p) for p in first_chunk.predictions], "the chunk that ran before the deadline is kept"
    assert [p["result"] for p in outcome.predictions[4:]] == [[], [], []]
    assert [(f.task_id, f.reason) for f in outcome.failures] == [(i, DEADLINE_PASSED) for i in (5, 6, 7)]
    fetched = [r.path for r in fake_bucket.requests]
    assert fetched == ["/img/1.png", "/img/2.png", "/img/3.png", "/img/4.png", "/trickle"], "6 and 7 never started"


def test_a_download_past_the_fetch_deadline_fails_its_task_alone(
    tiny_detector: GroundingDinoDetector, fake_bucket: FakeBucket
) -> None:
    fake_bucket.objects["/img/1.png"] = png(64, 48, 1)
    tasks = [
        {"id": 1, "data": {"image": f"{fake_bucket.url}/trickle"}},
        {"id": 2, "data": {"image": f"{fake_bucket.url}/img/1.png"}},
    ]
    predictor = Predictor(tiny_detector, batch_size=1, download_threads=2)
    with ImageFetcher(label_studio_url=None, api_key=None, total_timeout=2, allow=["127.0.0.1"]) as fetcher:
        outcome = predictor.predict(tasks, parse_label_config(CONFIG), PARAMS, "v1", fetcher)
    [failure] = outcome.failures
    assert failure.task_id == 1 and "took longer than 2 s in total" in failure.reason
    assert outcome.predictions[0]["result"] == [] and outcome.predictions[1]["result"]


def test_draft_decoding_keeps_regions_in_the_displayed_images_frame(
    tiny_detector: GroundingDinoDetector, fake_bucket: FakeBucket
) -> None:
    # Shown 640x480 (stored portrait, EXIF 6); the tiny model's input is 106x80, so the JPEG decoder
    # hands over 160x120. Label Studio must still be told 640x480, and boxes in percent of it.
    fake_bucket.objects["/img/phone.jpg"] = jpeg(480, 640, 3, orientation=6)
    tasks = [{"id": 1, "data": {"image": f"{fake_bucket.url}/img/phone.jpg"}}]
    target = parse_label_config(CONFIG)
    exact, draft = Predictor(tiny_detector, batch_size=1), Predictor(tiny_detector, batch_size=1, draft_decode=True)
    with ImageFetcher(label_studio_url=None, api_key=None, allow=["127.0.0.1"]) as fetcher:
        regions = {
            name: predictor.predict(tasks, target, PARAMS, "v1", fetcher).predictions[0]["result"]
            for name, predictor in (("exact", exact), ("draft", draft))
        }
    assert regions["exact"] and regions["draft"]
    for result in regions.values():
        assert {(r["original_width"], r["original_height"]) for r in result} == {(640, 480)}
        assert all(
            r["value"]["x"] + r["value"]["width"] <= 100 and r["value"]["y"] + r["value"]["height"] <= 100
            for r in result
        )
    spans = [max(r["value"]["x"] + r["value"]["width"] for r in result) for result in regions.values()]
    assert min(spans) > 25, "boxes span the picture in both, not a quarter of it"


def test_in_preprocessing_processes_every_task_gets_what_it_gets_on_threads(
    tiny_detector: GroundingDinoDetector, fake_bucket: FakeBucket
) -> None:
    # Varied sizes and EXIF, draft decoding on (its decode size travels to the children), an HTML page
    # where an image should be and a task without an image: each fails alone, with the same reason.
    fake_bucket.objects.update({
        "/img/phone.jpg": jpeg(480, 640, 3, orientation=6), "/img/turned.jpg": jpeg(300, 200, 4, orientation=3),
        "/img/small.png": png(97, 61, 5), "/img/wide.jpg": jpeg(1200, 90, 6), "/img/page.png": b"<html>gone</html>",
    })  # fmt: skip
    names = ["phone.jpg", "small.png", "page.png", "turned.jpg", None, "wide.jpg"]
    tasks = [
        {"id": i, "data": {"image": f"{fake_bucket.url}/img/{name}"} if name else {}} for i, name in enumerate(names)
    ]
    target = parse_label_config(CONFIG)
    threads = Predictor(tiny_detector, batch_size=1, draft_decode=True)
    processes = Predictor(tiny_detector, batch_size=1, draft_decode=True, preprocess_processes=2)
    try:
        with ImageFetcher(label_studio_url=None, api_key=None, allow=["127.0.0.1"]) as fetcher:
            expected = threads.predict(tasks, target, PARAMS, "v1", fetcher)
            found = processes.predict(tasks, target, PARAMS, "v1", fetcher)
    finally:
        threads.pipeline.close()
        processes.pipeline.close()
    assert [boxes(p) for p in found.predictions] == [boxes(p) for p in expected.predictions]
    assert sum(bool(p["result"]) for p in found.predictions) >= 3, "the tiny model finds boxes at a low threshold"
    assert [(f.task_id, f.reason) for f in found.failures] == [(f.task_id, f.reason) for f in expected.failures]
    assert [f.task_id for f in found.failures] == [2, 4] and "an HTML or XML document" in found.failures[0].reason


def test_a_waiting_interactive_pass_goes_before_the_bulk_pass_that_just_ended() -> None:
    """The bulk batch's thread ends a pass and asks for the next one at once (as its pipeline does when
    the next batch is ready): the annotator's pass waiting meanwhile goes first. With a plain lock the
    thread that releases it takes it again."""
    turns = ModelTurns()
    order: list[str] = []

    def annotator() -> None:
        with turns.turn(interactive=True):
            order.append("interactive")

    with turns.turn(interactive=False):
        waiting = threading.Thread(target=annotator)
        waiting.start()
        wait_for(lambda: turns.interactive_waiting == 1, 30, "the annotator's pass to wait")
        order.append("bulk 1")
    with turns.turn(interactive=False):
        order.append("bulk 2")
    waiting.join(30)
    assert order == ["bulk 1", "interactive", "bulk 2"]
    assert turns.interactive_waiting == 0
