""" "More like these" from uploaded images and from a label's annotated boxes, end to end: the API with its
store writer thread, a real ``dinolabel worker`` process serving a tiny DINOv2 loaded by path, real Redis,
a store filled with that model's own embeddings of the task images, and the fake Label Studio project
(tasks, annotations, the Data Manager's action and tabs) that the ranking is written into.

The project's images: common grey "scenes" (smooth gradients under blurred shapes) and a planted rare
cluster of magenta/yellow checkerboards; the examples (uploads, or annotated boxes around small checkerboard
patches pasted into larger scenes) look like the rare cluster."""

from __future__ import annotations

import base64
import contextlib
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image, ImageOps
from rq import Queue
from rq.serializers import JSONSerializer

from backend.config import Settings
from backend.like_examples import MAX_LABEL_BOXES, LabelBox, crop_box, label_boxes
from backend.main import create_app
from tests.backend.conftest import FakeProjectAPI, serving
from tests.backend.embedding import start_embed_worker, store_embeddings
from tests.images import encode_png, scene
from tests.processes import DINOLABEL, Service, wait_for
from tests.tiny_checkpoints import TINY_DINOV2_ARGS, build_dinov2_checkpoint

PROJECT = 1
COMMON = range(1, 21)  # scenes; tasks 1 and 2 hold a small checkerboard patch under their "bicycle" boxes
RARE = range(21, 25)  # checkerboards
WIDTH, HEIGHT = 160, 120
LABELED = (480, 360)  # the size of tasks 1 and 2: their patch is a small part of them, as an object is
PATCHES = {1: (240, 120, 320, 190), 2: (60, 180, 130, 260)}  # pixels: x0, y0, x1, y1
CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="bicycle"/><Label value="car"/><Label value="person"/></RectangleLabels></View>'
)


