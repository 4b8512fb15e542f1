"""The Label Studio ML-backend protocol, served by the real app with a tiny checkpoint.

Images are read from a mounted document root / media root here (the HTTP paths of image fetching
are covered in test_image_source.py, and the whole chain against a real Label Studio in
tests/test_e2e_labelstudio.py).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr

from backend import worker
from backend.config import Settings
from backend.labeling import parse_label_config
from backend.main import create_app
from backend.queues import Queues
from backend.results import region
from model import DetectionParams, GroundingDinoDetector
from model.images import decode_image
from tests.backend.conftest import FakeBucket, FakeLabelStudio
from tests.images import png
from tests.processes import wait_for

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "label_studio"  # recorded from Label Studio 1.23.2
CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/><Label value="dog"/><Label value="vehicle" predicted_values="car,truck"/>'
    "</RectangleLabels></View>"
)
PROMPT_CONFIG = CONFIG.replace("<RectangleLabels", '<TextArea name="prompt" toName="image"/><RectangleLabels')
THRESHOLDS = {"box_threshold": 0.3, "text_threshold": 0.25}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A local-files document root and a Label Studio media root holding the test images."""
    docs = tmp_path_factory.mktemp("docs")
    media = tmp_path_factory.mktemp("media")
    for name, size, seed in [
        ("wide.png", (96, 48), 1),
        ("tall.png", (40, 88), 2),
        ("square.png", (64, 64), 3),
    ]:
        (docs / name).write_bytes(png(*size, seed))
    (docs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    upload = media / "upload" / "1"
    upload.mkdir(parents=True)
    for task in json.loads((SAMPLES / "ls_to_backend_predict_batch.json").read_text())["body"]["tasks"]:
        name = Path(task["data"]["image"]).name  # e.g. f8913674-up_afc436_0_64x48.png
        width, height = (int(v) for v in name.rsplit("_", 1)[1].removesuffix(".png").split("x"))
        (upload / name).write_bytes(png(width, height, task["id"]))
    return docs, media


@pytest.fixture(scope="module")
def settings(tiny_checkpoint: Path, roots: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(
        detector_checkpoint=str(tiny_checkpoint),
        device="cpu",
        data_dir=tmp_path_factory.mktemp("data"),  # embedded Redis + in-process worker: the default start
        local_files_document_root=roots[0],
        media_root=roots[1],
        label_studio_url="http://127.0.0.1:9",  # nothing listens: every image must come from the roots
        **THRESHOLDS,
    )


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        wait_until_up(client)
        yield client


def wait_until_up(client: TestClient, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        body = client.get("/health").json()
        if body["status"] == "UP":
            return body
        time.sleep(0.1)
    raise AssertionError(f"the embedded worker never became ready: {body}")


def task(task_id: int, name: str) -> dict:
    return {"id": task_id, "data": {"image": f"/data/local-files/?d={name}"}}


def predict(client: TestClient, tasks: list[dict], config: str = CONFIG, **extra: object) -> dict:
    response = client.post("/predict", json={"tasks": tasks, "project": "7.123", "label_config": config, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def expected_regions(detector: GroundingDinoDetector, data: bytes) -> list[tuple]:
    """What the backend must return for one image: the detector's boxes, in percent, with labels."""
    target = parse_label_config(CONFIG)
    img = decode_image(data, max_pixels=10**8)
    found = detector.detect([img], list(target.phrases), DetectionParams(**THRESHOLDS), groups=target.phrase_label)[0]
    return [_key(region(d, target.labels[target.phrase_label[d.phrase]], target, *img.size)) for d in found]


def _key(r: dict) -> tuple:
    v = r["value"]
    box = tuple(round(v[k], 3) for k in ("x", "y", "width", "height"))
    return (v["rectanglelabels"][0], *box, round(r["score"], 4), r["original_width"], r["original_height"])


def test_health_answers_at_once_while_the_model_loads(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_load = worker.load_predictor
    monkeypatch.setattr(worker, "load_predictor", lambda s: release.wait(30) and real_load(s))  # a slow load
    with TestClient(create_app(settings.model_copy(update={"data_dir": tmp_path}))) as client:
        time.sleep(0.5)
        started = time.perf_counter()
        response = client.get("/health")
        assert time.perf_counter() - started < 1.0
        body = response.json()
        assert response.status_code == 200 and body["status"] == "DEGRADED", body
        assert body["workers"]["live"] == 1 and "loading" in body["reason"]
        release.set()
        assert wait_until_up(client)["workers"]["ready"] == 1


def test_health_without_workers_is_degraded(settings: Settings, tmp_path: Path) -> None:
    alone = settings.model_copy(update={"data_dir": tmp_path, "embedded_worker": False})
    with TestClient(create_app(alone)) as client:
        body = client.get("/health").json()
        assert body["status"] == "DEGRADED" and body["workers"]["live"] == 0
        assert "dinolabel worker" in body["reason"]
        assert body["queues"] == dict.fromkeys(
            [
                "dinolabel-interactive",
                "dinolabel-embed",
                "dinolabel-plan",
                "dinolabel-combined",
                "dinolabel-bulk",
                "dinolabel-store",
                "dinolabel-index-plan",
            ],
            0,
        )


def test_setup_returns_the_version_predict_uses(client: TestClient) -> None:
    setup = client.post("/setup", json={"project": "7.123", "schema": CONFIG, "hostname": "http://127.0.0.1:9"})
    assert setup.status_code == 200, setup.text
    version = setup.json()["model_version"]
    body = predict(client, [task(1, "wide.png")])
    assert body["model_version"] == version and body["results"][0]["model_version"] == version


def test_extra_params_change_thresholds_and_version(client: TestClient, tiny_detector: GroundingDinoDetector) -> None:
    base = client.post("/setup", json={"project": "8.1", "schema": CONFIG}).json()["model_version"]
    strict = client.post("/setup", json={"project": "8.2", "schema": CONFIG, "extra_params": {"box_threshold": 0.8}})
    assert strict.status_code == 200 and strict.json()["model_version"] != base
    body = client.post(
        "/predict", json={"tasks": [task(1, "wide.png")], "project": "8.2", "label_config": CONFIG}
    ).json()
    assert body["model_version"] == strict.json()["model_version"]
    assert all(r["score"] > 0.8 for r in body["results"][0]["result"])
    for bad in ({"box_threshold": 2}, {"box_treshold": 0.4}, "{not json"):
        response = client.post("/setup", json={"project": "8.3", "schema": CONFIG, "extra_params": bad})
        assert response.status_code == 422, bad


def test_predict_returns_the_detectors_boxes_in_percent_in_task_order(
    client: TestClient, tiny_detector: GroundingDinoDetector, roots: tuple[Path, Path]
) -> None:
    names = ["tall.png", "wide.png", "square.png", "wide.png"]
    body = predict(client, [task(i, n) for i, n in enumerate(names, start=10)])
    assert len(body["results"]) == 4
    for name, result in zip(names, body["results"], strict=True):
        got = [_key(r) for r in result["result"]]
        assert got == expected_regions(tiny_detector, (roots[0] / name).read_bytes())
        assert got, f"{name}: the tiny model finds boxes at threshold 0.3"
        assert {r["value"]["rectanglelabels"][0] for r in result["result"]} <= {"cat", "dog", "vehicle"}
        assert all(r["from_name"] == "label" and r["to_name"] == "image" for r in result["result"])
        assert result["score"] == pytest.approx(sum(r["score"] for r in result["result"]) / len(result["result"]))
    assert body["results"][1]["result"][0]["original_width"] == 96


def test_a_broken_image_fails_only_its_own_task(client: TestClient) -> None:
    tasks = [task(1, "wide.png"), task(2, "broken.png"), task(3, "missing.png"), {"id": 4, "data": {"x": 1}},
             task(5, "../outside.png"), task(6, "tall.png")]  # fmt: skip
    results = predict(client, tasks)["results"]
    assert len(results) == 6
    assert [bool(r["result"]) for r in results] == [True, False, False, False, False, True]
    assert all(r["score"] == 0.0 for r in results[1:5])


def test_exif_rotated_jpeg_gets_boxes_in_the_displayed_frame(client: TestClient, roots: tuple[Path, Path]) -> None:
    stored = Image.open(io.BytesIO(png(80, 48, 4)))  # stored landscape, displayed portrait
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    out = io.BytesIO()
    stored.save(out, "JPEG", quality=95, exif=exif)
    (roots[0] / "rotated.jpg").write_bytes(out.getvalue())
    displayed = decode_image(out.getvalue(), max_pixels=10**8)
    assert displayed.size == (48, 80)
    plain = io.BytesIO()
    displayed.save(plain, "PNG")  # the same pixels, upright, without EXIF
    (roots[0] / "upright.png").write_bytes(plain.getvalue())
    rotated, upright = predict(client, [task(1, "rotated.jpg"), task(2, "upright.png")])["results"]
    assert rotated["result"], "boxes found"
    assert [_key(r) for r in rotated["result"]] == [_key(r) for r in upright["result"]]
    assert {(r["original_width"], r["original_height"]) for r in rotated["result"]} == {(48, 80)}


def test_recorded_label_studio_requests_replay(client: TestClient) -> None:
    setup = json.loads((SAMPLES / "ls_to_backend_setup.json").read_text())["body"]
    batch = json.loads((SAMPLES / "ls_to_backend_predict_batch.json").read_text())["body"]
    setup["extra_params"] = THRESHOLDS
    version = client.post("/setup", json=setup).json()["model_version"]
    body = client.post("/predict", json=batch)
    assert body.status_code == 200, body.text
    results = body.json()["results"]
    assert [r["model_version"] for r in results] == [version, version]
    sizes = [{(r["original_width"], r["original_height"]) for r in p["result"]} for p in results]
    assert sizes == [{(64, 48)}, {(72, 52)}]  # read from the media root, in task order
    assert {r["value"]["rectanglelabels"][0] for p in results for r in p["result"]} <= {"cat", "dog"}


def test_typed_prompt_is_detected_and_mapped_to_project_labels(client: TestClient) -> None:
    context = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                           "value": {"text": ["red car . kitten"]}}]}  # fmt: skip
    body = predict(client, [task(1, "square.png")], PROMPT_CONFIG, params={"context": context})
    regions = body["results"][0]["result"]
    assert regions
    by_label = {r["value"]["rectanglelabels"][0]: r["meta"]["text"][0] for r in regions}
    assert set(by_label) <= {"vehicle", "cat"}
    if "cat" in by_label:  # "kitten" matches no label: first label, and the result says so
        assert "matches no label" in by_label["cat"]
    if "vehicle" in by_label:
        assert by_label["vehicle"] == "prompt: red car"
    assert len(by_label) == 2, "both typed phrases produced boxes on this image"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"tasks": "nope"}, "tasks"),
        ({"tasks": [{"id": 1}]}, "data"),
        ({"tasks": [], "project": "99.1"}, "label_config"),
        ({"tasks": [], "label_config": "<View/>"}, "RectangleLabels"),
    ],
)
def test_malformed_requests_get_a_4xx_with_a_reason(client: TestClient, payload: dict, reason: str) -> None:
    response = client.post("/predict", json=payload)
    assert response.status_code == 422
    assert reason in response.text


