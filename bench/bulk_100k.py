"""A bulk job on a big Label Studio project (100k tasks by default), the detector stubbed at a fixed cost.

Why this script exists: at 100k tasks the bulk path was bound by planning (the whole project listed and
every prediction read before the first batch) and by Label Studio's cost per import call, not by the
model. This measures, for one or more versions of the code in the same run, against the same Label
Studio project:

* the import of the tasks into Label Studio (JSON tasks pointing at a few hundred local PNGs);
* the time from ``POST /v1/projects/{id}/preannotate`` to the first prediction counted, and how many
  tasks were planned per second;
* the end-to-end tasks/s over ``--window`` seconds after the first prediction, against the stub's own
  rate (``efficiency``; the goal is >= 0.9);
* Label Studio import calls made and their sizes (from Label Studio's log, and from the worker's log
  where the code says how many rows each call held);
* peak RSS of the API and of the worker, Redis memory used by the job;
* one-task ``/predict`` latency while idle, while the job plans (status ``planning``) and while
  batches run;
* cancel latency: from ``DELETE /v1/jobs/{id}`` until the queues are empty.

The job is cancelled at the end of the window (a 100k job at 40 tasks/s would take 40 minutes); each
run writes predictions of a model version of its own, so nothing is deleted in between. Each run
(``--run LABEL@RATE[:setting=value,...]``) starts child processes from its tree (``--code label=DIR``;
a ``git worktree`` of an older commit, say): a redis-server, ``dinolabel serve`` without embedded
worker and one worker whose detector sleeps ``1/RATE`` seconds per image (this file run with
``--stub-worker``), with the settings given. Images are read from Label Studio's document root on disk.

Run from the repository root::

    .venv/bin/python bench/bulk_100k.py [--tasks 100000] [--settle 30] [--window 90]
        --code old=/tmp/dinolabel-old --code new=. --run old@40 --run new@40 --run new@100
        [--run new@100:bulk_write_size=2000 ...] [--logs DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
CODE = Path(os.environ.get("BENCH_CODE", REPO)).resolve()  # the tree a --stub-worker runs
sys.path.insert(0, str(CODE))
sys.path.insert(1, str(REPO))

import httpx  # noqa: E402
import redis  # noqa: E402
from PIL import Image  # noqa: E402

LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/><Label value="dog"/></RectangleLabels></View>'
)
FOLDER = "bench-100k"
STUB_PREFIX = "bench:stub:"  # the stub worker's counters in Redis: model time and images, batches, interactive
STUB_COUNTERS = ("model_s", "models", "images", "batch_s", "batchs", "interactive_s", "interactives")


# --- the stub worker (a child process) ----------------------------------------------------------------------


def stub_worker_main() -> int:
    """``--stub-worker``: the real ``run_worker`` of the tree in ``BENCH_CODE``, the detector a sleep."""
    import logging

    import backend.worker
    from backend.config import Settings
    from backend.predictor import Predictor
    from backend.queues import connect

    seconds = 1.0 / float(os.environ["BENCH_RATE"])
    counters = Counters(redis.Redis.from_url(os.environ["DINOLABEL_REDIS_URL"]))

    def model(count: int) -> None:
        """The model's time for ``count`` images, counted (how busy the model was, in the window)."""
        time.sleep(seconds * count)
        counters.add(model_s=seconds * count, models=1, images=count)

    import torch

    class Stub:
        """No boxes, after ``1/rate`` seconds per image: ``detect`` for trees before the image pipeline,
        ``stages`` for those after it."""

        device = torch.device("cpu")

        def detect(self, images: Sequence[Any], *args: Any, **kwargs: Any) -> list[list[Any]]:
            model(len(images))
            return [[] for _ in images]

        def stages(self, phrases: Sequence[str], params: Any, *, groups: Any = None) -> Any:
            from model.pipeline import Stages

            def forward(pixels: Any) -> None:
                model(len(pixels))

            return Stages(preprocess=lambda image: (torch.zeros((1, 1)), image.size), forward=forward,
                          postprocess=lambda outputs, sizes: [[] for _ in sizes])  # fmt: skip

    import backend.jobs

    def timed(function: Any, name: str) -> Any:
        """``function``, its wall time added to the ``name`` counters (where a bulk batch's time goes)."""

        @functools.wraps(function)  # the same module and name: RQ queues jobs by the function's name
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                counters.add(**{f"{name}_s": time.perf_counter() - started, f"{name}s": 1})

        return run

    settings = Settings()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.environ.get("BENCH_PIPELINE_STATS"):
        logging.getLogger("backend.predictor").setLevel(logging.DEBUG)
    backend.jobs.run_batch = timed(backend.jobs.run_batch, "batch")  # RQ looks the function up by name
    backend.jobs.predict_tasks = timed(backend.jobs.predict_tasks, "interactive")
    backend.worker.load_predictor = lambda s: Predictor(Stub(), batch_size=8)  # type: ignore[arg-type]
    backend.worker.run_worker(settings, connect(settings.redis_url or ""))
    return 0