def checker(width: int, height: int, seed: int, cell: int | None = None) -> Image.Image:
    """A magenta/yellow checkerboard; the seed shifts its colours, cell size and phase a little."""
    rng = np.random.default_rng(seed)
    cell = cell or 7 + seed % 4
    first = np.clip(np.array([225, 40, 200]) + rng.integers(-20, 20, 3), 0, 255)
    second = np.clip(np.array([245, 225, 35]) + rng.integers(-20, 20, 3), 0, 255)
    rows, cols = np.mgrid[:height, :width]
    odd = ((rows + seed) // cell + cols // cell) % 2 == 1
    return Image.fromarray(np.where(odd[..., None], first, second).astype(np.uint8), "RGB")


def grey_scene(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like picture without colour: the common tasks, and the background of the labeled ones."""
    return ImageOps.grayscale(scene(width, height, seed)).convert("RGB")


def task_image(task: int) -> Image.Image:
    if task in RARE:
        return checker(WIDTH, HEIGHT, seed=task)
    if task not in PATCHES:
        return grey_scene(WIDTH, HEIGHT, seed=300 + task)
    image = grey_scene(*LABELED, seed=300 + task)
    x0, y0, x1, y1 = PATCHES[task]
    image.paste(checker(x1 - x0, y1 - y0, seed=100 + task, cell=3), (x0, y0))  # cells as large once cropped
    return image


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DINOv2 with LayerScale 3: at 1.0 its embeddings of the grey scenes are as close as cosine
    0.96 to the checkerboard crops (0.99 for the rare ones); at 3 they spread (0.80 against 0.98), far from
    the near-duplicate threshold (0.9) that would push tasks back."""
    path = tmp_path_factory.mktemp("dinov2") / "tiny"
    return build_dinov2_checkpoint(path, layer_scale=3.0, img_size=224, **TINY_DINOV2_ARGS)


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    for task in [*COMMON, *RARE]:
        (root / f"img{task}.png").write_bytes(encode_png(task_image(task)))
    return root


@pytest.fixture
def settings(redis_url: str, dinov2: Path, docs: Path, tmp_path: Path, fake_project: FakeProjectAPI) -> Settings:
    """The project indexed with the tiny model's own embeddings of its images."""
    settings = Settings(
        redis_url=redis_url,
        worker_models=("embedder",),
        embedder_model=str(dinov2),
        device="cpu",
        local_files_document_root=docs,
        data_dir=tmp_path / "data",
        label_studio_url=fake_project.url,
        predict_deadline=120,  # the worker process loads torch and the model first
    )
    fake_project.tasks.update({t: {"image": f"/data/local-files/?d=img{t}.png"} for t in [*COMMON, *RARE]})
    store_embeddings(settings, PROJECT, docs, [*COMMON, *RARE])
    return settings


@pytest.fixture
def embed_worker(settings: Settings, tmp_path: Path) -> Iterator[Service]:
    service = start_embed_worker(settings, tmp_path / "worker.log")
    yield service
    service.stop()


def follow(client: TestClient, started: dict, worker: Service | None = None) -> dict:
    def ended() -> dict | bool:
        job = client.get(f"/v1/priority-jobs/{started['id']}").json()
        return job["status"] in ("done", "failed") and job

    return wait_for(ended, 180, f"the prioritize job to end\n{worker.log_tail() if worker else ''}")


def rare_first(client: TestClient, fake_project: FakeProjectAPI) -> None:
    """The planted rare cluster matches the examples best, and its best match is ranked first."""
    ranks = {
        task: int(data["dinolabel_rank"]) for task, data in fake_project.tasks.items() if data.get("dinolabel_rank")
    }
    first = min(ranks, key=ranks.__getitem__)
    assert first in RARE, ranks
    assert fake_project.tasks[first]["dinolabel_reason"] == "like"
    ranking = client.get(f"/v1/projects/{PROJECT}/priority").json()
    explained = {t["task_id"]: t for t in ranking["head"] + ranking["pushed_back"]}
    assert set(explained) == set(ranks), "every ranked task is explained in this small project"
    rare = [explained[t]["like"] for t in RARE]
    common = [t["like"] for task, t in explained.items() if task not in RARE]
    assert min(rare) > max(common), (rare, common)


def holding(connection: redis.Redis, needle: bytes) -> list[bytes]:
    """The keys whose values hold ``needle`` (RQ's job data is zlib-compressed: looked into as well)."""
    read = {
        b"string": lambda key: [connection.get(key)],
        b"hash": lambda key: list(connection.hgetall(key).values()),
        b"list": lambda key: connection.lrange(key, 0, -1),
        b"set": lambda key: list(connection.smembers(key)),
        b"zset": lambda key: connection.zrange(key, 0, -1),
    }
    found = []
    for key in connection.scan_iter():
        for value in read.get(connection.type(key), lambda key: [])(key):
            readable = [value or b""]
            with contextlib.suppress(zlib.error):
                readable.append(zlib.decompress(value or b""))
            if any(needle in text for text in readable):
                found.append(key)
                break
    return found


# --- the boxes of a label --------------------------------------------------------------------------------------


def box(
    label: str, x0: float, y0: float, x1: float, y1: float, to_name: str = "image", size: tuple[int, int] = LABELED
) -> dict:
    """A rectangle as Label Studio stores it in an annotation: percent of the image (``size``) it was drawn on."""
    width, height = size
    value = {
        "x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width,
        "height": 100 * (y1 - y0) / height, "rotation": 0, "rectanglelabels": [label],
    }  # fmt: skip
    return {"type": "rectanglelabels", "from_name": "label", "to_name": to_name, "value": value,
            "original_width": width, "original_height": height, "image_rotation": 0}  # fmt: skip


def annotation(number: int, result: list[dict], when: str, *, cancelled: bool = False) -> dict:
    return {"id": number, "result": result, "was_cancelled": cancelled, "created_at": when, "updated_at": when}


def test_the_boxes_are_spread_over_tasks_newest_annotation_first_and_bounded() -> None:
    tasks = [
        {"id": 7, "annotations": [
            annotation(1, [box("bicycle", 0, 0, 20, 20), box("bicycle", 20, 0, 40, 20)], "2026-01-01T00:00:00Z"),
            annotation(2, [box("bicycle", 50, 50, 90, 90), box("car", 0, 0, 80, 80)], "2026-03-01T00:00:00Z"),
            annotation(3, [box("bicycle", 0, 0, 160, 120)], "2026-04-01T00:00:00Z", cancelled=True),
        ]},
        {"id": 3, "annotations": [annotation(4, [box("bicycle", 10, 10, 14, 50),  # 4 pixels wide: skipped
                                                 box("bicycle", 10, 10, 60, 60, to_name="other"),
                                                 box("bicycle", 100, 60, 150, 110)], "2026-02-01T00:00:00Z")]},
        {"id": 9, "annotations": [annotation(5, [{"type": "rectanglelabels", "to_name": "image",
                                                  "value": {"x": "wide", "rectanglelabels": ["bicycle"]}}],
                                             "2026-02-01T00:00:00Z")]},
    ]  # fmt: skip
    boxes = label_boxes(tasks, "bicycle", "image", limit=10)
    as_pixels = [(b.task_id, round(b.x * LABELED[0] / 100), round(b.y * LABELED[1] / 100)) for b in boxes]
    # Task 7's newest annotation first; then task 3's box; then task 7's older ones.
    assert as_pixels == [(7, 50, 50), (3, 100, 60), (7, 0, 0), (7, 20, 0)]
    assert label_boxes(tasks, "bicycle", "image", limit=2) == boxes[:2]
    assert label_boxes(tasks, "person", "image", limit=10) == []
    many = [{"id": t, "annotations": [annotation(t, [box("bicycle", 0, 0, 50, 50)] * 3, "2026")]} for t in range(40)]
    spread = label_boxes(many, "bicycle", "image", limit=MAX_LABEL_BOXES)
    assert len(spread) == MAX_LABEL_BOXES and [b.task_id for b in spread] == list(range(MAX_LABEL_BOXES))


def test_a_crop_is_the_box_with_some_context_clipped_to_the_image() -> None:
    image = Image.new("RGB", (200, 100))
    centre = crop_box(image, LabelBox(1, x=25.0, y=20.0, width=50.0, height=60.0))  # 100x60 at (50, 20)
    assert centre is not None and centre.size == (120, 72)  # 10% of the box on each side
    corner = crop_box(image, LabelBox(1, x=0.0, y=0.0, width=50.0, height=50.0))
    assert corner is not None and corner.size == (110, 55)  # clipped at the left and top
    assert crop_box(image, LabelBox(1, x=10.0, y=10.0, width=3.0, height=50.0)) is None  # 6 pixels wide
    turned = crop_box(image, LabelBox(1, x=50.0, y=10.0, width=10.0, height=20.0, rotation=90.0))
    # 20x20 turned about its top-left corner (100, 10): it spans x 80..100, y 10..30; 2 pixels of context.
    assert turned is not None and turned.size == (24, 24)


def test_a_labels_annotated_boxes_bring_the_rare_cluster_first(
    settings: Settings, embed_worker: Service, fake_project: FakeProjectAPI
) -> None:
    fake_project.label_config = CONFIG  # no /setup: the API reads the config from Label Studio
    fake_project.labeled.update({1, 2, 3})
    tiny = box("bicycle", 2, 2, 5, 5)  # 3 pixels: skipped
    fake_project.annotations.update({
        1: [annotation(1, [box("bicycle", *PATCHES[1]), box("car", 0, 0, 30, 30)], "2026-11-27T10:00:00Z"),
            annotation(2, [tiny], "2026-11-27T09:00:00Z")],
        2: [annotation(3, [box("bicycle", *PATCHES[2])], "2026-11-27T11:00:00Z"),
            annotation(4, [box("bicycle", 0, 0, *LABELED)], "2026-11-27T12:00:00Z", cancelled=True)],
        3: [annotation(5, [box("car", 10, 10, 90, 90, size=(WIDTH, HEIGHT))], "2026-11-27T08:00:00Z")],
    })  # fmt: skip
    listings = lambda: [s for s in fake_project.seen("/api/tasks") if "annotations" in s.query["include"][0]]  # noqa: E731
    with TestClient(create_app(settings)) as client:
        started = client.post(f"/v1/projects/{PROJECT}/prioritize", json={"like_label": "bicycle"})
        assert started.status_code == 202, started.text
        assert started.json()["like_label"] == "bicycle" and started.json()["like"] == "label 'bicycle'"
        job = follow(client, started.json(), embed_worker)
        assert job["status"] == "done", f"{job}\n{embed_worker.log_tail()}"
        # Task 2's and task 1's boxes; not the tiny one, not the cancelled annotation's, not the car.
        assert job["like_boxes"] == 2 and job["like"] == "label 'bicycle': 2 annotated boxes"
        assert job["ranked"] == len(COMMON) + len(RARE) - 3
        rare_first(client, fake_project)
        assert len(listings()) == 1, "one listing of the annotated tasks"
        query = listings()[0].query
        assert query["fields"] == ["all"] and '"-tasks:completed_at"' in query["query"][0]
        assert '"filter:tasks:annotations_results"' in query["query"][0] and '"bicycle"' in query["query"][0]

        nothing = client.post(f"/v1/projects/{PROJECT}/prioritize", json={"like_label": "person"})
        assert nothing.status_code == 202, nothing.text
        failed = follow(client, nothing.json(), embed_worker)
        assert failed["status"] == "failed" and failed["error"] == "no annotated boxes of label 'person' yet"

    with serving(create_app(settings)) as url:
        command = [DINOLABEL, "prioritize", "--api", url, "--interval", "0.2", "--project", str(PROJECT)]
        done = subprocess.run([*command, "--like-label", "bicycle"], capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        assert "more like these: label 'bicycle': 2 annotated boxes" in done.stdout
        refused = subprocess.run([*command, "--like-label", "tandem"], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 3 and "'tandem' is not a label" in refused.stderr
        assert "'bicycle', 'car', 'person'" in refused.stderr


# --- uploaded images -------------------------------------------------------------------------------------------


def test_uploaded_images_bring_the_rare_cluster_first_and_leave_no_bytes_in_redis(
    settings: Settings, embed_worker: Service, fake_project: FakeProjectAPI, tmp_path: Path
) -> None:
    fake_project.labeled.update({1, 2, 3})
    connection = redis.Redis.from_url(settings.redis_url or "")
    uploads = [encode_png(checker(200, 150, seed=seed)) for seed in (90, 91)]
    needles = [base64.b64encode(data)[40:120] for data in uploads] + [data[100:180] for data in uploads]
    # The search for the bytes finds them where they are (an RQ job's data is compressed).
    probe = Queue("probe", connection=connection, serializer=JSONSerializer).enqueue(
        "math.floor", {"images": [base64.b64encode(uploads[0]).decode()]}
    )
    assert holding(connection, needles[0]) == [f"rq:job:{probe.id}".encode()]
    probe.delete()

    with TestClient(create_app(settings)) as client:
        files = [("image", (f"example{n}.png", data, "image/png")) for n, data in enumerate(uploads)]
        started = client.post(f"/v1/projects/{PROJECT}/prioritize", files=files)
        assert started.status_code == 202, f"{started.text}\n{embed_worker.log_tail()}"
        assert started.json()["like_images"] == 2 and started.json()["like"] == "2 uploaded images"
        job = follow(client, started.json(), embed_worker)
        assert job["status"] == "done", job
        rare_first(client, fake_project)
        assert all(holding(connection, needle) == [] for needle in needles), "the uploads left Redis"

        # An image the worker cannot decode: the request is refused, nothing is queued, nothing is kept.
        jobs_before = len(list(connection.scan_iter("dinolabel:priority-job:*")))
        broken = [("image", ("a.png", uploads[0])), ("image", ("b.png", uploads[1][:400]))]
        refused = client.post(f"/v1/projects/{PROJECT}/prioritize", files=broken)
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"].startswith("image 2: cannot decode PNG image of 200x150")
        assert len(list(connection.scan_iter("dinolabel:priority-job:*"))) == jobs_before
        assert all(holding(connection, needle) == [] for needle in needles)
        assert client.app.state.service.queues.embed.count == 0

    example = tmp_path / "example.png"
    example.write_bytes(uploads[1])
    with serving(create_app(settings)) as url:
        command = [DINOLABEL, "prioritize", "--api", url, "--interval", "0.2", "--project", str(PROJECT)]
        done = subprocess.run([*command, "--like-image", str(example)], capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        assert "more like these: 1 uploaded image" in done.stdout
        missing = subprocess.run([*command, "--like-image", str(tmp_path / "nope.png")], capture_output=True,
                                 text=True, timeout=60)  # fmt: skip
        assert missing.returncode == 2 and "cannot read" in missing.stderr


# --- refusals (no worker needed) -------------------------------------------------------------------------------


def test_examples_that_cannot_be_used_are_refused_naming_the_problem(
    settings: Settings, fake_project: FakeProjectAPI
) -> None:
    url = f"/v1/projects/{PROJECT}/prioritize"
    image = encode_png(checker(64, 48, seed=1))
    with TestClient(create_app(settings)) as client:
        no_config = client.post(url, json={"like_label": "bicycle"})
        assert no_config.status_code == 503 and "labeling config" in no_config.json()["detail"]
        fake_project.label_config = CONFIG

        unknown = client.post(url, json={"like_label": "tandem"})
        assert unknown.status_code == 422
        assert unknown.json()["detail"] == (
            "like_label: 'tandem' is not a label of project 1's labeling config (its labels: 'bicycle', 'car', "
            "'person')"
        )
        both = client.post(url, json={"like_label": "car", "like_task_ids": [3]})
        assert both.status_code == 422 and "not both" in str(both.json()["detail"])

        too_many = client.post(url, files=[("image", (f"{n}.png", image)) for n in range(17)])
        assert too_many.status_code == 422 and "16" in too_many.json()["detail"]
        not_an_image = client.post(url, files=[("image", ("a.png", image)), ("image", ("b.txt", b"just text"))])
        assert not_an_image.status_code == 415
        assert not_an_image.json()["detail"].startswith("image 2: text is not a type searched")
        other_field = client.post(url, files=[("image", ("a.png", image))], data={"uncertainty_weight": "0.5"})
        assert other_field.status_code == 422 and "no other field" in other_field.json()["detail"]
        plain = client.post(url, content=b"bicycle", headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415

        # Nothing above was queued; a known label is: its boxes' embedding waits for a worker.
        service = client.app.state.service
        assert service.queues.embed.count == 0 and service.queues.store.count == 0
        queued = client.post(url, json={"like_label": "car", "uncertainty_weight": 0})
        assert queued.status_code == 202 and queued.json()["status"] == "queued"
        assert [j.func_name for j in service.queues.embed.jobs] == ["backend.like_examples.embed_label_boxes"]
        assert service.queues.store.count == 0, "the ranking is queued once the examples are embedded"

    # Uploads that no worker embeds: the API says so once its deadline passes; no job, nothing left queued.
    with TestClient(create_app(settings.model_copy(update={"predict_deadline": 1}))) as client:
        service = client.app.state.service
        jobs_before = len(list(service.connection.scan_iter("dinolabel:priority-job:*")))
        waited = client.post(url, files=[("image", ("a.png", image))])
        assert waited.status_code == 503, waited.text
        assert waited.json()["detail"].startswith("no worker serving the embedder answered within 1 s")
        assert service.queues.embed.count == 1, "only the label's job of before"
        assert len(list(service.connection.scan_iter("dinolabel:priority-job:*"))) == jobs_before
        assert holding(service.connection, base64.b64encode(image)[40:120]) == []
