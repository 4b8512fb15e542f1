"""What the API process holds: Redis, the queues, projects seen in ``/setup``, an embedded worker.

Projects live in Redis (not in the API's memory) so that several API replicas and the workers agree
on each project's thresholds, and so a restart forgets nothing.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from redis import Redis

from backend.bulk import BulkJob, JobKind, JobSpec
from backend.config import Settings
from backend.ls_credentials import LabelStudioAccess, label_studio_access
from backend.project_vectors import embedder_version_of
from backend.queues import KEY_PREFIX, EmbeddedRedis, Queues, connect
from backend.schemas.tasks import MAX_ID
from backend.tasks import Rejection
from model import DetectionParams, model_version

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 30.0
"""Seconds ``serve`` waits at shutdown for its embedded worker's job in progress."""


INDEXED_KEY = KEY_PREFIX + "indexed-projects"
"""The projects an index job was started for (``TASKS_CREATED`` indexes their new tasks)."""


class NoLabelStudio(LookupError):
    """Neither the settings nor a ``/setup`` call told us where the project's Label Studio is."""


@dataclass(frozen=True)
class Project:
    """What ``/setup`` told us about one Label Studio project."""

    label_config: str | None = None
    hostname: str | None = None
    access_token: str | None = None
    params: DetectionParams = field(default_factory=DetectionParams)


def project_id(project: Any) -> int | None:
    """Label Studio sends ``"<id>.<timestamp>"`` as the project; the id part names it.

    Only ASCII digits count (``str.isdigit`` also accepts "²", which ``int`` refuses), and only ids in
    range: anything else names no project.
    """
    if isinstance(project, bool) or project is None:
        return None
    head = str(project).split(".", 1)[0]
    if not (head.isascii() and head.isdigit()) or len(head) > len(str(MAX_ID)):
        return None
    number = int(head)
    return number if number <= MAX_ID else None


class ProjectStore:
    """Per-project settings from ``/setup`` (label config, Label Studio address, threshold overrides)."""

    prefix = KEY_PREFIX + "project:"

    def __init__(self, settings: Settings, connection: Redis) -> None:
        self.settings = settings
        self.connection = connection
        self.default_params = DetectionParams(
            box_threshold=settings.box_threshold,
            text_threshold=settings.text_threshold,
            nms_iou=settings.nms_iou,
            max_boxes=settings.max_boxes,
        )
        self._versions: dict[DetectionParams, str] = {}

    def get(self, project: Any) -> Project:
        key = project_id(project)
        raw = self.connection.get(f"{self.prefix}{key}") if key is not None else None
        if raw is None:
            return Project(params=self.default_params)
        data = json.loads(raw)
        data["params"] = DetectionParams(**data["params"])
        return Project(**data)

    def update(self, project: Any, **changes: Any) -> Project:
        updated = replace(self.get(project), **changes)
        key = project_id(project)
        if key is not None:
            data = asdict(updated)
            self.connection.set(f"{self.prefix}{key}", json.dumps(data))
        return updated

    def params_with(self, overrides: dict[str, Any] | None) -> DetectionParams:
        """The default detection parameters with a project's ``extra_params`` applied."""
        return replace(self.default_params, **(overrides or {}))

    def model_version(self, params: DetectionParams) -> str:
        """Computed once per parameter set: it reads the checkpoint folder, and /predict asks every time.

        Workers load the checkpoint once too, so a checkpoint changed on disk needs a restart of both.
        """
        if params not in self._versions:
            s = self.settings
            self._versions[params] = model_version(
                s.detector_checkpoint, revision=s.detector_revision, params=params, precision=s.precision
            )
        return self._versions[params]

    def label_studio(self, project: Any) -> LabelStudioAccess:
        """The Label Studio URL and key for a project, from these settings and its ``/setup`` record."""
        record = self.get(project)
        return label_studio_access(self.settings, record.hostname, record.access_token)

    def job_spec(self, project_number: int, *, label_config: str | None, source: str) -> JobSpec:
        """What a bulk job for the project needs; raises NoLabelStudio when we cannot reach it.

        The spec holds no URL or key (it is stored in Redis): the workers resolve them.
        """
        project = self._reachable(project_number)
        return JobSpec(
            project=project_number,
            model_version=self.model_version(project.params),
            label_config=label_config or project.label_config or "",
            params=asdict(project.params),
            source=source,
        )

    def index_spec(self, project_number: int, *, label_config: str | None, source: str, sync: bool) -> JobSpec:
        """What an index job for the project needs (the current embedder version); raises NoLabelStudio."""
        project = self._reachable(project_number)
        return JobSpec(
            project=project_number,
            model_version=embedder_version_of(self.settings),
            label_config=label_config or project.label_config or "",
            params={"sync": True} if sync else {},
            source=source,
            kind=JobKind.INDEX,
        )

    def _reachable(self, project_number: int) -> Project:
        project = self.get(project_number)
        if not label_studio_access(self.settings, project.hostname, project.access_token).url:
            raise NoLabelStudio(
                f"no Label Studio address for project {project_number}: connect the model to the project in "
                "Label Studio (it then calls /setup) or set DINOLABEL_LABEL_STUDIO_URL and _API_KEY"
            )
        return project


