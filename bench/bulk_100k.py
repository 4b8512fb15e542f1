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

The job is cancelled at the end of the window (a 100k job at 40 tasks/s would take 40 minutes), and
the predictions written are deleted before the next version runs. Each version runs as child
processes from its own tree (``--code label=DIR``; a ``git worktree`` of an older commit, say): a
redis-server, ``dinolabel serve`` without embedded worker and one worker whose detector sleeps
``1/--rate`` seconds per image (this file run with ``--stub-worker``). Images are read from Label
Studio's document root on disk.

Run from the repository root::

    .venv/bin/python bench/bulk_100k.py [--tasks 100000] [--rate 40] [--window 90]
        [--code old=/tmp/dinolabel-old --code new=.]
"""

from __future__ import annotations

import argparse
import contextlib
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


# --- the stub worker (a child process) ----------------------------------------------------------------------


def stub_worker_main() -> int:
    """``--stub-worker``: the real ``run_worker`` of the tree in ``BENCH_CODE``, the detector a sleep."""
    import logging

    import backend.worker
    from backend.config import Settings
    from backend.predictor import Predictor
    from backend.queues import connect

    seconds = 1.0 / float(os.environ["BENCH_RATE"])

    import torch

    class Stub:
        """No boxes, after ``1/rate`` seconds per image: ``detect`` for trees before the image pipeline,
        ``stages`` for those after it."""

        device = torch.device("cpu")

        def detect(self, images: Sequence[Any], *args: Any, **kwargs: Any) -> list[list[Any]]:
            time.sleep(seconds * len(images))
            return [[] for _ in images]

        def stages(self, phrases: Sequence[str], params: Any, *, groups: Any = None) -> Any:
            from model.pipeline import Stages

            def forward(pixels: Any) -> None:
                time.sleep(seconds * len(pixels))

            return Stages(preprocess=lambda image: (torch.zeros((1, 1)), image.size), forward=forward,
                          postprocess=lambda outputs, sizes: [[] for _ in sizes])  # fmt: skip

    settings = Settings()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backend.worker.load_predictor = lambda s: Predictor(Stub(), batch_size=8)  # type: ignore[arg-type]
    backend.worker.run_worker(settings, connect(settings.redis_url or ""))
    return 0


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


def run_version(label: str, code: Path, ls: Any, server: Any, project: int, args: argparse.Namespace,
                directory: Path) -> dict[str, Any]:  # fmt: skip
    from tests.labelstudio import free_port
    from tests.processes import RedisServer, health, wait_for

    logs = directory / label
    logs.mkdir()
    redis_server = RedisServer(logs).start()
    port = free_port()
    env = {
        "DINOLABEL_REDIS_URL": redis_server.url,
        "DINOLABEL_LABEL_STUDIO_URL": server.url,
        "DINOLABEL_LABEL_STUDIO_API_KEY": server.token,
        "DINOLABEL_LOCAL_FILES_DOCUMENT_ROOT": str(server.document_root),
        "DINOLABEL_EMBEDDED_WORKER": "false",
        "DINOLABEL_DETECTOR_CHECKPOINT": "stub",
        "DINOLABEL_HOST": "127.0.0.1",
        "DINOLABEL_PORT": str(port),
        "DINOLABEL_DATA_DIR": str(logs / "data"),
        "PYTHONPATH": str(code),
        "BENCH_CODE": str(code),
        "BENCH_RATE": str(args.rate),
    }
    api_url = f"http://127.0.0.1:{port}"
    # The serve of that tree (not this venv's entry point), and the stub worker running that tree's code.
    api = spawn([sys.executable, "-m", "backend.cli", "serve"], env, logs / "api.log", code)
    worker = spawn([sys.executable, str(Path(__file__).resolve()), "--stub-worker"], env, logs / "worker.log", code)
    report: dict[str, Any] = {"label": label, "code": str(code)}
    try:
        wait_for(lambda: health(api_url).get("status") == "UP", 120, f"{label}: API and worker\n{worker.log_tail()}")
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
            peak = {"api_mb": 0.0, "worker_mb": 0.0, "redis_mb": 0.0}
            first_s = planned_s = None
            window_start: tuple[float, int] | None = None
            progress: list[tuple[float, int, int, int, str]] = []
            while True:
                state = client.get(f"{api_url}/v1/jobs/{job['id']}", params={"failures": 0}).json()
                now = time.perf_counter() - posted
                progress.append((round(now, 2), state["total"], state["done"], state["skipped"], state["status"]))
                prober.phase = "planning" if state["status"] == "planning" else "batches"
                peak["api_mb"] = max(peak["api_mb"], rss_mb(api.process.pid))
                peak["worker_mb"] = max(peak["worker_mb"], rss_mb(worker.process.pid))
                used = (int(connection.info("memory")["used_memory"]) - redis_before) / 2**20
                peak["redis_mb"] = max(peak["redis_mb"], used)
                if planned_s is None and state["status"] != "planning":
                    planned_s = now
                if first_s is None and state["done"] > 0:
                    first_s, window_start = now, (now, state["done"])
                if (window_start and now - window_start[0] >= args.window) or state["status"] in ("done", "failed"):
                    break
                if now > args.window + 900:
                    break
                time.sleep(0.5)
            prober.stopped.set()
            cancelled = time.perf_counter()
            client.delete(f"{api_url}/v1/jobs/{job['id']}")
            try:
                wait_for(lambda: not any(health(api_url).get("queues", {}).values()), 300, "the queues to empty")
                cancel_s: float | None = time.perf_counter() - cancelled
            except AssertionError:  # reported, not fatal: the other versions still run
                cancel_s = None
        prober.join(timeout=130)
        rate = (progress[-1][2] - window_start[1]) / (progress[-1][0] - window_start[0]) if window_start else 0.0
        time.sleep(3)  # writes of batches already running
        ls_log = server.log_path.read_bytes()[ls_log_before:].decode(errors="replace")
        sizes = [int(n) for n in re.findall(r"wrote (\d+) predictions", worker.log.read_text(errors="replace"))]
        report.update(
            total=progress[-1][1],
            first_prediction_s=first_s,
            planning_status_s=planned_s,
            window_s=args.window,
            tasks_per_s=round(rate, 2),
            stub_tasks_per_s=args.rate,
            efficiency=round(rate / args.rate, 3),
            # Label Studio 1.23 logs each request twice (two handlers on django.server).
            ls_import_calls=len(re.findall(r"\] \"POST /api/projects/\d+/import/predictions", ls_log)) // 2,
            import_sizes=(
                {"calls": len(sizes), "mean": round(statistics.mean(sizes), 1), "max": max(sizes)}
                if sizes
                else "one call per bulk batch"
            ),
            peak=({k: round(v, 1) for k, v in peak.items()}),
            predict_latency=prober.summary(),
            cancel_s=round(cancel_s, 2) if cancel_s is not None else "queues not empty after 300 s",
            progress=progress[:: max(1, len(progress) // 60)],
        )
    finally:
        worker.stop()
        api.stop()
        redis_server.stop()
    return report


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


def delete_predictions(ls: Any, project: int) -> None:
    ls.request("POST", "/api/dm/actions", params={"id": "delete_tasks_predictions", "project": project},
               json={"selectedItems": {"all": True, "excluded": []}})  # fmt: skip


@contextlib.contextmanager
def label_studio(directory: Path) -> Iterator[tuple[Any, Any]]:
    from tests.labelstudio import LabelStudioAPI, LabelStudioServer

    server = LabelStudioServer(directory / "label-studio")
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
    parser.add_argument("--rate", type=float, default=40.0, help="the stub detector's tasks/s")
    parser.add_argument("--window", type=float, default=90.0, help="seconds measured after the first prediction")
    parser.add_argument("--code", action="append", default=[], help="label=DIR: a tree to run (repeatable)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "bulk_100k.json")
    args = parser.parse_args(argv)
    if args.stub_worker:
        return stub_worker_main()
    versions = [(c.split("=", 1)[0], Path(c.split("=", 1)[1]).resolve()) for c in args.code] or [("new", REPO)]
    reports: dict[str, Any] = {"tasks": args.tasks, "rate": args.rate, "versions": []}
    with tempfile.TemporaryDirectory(prefix="bulk-100k-") as tmp, label_studio(Path(tmp)) as (server, ls):
        project, import_s = import_project(ls, server, args.tasks, args.images)
        reports["import_s"] = round(import_s, 1)
        print(f"imported {args.tasks} tasks in {import_s:.1f} s", flush=True)
        for label, code in versions:
            report = run_version(label, code, ls, server, project, args, Path(tmp))
            reports["versions"].append(report)
            print(json.dumps({k: v for k, v in report.items() if k != "progress"}), flush=True)
            delete_predictions(ls, project)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
