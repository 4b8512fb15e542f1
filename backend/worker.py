"""``dinolabel worker``: one process per GPU that loads its models once and then takes jobs.

A worker loads the models named in ``DINOLABEL_WORKER_MODELS`` (the detector, the embedder, or both)
and listens only to the queues of those models: a worker without the embedder never takes embedding
work, and the other way round.

RQ's default ``Worker`` forks a child for every job: the child would load the model again, and CUDA
cannot be used after a fork once initialised. We use ``SimpleWorker`` (jobs run in the worker's own
process) and build the model *before* the first job. A heartbeat thread keeps a short-lived "alive"
key, and re-queues the batches of workers whose key has expired (killed, crashed, machine gone).

A Redis outage of any length, even one that breaks RQ's own handling of the job in progress, does not
end the process: it waits for Redis and goes on under a new name, so that the job cut short is
re-queued and checked against Label Studio like one of a dead worker (``recover``).

The models' thread takes embedding and detection batches only: on a worker serving the detector,
``/predict`` requests run on a thread of their own and take the model's next forward pass before the
bulk batch's (``predictor.ModelTurns``), plan steps run on a planner thread and Label Studio writes on a
writer thread, so an annotator's ``/predict`` waits at most for the forward pass under way, not for a
bulk batch, a page listing or an import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis
import torch
from redis import Redis
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty

from backend.bulk import BulkJob, Workers
from backend.config import Settings
from backend.image_source import ImageFetcher, fetcher_for
from backend.ls_credentials import LabelStudioAccess
from backend.predictor import Predictor
from backend.project_vectors import open_store
from backend.queues import DETECTOR, EMBEDDER, INTERACTIVE, KEY_PREFIX, PLAN, Queues
from backend.state import ProjectStore
from backend.writer import Writer
from indexer.store import STORE_FILE, VectorStore, project_dir
from model import DinoV2Embedder, create_detector, create_embedder

log = logging.getLogger(__name__)

SHUTDOWN_WRITES = 60.0
"""Seconds a stopping worker gives its writer to write the predictions it holds (a batch whose rows are
not written is re-queued by another worker)."""
HEARTBEAT_SECONDS = 2.0
POLL_SECONDS = 1
REAP_EVERY = 3  # heartbeats


@dataclass
class Runtime:
    """What jobs use inside a worker process: the models it serves (None when not served), the settings,
    Redis, cached fetchers."""

    settings: Settings
    connection: Redis
    name: str
    writer: Writer
    predictor: Predictor | None = None
    embedder: DinoV2Embedder | None = None
    _fetchers: dict[LabelStudioAccess, ImageFetcher] = field(default_factory=dict)
    _stores: dict[int, VectorStore] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def models(self) -> tuple[str, ...]:
        """The models this runtime serves, by their names in ``DINOLABEL_WORKER_MODELS``."""
        return tuple(name for name, model in ((DETECTOR, self.predictor), (EMBEDDER, self.embedder)) if model)

    def detector(self) -> Predictor:
        """The detector; a job that needs it only runs on a worker serving it (it listens to its queues)."""
        if self.predictor is None:
            raise RuntimeError(f"worker {self.name} does not serve the detector (DINOLABEL_WORKER_MODELS)")
        return self.predictor

    def store(self, project: int) -> VectorStore:
        """The project's store, opened for writing once and kept: only the store writer calls this."""
        with self._lock:
            if project not in self._stores:
                self._stores[project] = open_store(self.settings, project, writer=True)
            return self._stores[project]

    def has_store(self, project: int) -> bool:
        """Whether the project was ever indexed (a store to change exists)."""
        return project in self._stores or (project_dir(self.settings.index_dir, project) / STORE_FILE).is_file()

    def close_stores(self) -> None:
        """Close the stores this runtime wrote (their writer locks go with them)."""
        with self._lock:
            for store in self._stores.values():
                store.close()
            self._stores.clear()

    def label_studio(self, project: int | None) -> LabelStudioAccess:
        """Label Studio's address and key for a project, from this worker's settings (a worker may
        reach Label Studio by another address than the API) and the project's ``/setup`` record."""
        return ProjectStore(self.settings, self.connection).label_studio(project)

    def fetcher(self, access: LabelStudioAccess) -> ImageFetcher:
        """One image fetcher (and connection pool) per Label Studio and key, kept for the process."""
        with self._lock:
            if access not in self._fetchers:
                self._fetchers[access] = fetcher_for(self.settings, access)
            return self._fetchers[access]


