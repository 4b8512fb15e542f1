"""What ``POST /predict`` costs around the model: HTTP, the Redis queue, RQ, image reading.

Why this script exists: on a GPU one grounding-dino-tiny forward pass takes tens of milliseconds, so
what the service adds around it decides whether an annotator waits for the model or for the plumbing.
With a detector that answers at once (no boxes) only the plumbing is left to time.

Three paths, same task (one small PNG read from a Local Files document root), same counts:

* ``direct``: the stub ``Predictor.predict`` called in this process (image read + decode, result
  building; no HTTP, no queue). The floor.
* ``queue``: the payload that ``/predict`` enqueues, put on the interactive queue from this process,
  waiting for the worker's result (``job.latest_result``), no HTTP. Tells the queue's share.
* ``http``: ``POST /predict`` with one task, as Label Studio sends it, to ``dinolabel serve``.

Shaped as deployed: ``dinolabel serve`` is a child process (the CLI's own uvicorn) on a real
redis-server, and each stub worker is a child process (this file run with ``--stub-worker``:
``backend.worker.load_predictor`` is replaced by one returning a ``Predictor`` around the stub, then
the real ``run_worker`` takes jobs). Clients are threads of this process, each with its own
keep-alive httpx client, like annotators' browsers behind Label Studio. Every client's first requests
are a warm-up and not counted. ``ratio`` is p50 of a path / p50 of ``direct`` at the same concurrency.

Run from the repository root::

    .venv/bin/python bench/predict_overhead.py [--requests 300] [--clients 1,32] [--workers 1,2,4]

On a small machine the API, Redis, the workers and the clients share the cores, so the numbers are
an upper bound for a machine where they do not; each line says how many cores *other* processes used.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Offline: nothing here needs the Hub, and a stray download attempt must not stall a timing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run as a plain script: the repository root (for backend, model and tests) is not on sys.path otherwise.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import torch
from PIL import Image

from backend.config import Settings
from backend.image_source import ImageFetcher
from backend.jobs import RESULT_TTL, predict_tasks
from backend.labeling import parse_label_config
from backend.predictor import Predictor
from backend.queues import Queues, connect
from bench.common import OtherLoad, busy, machine_info, positive_ints, write_report
from model import DetectionParams, model_version
from model.pipeline import Stages
from tests.images import png
from tests.processes import RedisServer, Service, health, wait_for

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT_NAME = "stub-detector"  # only names the model version; nothing is loaded
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/><Label value="dog"/><Label value="traffic light"/></RectangleLabels></View>'
)
IMAGE_NAME = "stub.png"
IMAGE_SIZE = (64, 48)  # small on purpose: the image path should cost little next to the plumbing
PROJECT = 1
HTTP_TIMEOUT_S = 120.0
log = logging.getLogger("bench.predict_overhead")


# --- the stub model and its worker ------------------------------------------------------------------------


class StubDetector:
    """Answers every image with no boxes, at once: what remains is everything around the model."""

    device = torch.device("cpu")  # the pipeline copies batches to it; /health reports it

    def stages(
        self, phrases: Sequence[str], params: DetectionParams, *, groups: Sequence[int] | None = None
    ) -> Stages[Image.Image, tuple[int, int], list[Any]]:
        """No resize, no model: a one-number tensor per image (all batch together), no boxes."""
        return Stages(
            preprocess=lambda image: (torch.zeros((1, 1)), image.size),
            forward=lambda pixels: None,
            postprocess=lambda outputs, sizes: [[] for _ in sizes],
        )


def stub_predictor(settings: Settings) -> Predictor:
    """Same signature and wrapping as ``backend.worker.load_predictor``, with the stub inside."""
    return Predictor(
        StubDetector(),  # type: ignore[arg-type]  # duck-typed: Predictor only calls stages() and device
        batch_size=settings.batch_size or 1,  # None: load_predictor's default off a GPU
        max_pixels=settings.image_max_pixels,
        download_threads=settings.image_download_threads,
    )


def stub_worker_main() -> int:
    """``--stub-worker``: the real ``run_worker`` on the main thread (SIGTERM stops it), stub model."""
    import backend.worker

    settings = Settings()  # from the DINOLABEL_* environment the parent sets
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backend.worker.load_predictor = stub_predictor
    if not settings.redis_url:
        raise SystemExit("--stub-worker needs DINOLABEL_REDIS_URL")
    backend.worker.run_worker(settings, connect(settings.redis_url))
    return 0


class StubWorker(Service):
    """This file with ``--stub-worker`` as a child process (own session, log in a file)."""

    def start(self) -> StubWorker:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--stub-worker"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO,
            )
        return self


# --- load generation --------------------------------------------------------------------------------------


@dataclass
class Level:
    """One path at one concurrency: latencies of the counted requests and their wall time."""

    path: str
    workers: int
    clients: int
    requests: int
    warmup: int
    wall_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    requests_per_s: float
    other_processes_cores: float | None


def drive(
    make_call: Callable[[], tuple[Callable[[int], None], Callable[[], None]]],
    clients: int,
    count: int,
    warmup_per_client: int,
) -> tuple[list[float], float]:
    """``clients`` threads share ``count`` calls after their own warm-up; (latencies in s, wall s).

    ``make_call`` runs on each thread and returns (call, close): one client's keep-alive connection
    lives on its own thread, as a browser's would.
    """
    ticket = itertools.count()  # next() on it is atomic in CPython: a lock-free shared counter
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)
    done = threading.Barrier(clients + 1)

    def client() -> None:
        mine: list[float] = []
        close: Callable[[], None] = lambda: None  # noqa: E731
        try:
            call, close = make_call()
            for index in range(warmup_per_client):
                call(-1 - index)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        ready.wait()
        try:
            while (index := next(ticket)) < count and not errors:
                started = time.perf_counter()
                call(index)
                mine.append(time.perf_counter() - started)
        except BaseException as exc:
            errors.append(exc)
        finally:
            close()
            with lock:
                latencies.extend(mine)
            done.wait()

    threads = [threading.Thread(target=client, name=f"client-{i}", daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()
    started = time.perf_counter()
    done.wait()
    wall = time.perf_counter() - started
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed; first: {errors[0]!r}") from errors[0]
    return latencies, wall


def summarise(
    path: str, workers: int, clients: int, latencies: list[float], wall: float, warmup: int, other: float | None
) -> Level:
    ms = sorted(v * 1000 for v in latencies)
    return Level(
        path=path,
        workers=workers,
        clients=clients,
        requests=len(ms),
        warmup=warmup,
        wall_s=round(wall, 3),
        p50_ms=round(statistics.median(ms), 3),
        p99_ms=round(statistics.quantiles(ms, n=100, method="inclusive")[98], 3),
        mean_ms=round(statistics.fmean(ms), 3),
        max_ms=round(ms[-1], 3),
        requests_per_s=round(len(ms) / wall, 1),
        other_processes_cores=other,
    )


def task(index: int) -> dict[str, Any]:
    """One Label Studio task on the document root's PNG; ids differ per request, as tasks would."""
    return {
        "id": 100_000 + index if index >= 0 else 10 - index,
        "data": {"image": f"/data/local-files/?d={IMAGE_NAME}"},
    }


