"""The index kept current by a real Label Studio 1.23 server: its webhooks, and a re-sync without them.

``dinolabel serve`` alone (embedded Redis; its worker serves the tiny Grounding DINO and a tiny DINOv2,
both loaded by path) against the session's Label Studio. What Label Studio 1.23.2 sends (its source,
``webhooks/utils.py`` and the callers of ``emit_webhooks_for_instance``):

- ``TASKS_CREATED`` from an import (``data_import/api.py``): every new task whole (``id``, ``data``, ...)
  and the project (``id``, ``label_config``, ...).
- ``TASKS_DELETED`` from the Data Manager's "Delete tasks" (``data_manager/actions/basic.py``) and from
  ``DELETE /api/tasks/{id}`` (``tasks/api.py``): ``tasks: [{"id": ...}]`` and the project.
- Both inside the request that changed the tasks (Community edition has no Redis: ``start_job_async_or_sync``
  runs inline), each hook once, with a 1 s time-out (``WEBHOOK_TIMEOUT``) and no retry. A changed task
  sends nothing: that is what ``dinolabel index --sync`` is for.
"""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from backend.index_cache import INDEX_FOLDER
from backend.routes.ls import WEBHOOK_ACTIONS
from indexer import StoredVector, StoreNotFoundError, VectorIndex, VectorStore, project_dir
from indexer.hashes import sha256_hex
from tests.images import scene
from tests.labelstudio import LabelStudioAPI, LabelStudioServer, free_port
from tests.processes import DINOLABEL, Service, health, wait_for
from tests.tiny_checkpoints import build_tiny_dinov2

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/></RectangleLabels></View>'
)
SECRET = "index-webhook-secret"


class Backend:
    """``dinolabel serve`` on a loopback port, restartable on the same data folder."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.data_dir = Path(env["DINOLABEL_DATA_DIR"])
        self.url = f"http://127.0.0.1:{env['DINOLABEL_PORT']}"
        self.service: Service | None = None

    @classmethod
    def serving(cls, server: LabelStudioServer, folder: Path, checkpoint: Path, secret: str, **env: str) -> Backend:
        """One writing to ``server`` with a tiny DINOv2 built into ``folder`` (which holds its data and logs)
        and the detector ``checkpoint``; ``env`` adds settings or overrides these."""
        common = {
            "DINOLABEL_DETECTOR_CHECKPOINT": str(checkpoint),
            "DINOLABEL_EMBEDDER_MODEL": str(build_tiny_dinov2(folder / "dinov2", img_size=224)),
            "DINOLABEL_DEVICE": "cpu",
            "DINOLABEL_DATA_DIR": str(folder / "data"),
            "DINOLABEL_LABEL_STUDIO_URL": server.url,
            "DINOLABEL_LABEL_STUDIO_API_KEY": server.token,
            "DINOLABEL_WEBHOOK_SECRET": secret,
            "DINOLABEL_HOST": "127.0.0.1",
            "DINOLABEL_PORT": str(free_port()),
        }
        return cls({**common, **env}, folder)

    def start(self) -> None:
        service = self.service = Service(["serve"], self.env, self.logs / "serve.log").start()
        wait_for(
            lambda: (h := health(self.url)).get("status") == "UP" and h.get("store_writers") == 1,
            120,
            lambda: f"the backend's worker and store writer\n{service.log_tail()}",
        )

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DINOLABEL, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **self.env}
        )

    def index(self, project: int, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.cli("index", "--project", str(project), "--api", self.url, "--interval", "0.2", "--quiet", *extra)

    def log_tail(self) -> str:
        return self.service.log_tail() if self.service else ""

    def stored(self, project: int) -> dict[int, StoredVector]:
        """The project's rows, read from its store as any reader may (read-only, beside the writer)."""
        try:
            with VectorStore(self.data_dir / "index", project) as store:
                return {int(t): row for t in store.task_ids() if (row := store.get(int(t))) is not None}
        except StoreNotFoundError:
            return {}

    def search(self, project: int, image: bytes, k: int = 10) -> list[dict]:
        response = httpx.post(
            f"{self.url}/v1/projects/{project}/search",
            params={"k": k},
            files={"image": ("query.png", image, "image/png")},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        assert response.json()["label_studio"] == "ok", response.json()
        return response.json()["results"]

    def similar(self, project: int, task_id: int, k: int = 10) -> httpx.Response:
        return httpx.get(f"{self.url}/v1/projects/{project}/similar", params={"task_id": task_id, "k": k}, timeout=60)


@pytest.fixture(scope="module")
def backend(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI],
    tiny_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Backend]:
    server, _ = label_studio
    folder = tmp_path_factory.mktemp("index-e2e")
    backend = Backend.serving(
        server,
        folder,
        tiny_checkpoint,
        SECRET,
        DINOLABEL_WORKER_MODELS="detector,embedder",
        DINOLABEL_BULK_BATCH_SIZE="4",
    )
    backend.start()
    yield backend
    backend.stop()


