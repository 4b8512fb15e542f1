"""Index jobs: the RQ functions that fill a project's vector store, on the bulk job machinery.

An index job is a ``BulkJob`` of kind ``index``: planned page by page, run in batches, counted once per
batch, cancelled and followed like a pre-annotation job. Three places take part:

- ``plan_index_page`` (a plan step, on the store writer: it reads the store): lists a page of the
  project's tasks and skips those whose stored vector is of the current embedder version. A *sync* job
  skips nothing: each batch task carries the sha256 of its stored image, and the worker re-embeds only
  the images whose bytes changed; a sync also removes the vectors of tasks that vanished from the
  project (streamed: per page, the stored ids between the previous cursor and this page's last id that
  the page lacks).
- ``run_index_batch`` (on an embedder worker): fetches each image through the worker's ``ImageFetcher``
  (the same rules as for detection), hashes it (``indexer.hashes``) and embeds it; a broken image fails
  its task with the reason, not the batch. The vectors go through Redis to the store writer
  (``store_index_batch`` on the store queue); the batch stays held by this worker until then.
- ``store_index_batch`` (on the store writer): upserts the vectors, then counts the batch, so a job
  that is done has all its vectors in the store and a search right after it sees them.

Exactly once per task and embedder version: a task's row is keyed by its task id, so a batch run twice
(a worker that died after embedding) rewrites the same row, and the job counts each batch once. The
store only ever holds vectors of tasks that exist: deletions (``TASKS_DELETED``, a sync) are recorded
per project (``DeletedTasks``) and a batch embedded before a deletion stores nothing for that task.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import redis
from redis import Redis

from backend.bulk import JOB_TTL, BulkJob, JobStatus, NoSuchJob
from backend.image_source import ImageFetchError
from backend.jobs import (
    RESULT_TTL,
    cancel_queued,
    enqueue_batch,
    keep_planning,
    label_studio_client,
    next_page,
    with_label_config,
)
from backend.labeling import image_key
from backend.predictor import DECODE_MARGIN_S, MissingImage, fetch_task_image
from backend.prioritize import after_index_job
from backend.queues import KEY_PREFIX, Queues
from backend.shared_images import SharedImages
from backend.worker import STORE_HOLDER, Runtime, current_runtime
from indexer.hashes import ImageHashes, image_hashes, sha256_hex
from indexer.store import StoredVector, VectorStore
from model.images import ImageDecodeError, decode_image
from model.pipeline import Failed

log = logging.getLogger(__name__)

STORE_TIMEOUT = 600
"""Seconds one store step (a batch's vectors upserted) may run."""
UNCHANGED = "the stored vector is of this image already"
"""Why a sync skips a task: its image's bytes are those the stored vector was made from."""
_LAST_ID = 2**63 - 1


class Unchanged(Exception):
    """Raised while loading an image whose bytes the store has a vector of (a sync): nothing to embed."""


class DeletedTasks:
    """Task ids deleted from a project (Label Studio never reuses them), kept as long as a job may run.

    The store writer consults them before storing a batch's vectors: a batch embedded before its task
    was deleted must not bring the task back.
    """

    prefix = KEY_PREFIX + "index-deleted:"

    def __init__(self, connection: Redis, project: int) -> None:
        self.connection = connection
        self.key = f"{self.prefix}{project}"

    def add(self, task_ids: Sequence[int]) -> None:
        if task_ids:
            with self.connection.pipeline() as pipe:
                pipe.sadd(self.key, *[str(t) for t in task_ids])
                pipe.expire(self.key, JOB_TTL)
                pipe.execute()

    def among(self, task_ids: Sequence[int]) -> set[int]:
        if not task_ids:
            return set()
        flags = self.connection.smismember(self.key, [str(t) for t in task_ids])
        return {t for t, flag in zip(task_ids, flags, strict=True) if flag}


# --- planning (store writer) ----------------------------------------------------------------------------


def plan_index_page(job: BulkJob, state: dict[str, Any], runtime: Runtime, queues: Queues) -> dict[str, Any]:
    """List one page after the cursor, check it against the store, record and queue its batches."""
    spec = job.spec()
    with label_studio_client(spec) as client:
        (spec,) = with_label_config(client, (job, spec))
        key = image_key(spec.label_config)
        tasks, cursor, last = next_page(client, job, spec.project, state)
    store = runtime.store(spec.project)
    sync = bool(spec.params.get("sync"))
    todo, held = index_todo(store, tasks, key, spec.model_version, sync=sync)
    vanished: list[int] = []
    if sync and not state["restricted"]:
        stored = store.task_ids(after=state["cursor"], upto=_LAST_ID if last else cursor)
        listed = {task["id"] for task in tasks}
        vanished = [int(t) for t in stored if int(t) not in listed]
        remove_vectors(runtime, spec.project, vanished)
    size = runtime.settings.bulk_batch_size
    batches = [todo[i : i + size] for i in range(0, len(todo), size)]
    numbers = job.plan_page(
        after=state["cursor"], cursor=cursor, listed=len(tasks), skipped=held, batches=batches, last=last
    )
    if numbers is None:  # cancelled meanwhile
        return {"status": str(job.status())}
    for number in numbers:
        enqueue_batch(queues, job, number, timeout=runtime.settings.batch_timeout)
    if job.is_final():  # cancelled while this page was queued (or every task was skipped): take it back
        cancel_queued(queues, job)
        rank_again_when_done(runtime, job)
    log.info("index job %s: planned %d tasks after %d, %d to embed, %d vanished", job.id, len(tasks),
             state["cursor"], len(todo), len(vanished))  # fmt: skip
    return {"tasks": len(tasks), "to_embed": len(todo), "vanished": len(vanished), "last": last}


def index_todo(
    store: VectorStore, tasks: list[dict[str, Any]], key: str, version: str, *, sync: bool
) -> tuple[list[dict[str, Any]], int]:
    """The batch entries of the listed ``tasks`` to embed, and how many already hold a vector of ``version``
    (a sync re-checks those: their entry carries the sha256 the vector was made from)."""
    known = store.digests([task["id"] for task in tasks], version)
    todo: list[dict[str, Any]] = []
    held = 0
    for task in tasks:
        if task["id"] in known and not sync:
            held += 1
            continue
        image = (task.get("data") or {}).get(key)
        todo.append({"id": task["id"], "image": image, "key": key, "known": known.get(task["id"])})
    return todo, held


def remove_vectors(runtime: Runtime, project: int, task_ids: Sequence[int]) -> int:
    """Forget deleted tasks: recorded first (a batch in flight must not store them again), then removed."""
    if not task_ids:
        return 0
    DeletedTasks(runtime.connection, project).add(task_ids)
    if not runtime.has_store(project):
        return 0
    return runtime.store(project).delete(task_ids)


def delete_vectors(project: int, task_ids: list[int]) -> dict[str, Any]:
    """The store writer removes the vectors of deleted tasks (``TASKS_DELETED``)."""
    removed = remove_vectors(current_runtime(), project, task_ids)
    log.info("project %d: %d tasks deleted, %d vectors removed", project, len(task_ids), removed)
    return {"removed": removed}


def enqueue_delete(queues: Queues, project: int, task_ids: Sequence[int]) -> None:
    """Ask the store writer to remove these tasks' vectors (it is the one process that writes the store)."""
    queues.store.enqueue(
        delete_vectors,
        project,
        list(task_ids),
        job_timeout=STORE_TIMEOUT,
        result_ttl=RESULT_TTL,
        description=f"delete {len(task_ids)} vectors of project {project}",
    )


# --- embedding (embedder workers) ----------------------------------------------------------------------------


def run_index_batch(job_id: str, number: int) -> dict[str, Any]:
    """Fetch, hash and embed one batch; its vectors go to the store writer, which counts the batch."""
    runtime = current_runtime()
    return embed_batch(runtime, BulkJob.fetch(runtime.connection, job_id), number)


def embed_batch(runtime: Runtime, job: BulkJob, number: int, shared: SharedImages | None = None) -> dict[str, Any]:
    """Embed batch ``number`` of an index job and send its vectors to the store writer. ``shared``: the
    images a detection batch loaded already, taken from it instead of fetched again (``backend.combined``)."""
    job_id = job.id
    if job.is_final() or job.batch_finished(number):
        return {"status": "skipped"}
    job.hold(number, runtime.name)
    spec = job.spec()
    tasks = job.batch_tasks(number)
    started = time.perf_counter()
    try:
        rows, failures, unchanged = _embed(runtime, spec.project, spec.model_version, tasks, shared)
    except Exception as exc:  # a time-out, a bug: the batch ends with the reason, the job goes on
        log.exception("index job %s batch %d failed", job_id, number)
        reason = f"batch failed: {type(exc).__name__}"
        job.finish_batch(number, done=0, skipped=0, failures=[(t["id"], reason) for t in tasks])
        keep_planning(Queues.on(runtime.connection), job, runtime.settings.bulk_plan_ahead)
        raise
    seconds = time.perf_counter() - started
    store_job = uuid.uuid4().hex
    Queues.on(runtime.connection).store.enqueue(
        store_index_batch,
        job_id,
        number,
        rows,
        [list(f) for f in failures],
        unchanged,
        job_timeout=STORE_TIMEOUT,
        result_ttl=RESULT_TTL,
        failure_ttl=JOB_TTL,
        description=f"store job {job_id} batch {number}",
        job_id=store_job,
    )
    # From now on the store job holds the batch: this worker may stop or die, the batch is not re-run
    # unless the store job is lost.
    job.hold(number, f"{STORE_HOLDER}{store_job}")
    return {"embedded": len(rows), "unchanged": unchanged, "failed": len(failures), "seconds": round(seconds, 3)}


def _embed(
    runtime: Runtime, project: int, version: str, tasks: list[dict[str, Any]], shared: SharedImages | None = None
) -> tuple[list[dict[str, Any]], list[tuple[int, str]], int]:
    """The store rows of the tasks embedded, the failures with reasons, and how many were unchanged."""
    embedder = runtime.embedder
    if embedder is None:
        raise RuntimeError(f"worker {runtime.name} does not serve the embedder (DINOLABEL_WORKER_MODELS)")
    if embedder.version != version:
        reason = (
            f"this worker's embedder is {embedder.version}, the job indexes {version}: give the workers and "
            "the API the same DINOLABEL_EMBEDDER_* settings"
        )
        return [], [(t["id"], reason) for t in tasks], 0
    fetcher = runtime.fetcher(runtime.label_studio(project))
    hashes: dict[int, ImageHashes] = {}
    max_pixels = runtime.settings.image_max_pixels

    def load(task: dict[str, Any]) -> Any:
        kept = shared.take(task["id"]) if shared is not None else None
        if kept is not None:  # loaded for the detector: its pixels preprocessed for us, or why it failed
            hashes[task["id"]] = kept.hashes
            return kept.pixels
        data = fetch_task_image(fetcher, task.get("image"), key=task.get("key"), task_id=task["id"])
        digest = sha256_hex(data)
        if digest == task.get("known"):
            raise Unchanged(UNCHANGED)
        image = decode_image(data, max_pixels=max_pixels)
        hashes[task["id"]] = image_hashes(data, image, digest=digest)
        return image

    rows: list[dict[str, Any]] = []
    failures: list[tuple[int, str]] = []
    unchanged = 0
    stages = embedder.stages()
    for index, result in embedder.pipeline.run(
        tasks,
        load,
        shared.embedder_stages(stages) if shared is not None else stages,
        batch_size=embedder.batch_size,
        item_errors=(ImageFetchError, ImageDecodeError, MissingImage, Unchanged),
        item_timeout=fetcher.total_timeout + DECODE_MARGIN_S,
    ):
        task_id = tasks[index]["id"]
        if isinstance(result, Failed):
            if result.reason == UNCHANGED:
                unchanged += 1
            else:
                log.warning("task %s not embedded: %s", task_id, result.reason)
                failures.append((task_id, result.reason))
            continue
        found = hashes[task_id]
        vector = np.ascontiguousarray(result, dtype=np.float32)
        rows.append({
            "task": task_id, "vector": base64.b64encode(vector.tobytes()).decode("ascii"), "sha256": found.sha256,
            "pixel_hash": found.pixel_hash, "phash": found.phash, "width": found.width, "height": found.height,
        })  # fmt: skip
    rows.sort(key=lambda row: row["task"])
    return rows, failures, unchanged


# --- storing (store writer) ---------------------------------------------------------------------------------


def store_index_batch(
    job_id: str, number: int, rows: list[dict[str, Any]], failures: list[list[Any]], unchanged: int
) -> dict[str, Any]:
    """Upsert a batch's vectors into the project's store, then count the batch (so it is searchable when
    counted). Tasks deleted meanwhile are not stored; a store that refuses fails the batch's tasks."""
    runtime = current_runtime()
    try:
        job = BulkJob.fetch(runtime.connection, job_id)
    except NoSuchJob:
        log.warning("job %s expired before its batch %d was stored: dropped", job_id, number)
        return {"status": "expired"}
    spec = job.spec()
    gone = DeletedTasks(runtime.connection, spec.project).among([row["task"] for row in rows])
    records = [_record(row, spec.model_version) for row in rows if row["task"] not in gone]
    lost: list[tuple[int, str]] = []
    try:
        if records:
            runtime.store(spec.project).upsert(records)
    except redis.RedisError:
        raise
    except Exception as exc:  # a full disk, another writer holding the store: the batch's tasks fail
        log.exception("job %s batch %d: storing %d vectors failed", job_id, number, len(records))
        lost = [(r.task_id, f"storing the vector failed: {type(exc).__name__}") for r in records]
        records = []
    job.finish_batch(
        number,
        done=len(records),
        skipped=unchanged + len(gone),
        failures=[(int(t), str(reason)) for t, reason in failures] + lost,
    )
    keep_planning(Queues.on(runtime.connection), job, runtime.settings.bulk_plan_ahead)
    rank_again_when_done(runtime, job)
    return {"stored": len(records), "deleted_meanwhile": len(gone)}


def rank_again_when_done(runtime: Runtime, job: BulkJob) -> None:
    """A project prioritized before is ranked again when its index job ends done (``backend.prioritize``)."""
    if job.status() == JobStatus.DONE:
        after_index_job(runtime.connection, job.id, job.spec().project)


def _record(row: dict[str, Any], version: str) -> StoredVector:
    return StoredVector(
        task_id=int(row["task"]),
        embedder=version,
        vector=np.frombuffer(base64.b64decode(row["vector"]), dtype=np.float32),
        sha256=row["sha256"],
        pixel_hash=row["pixel_hash"],
        phash=int(row["phash"]),
        width=int(row["width"]),
        height=int(row["height"]),
    )
