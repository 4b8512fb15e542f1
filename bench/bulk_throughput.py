"""Tasks per second of a bulk job against one ``/predict`` per task, through a real Label Studio.

Why this script exists: Label Studio asks a backend for one task at a time when an annotator opens
tasks one by one, and the worker then pays per task for everything around the forward pass (a
queue round trip, one image download from Label Studio, a batch of one). A bulk job
(``POST /v1/projects/{id}/preannotate``) plans the project once, batches the tasks and writes the
predictions back in one import per batch. This measures what that is worth, in the same run, with
the same model, worker, images and Label Studio:

* ``sync``: for each task, one ``POST /predict`` with that one task (body as Label Studio sends it:
  tasks, ``project`` "<id>.<timestamp>", ``label_config``), one after another, after one uncounted
  warm-up request; tasks/s = N / the sum of the per-task wall times. Nothing is written to Label
  Studio on this path (Label Studio would store the answer itself).
* ``bulk``: ``POST /v1/projects/{id}/preannotate`` on a second project holding the same images, then
  ``GET /v1/jobs/{id}`` every 0.2 s until it is final; tasks/s = N / wall time from the POST to the
  poll that saw it done. Every task must then hold exactly one prediction in Label Studio.

``ratio`` = bulk tasks/s / sync tasks/s (> 1: the bulk path is faster).

Started here as child processes: Label Studio (in a temporary directory; the first start runs its
migrations, 20-45 s), a redis-server, ``dinolabel serve`` and one ``dinolabel worker``, configured as
the end-to-end tests' cluster (the worker downloads the images from Label Studio with its token).
The images are N synthetic 640x480 PNGs in Label Studio's document root, served through a
local-files storage of each project.

Models: without ``--tiny``, a random-weight checkpoint of the real grounding-dino-tiny architecture
(the cost of a forward pass does not depend on the weights; built once into ``bench/out/cache/``,
shared with ``predict_latency.py``), or ``--checkpoint``; with ``--tiny``, the tests' tiny random
checkpoint, where the model costs next to nothing and the plumbing dominates.

Run from the repository root::

    .venv/bin/python bench/bulk_throughput.py [--tasks 12] [--precision bf16|fp32|fp16]
    .venv/bin/python bench/bulk_throughput.py --tiny [--tasks 200]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Offline: the benchmark must never stall on Hub retries (a hub id given to --checkpoint must be on disk).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run as a plain script: the repository root (for backend, model and tests) is not on sys.path otherwise.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bench.common import OtherLoad, busy, ensure_random_checkpoint, machine_info, write_report
from tests.labelstudio import LabelStudioAPI, LabelStudioServer, free_port
from tests.processes import RedisServer, Service, health, wait_for

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (640, 480)  # width, height: a common camera size; all equal, so same-size batching applies
LABELS = ("cat", "dog", "traffic light")
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    + "".join(f'<Label value="{label}"/>' for label in LABELS)
    + "</RectangleLabels></View>"
)
IMAGE_FOLDER = "bench-images"
REAL_SIZE_LABEL = "grounding-dino-tiny(random weights, real size)"
TINY_LABEL = "tiny random grounding-dino (tests)"
POLL_S = 0.2
READY_TIMEOUT_S = 600.0
JOB_TIMEOUT_S = 1800.0


# --- inputs -----------------------------------------------------------------------------------------------


def make_images(count: int, folder: Path, *, seed: int = 0) -> list[str]:
    """Write ``count`` 640x480 PNGs (gradient, shapes, mild noise) into ``folder``; return their names.

    Structured rather than flat, so that PNG decoding and the processor's resize cost what photos
    would; seeded, so every run times the same pixels.
    """
    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIZE
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        angle = rng.uniform(0, 2 * np.pi)
        ramp = xs / width * np.cos(angle) + ys / height * np.sin(angle)
        ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
        start, end = rng.integers(0, 256, size=(2, 3))
        image = Image.fromarray((start * (1 - ramp[..., None]) + end * ramp[..., None]).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(6, 15))):
            x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            box = (
                x0,
                y0,
                min(width - 1, x0 + int(rng.integers(30, 260))),
                min(height - 1, y0 + int(rng.integers(30, 200))),
            )
            fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=fill, outline=(0, 0, 0), width=3)
        pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(radius=1.0)), dtype=np.int16)
        pixels = pixels + rng.normal(0, 6, size=pixels.shape).astype(np.int16)
        name = f"img_{index:04d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name)
        names.append(name)
    return names


# --- machine ----------------------------------------------------------------------------------------------


def torch_info() -> dict[str, Any]:
    """What this benchmark adds to ``machine_info()`` (the worker's device is added later)."""
    import torch

    info: dict[str, Any] = {"torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --- the cluster ------------------------------------------------------------------------------------------


@dataclass
class Cluster:
    """Label Studio, its API client, and the URL of ``dinolabel serve`` with one worker behind it."""

    server: LabelStudioServer
    ls: LabelStudioAPI
    api_url: str
    worker: dict[str, Any]
    logs: Path
    startup_s: dict[str, float]


@contextlib.contextmanager
def cluster(directory: Path, checkpoint: str, args: argparse.Namespace) -> Iterator[Cluster]:
    """Everything as child processes; stopped in reverse order, whatever happens."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    server = LabelStudioServer(directory / "label-studio")
    redis_server = RedisServer(directory).start()
    services: list[Service] = []
    try:
        server.start()
        timings["label_studio_s"] = round(time.perf_counter() - started, 1)
        port = free_port()
        logs = directory / "logs"
        logs.mkdir()
        env = {
            "DINOLABEL_REDIS_URL": redis_server.url,
            "DINOLABEL_LABEL_STUDIO_URL": server.url,
            "DINOLABEL_LABEL_STUDIO_API_KEY": server.token,
            "DINOLABEL_DETECTOR_CHECKPOINT": checkpoint,
            "DINOLABEL_DEVICE": args.device,
            "DINOLABEL_PRECISION": args.precision,
            "DINOLABEL_BATCH_SIZE": str(args.batch_size),
            "DINOLABEL_BULK_BATCH_SIZE": str(args.bulk_batch_size),
            # A slow CPU must not hand a sync request to a bulk job: that answers fast and empty.
            "DINOLABEL_PREDICT_DEADLINE": "600",
            "DINOLABEL_DATA_DIR": str(directory / "dinolabel"),
            "DINOLABEL_HOST": "127.0.0.1",
            "DINOLABEL_PORT": str(port),
        }
        api_url = f"http://127.0.0.1:{port}"
        services.append(Service(["serve"], env, logs / "api.log").start())
        services.append(Service(["worker"], env, logs / "worker.log").start())
        began = time.perf_counter()

        def ready() -> dict[str, Any] | None:
            body = health(api_url)
            details = (body.get("workers") or {}).get("details") or []
            if any(w.get("state") == "failed" for w in details):
                raise RuntimeError(f"the worker could not load the model: {body.get('reason')}")
            return next((w for w in details if w.get("state") == "ready"), None)

        worker = wait_for(ready, READY_TIMEOUT_S, f"the worker\n{services[-1].log_tail()}", interval=0.25)
        timings["worker_ready_s"] = round(time.perf_counter() - began, 1)
        with LabelStudioAPI(server.url, server.token) as ls:
            yield Cluster(server, ls, api_url, worker, logs, timings)
    finally:
        for service in reversed(services):
            service.stop()
        redis_server.stop()
        server.stop()


def make_project(c: Cluster, title: str, names: Sequence[str]) -> tuple[int, list[dict[str, Any]]]:
    """A project whose tasks are the shared images; returns (project id, tasks as ``{id, data}``).

    Label Studio serves ``/data/local-files/`` only under a local-files storage of the project, so one
    is added on the image folder (not synced: the tasks are imported as JSON, in file order).
    """
    project = c.ls.create_project(title, LABEL_CONFIG)["id"]
    c.ls.add_local_storage(project, c.server.document_root / IMAGE_FOLDER)
    c.ls.import_tasks(project, [{"data": {"image": f"/data/local-files/?d={IMAGE_FOLDER}/{n}"}} for n in names])
    tasks = sorted(c.ls.list_tasks(project), key=lambda t: t["id"])
    return project, [{"id": t["id"], "data": t["data"]} for t in tasks]


# --- the two paths ----------------------------------------------------------------------------------------


def predict_one(http: httpx.Client, project: int, task: dict[str, Any]) -> tuple[float, int]:
    """One ``/predict`` of one task, as Label Studio sends it; (wall s, boxes). Refuses a hand-off."""
    body = {"tasks": [task], "project": f"{project}.{int(time.time())}", "label_config": LABEL_CONFIG}
    started = time.perf_counter()
    response = http.post("/predict", json=body)
    wall = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"/predict answered {response.status_code}: {response.text[:500]}")
    answer = response.json()
    if len(answer["results"]) != 1 or answer.get("job_id"):
        raise RuntimeError(f"/predict did not answer task {task['id']} itself (handed off?): {answer}")
    return wall, len(answer["results"][0]["result"])


def run_sync(c: Cluster, project: int, tasks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One request per task, one after another, after one uncounted warm-up request."""
    with httpx.Client(base_url=c.api_url, timeout=900.0) as http:
        warmup_s, _ = predict_one(http, project, tasks[0])
        meter = OtherLoad()
        walls, boxes = [], 0
        for task in tasks:
            wall, found = predict_one(http, project, task)
            walls.append(wall)
            boxes += found
    total = sum(walls)
    return {
        "tasks": len(tasks),
        "warmup_s": round(warmup_s, 3),
        "total_s": round(total, 3),
        "tasks_per_s": round(len(tasks) / total, 4),
        "p50_ms": round(statistics.median(walls) * 1000, 1),
        "max_ms": round(max(walls) * 1000, 1),
        "per_task_ms": [round(w * 1000, 1) for w in walls],
        "boxes": boxes,
        "other_processes_cores": meter.cores(),
    }


def run_bulk(c: Cluster, project: int, task_ids: Sequence[int]) -> dict[str, Any]:
    """One bulk job over the whole project; then every task must hold exactly one prediction."""
    with httpx.Client(base_url=c.api_url, timeout=60.0) as http:
        meter = OtherLoad()
        started = time.perf_counter()
        response = http.post(f"/v1/projects/{project}/preannotate")
        if response.status_code != 202:
            raise RuntimeError(f"preannotate answered {response.status_code}: {response.text[:500]}")
        job_id = response.json()["id"]
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:
            job = http.get(f"/v1/jobs/{job_id}", params={"failures": 5}).json()
            if job["status"] in ("done", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} not done after {JOB_TIMEOUT_S:.0f} s: {job}")
            time.sleep(POLL_S)
        wall = time.perf_counter() - started
        other = meter.cores()
    if job["status"] != "done" or job["failed"] or job["done"] != len(task_ids):
        raise RuntimeError(f"job {job_id} did not predict every task once: {job}")
    per_task = Counter(p["task"] for p in c.ls.get("/api/predictions", project=project))
    wrong = {t: per_task.get(t, 0) for t in task_ids if per_task.get(t, 0) != 1}
    if wrong or set(per_task) - set(task_ids):
        raise RuntimeError(f"predictions per task are not exactly one: {wrong or dict(per_task)}")
    return {
        "tasks": len(task_ids),
        "job_id": job_id,
        "wall_s": round(wall, 3),
        "tasks_per_s": round(len(task_ids) / wall, 4),
        "job_reported_tasks_per_s": round(job["tasks_per_second"], 4),
        "job_created_to_finished_s": round(job["finished_at"] - job["created_at"], 3),
        "predictions_verified": len(task_ids),
        "other_processes_cores": other,
    }


# --- command line -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, help="N tasks per path (default 12; 200 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny model: the plumbing dominates")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    parser.add_argument("--device", default="auto", help="the worker's DINOLABEL_DEVICE: auto, cpu, cuda ...")
    parser.add_argument("--checkpoint", help="local folder or hub id on disk; default: the random real-size one")
    parser.add_argument("--batch-size", type=int, default=4, help="DINOLABEL_BATCH_SIZE (images per forward pass)")
    parser.add_argument("--bulk-batch-size", type=int, default=32, help="DINOLABEL_BULK_BATCH_SIZE (tasks per job)")
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "out" / "cache")
    parser.add_argument("--out", type=Path, help="default bench/out/bulk_throughput[-tiny].json")
    args = parser.parse_args(argv)
    if args.tiny and args.checkpoint:
        parser.error("--tiny and --checkpoint exclude each other")
    args.tasks = args.tasks or (200 if args.tiny else 12)
    if args.tasks < 1:
        parser.error("--tasks must be at least 1")
    suffix = "-tiny" if args.tiny else ""
    args.out = args.out or REPO / "bench" / "out" / f"bulk_throughput{suffix}.json"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run_started = time.perf_counter()
    info = {**machine_info(), **torch_info()}
    with tempfile.TemporaryDirectory(prefix="dinolabel-bulk-") as tmp:
        directory = Path(tmp)
        if args.tiny:
            from tests.tiny_checkpoints import build_tiny_grounding_dino

            checkpoint, model_label = str(build_tiny_grounding_dino(directory / "tiny-grounding-dino")), TINY_LABEL
        else:
            checkpoint = args.checkpoint or str(ensure_random_checkpoint(args.cache))
            model_label = args.checkpoint or REAL_SIZE_LABEL
        with cluster(directory, checkpoint, args) as c:
            device = str(c.worker.get("device"))
            hardware = info["gpu"] if device.startswith("cuda") and "gpu" in info else None
            hardware = hardware or f"{info['cpu_model']} x{info['cpu_cores_usable']} cores"
            names = make_images(args.tasks, c.server.document_root / IMAGE_FOLDER)
            sync_project, sync_tasks = make_project(c, "bench sync predict", names)
            bulk_project, bulk_tasks = make_project(c, "bench bulk job", names)
            print(
                f"cluster up: Label Studio {c.startup_s['label_studio_s']} s, worker ready "
                f"{c.startup_s['worker_ready_s']} s on {device}; {args.tasks} tasks per path",
                flush=True,
            )
            head = (
                f"bulk_throughput hw={hardware!r} device={device} model={model_label} precision={args.precision} "
                f"workers=1 tasks={args.tasks}"
            )
            sync = run_sync(c, sync_project, sync_tasks)
            print(
                f"{head} path=sync batch=1 concurrency=1 | {sync['total_s']:.1f} s, p50 {sync['p50_ms']:.0f} ms/task, "
                f"{sync['tasks_per_s']:.3f} tasks/s | {busy(sync['other_processes_cores'])}",
                flush=True,
            )
            bulk = run_bulk(c, bulk_project, [t["id"] for t in bulk_tasks])
            print(
                f"{head} path=bulk batch={args.batch_size} bulk_batch={args.bulk_batch_size} concurrency=1 job | "
                f"{bulk['wall_s']:.1f} s, {bulk['tasks_per_s']:.3f} tasks/s, {bulk['predictions_verified']} tasks "
                f"with exactly 1 prediction | {busy(bulk['other_processes_cores'])}",
                flush=True,
            )
            ratio = round(bulk["tasks_per_s"] / sync["tasks_per_s"], 2)
            print(f"{head} ratio bulk/sync tasks/s = {ratio}x", flush=True)
            info["worker"] = c.worker
            startup = c.startup_s
    info["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report = {
        "benchmark": "bulk_throughput",
        "model": model_label,
        "checkpoint": None if args.tiny else checkpoint,
        "precision": args.precision,
        "device": device,
        "batch_size": args.batch_size,
        "bulk_batch_size": args.bulk_batch_size,
        "tasks": args.tasks,
        "image_size": list(IMAGE_SIZE),
        "labels": list(LABELS),
        "machine": info,
        "startup": startup,
        "sync": sync,
        "bulk": bulk,
        "ratio_bulk_over_sync": ratio,
        "wall_s": round(time.perf_counter() - run_started, 1),
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the child processes on SIGTERM too
    sys.exit(main())