def test_webhook_accepts_label_studio_events(client: TestClient) -> None:
    event = json.loads((SAMPLES / "ls_to_backend_webhook.json").read_text())["body"]
    response = client.post("/webhook", json=event)
    assert response.status_code == 200 and response.json()["action"] == "ANNOTATION_CREATED"
    assert client.post("/webhook", content=b"not json").status_code == 400


def test_metrics_count_requests_tasks_and_model_load(client: TestClient) -> None:
    predict(client, [task(1, "wide.png"), task(2, "broken.png")])
    text = client.get("/metrics").text
    assert 'dinolabel_http_requests_total{method="POST",route="/predict",status="200"}' in text
    assert 'dinolabel_predicted_tasks_total{outcome="failed"}' in text
    assert 'dinolabel_workers{state="ready"} 1.0' in text
    assert 'dinolabel_queue_depth{queue="dinolabel-interactive"} 0.0' in text
    load = [line for line in text.splitlines() if line.startswith("dinolabel_model_load_seconds{")]
    assert load and float(load[0].split()[-1]) > 0


def test_basic_auth_when_configured(settings: Settings, tmp_path: Path) -> None:
    secured = settings.model_copy(
        update={
            "basic_auth_user": "ls",
            "basic_auth_pass": SecretStr("s3cret"),
            "embedded_worker": False,
            "data_dir": tmp_path,
        }
    )
    with TestClient(create_app(secured)) as client:
        assert client.get("/health").status_code == 401
        assert client.get("/health", auth=("ls", "wrong")).status_code == 401
        assert client.get("/health", auth=("ls", "s3cret")).status_code == 200
        good = "Basic " + base64.b64encode(b"ls:s3cret").decode()
        assert client.post("/setup", json={"schema": CONFIG}, headers={"Authorization": good}).status_code == 200
        assert client.post("/webhook", json={"action": "X"}).status_code == 200  # Label Studio sends no auth


