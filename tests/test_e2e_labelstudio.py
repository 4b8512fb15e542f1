"""End to end against a real Label Studio 1.23 server (started by the session fixture).

- ``dinolabel serve`` alone (embedded Redis + worker): Label Studio connects, retrieves predictions,
  and what it stores has the project's labels and the detector's boxes in percent.
- ``dinolabel serve`` + ``dinolabel worker`` processes on a real Redis: a bulk job over a few
  hundred tasks, run twice (idempotent); a worker killed with SIGKILL mid-batch and replaced; the
  ``TASKS_CREATED`` webhook registered by ``dinolabel register-webhook``; the CLI's progress.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from backend.bulk import BulkJob, Workers
from backend.labeling import parse_label_config
from backend.results import region
from backend.routes.ls import WEBHOOK_ACTIONS
from model import DetectionParams, GroundingDinoDetector, model_version
from model.images import decode_image
from tests.images import png
from tests.labelstudio import DroppingProxy, LabelStudioAPI, LabelStudioServer, free_port
from tests.processes import DINOLABEL, RedisServer, Service, health, wait_for

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/><Label value="dog"/><Label value="vehicle" predicted_values="car,truck"/>'
    "</RectangleLabels></View>"
)
PARAMS = DetectionParams(box_threshold=0.3)
SECRET = "e2e-webhook-secret"


def common_env(checkpoint: Path, data_dir: Path) -> dict[str, str]:
    return {
        "DINOLABEL_DETECTOR_CHECKPOINT": str(checkpoint),
        "DINOLABEL_DEVICE": "cpu",
        "DINOLABEL_BOX_THRESHOLD": str(PARAMS.box_threshold),
        "DINOLABEL_DATA_DIR": str(data_dir),
        "DINOLABEL_BULK_BATCH_SIZE": "16",
    }


def local_images(
    server: LabelStudioServer, api: LabelStudioAPI, project: int, count: int, *, offset: int = 0
) -> list[dict]:
    """Write ``count`` PNGs of a few sizes into Label Studio's document root; return JSON tasks.

    Label Studio serves ``/data/local-files/`` only under a local-files storage of the project, so
    one is added (not synced: the tasks are imported as JSON).
    """
    folder = f"project{project}"
    root = server.document_root / folder
    root.mkdir(parents=True, exist_ok=True)
    api.add_local_storage(project, root)
    tasks = []
    for i in range(offset, offset + count):
        width, height = (40, 30) if i % 3 == 0 else (48, 32) if i % 3 == 1 else (30, 44)
        (root / f"img{i}.png").write_bytes(png(width, height, i))
        tasks.append({"data": {"image": f"/data/local-files/?d={folder}/img{i}.png"}})
    return tasks


def predictions_by_task(api: LabelStudioAPI, project: int) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for p in api.get("/api/predictions", project=project):
        out.setdefault(p["task"], []).append(p)
    return out


def key(r: dict) -> tuple:
    v = r["value"]
    box = tuple(round(v[k], 2) for k in ("x", "y", "width", "height"))
    return (v["rectanglelabels"][0], *box, round(r["score"], 3), r["original_width"], r["original_height"])


# --- issue 2: the backend alone, as `make serve` starts it -------------------------------------------


@pytest.fixture(scope="module")
def solo_backend(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    env = {**common_env(tiny_checkpoint, tmp_path_factory.mktemp("solo")), "DINOLABEL_PORT": str(port),
           "DINOLABEL_HOST": "127.0.0.1"}  # fmt: skip
    service = Service(["serve"], env, tmp_path_factory.mktemp("logs") / "serve.log").start()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: health(url).get("status") == "UP", 120, f"the backend\n{service.log.read_text()[-3000:]}")
    yield url
    service.stop()


def test_label_studio_gets_predictions_with_project_labels_and_boxes(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI],
    solo_backend: str,
    tiny_detector: GroundingDinoDetector,
    tiny_checkpoint: Path,
    tmp_path: Path,
) -> None:
    server, api = label_studio
    project = api.create_project("e2e solo backend", CONFIG)["id"]
    uploads = []
    for i, size in enumerate([(64, 48), (40, 72)]):
        path = tmp_path / f"upload{i}.png"
        path.write_bytes(png(*size, 10 + i))
        uploads.append(path)
    ids = api.import_uploaded_images(project, uploads)
    ids += api.import_tasks(project, local_images(server, api, project, 2))
    ml = api.connect_ml_backend(project, solo_backend)
    expected_version = model_version(str(tiny_checkpoint), revision=None, params=PARAMS, precision="fp32")
    assert ml["model_version"] == expected_version

    api.retrieve_predictions(project, ids)

    originals = {p.name: p.read_bytes() for p in uploads}  # what we sent, by file name
    target = parse_label_config(CONFIG)
    stored = predictions_by_task(api, project)
    assert sorted(stored) == sorted(ids), "every task got a prediction"
    for task in api.list_tasks(project):
        (prediction,) = stored[task["id"]]
        assert prediction["model_version"] == expected_version
        url = task["data"]["image"]
        if "?d=" in url:  # local files: the file in Label Studio's document root
            data = (server.document_root / url.split("?d=", 1)[1]).read_bytes()
        else:  # uploads are stored as /data/upload/<project>/<prefix>-<original name>
            data = originals[url.rsplit("-", 1)[1]]
        image = decode_image(data, max_pixels=10**8)
        found = tiny_detector.detect([image], list(target.phrases), PARAMS, groups=target.phrase_label)[0]
        expected = [key(region(d, target.labels[target.phrase_label[d.phrase]], target, *image.size)) for d in found]
        assert expected, "the tiny model finds boxes at this threshold"
        assert [key(r) for r in prediction["result"]] == expected
        assert {r["value"]["rectanglelabels"][0] for r in prediction["result"]} <= {"cat", "dog", "vehicle"}
    api.retrieve_predictions(project, ids)  # again: Label Studio asks nothing new, stores no duplicate
    assert all(len(p) == 1 for p in predictions_by_task(api, project).values())


# --- issue 3: API + worker processes on a real Redis ----------------------------------------------------


class Cluster:
    def __init__(self, api_url: str, redis_url: str, env: dict[str, str], logs: Path) -> None:
        self.api_url = api_url
        self.redis_url = redis_url
        self.env = env
        self.logs = logs
        self.workers: list[Service] = []

    def add_worker(self) -> Service:
        worker = Service(["worker"], self.env, self.logs / f"worker{len(self.workers)}.log").start()
        self.workers.append(worker)
        return worker

    def ready_workers(self) -> int:
        return health(self.api_url).get("workers", {}).get("ready", 0)


@pytest.fixture(scope="module")
def cluster(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI],
    redis_server: RedisServer,
    tiny_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    server, _ = label_studio
    if redis_server.process is None:
        redis_server.start()
    redis_url = redis_server.url.rsplit("/", 1)[0] + "/1"  # a database of its own
    redis.Redis.from_url(redis_url).flushdb()
    port = free_port()
    logs = tmp_path_factory.mktemp("cluster")
    env = {
        **common_env(tiny_checkpoint, logs),
        "DINOLABEL_REDIS_URL": redis_url,
        "DINOLABEL_LABEL_STUDIO_URL": server.url,
        "DINOLABEL_LABEL_STUDIO_API_KEY": server.token,
        "DINOLABEL_WEBHOOK_SECRET": SECRET,
        "DINOLABEL_PORT": str(port),
        "DINOLABEL_HOST": "127.0.0.1",
    }
    api = Service(["serve"], env, logs / "api.log").start()
    cluster = Cluster(f"http://127.0.0.1:{port}", redis_url, env, logs)
    cluster.add_worker()
    wait_for(lambda: cluster.ready_workers() == 1, 120, f"API and worker\n{api.log_tail()}")
    yield cluster
    for worker in cluster.workers:
        worker.stop()
    api.stop()


def preannotate(cluster: Cluster, project: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DINOLABEL, "preannotate", "--project", str(project), "--api", cluster.api_url, "--interval", "0.2"],
        capture_output=True, text=True, timeout=600, env=cluster.env,
    )  # fmt: skip


def test_bulk_job_predicts_a_whole_project_once(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI], cluster: Cluster
) -> None:
    server, api = label_studio
    project = api.create_project("e2e bulk", CONFIG)["id"]
    ids = api.import_tasks(project, local_images(server, api, project, 300))

    first = preannotate(cluster, project)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "done: 300 predicted, 0 skipped (already predicted), 0 failed of 300 tasks" in first.stdout
    assert "100%" in first.stderr and "300/300" in first.stderr, "the progress bar reached the end"
    stored = predictions_by_task(api, project)
    assert sorted(stored) == sorted(ids)
    versions = {p["model_version"] for ps in stored.values() for p in ps}
    assert all(len(ps) == 1 for ps in stored.values()) and len(versions) == 1
    assert sum(bool(ps[0]["result"]) for ps in stored.values()) > 250, "boxes on (almost) every image"

    again = preannotate(cluster, project)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "done: 0 predicted, 300 skipped" in again.stdout
    assert all(len(ps) == 1 for ps in predictions_by_task(api, project).values())


def test_a_worker_killed_mid_batch_loses_nothing_and_duplicates_nothing(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI], cluster: Cluster
) -> None:
    server, api = label_studio
    project = api.create_project("e2e kill worker", CONFIG)["id"]
    ids = api.import_tasks(project, local_images(server, api, project, 240))
    connection = redis.Redis.from_url(cluster.redis_url)
    (victim,) = [w for w in cluster.workers if w.process and w.process.poll() is None]
    (victim_name,) = Workers.all(connection)

    job_id = httpx.post(f"{cluster.api_url}/v1/projects/{project}/preannotate", timeout=10).json()["id"]
    job = BulkJob(job_id, connection)

    def victim_mid_batch() -> bool:
        if job.status() != "running" or job.summary()["done"] < 16:
            return False
        return any(w == victim_name and not job.batch_finished(n) for n, w in job.holders().items())

    wait_for(victim_mid_batch, 120, "the worker in the middle of a batch, after one finished", interval=0.01)
    victim.kill()
    assert job.summary()["remaining"] > 0
    replacement = cluster.add_worker()
    summary = wait_for(
        lambda: (s := job.summary())["status"] == "done" and s, 180, f"the job to finish\n{replacement.log_tail()}"
    )
    assert (summary["total"], summary["done"] + summary["skipped"], summary["failed"]) == (240, 240, 0)
    # Any live process's heartbeat re-queues a dead worker's batches: the new worker's, or the store writer's
    # in `serve`.
    reapers = replacement.log.read_text() + (cluster.logs / "api.log").read_text()
    assert f"worker {victim_name} is gone" in reapers, "the abandoned batch was re-queued"
    stored = predictions_by_task(api, project)
    counts = Counter(len(ps) for ps in stored.values())
    assert sorted(stored) == sorted(ids) and counts == {1: 240}, f"predictions per task: {counts}"


def test_tasks_created_webhook_preannotates_new_tasks(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI], cluster: Cluster
) -> None:
    server, api = label_studio
    project = api.create_project("e2e webhook", CONFIG)["id"]
    registered = subprocess.run(
        [DINOLABEL, "register-webhook", "--project", str(project), "--backend-url", cluster.api_url],
        capture_output=True, text=True, timeout=60, env=cluster.env,
    )  # fmt: skip
    assert registered.returncode == 0, registered.stdout + registered.stderr
    (hook,) = [h for h in api.webhooks(project) if h["url"] == f"{cluster.api_url}/webhook"]
    assert sorted(hook["actions"]) == sorted(WEBHOOK_ACTIONS)  # tasks created/deleted, annotations changed
    assert "TASKS_CREATED" in hook["actions"]
    assert hook["headers"] == {"X-Dinolabel-Secret": SECRET}

    ids = api.import_tasks(project, local_images(server, api, project, 5))
    stored = wait_for(
        lambda: (s := predictions_by_task(api, project)) and len(s) == 5 and s, 120, "predictions of the new tasks"
    )
    assert sorted(stored) == sorted(ids) and all(len(ps) == 1 for ps in stored.values())


def test_ctrl_c_in_the_cli_cancels_the_job_after_confirmation(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI], cluster: Cluster
) -> None:
    import signal

    server, api = label_studio
    project = api.create_project("e2e cancel", CONFIG)["id"]
    api.import_tasks(project, local_images(server, api, project, 400))
    cli = subprocess.Popen(
        [DINOLABEL, "preannotate", "--project", str(project), "--api", cluster.api_url, "--interval", "0.1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env,
    )  # fmt: skip
    connection = redis.Redis.from_url(cluster.redis_url)
    running = wait_for(
        lambda: [j for j in BulkJob.active(connection) if j.summary()["project"] == project and j.summary()["done"]],
        60,
        "the job to start predicting",
        interval=0.02,
    )
    cli.send_signal(signal.SIGINT)
    out, err = cli.communicate("y\n", timeout=30)
    assert cli.returncode == 130, out + err
    assert "Cancel job" in out + err and "cancelled" in err  # input() prompts on stdout when not a tty
    summary = running[0].summary()
    assert summary["status"] == "cancelled" and summary["remaining"] > 0, summary
    time.sleep(2)  # a batch already running finishes; nothing else starts
    after = running[0].summary()
    assert after["remaining"] > 0 and len(predictions_by_task(api, project)) < 400


# --- issue 7: writes never repeated blindly -------------------------------------------------------------


def test_an_import_whose_answer_is_lost_is_not_written_twice(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI],
    redis_server: RedisServer,
    tiny_checkpoint: Path,
    tmp_path: Path,
) -> None:
    """Label Studio commits an import, the proxy in between drops the answer: the worker checks what
    Label Studio holds and writes only the rest, so every task ends with exactly one prediction."""
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from backend.config import Settings
    from backend.main import create_app

    server, api = label_studio
    project = api.create_project("e2e lost answers", CONFIG)["id"]
    ids = api.import_tasks(project, local_images(server, api, project, 40))
    if redis_server.process is None:
        redis_server.start()
    redis_url = redis_server.url.rsplit("/", 1)[0] + "/2"  # a database of its own (the cluster uses 1)
    redis.Redis.from_url(redis_url).flushdb()

    def is_import(method: str, path: str) -> bool:
        return method == "POST" and path == f"/api/projects/{project}/import/predictions"

    with DroppingProxy(server.url, drops=2, should_drop=is_import) as proxy:
        env = {**common_env(tiny_checkpoint, tmp_path), "DINOLABEL_REDIS_URL": redis_url,
               "DINOLABEL_LABEL_STUDIO_URL": proxy.url, "DINOLABEL_LABEL_STUDIO_API_KEY": server.token,
               "DINOLABEL_BULK_WRITE_SIZE": "16"}  # fmt: skip
        worker = Service(["worker"], env, tmp_path / "worker.log").start()
        settings = Settings(redis_url=redis_url, label_studio_url=server.url,
                            label_studio_api_key=SecretStr(server.token), detector_checkpoint=str(tiny_checkpoint),
                            box_threshold=PARAMS.box_threshold, data_dir=tmp_path, embedded_worker=False)  # fmt: skip
        try:
            with TestClient(create_app(settings)) as client:
                wait_for(lambda: client.get("/health").json()["status"] == "UP", 120, worker.log_tail())
                job = client.post(f"/v1/projects/{project}/preannotate").json()
                done = wait_for(lambda: (j := client.get(f"/v1/jobs/{job['id']}").json())["status"] != "running"
                                and j["status"] != "planning" and j, 180, worker.log_tail())  # fmt: skip
        finally:
            worker.stop()
        assert [entry[2] for entry in proxy.dropped] == [201, 201], "Label Studio committed both lost imports"
        assert (done["status"], done["done"], done["failed"]) == ("done", 40, 0), done
    stored = predictions_by_task(api, project)
    counts = Counter(len(ps) for ps in stored.values())
    assert sorted(stored) == sorted(ids) and counts == {1: 40}, f"predictions per task: {counts}"
    assert "may have gone through" in worker.log.read_text()


def test_retrieve_predictions_past_the_interactive_cap_stores_the_first_at_once_and_the_rest_later(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI], cluster: Cluster
) -> None:
    """ "Retrieve predictions" of 20 tasks (cap 16): Label Studio stores the 16 answered ones as the
    action returns, without logging an error; a bulk job of the other 4 writes those; every task ends
    with exactly one prediction of the version, and a second "Retrieve predictions" asks for nothing."""
    server, api = label_studio
    project = api.create_project("e2e partial answer", CONFIG)["id"]
    ids = api.import_tasks(project, local_images(server, api, project, 20))
    version = api.connect_ml_backend(project, cluster.api_url)["model_version"]
    log_offset = server.log_path.stat().st_size

    api.retrieve_predictions(project, ids)
    at_once = predictions_by_task(api, project)
    connection = redis.Redis.from_url(cluster.redis_url)
    (job,) = [BulkJob(key.decode().removeprefix(BulkJob.prefix), connection)
              for key in connection.scan_iter(match=f"{BulkJob.prefix}*") if key.count(b":") == 2
              and connection.hget(key, "project") == str(project).encode()]  # fmt: skip
    summary = wait_for(lambda: (s := job.summary())["status"] == "done" and s, 120, "the hand-off job to finish")
    assert (summary["source"], summary["total"], summary["done"]) == ("predict:too_many_tasks", 4, 4), summary
    assert len(at_once) >= 16 and all(len(ps) == 1 for ps in at_once.values()), "16 stored from the answer"
    log = server.log_path.read_bytes()[log_offset:].decode(errors="replace")
    assert "incorrect response" not in log and "Number of tasks and responses are not equal" not in log

    stored = predictions_by_task(api, project)
    assert sorted(stored) == sorted(ids) and Counter(len(ps) for ps in stored.values()) == {1: 20}
    assert {p["model_version"] for ps in stored.values() for p in ps} == {version}
    assert sum(bool(ps[0]["result"]) for ps in stored.values()) >= 16, "boxes, not empty predictions"
    api.retrieve_predictions(project, ids)
    assert Counter(len(ps) for ps in predictions_by_task(api, project).values()) == {1: 20}