class Counters(threading.Thread):
    """The stub's counters, added up here and sent to Redis twice a second: a Redis call per forward
    pass would add its round trip to the model time the benchmark compares with (~1% at 100 tasks/s)."""

    def __init__(self, connection: redis.Redis) -> None:
        super().__init__(daemon=True, name="bench-counters")
        self.connection = connection
        self.lock = threading.Lock()
        self.pending: dict[str, float] = {}
        self.start()

    def add(self, **values: float) -> None:
        with self.lock:
            for name, value in values.items():
                self.pending[name] = self.pending.get(name, 0.0) + value

    def run(self) -> None:
        while True:
            time.sleep(0.5)
            with self.lock:
                pending, self.pending = self.pending, {}
            if pending:
                with self.connection.pipeline() as pipe:
                    for name, value in pending.items():
                        pipe.incrbyfloat(STUB_PREFIX + name, value)
                    pipe.execute()


# --- measuring ----------------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else 0.0


class Prober(threading.Thread):
    """One-task ``/predict`` every ``every`` seconds; each latency tagged with the job's phase then."""

    def __init__(self, api: str, project: int, task: dict[str, Any], every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.api, self.project, self.task, self.every = api, project, task, every
        self.phase = "idle"
        self.samples: list[tuple[str, float]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        body = {"tasks": [self.task], "project": f"{self.project}.1", "label_config": LABEL_CONFIG}
        with httpx.Client(timeout=120) as client:
            while not self.stopped.is_set():
                phase, started = self.phase, time.perf_counter()
                try:
                    client.post(f"{self.api}/predict", json=body)
                except httpx.HTTPError:
                    continue
                self.samples.append((phase, time.perf_counter() - started))
                self.stopped.wait(self.every)

    def summary(self) -> dict[str, Any]:
        out = {}
        for phase in ("idle", "planning", "batches"):
            values = sorted(s for p, s in self.samples if p == phase)
            if values:
                out[phase] = {
                    "n": len(values),
                    "p50_ms": round(1000 * statistics.median(values)),
                    "p90_ms": round(1000 * values[int(0.9 * (len(values) - 1))]),
                }
        return out


@dataclass(frozen=True)
class Run:
    """One measured job: a tree (``--code``), the stub's rate and settings that differ from the defaults."""

    code_label: str
    code: Path
    rate: float
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        rate = f"{self.rate:g}"
        return " ".join([f"{self.code_label}@{rate}", *(f"{k}={v}" for k, v in self.settings)])

    @classmethod
    def parse(cls, text: str, codes: dict[str, Path]) -> Run:
        """``LABEL@RATE[:setting=value,...]``, e.g. ``new@100:bulk_write_size=500,bulk_write_wait=2``."""
        head, _, tail = text.partition(":")
        label, _, rate = head.partition("@")
        if label not in codes or not rate:
            raise argparse.ArgumentTypeError(f"--run {text!r}: expected LABEL@RATE with LABEL one of {sorted(codes)}")
        settings = tuple(tuple(item.split("=", 1)) for item in tail.split(",") if item)
        if any(len(item) != 2 for item in settings):
            raise argparse.ArgumentTypeError(f"--run {text!r}: settings are name=value")
        return cls(label, codes[label], float(rate), settings)  # type: ignore[arg-type]


class CpuMeter:
    """CPU cores used by each service (its process and children) and by other processes over a span.

    Only the benchmark process uses it: a ``--stub-worker`` imports ``bench.common`` of another tree.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        from bench.common import OtherLoad, tree_cpu_seconds

        self.seconds = tree_cpu_seconds
        self.pids = pids
        self.started = time.perf_counter()
        self.start = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
        self.others = OtherLoad()

    def cores(self) -> dict[str, float | None]:
        elapsed = time.perf_counter() - self.started
        used: dict[str, float | None] = {
            name: round((self.seconds(pid) - self.start[name]) / elapsed, 2) for name, pid in self.pids.items()
        }
        used["other_processes"] = self.others.cores()
        return used


def steady_rate(progress: Sequence[tuple[Any, ...]], start: float, end: float) -> tuple[float, int]:
    """Tasks/s written between ``start`` and ``end`` s, and the tasks counted then.

    ``done`` moves in bursts, one per import call (its batches are counted one after another as the
    call returns), so the rate is taken between the ends of the first and the last burst inside the
    span; with fewer than two bursts there is no rate (0): the window was shorter than two calls.
    """
    inside = [(t, done) for t, _, done, *_ in progress if start <= t <= end]
    changes = [inside[i] for i in range(1, len(inside)) if inside[i][1] != inside[i - 1][1]]
    ends = [c for i, c in enumerate(changes) if i + 1 == len(changes) or changes[i + 1][0] - c[0] > BURST_S]
    if len(ends) < 2:
        return 0.0, 0
    return (ends[-1][1] - ends[0][1]) / (ends[-1][0] - ends[0][0]), ends[-1][1] - ends[0][1]


BURST_S = 3.0
"""Changes of ``done`` closer than this (seconds) belong to one import call's burst."""


def run_version(run: Run, index: int, ls: Any, server: Any, project: int, args: argparse.Namespace,
                directory: Path) -> dict[str, Any]:  # fmt: skip
    from backend.bulk import BulkJob
    from tests.labelstudio import free_port
    from tests.processes import RedisServer, health, wait_for

    logs = directory / f"run{index}-{run.code_label}"
    logs.mkdir(parents=True)
    redis_server = RedisServer(logs).start()
    port = free_port()
    env = {
        "DINOLABEL_REDIS_URL": redis_server.url,
        "DINOLABEL_LABEL_STUDIO_URL": server.url,
        "DINOLABEL_LABEL_STUDIO_API_KEY": server.token,
        "DINOLABEL_LOCAL_FILES_DOCUMENT_ROOT": str(server.document_root),
        "DINOLABEL_EMBEDDED_WORKER": "false",
        "DINOLABEL_WORKER_MODELS": "detector",  # the stub stands in for the detector only
        # A model version of its own per run: no run finds another's predictions, and none is deleted in
        # between (deleting 100k tasks' predictions holds Label Studio's SQLite database for minutes).
        "DINOLABEL_DETECTOR_CHECKPOINT": f"stub-run{index}",
        "DINOLABEL_HOST": "127.0.0.1",
        "DINOLABEL_PORT": str(port),
        "DINOLABEL_DATA_DIR": str(logs / "data"),
        "PYTHONPATH": str(run.code),
        "BENCH_CODE": str(run.code),
        "BENCH_RATE": str(run.rate),
        **{"DINOLABEL_" + name.upper(): value for name, value in run.settings},
    }
    api_url = f"http://127.0.0.1:{port}"
    # The serve of that tree (not this venv's entry point), and the stub worker running that tree's code.
    api = spawn([sys.executable, "-m", "backend.cli", "serve"], env, logs / "api.log", run.code)
    worker = spawn([sys.executable, str(Path(__file__).resolve()), "--stub-worker"], env, logs / "worker.log", run.code)
    report: dict[str, Any] = {"label": run.label, "code": str(run.code), "rate": run.rate,
                              "settings": dict(run.settings), "load_average_before": load_average()}  # fmt: skip
    pids = {"api": api.process.pid, "worker": worker.process.pid, "label_studio": server.process.pid,
            "redis": redis_server.process.pid}  # fmt: skip
    try:
        up = f"{run.label}: API and worker\n{worker.log_tail()}"
        wait_for(lambda: health(api_url).get("status") == "UP", 120, up)
        connection = redis.Redis.from_url(redis_server.url)
        first_task = ls.get("/api/tasks", project=project, page_size=1)["tasks"][0]
        prober = Prober(api_url, project, {"id": first_task["id"], "data": first_task["data"]})
        prober.start()
        time.sleep(10)  # idle /predict samples
        redis_before = int(connection.info("memory")["used_memory"])
        ls_log_before = server.log_path.stat().st_size
        with httpx.Client(timeout=60) as client:
            posted = time.perf_counter()
            job = client.post(f"{api_url}/v1/projects/{project}/preannotate").json()
            job_key = BulkJob.key_for(job["id"])
            peak = {"api_mb": 0.0, "worker_mb": 0.0, "redis_mb": 0.0}
            first_s = planned_s = None
            window: dict[str, Any] = {}
            progress: list[tuple[float, int, int, int, str, int | None]] = []
            while True:
                state = client.get(f"{api_url}/v1/jobs/{job['id']}", params={"failures": 0}).json()
                now = time.perf_counter() - posted
                listed = connection.hget(job_key, "listed")  # the streamed planner's count (absent before)
                progress.append((round(now, 2), state["total"], state["done"], state["skipped"], state["status"],
                                 int(listed) if listed is not None else None))  # fmt: skip
                prober.phase = "planning" if state["status"] == "planning" else "batches"
                peak["api_mb"] = max(peak["api_mb"], rss_mb(api.process.pid))
                peak["worker_mb"] = max(peak["worker_mb"], rss_mb(worker.process.pid))
                used = (int(connection.info("memory")["used_memory"]) - redis_before) / 2**20
                peak["redis_mb"] = max(peak["redis_mb"], used)
                if planned_s is None and state["status"] != "planning":
                    planned_s = now
                if first_s is None and state["done"] > 0:
                    first_s = now
                if first_s is not None and not window and now >= first_s + args.settle:
                    window = {"start": now, "ls_log": server.log_path.stat().st_size,
                              "worker_log": worker.log.stat().st_size, "cpu": CpuMeter(pids),
                              "model": stub_counters(connection)}  # fmt: skip
                if window and now - window["start"] >= args.window:
                    break
                if state["status"] in ("done", "failed") or now > args.settle + args.window + args.max_plan:
                    break
                time.sleep(0.5)
            window_end = time.perf_counter() - posted
            cores = window["cpu"].cores() if window else {}
            if window:  # where the worker's time went in the window (/predict probes included in the model's)
                span = window_end - window["start"]
                now_counters = stub_counters(connection)
                counted = {n: b - a for n, a, b in zip(STUB_COUNTERS, window["model"], now_counters, strict=True)}
                model_use = {
                    "model_busy": round(counted["model_s"] / span, 3),
                    "images_per_s": round(counted["images"] / span, 2),
                    "bulk_batches": counted["batchs"],
                    "bulk_batch_ms": round(1000 * counted["batch_s"] / max(counted["batchs"], 1), 1),
                    "in_bulk_batches": round(counted["batch_s"] / span, 3),
                    "interactive_requests": counted["interactives"],
                    "in_interactive": round(counted["interactive_s"] / span, 3),
                }
            ls_window = read_from(server.log_path, window.get("ls_log", ls_log_before))
            worker_window = read_from(worker.log, window.get("worker_log", 0))
            prober.stopped.set()
            cancelled = time.perf_counter()
            client.delete(f"{api_url}/v1/jobs/{job['id']}")
            try:
                wait_for(lambda: not any(health(api_url).get("queues", {}).values()), 300, "the queues to empty")
                cancel_s: float | None = time.perf_counter() - cancelled
            except AssertionError:  # reported, not fatal: the other versions still run
                cancel_s = None
        prober.join(timeout=130)
        rate, counted = steady_rate(progress, window["start"], window_end) if window else (0.0, 0)
        time.sleep(3)  # writes of batches already running
        ls_log = read_from(server.log_path, ls_log_before)
        sizes = [int(n) for n in re.findall(r"wrote (\d+) predictions", worker.log.read_text(errors="replace"))]
        window_sizes = [int(n) for n in re.findall(r"wrote (\d+) predictions", worker_window)]
        planning = [p for p in progress if p[4] == "planning"]
        report.update(
            status=progress[-1][4],
            total=progress[-1][1],
            first_prediction_s=round(first_s, 2) if first_s is not None else None,
            planning_status_s=round(planned_s, 2) if planned_s is not None else None,
            # The old planner lists everything while the status says planning; the streamed one lists a page
            # ahead of the model, so its listing rate is the model's once the first page is planned.
            planning_tasks_per_s=(
                round(progress[-1][1] / planned_s, 1) if planned_s and planning and planning[-1][5] is None else None
            ),
            listed_at_end=progress[-1][5],
            settle_s=args.settle,
            window_s=round(window_end - window["start"], 1) if window else None,
            tasks_per_s=round(rate, 2),
            tasks_counted=counted,
            stub_tasks_per_s=run.rate,
            efficiency=round(rate / run.rate, 3),
            # Label Studio 1.23 logs each request twice (two handlers on django.server).
            ls_import_calls=len(IMPORT_CALL.findall(ls_log)) // 2,
            ls_import_calls_in_window=len(IMPORT_CALL.findall(ls_window)) // 2,
            import_sizes=(
                {"calls": len(sizes), "mean": round(statistics.mean(sizes), 1), "max": max(sizes)}
                if sizes
                else "one call per bulk batch"
            ),
            import_sizes_in_window=(
                {"calls": len(window_sizes), "mean": round(statistics.mean(window_sizes), 1), "max": max(window_sizes)}
                if window_sizes
                else None
            ),
            model_in_window=model_use if window else None,
            cpu_cores_in_window=cores,
            peak=({k: round(v, 1) for k, v in peak.items()}),
            predict_latency=prober.summary(),
            cancel_s=round(cancel_s, 2) if cancel_s is not None else "queues not empty after 300 s",
            progress=progress[:: max(1, len(progress) // 120)],
        )
    finally:
        worker.stop()
        api.stop()
        redis_server.stop()
    report["load_average_after"] = load_average()
    return report


def stub_counters(connection: redis.Redis) -> list[float]:
    return [float(v or 0) for v in connection.mget([STUB_PREFIX + name for name in STUB_COUNTERS])]


IMPORT_CALL = re.compile(r"\] \"POST /api/projects/\d+/import/predictions")


def read_from(path: Path, offset: int) -> str:
    with path.open("rb") as file:
        file.seek(offset)
        return file.read().decode(errors="replace")


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def spawn(command: list[str], env: dict[str, str], log: Path, cwd: Path) -> Any:
    """A child process in its own session, logging to ``log`` (stoppable like the tests' services)."""
    from tests.processes import Service

    service = Service([], env, log)
    with log.open("ab") as out:
        service.process = subprocess.Popen(command, env=service.env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True, cwd=cwd)  # fmt: skip
    return service


def import_project(ls: Any, server: Any, tasks: int, images: int) -> tuple[int, float]:
    folder = server.document_root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (i % 256, 80, 160)).save(buffer, format="PNG")
        (folder / f"img{i}.png").write_bytes(buffer.getvalue())
    project = ls.create_project("bench 100k", LABEL_CONFIG)["id"]
    ls.add_local_storage(project, folder)
    started = time.perf_counter()
    chunk = 10_000
    for start in range(0, tasks, chunk):
        body = [{"data": {"image": f"/data/local-files/?d={FOLDER}/img{i % images}.png"}}
                for i in range(start, min(start + chunk, tasks))]  # fmt: skip
        ls.request("POST", f"/api/projects/{project}/import", json=body)
    return project, time.perf_counter() - started


@contextlib.contextmanager
def label_studio(directory: Path, extra_env: dict[str, str]) -> Iterator[tuple[Any, Any]]:
    from tests.labelstudio import LabelStudioAPI, LabelStudioServer

    # startup_timeout: a busy 2-core machine takes minutes
    server = LabelStudioServer(directory / "label-studio", startup_timeout=900, extra_env=extra_env)
    server.start()
    try:
        with LabelStudioAPI(server.url, server.token, timeout=600) as ls:
            yield server, ls
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stub-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rate", type=float, default=40.0, help="the stub detector's tasks/s (runs without --run)")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds after the first prediction not counted")
    parser.add_argument("--window", type=float, default=90.0, help="seconds measured after --settle")
    parser.add_argument("--max-plan", type=float, default=1200.0, help="seconds a job may take to its first prediction")
    parser.add_argument("--code", action="append", default=[], help="label=DIR: a tree to run (repeatable)")
    parser.add_argument("--run", action="append", default=[],
                        help="LABEL@RATE[:setting=value,...] (repeatable; default: each --code at --rate)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "bulk_100k.json")
    parser.add_argument("--logs", type=Path, help="keep each run's logs (API, worker, Redis) in this folder")
    parser.add_argument("--ls-env", action="append", default=[],
                        help="KEY=VALUE for Label Studio's environment (repeatable): a feature flag")  # fmt: skip
    args = parser.parse_args(argv)
    if args.stub_worker:
        return stub_worker_main()
    from bench.common import machine_info, write_report

    codes = {c.split("=", 1)[0]: Path(c.split("=", 1)[1]).resolve() for c in args.code} or {"new": REPO}
    try:
        runs = [Run.parse(text, codes) for text in args.run] or [Run(k, v, args.rate) for k, v in codes.items()]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    ls_env = dict(item.split("=", 1) for item in args.ls_env)
    started = time.perf_counter()
    reports: dict[str, Any] = {
        "machine": machine_info(),
        "label_studio_env": ls_env,
        "tasks": args.tasks,
        "settle_s": args.settle,
        "window_s": args.window,
        "codes": {k: str(v) for k, v in codes.items()},
        "runs": [],
    }
    with (
        tempfile.TemporaryDirectory(prefix="bulk-100k-") as tmp,
        label_studio(Path(tmp), ls_env) as (
            server,
            ls,
        ),
    ):
        project, import_s = import_project(ls, server, args.tasks, args.images)
        reports["import_s"] = round(import_s, 1)
        print(f"imported {args.tasks} tasks in {import_s:.1f} s", flush=True)
        for index, run in enumerate(runs):
            report = run_version(run, index, ls, server, project, args, (args.logs or Path(tmp)).resolve())
            reports["runs"].append(report)
            print(json.dumps({k: v for k, v in report.items() if k != "progress"}), flush=True)
            reports["wall_s"] = time.perf_counter() - started
            write_report(args.out, reports)  # after every run: a long run cut short keeps what it measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