# Jobs run on the thread that runs the worker loop: a thread-local runtime lets an embedded worker
# (a thread of `dinolabel serve`) and tests with several apps in one process keep theirs apart.
_local = threading.local()


def current_runtime() -> Runtime:
    """The runtime of the worker running on this thread (jobs only run inside a worker)."""
    runtime = getattr(_local, "runtime", None)
    if runtime is None:
        raise RuntimeError("no worker runtime: job functions run inside `dinolabel worker`")
    return runtime


class PredictionWorker(SimpleWorker):
    """A non-forking worker. With ``stop`` it runs off the main thread (the embedded worker): no
    signal handlers, and it polls the queues in short waits so that setting ``stop`` ends it.

    The job it is running goes into ``published[busy_key]`` (the state the heartbeat publishes: ``busy``
    for the model's thread, ``busy_<queue>`` for a ``QueueThread``), so ``/health``
    can tell a worker stuck in one job past its time-out: RQ's timer raises its exception in the
    job's thread only when that thread next runs Python code, never inside a blocking wait.
    """

    death_penalty_class = TimerDeathPenalty  # signal-free job time-outs: works in any thread

    def __init__(
        self,
        *args: Any,
        stop: threading.Event | None = None,
        published: dict[str, Any] | None = None,
        busy_key: str = "busy",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.stop = stop
        self.published = published if published is not None else {}  # RQ's own ``state`` is its status
        self.busy_key = busy_key
        self.lost_redis = False

    def handle_exception(self, job: Any, *exc_info: Any) -> None:
        """Note a job that failed because Redis went away: its bookkeeping may be half done."""
        if isinstance(exc_info[1], redis.ConnectionError | redis.TimeoutError):
            self.lost_redis = True
        super().handle_exception(job, *exc_info)

    def execute_job(self, job: Job, queue: Queue) -> None:
        timeout = job.timeout or queue.DEFAULT_TIMEOUT
        self.published[self.busy_key] = {
            "job": job.id,
            "function": job.func_name,  # not the description: it holds the arguments (tokens)
            "since": time.time(),
            "timeout": timeout if timeout > 0 else None,  # -1: no time-out
        }
        try:
            super().execute_job(job, queue)
        finally:
            self.published[self.busy_key] = None
        if self.lost_redis:  # Redis came back before RQ noticed: end the loop all the same, to recover
            raise redis.ConnectionError(f"job {job.id} lost Redis while it ran")

    def _install_signal_handlers(self) -> None:
        if self.stop is None:
            super()._install_signal_handlers()

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        if self.stop is None or timeout is None:
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        while not self.stop.is_set():
            result = super().dequeue_job_and_maintain_ttl(POLL_SECONDS, POLL_SECONDS)  # None when idle
            if result is not None:
                return result
        raise StopRequested()


class Heartbeat(threading.Thread):
    """Refreshes this worker's alive key and re-queues the batches of dead workers."""

    def __init__(self, connection: Redis, name: str, state: dict[str, Any], batch_timeout: int) -> None:
        super().__init__(name="dinolabel-heartbeat", daemon=True)
        self.batch_timeout = batch_timeout
        self.connection = connection
        self.worker_name = name
        self.state = state
        self.stopped = threading.Event()

    def run(self) -> None:
        beats = 0
        while not self.stopped.is_set():
            try:
                Workers.beat(self.connection, self.worker_name, self.state)
                if beats % REAP_EVERY == 0:
                    requeue_abandoned(self.connection, batch_timeout=self.batch_timeout)
            except redis.RedisError as exc:
                log.warning("heartbeat: Redis unreachable (%s)", exc)
            beats += 1
            self.stopped.wait(HEARTBEAT_SECONDS)
        with contextlib.suppress(redis.RedisError):
            Workers.gone(self.connection, self.worker_name)


def requeue_abandoned(connection: Redis, *, batch_timeout: int) -> int:
    """Put back on the queue every batch whose worker stopped beating; returns how many.

    Safe to run from many workers at once: a short lock per batch lets one of them re-queue it, and
    the write marks make a batch that still runs somewhere harmless.
    """
    from backend.jobs import enqueue_batch

    jobs = list(BulkJob.active(connection))
    count = sum(_restart_plan_step(connection, leader) for leader in _plan_leaders(jobs))
    for job in jobs:
        for number, holder in job.holders().items():
            if job.batch_finished(number) or _holder_alive(connection, holder):
                continue
            lock = f"{KEY_PREFIX}reap:{job.id}:{number}:{holder}"
            if not connection.set(lock, "1", nx=True, ex=60):
                continue
            log.warning("worker %s is gone: re-queueing batch %d of job %s", holder, number, job.id)
            enqueue_batch(Queues.on(connection), job, number, timeout=batch_timeout, at_front=True)
            count += 1
    return count


STORE_HOLDER = "store:"
"""A batch whose vectors wait for the store writer is held by ``store:<RQ job>``, not by its worker."""


def _holder_alive(connection: Redis, holder: str) -> bool:
    """A worker that beats; or a store job that is still queued or running (a lost one, e.g. of a store
    writer killed mid-job, ends up failed in RQ's registry: then its batch is embedded again)."""
    if holder.startswith(STORE_HOLDER):
        rq_id = holder.removeprefix(STORE_HOLDER)
        rq_job = Job.fetch_many([rq_id], connection=connection, serializer=JSONSerializer)[0]
        return rq_job is not None and rq_job.get_status(refresh=False) in ("queued", "started", "deferred")
    return Workers.alive(connection, holder)


def _plan_leaders(jobs: list[BulkJob]) -> list[BulkJob]:
    """The jobs whose plan steps plan ``jobs``, each once: a job paired with an index job is planned by
    that job's steps, which go on after the index job ended (``backend.combined``)."""
    leaders = {}
    for job in jobs:
        leader = job.plan_leader()
        leaders.setdefault(leader.id, leader)
    return list(leaders.values())


def _restart_plan_step(connection: Redis, job: BulkJob) -> int:
    """Queue a job's plan step again when the worker running it is gone, or its queued RQ job vanished."""
    from backend.jobs import request_plan_step

    step = job.pending_plan_step()
    kind, _, who = step.partition(":")
    if not step or (kind == "running" and Workers.alive(connection, who)):
        return 0
    if kind == "queued" and Job.exists(who, connection=connection):
        return 0
    if not connection.set(f"{KEY_PREFIX}reap:{job.id}:plan:{who}", "1", nx=True, ex=60):
        return 0
    log.warning("job %s: its plan step (%s) is lost: queueing it again", job.id, step)
    job.end_plan_step()
    return int(request_plan_step(Queues.on(connection), job))


def load_predictor(settings: Settings) -> Predictor:
    """Load the detector named by the settings and wrap it for Label Studio tasks."""
    detector = create_detector(
        settings.detector_checkpoint,
        revision=settings.detector_revision,
        device=settings.device,
        precision=settings.precision,
    )
    # Batches pay off on GPUs; on the CPU a batch of 4 was ~13% slower per image than 1 (bench/).
    default_batch = 8 if detector.device.type == "cuda" else 1
    return Predictor(
        detector,
        batch_size=settings.batch_size or default_batch,
        max_pixels=settings.image_max_pixels,
        download_threads=settings.image_download_threads,
        preprocess_threads=settings.image_preprocess_threads,
        preprocess_processes=preprocess_processes(settings, detector.device),
        draft_decode=settings.image_draft_decode,
        niceness=settings.image_thread_niceness,
    )


def load_embedder(settings: Settings) -> DinoV2Embedder:
    """Load the DINOv2 embedder named by the settings (timm name, alias or local folder)."""
    return create_embedder(
        settings.embedder_model,
        image_size=settings.embedder_image_size,
        device=settings.device,
        precision=settings.embedder_precision,
        batch_size=settings.embedder_batch_size,
        preprocess_threads=settings.image_preprocess_threads,
        niceness=settings.image_thread_niceness,
        # No processes yet: index jobs hand the embedder's pipeline decoded images (backend.shared_images).
    )


def preprocess_processes(settings: Settings, device: torch.device) -> int:
    """``DINOLABEL_IMAGE_PREPROCESS_PROCESSES``; none by default, on the GPU as on the CPU: on 2 cores
    processes cost more CPU per image than threads and fed a 30 images/s device no better (README,
    Benchmarks). On a 16-core H200 host one short run (``bench/gpu_detector.py``, 2026-11-28) had them
    1.3-1.4x ahead at batch 8 but behind in one batch-16 cell: the README advises 8 there, and the default
    may come to depend on ``device`` once a longer run confirms it."""
    del device
    return settings.image_preprocess_processes or 0


def build_runtime(settings: Settings, connection: Redis, name: str) -> Runtime:
    """Load the models of ``settings.worker_models``, start the writer thread, and make them available
    to the job functions run on this thread."""
    if not settings.worker_models:
        raise ValueError("DINOLABEL_WORKER_MODELS names no model: a worker serves detector, embedder or both")
    predictor = load_predictor(settings) if DETECTOR in settings.worker_models else None
    embedder = load_embedder(settings) if EMBEDDER in settings.worker_models else None
    writer = Writer(size=settings.bulk_write_size, wait=settings.bulk_write_wait, retries=settings.label_studio_retries)
    writer.start()
    _local.runtime = Runtime(
        settings=settings, connection=connection, name=name, writer=writer, predictor=predictor, embedder=embedder
    )
    return _local.runtime


def _device(runtime: Runtime) -> str:
    model = runtime.predictor.detector if runtime.predictor is not None else runtime.embedder
    return str(model.device) if model is not None else "none"


def run_worker(
    settings: Settings,
    connection: Redis,
    *,
    burst: bool = False,
    stop: threading.Event | None = None,
    state: dict[str, Any] | None = None,
) -> None:
    """Load the models, then take jobs until stopped; survives Redis outages by reconnecting.

    ``stop`` (an event) runs the worker off the main thread and ends it when set; without it, SIGINT
    and SIGTERM end it (RQ's warm shutdown). ``state`` reports ``loading``/``ready``/``failed``.
    """
    name = Workers.new_name()
    state = state if state is not None else {}
    models = list(settings.worker_models)
    state.update(name=name, pid=os.getpid(), state="loading", models=models, busy=None)
    if DETECTOR in models:
        state["checkpoint"] = settings.detector_checkpoint
    if EMBEDDER in models:
        state["embedder"] = settings.embedder_model
    heartbeat = Heartbeat(connection, name, state, settings.batch_timeout)
    heartbeat.start()
    runtime: Runtime | None = None
    side: list[QueueThread] = []
    try:
        started = time.perf_counter()
        try:
            runtime = build_runtime(settings, connection, name)
        except Exception as exc:
            state.update(state="failed", error=f"{type(exc).__name__}: {exc}")
            log.exception("worker %s: a model failed to load", name)
            raise
        state.update(
            state="ready",
            device=_device(runtime),
            load_seconds=round(time.perf_counter() - started, 2),
        )
        log.info("worker %s ready on %s", name, state["device"])
        queues = Queues.on(connection)
        listen = queues.for_models(runtime.models)
        if not burst:  # plan steps and /predict on threads of their own: the models' thread runs batches
            level = settings.log_level.upper()
            side = [Planner(runtime, level, state)]
            if runtime.predictor is not None:
                side.append(Interactive(runtime, level, state))
                listen = [q for q in listen if q.name != INTERACTIVE]
            for thread in side:
                thread.start()
        while not (stop and stop.is_set()):
            worker: PredictionWorker | None = None
            try:
                worker = PredictionWorker(
                    _with_plan(queues, listen) if burst else listen,
                    connection=connection,
                    name=f"{runtime.name}.{int(time.time())}",
                    serializer=JSONSerializer,
                    worker_ttl=30,
                    stop=stop,
                    published=state,
                )
                worker.work(burst=burst, logging_level=settings.log_level.upper())
                runtime.writer.flush()  # batches counted, and the plan steps they ask for queued
                if burst and any(q.count for q in _with_plan(queues, listen)):
                    continue
            except Exception as exc:  # mostly Redis gone mid-job, raised out of RQ's own failure handling
                log.error("worker %s: the work loop failed (%s: %s)", runtime.name, type(exc).__name__, exc)
                _stop_pubsub(worker)
            # RQ notes a SIGINT/SIGTERM in _shutdown_requested_date (and ends work() quietly when idle).
            if burst or (worker and worker._shutdown_requested_date is not None) or (stop and stop.is_set()):
                break
            recover(connection, runtime, heartbeat, state, stop)
    finally:
        for thread in side:
            thread.stop.set()
        for thread in side:
            thread.join(timeout=POLL_SECONDS + 10)
        if runtime is not None:
            runtime.writer.stop(timeout=SHUTDOWN_WRITES)
        heartbeat.stopped.set()
        heartbeat.join(timeout=5)


def _with_plan(queues: Queues, listen: list[Queue]) -> list[Queue]:
    """A burst worker's queues: its models' queues and the plan queue (it has no planner thread)."""
    names = {q.name for q in listen} | {queues.plan.name}
    return [q for q in queues.in_listen_order() if q.name in names]


def _stop_pubsub(worker: PredictionWorker | None) -> None:
    """End the pubsub thread of an RQ worker whose teardown failed before it could."""
    if worker is not None and worker.pubsub_thread is not None:
        worker.pubsub_thread.stop()
        worker.pubsub_thread.join(timeout=1)


def wait_for_redis(connection: Redis, stop: threading.Event | None, who: str) -> None:
    """Ping Redis with back-off (0.5 s doubling to 30 s) until it answers or ``stop`` is set."""
    delay = 0.5
    while not (stop and stop.is_set()):
        try:
            connection.ping()
            return
        except redis.RedisError as exc:
            log.warning("%s: Redis unreachable (%s); trying again in %.1f s", who, exc, delay)
            (stop.wait if stop else time.sleep)(delay)
            delay = min(delay * 2, 30.0)


class QueueThread(threading.Thread):
    """An RQ worker of its own on one queue, on a thread of the worker process, sharing its runtime:
    what it runs never waits behind the model's thread, nor that thread behind it."""

    def __init__(self, runtime: Runtime, queue: str, log_level: str, state: dict[str, Any]) -> None:
        super().__init__(name=f"dinolabel-{queue}", daemon=True)
        self.runtime = runtime
        self.queue = queue
        self.log_level = log_level
        self.state = state  # the worker's published state: the job under way goes in ``busy_<queue>``
        self.stop = threading.Event()

    def run(self) -> None:
        _local.runtime = self.runtime
        connection = self.runtime.connection
        while not self.stop.is_set():
            worker: PredictionWorker | None = None
            try:
                queue = Queue(self.queue, connection=connection, serializer=JSONSerializer)
                worker = PredictionWorker([queue], connection=connection,
                                          name=f"{self.runtime.name}.{self.queue}.{int(time.time())}",
                                          serializer=JSONSerializer, worker_ttl=30, stop=self.stop,
                                          published=self.state, busy_key=f"busy_{self.queue}")  # fmt: skip
                worker.work(logging_level=self.log_level)
            except Exception as exc:  # Redis gone mid-job
                log.error("%s of %s: the work loop failed (%s: %s)", self.queue, self.runtime.name,
                          type(exc).__name__, exc)  # fmt: skip
                _stop_pubsub(worker)
            if self.stop.is_set():
                return
            wait_for_redis(connection, self.stop, f"{self.queue} of {self.runtime.name}")
            self.after_outage()

    def after_outage(self) -> None:
        """Redis is back after the work loop broke."""


class Planner(QueueThread):
    """Plan steps, off the model's thread: listing and checking a page of a big project takes Label
    Studio a second or more, which an annotator's ``/predict`` must not wait behind."""

    def __init__(self, runtime: Runtime, log_level: str, state: dict[str, Any]) -> None:
        super().__init__(runtime, PLAN, log_level, state)

    def after_outage(self) -> None:
        """A step cut short by the outage is queued again (it resumes at the job's cursor)."""
        with contextlib.suppress(redis.RedisError):
            restart_plan_steps_of(self.runtime.connection, self.runtime.name)


class Interactive(QueueThread):
    """``/predict`` requests, off the model's thread that runs bulk batches: a request waits for the
    model's current pass only (``ModelTurns`` gives it the next one), not for the whole bulk batch, nor
    for the batch's bookkeeping. A request that fails with an outage is answered by the API's time-out."""

    def __init__(self, runtime: Runtime, log_level: str, state: dict[str, Any]) -> None:
        super().__init__(runtime, INTERACTIVE, log_level, state)


def restart_plan_steps_of(connection: Redis, worker: str) -> int:
    """Queue again the plan steps that ``worker`` was running (its planner lost Redis mid-step)."""
    from backend.jobs import request_plan_step

    count = 0
    for job in _plan_leaders(list(BulkJob.active(connection))):
        if job.pending_plan_step() == f"running:{worker}":
            job.end_plan_step(worker)
            count += int(request_plan_step(Queues.on(connection), job))
    return count


def recover(
    connection: Redis, runtime: Runtime, heartbeat: Heartbeat, state: dict[str, Any], stop: threading.Event | None
) -> None:
    """After the work loop broke (Redis unreachable, however long): wait for Redis, then go on under a
    new name.

    A job cut short may have written to Label Studio without recording it. Under a new name, what the
    old one held counts as abandoned: the reaper re-queues its batches, and their claims are taken
    over with a check of what Label Studio holds, as for a worker that died. The process carries on.
    """
    wait_for_redis(connection, stop, f"worker {runtime.name}")
    dropped = runtime.writer.drop_pending()
    if dropped:
        log.warning("worker %s: %d predictions not written yet are dropped (their batches are re-queued)",
                    runtime.name, dropped)  # fmt: skip
    old, new = runtime.name, Workers.new_name()
    runtime.name = heartbeat.worker_name = new
    state["name"] = new
    with contextlib.suppress(redis.RedisError):
        Workers.gone(connection, old)
        Workers.beat(connection, new, state)
    log.warning("worker %s: Redis is back; going on as %s (what %s held is re-queued)", old, new, old)