class Images:
    """Photo-like PNGs in Label Studio's document root, served to the project by a local-files storage."""

    def __init__(self, server: LabelStudioServer, api: LabelStudioAPI, project: int) -> None:
        self.server = server
        self.folder = f"index{project}"
        (server.document_root / self.folder).mkdir(parents=True, exist_ok=True)
        api.add_local_storage(project, server.document_root / self.folder)

    def add(self, seed: int) -> dict:
        """Write image ``seed``; the task data that points to it."""
        data = io.BytesIO()
        scene(48 + 8 * (seed % 4), 36 + 6 * (seed % 3), seed).save(data, "PNG")
        (self.server.document_root / self.folder / f"img{seed}.png").write_bytes(data.getvalue())
        return {"image": f"/data/local-files/?d={self.folder}/img{seed}.png"}

    def tasks(self, seeds: range) -> list[dict]:
        return [{"data": self.add(seed)} for seed in seeds]

    def read(self, data: dict) -> bytes:
        return (self.server.document_root / data["image"].split("?d=", 1)[1]).read_bytes()


def test_webhooks_index_new_tasks_and_drop_deleted_ones_also_across_a_restart(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI], backend: Backend
) -> None:
    server, api = label_studio
    project = api.create_project("index webhooks", CONFIG)["id"]
    images = Images(server, api, project)
    first = api.import_tasks(project, images.tasks(range(1, 5)))

    # The webhook, registered as a user does: through Label Studio's webhooks API, with our secret.
    registered = backend.cli("register-webhook", "--project", str(project), "--backend-url", backend.url)
    assert registered.returncode == 0, registered.stdout + registered.stderr
    (hook,) = [h for h in api.webhooks(project) if h["url"] == f"{backend.url}/webhook"]
    assert sorted(hook["actions"]) == sorted(WEBHOOK_ACTIONS)
    assert hook["headers"] == {"X-Dinolabel-Secret": SECRET}
    again = backend.cli("register-webhook", "--project", str(project), "--backend-url", backend.url)
    assert "already sends TASKS_CREATED, TASKS_DELETED, ANNOTATION_CREATED" in again.stdout, again.stdout + again.stderr
    assert len(api.webhooks(project)) == 1

    indexed = backend.index(project)
    assert indexed.returncode == 0, indexed.stdout + indexed.stderr
    assert "done: 4 embedded, 0 skipped (already indexed), 0 failed of 4 tasks" in indexed.stdout

    # Imported tasks reach us as TASKS_CREATED (sent inside the import call) and are indexed.
    new = api.import_tasks(project, images.tasks(range(5, 8)))
    ids = first + new
    wait_for(lambda: sorted(backend.stored(project)) == sorted(ids), 120, f"new vectors\n{backend.log_tail()}")
    tasks = {task["id"]: task["data"] for task in api.list_tasks(project)}
    for task in new:
        hits = backend.search(project, images.read(tasks[task]))
        assert hits[0]["task_id"] == task and hits[0]["score"] == pytest.approx(1.0, abs=1e-4), hits
        assert hits[0]["image"] == server.url + tasks[task]["image"]
        assert sorted(h["task_id"] for h in hits) == sorted(ids), "k=10: every task of the project"
    url = f"{backend.url}/v1/projects/{project}/search"
    by_url = httpx.post(url, json={"url": tasks[new[1]]["image"]}, timeout=120)  # on Label Studio's origin
    assert by_url.status_code == 200 and by_url.json()["results"][0]["task_id"] == new[1], by_url.text

    # Deleted in Label Studio (the Data Manager's action, and one by one): the vectors go.
    deleted = [first[0], new[0], first[2]]
    api.delete_tasks(project, deleted[:2])
    api.delete_task(deleted[2])
    left = [task for task in ids if task not in deleted]
    wait_for(lambda: sorted(backend.stored(project)) == sorted(left), 60, f"vectors gone\n{backend.log_tail()}")

    def never_returns_the_deleted() -> None:
        for task in deleted:
            assert backend.similar(project, task).status_code == 404, "a deleted task is no query either"
            hits = backend.search(project, images.read(tasks[task]))
            assert sorted(h["task_id"] for h in hits) == sorted(left), hits
        for task in left:
            response = backend.similar(project, task)
            assert response.status_code == 200, response.text
            assert sorted(h["task_id"] for h in response.json()["results"]) == sorted(set(left) - {task})

    never_returns_the_deleted()

    # After a restart the index is loaded from its save (written at shutdown), not from the deleted past.
    backend.stop()
    saved = VectorIndex.load(project_dir(backend.data_dir / "index", project) / INDEX_FOLDER)
    _scores, saved_ids = saved.search(np.ones(saved.info.dim, dtype=np.float32), 100)
    assert sorted(saved_ids[0].tolist()) == sorted(left)
    log_offset = (backend.logs / "serve.log").stat().st_size
    backend.start()
    never_returns_the_deleted()
    restarted = (backend.logs / "serve.log").read_bytes()[log_offset:].decode(errors="replace")
    assert f"project {project}: loaded its flat index of {len(left)} vectors" in restarted, "read, not rebuilt"
    # ... and the project is still known as indexed: a task created now is indexed too.
    created = images.tasks(range(8, 9))
    (latest,) = api.import_tasks(project, created)
    wait_for(lambda: latest in backend.stored(project), 120, f"a task created after the restart\n{backend.log_tail()}")
    hits = backend.search(project, images.read(created[0]["data"]))
    assert hits[0]["task_id"] == latest and sorted(h["task_id"] for h in hits) == sorted([*left, latest])