def http_caller(url: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A client that sends ``/predict`` with one task, the way Label Studio does."""
    http = httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S)

    def call(index: int) -> None:
        body = {"tasks": [task(index)], "project": f"{PROJECT}.{int(time.time())}", "label_config": LABEL_CONFIG}
        response = http.post("/predict", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"/predict answered {response.status_code}: {response.text[:300]}")
        answer = response.json()
        if len(answer["results"]) != 1 or answer.get("job_id"):  # a hand-off answers fast and empty
            raise RuntimeError(f"/predict did not answer the task itself: {answer}")

    return call, http.close


def queue_caller(redis_url: str, version: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """What the ``/predict`` route does with Redis, without HTTP, FastAPI and config parsing."""
    connection = connect(redis_url)
    queue = Queues.on(connection).interactive
    params = DetectionParams().__dict__

    def call(index: int) -> None:
        payload = {
            "tasks": [task(index)],
            "label_config": LABEL_CONFIG,
            "params": params,
            "model_version": version,
            "project": None,
            "context": None,
        }
        job = queue.enqueue(predict_tasks, payload, result_ttl=RESULT_TTL, job_timeout=120)
        result = job.latest_result(timeout=60)
        if result is None or result.type != result.Type.SUCCESSFUL:
            raise RuntimeError(f"queued job {job.id} did not succeed: {result and result.exc_string}")

    return call, connection.close


def direct_caller(root: Path, version: str) -> Callable[[], tuple[Callable[[int], None], Callable[[], None]]]:
    """The floor: one stub Predictor shared by all threads (as in a worker), called in-process."""
    predictor = stub_predictor(Settings(redis_url="unused"))
    fetcher = ImageFetcher(label_studio_url=None, api_key=None, document_root=root)
    target = parse_label_config(LABEL_CONFIG)
    params = DetectionParams()

    def make() -> tuple[Callable[[int], None], Callable[[], None]]:
        def call(index: int) -> None:
            outcome = predictor.predict([task(index)], target, params, version, fetcher)
            if len(outcome.predictions) != 1 or outcome.failures:
                raise RuntimeError(f"direct predict failed: {outcome.failures}")

        return call, lambda: None

    return make


def micro(what: Callable[[], object], count: int = 200) -> float:
    """Mean milliseconds of one call (after one uncounted call)."""
    what()
    started = time.perf_counter()
    for _ in range(count):
        what()
    return (time.perf_counter() - started) / count * 1000


# --- the run ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cluster(directory: Path, root: Path, log_level: str) -> Iterator[tuple[RedisServer, str, Callable[[int], None]]]:
    """redis-server + ``dinolabel serve``; yields (redis, API URL, scale(n) that sets the stub workers)."""
    redis_server = RedisServer(directory).start()
    port = _free_port()
    env = {
        "DINOLABEL_REDIS_URL": redis_server.url,
        "DINOLABEL_HOST": "127.0.0.1",
        "DINOLABEL_PORT": str(port),
        "DINOLABEL_DETECTOR_CHECKPOINT": CHECKPOINT_NAME,
        "DINOLABEL_LOCAL_FILES_DOCUMENT_ROOT": str(root),
        "DINOLABEL_DATA_DIR": str(directory / "data"),
        "DINOLABEL_LOG_LEVEL": log_level,
    }
    api = Service(["serve"], env, directory / "api.log").start()
    url = f"http://127.0.0.1:{port}"
    workers: list[StubWorker] = []

    def scale(count: int) -> None:
        while len(workers) < count:
            workers.append(StubWorker([], env, directory / f"worker{len(workers)}.log").start())
        wait_for(
            lambda: (health(url).get("workers") or {}).get("ready", 0) >= count,
            60,
            f"{count} stub worker(s) ready\n{api.log_tail()}\n{workers[-1].log_tail()}",
            interval=0.2,
        )

    try:
        yield redis_server, url, scale
    finally:
        for worker in workers:
            worker.stop()
        api.stop()
        redis_server.stop()


def _free_port() -> int:
    from tests.labelstudio import free_port

    return free_port()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="counted requests per path and level")
    parser.add_argument("--warmup", type=int, default=20, help="uncounted requests per level (at least 1 per client)")
    parser.add_argument("--clients", type=positive_ints, default=[1, 32], help="concurrent clients, e.g. 1,32")
    parser.add_argument(
        "--workers", type=positive_ints, default=[1, 2, 4], help="stub workers; more than 1 only at the most clients"
    )
    parser.add_argument("--log-level", default="info", help="the API's and workers' (info: as deployed)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "predict_overhead.json")
    parser.add_argument("--stub-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stub_worker:
        return stub_worker_main()
    run_started = time.perf_counter()
    info = machine_info()
    hardware = f"{info['cpu_model']} x{info['cpu_cores_usable']} cores"
    version = model_version(CHECKPOINT_NAME, revision=None, params=DetectionParams(), precision="fp32")
    rows: list[Level] = []

    def record(level: Level) -> None:
        rows.append(level)
        print(
            f"predict_overhead path={level.path} hw={hardware!r} model=stub precision=n/a batch=1 "
            f"workers={level.workers} clients={level.clients} n={level.requests} | p50 {level.p50_ms:.2f} ms "
            f"p99 {level.p99_ms:.2f} ms mean {level.mean_ms:.2f} ms | {level.requests_per_s:.1f} req/s | "
            f"{busy(level.other_processes_cores)}",
            flush=True,
        )

    def measure(path: str, workers: int, clients: int, make: Callable[[], Any]) -> None:
        warmup = max(1, math.ceil(args.warmup / clients))
        meter = OtherLoad()
        latencies, wall = drive(make, clients, args.requests, warmup)
        record(summarise(path, workers, clients, latencies, wall, warmup * clients, meter.cores()))

    with tempfile.TemporaryDirectory(prefix="dinolabel-overhead-") as tmp:
        directory = Path(tmp)
        root = directory / "files"
        root.mkdir()
        (root / IMAGE_NAME).write_bytes(png(*IMAGE_SIZE, 1))
        fetcher = ImageFetcher(label_studio_url=None, api_key=None, document_root=root)
        breakdown = {
            "parse_label_config_ms": round(micro(lambda: parse_label_config(LABEL_CONFIG)), 3),
            "model_version_ms": round(
                micro(
                    lambda: model_version(CHECKPOINT_NAME, revision=None, params=DetectionParams(), precision="fp32")
                ),
                4,
            ),
            "fetch_local_png_ms": round(micro(lambda: fetcher.fetch(f"/data/local-files/?d={IMAGE_NAME}")), 3),
        }
        print(f"predict_overhead breakdown hw={hardware!r} (in-process, mean of 200) | {breakdown}", flush=True)

        direct = direct_caller(root, version)
        for clients in args.clients:
            measure("direct", 0, clients, direct)
        with cluster(directory, root, args.log_level) as (redis_server, url, scale):
            for workers in args.workers:
                scale(workers)
                for clients in args.clients:
                    if workers > 1 and clients != max(args.clients):
                        continue
                    measure("queue", workers, clients, lambda: queue_caller(redis_server.url, version))
                    measure("http", workers, clients, lambda u=url: http_caller(u))

    floor = {r.clients: r for r in rows if r.path == "direct"}
    ratios = []
    for row in rows:
        base = floor.get(row.clients)
        if row.path == "direct" or base is None:
            continue
        ratio = round(row.p50_ms / base.p50_ms, 1)
        ratios.append({"path": row.path, "workers": row.workers, "clients": row.clients, "p50_ratio": ratio})
        print(
            f"predict_overhead ratio path={row.path} workers={row.workers} clients={row.clients} | "
            f"p50 {row.p50_ms:.2f} ms / direct p50 {base.p50_ms:.2f} ms = {ratio}x",
            flush=True,
        )
    info["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report = {
        "benchmark": "predict_overhead",
        "model": "stub (no boxes, returns at once)",
        "label_config": LABEL_CONFIG,
        "image": {"name": IMAGE_NAME, "size": list(IMAGE_SIZE)},
        "machine": info,
        "api_log_level": args.log_level,
        "breakdown": breakdown,
        "results": [asdict(r) for r in rows],
        "ratios": ratios,
        "wall_s": round(time.perf_counter() - run_started, 1),
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up the children on SIGTERM too
    sys.exit(main())