def test_a_trickling_image_fails_alone_and_the_worker_serves_the_next_request(
    settings: Settings,
    tmp_path: Path,
    fake_bucket: FakeBucket,
    tiny_detector: GroundingDinoDetector,
    roots: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The trickle promises 100,000 bytes and sends one a second: no read ever times out.
    limited = settings.model_copy(
        update={"data_dir": tmp_path, "image_total_timeout": 2.0, "fetch_allow": ("127.0.0.1",)}
    )
    trickle = {"id": 1, "data": {"image": f"{fake_bucket.url}/trickle"}}
    with TestClient(create_app(limited)) as client:
        wait_until_up(client)
        first = predict(client, [trickle, task(2, "wide.png")])["results"]
        assert first[0]["result"] == [] and first[0]["score"] == 0.0
        wide = expected_regions(tiny_detector, (roots[0] / "wide.png").read_bytes())
        assert [_key(r) for r in first[1]["result"]] == wide
        assert "took longer than 2 s in total" in caplog.text
        # The worker is free again: the next request gets the model's boxes.
        second = predict(client, [task(3, "square.png")])
        assert "job_id" not in second, "answered by the worker, not handed off"
        got = [_key(r) for r in second["results"][0]["result"]]
        assert got and got == expected_regions(tiny_detector, (roots[0] / "square.png").read_bytes())
        assert client.get("/health").json()["status"] == "UP"


def test_health_reports_a_worker_stuck_past_its_job_time_out(
    settings: Settings, tmp_path: Path, fake_ls: FakeLabelStudio
) -> None:
    with TestClient(create_app(settings.model_copy(update={"data_dir": tmp_path}))) as client:
        name = wait_until_up(client)["workers"]["details"][0]["name"]
        queues = Queues.on(client.app.state.service.connection)
        # Blocked in a socket read, which RQ's 1 s timer cannot interrupt.
        job = queues.interactive.enqueue("tests.backend.conftest.wait_for_answer", f"{fake_ls.url}/slow", job_timeout=1)

        def degraded() -> dict:
            body = client.get("/health").json()
            return body if body["status"] == "DEGRADED" else {}

        body = wait_for(degraded, 30, "/health to report the stuck worker")
        assert body["reason"].startswith(f"worker {name} has been busy on job {job.id} for ")
        assert body["reason"].endswith(" s, past its time-out of 1 s")
        # /predict jobs run on the worker's interactive thread, which publishes its job under its queue's name
        busy = body["workers"]["details"][0]["busy_dinolabel-interactive"]
        assert busy["function"] == "tests.backend.conftest.wait_for_answer"
        fake_ls.release.set()
        assert wait_until_up(client)["workers"]["details"][0]["busy_dinolabel-interactive"] is None