def test_a_sync_drops_vanished_tasks_and_re_embeds_only_changed_images(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI], backend: Backend
) -> None:
    server, api = label_studio
    project = api.create_project("index sync", CONFIG)["id"]  # no webhook: Label Studio tells us nothing
    images = Images(server, api, project)
    ids = api.import_tasks(project, images.tasks(range(20, 25)))
    indexed = backend.index(project)
    assert indexed.returncode == 0, indexed.stdout + indexed.stderr
    before = backend.stored(project)
    assert sorted(before) == sorted(ids)

    gone, changed = ids[1], ids[3]
    api.delete_tasks(project, [gone])
    new_image = images.add(99)
    api.update_task(changed, new_image)
    assert sorted(backend.stored(project)) == sorted(ids), "without a webhook nothing told the index"
    assert backend.similar(project, gone).status_code == 200

    synced = backend.index(project, "--sync")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert "done: 1 embedded, 3 skipped (already indexed), 0 failed of 4 tasks" in synced.stdout

    after = backend.stored(project)
    assert sorted(after) == sorted(set(ids) - {gone})
    new_bytes = images.read(new_image)
    assert after[changed].sha256 == sha256_hex(new_bytes) != before[changed].sha256
    assert not np.array_equal(after[changed].vector, before[changed].vector), "re-embedded from the new image"
    for task in set(ids) - {gone, changed}:  # fetched and hashed, not embedded nor written again
        assert after[task].updated == before[task].updated
        assert np.array_equal(after[task].vector, before[task].vector)
    assert backend.similar(project, gone).status_code == 404
    hits = backend.search(project, new_bytes)
    assert hits[0]["task_id"] == changed and sorted(h["task_id"] for h in hits) == sorted(set(ids) - {gone})