class Service:
    """Redis, queues and projects; with no ``DINOLABEL_REDIS_URL``, an embedded Redis and worker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.embedded: EmbeddedRedis | None = None
        if settings.redis_url:
            self.redis_url = settings.redis_url
        else:
            self.embedded = EmbeddedRedis(settings.data_dir / "redis")
            self.redis_url = self.embedded.url
        self.connection = connect(self.redis_url)
        self.health_connection = connect(self.redis_url, timeout=0.5)
        self.queues = Queues.on(self.connection)
        self.projects = ProjectStore(settings, self.connection)
        self.worker_state: dict[str, Any] = {}
        self.store_writer_state: dict[str, Any] = {}
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._store_writer: threading.Thread | None = None

    def start_embedded_worker(self) -> None:
        """Run one worker on a thread of this process (the README's one-command start)."""
        from backend.worker import run_worker

        def work() -> None:
            try:
                run_worker(
                    self.settings,
                    connect(self.redis_url),
                    stop=self._stop,
                    state=self.worker_state,
                )
            except Exception:  # reported through the worker state and the log
                log.exception("embedded worker stopped")

        self._worker = threading.Thread(target=work, name="dinolabel-worker", daemon=True)
        self._worker.start()

    def start_store_writer(self) -> None:
        """Run the store writer on a thread of this process (``backend.store_writer``)."""
        from backend.store_writer import run_store_writer

        def work() -> None:
            try:
                run_store_writer(self.settings, connect(self.redis_url), stop=self._stop, state=self.store_writer_state)
            except Exception:  # reported in the log; /health shows no store writer
                log.exception("store writer stopped")

        self._store_writer = threading.Thread(target=work, name="dinolabel-store-writer", daemon=True)
        self._store_writer.start()

    def submit_index(
        self,
        project_number: int,
        *,
        task_ids: list[int] | None = None,
        sync: bool = False,
        label_config: str | None = None,
        source: str = "api",
        rejected: Sequence[Rejection] = (),
    ) -> BulkJob:
        """Create an index job (all the project's tasks, or ``task_ids``) and queue its planning."""
        from backend.jobs import enqueue_plan

        spec = self.projects.index_spec(project_number, label_config=label_config, source=source, sync=sync)
        job = BulkJob.create(self.connection, spec, rejected=[(r.task_id, r.reason) for r in rejected])
        self.connection.sadd(INDEXED_KEY, str(project_number))
        enqueue_plan(self.queues, job, task_ids=task_ids)
        return job

    def submit_pair(
        self,
        project_number: int,
        *,
        tasks: list[dict[str, Any]],
        label_config: str | None = None,
        source: str = "webhook",
        rejected: Sequence[Rejection] = (),
    ) -> tuple[BulkJob, BulkJob]:
        """Pre-annotate and index the same tasks: two jobs, each with its own record, planned together so
        that a worker serving both models fetches each image once (``backend.combined``)."""
        from backend.jobs import request_plan_step

        detect_spec = self.projects.job_spec(project_number, label_config=label_config, source=source)
        index_spec = self.projects.index_spec(project_number, label_config=label_config, source=source, sync=False)
        detect = BulkJob.create(self.connection, detect_spec, rejected=[(r.task_id, r.reason) for r in rejected])
        index = BulkJob.create(self.connection, index_spec)
        detect.pair_with(index)
        self.connection.sadd(INDEXED_KEY, str(project_number))
        ids = [t["id"] for t in tasks]
        detect.restrict_to(ids)
        index.restrict_to(ids)
        request_plan_step(self.queues, index)
        return detect, index

    def indexed(self, project_number: int) -> bool:
        """Whether an index job was ever started for the project: its new tasks are then indexed too."""
        return bool(self.connection.sismember(INDEXED_KEY, str(project_number)))

    def submit(
        self,
        project_number: int,
        *,
        tasks: list[dict[str, Any]] | None = None,
        task_ids: list[int] | None = None,
        label_config: str | None = None,
        source: str = "api",
        rejected: Sequence[Rejection] = (),
    ) -> BulkJob:
        """Create a bulk pre-annotation job and queue its planning; returns at once.

        ``tasks`` (checked ones, ``backend.tasks.check_tasks``) or ``task_ids`` restrict the job to those
        tasks (their data is listed from Label Studio when planned); ``rejected`` tasks are recorded as
        failures of the job.
        """
        from backend.jobs import enqueue_plan

        spec = self.projects.job_spec(project_number, label_config=label_config, source=source)
        job = BulkJob.create(self.connection, spec, rejected=[(r.task_id, r.reason) for r in rejected])
        enqueue_plan(self.queues, job, tasks=tasks, task_ids=task_ids)
        return job

    def close(self) -> None:
        """Stop the embedded worker, then the embedded Redis.

        A ready worker gets ``SHUTDOWN_GRACE`` seconds to finish a job in progress. One still loading its
        models holds no job, and cannot be interrupted (a Hub out of reach is retried for minutes): it is
        not waited for, its thread ends with the process. A batch cut short is not lost: its claims
        belong to a worker that no longer beats, so the next worker takes them over.
        """
        self._stop.set()
        if self._worker is not None and self.worker_state.get("state") == "ready":
            self._worker.join(timeout=SHUTDOWN_GRACE)
        if self._store_writer is not None:
            self._store_writer.join(timeout=SHUTDOWN_GRACE)
        if self.embedded is not None:
            self.embedded.close()
