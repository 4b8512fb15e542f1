"""A webhook's new tasks, pre-annotated and indexed with one fetch of each image.

``TASKS_CREATED`` on an indexed project makes two jobs over the same tasks: a pre-annotation job and an
index job (``Service.submit_pair``). Each keeps its own record (progress, cancel, failures), as when
they are started apart; they are linked (``BulkJob.pair_with``) so that:

- **One planner.** The index job's plan steps (on the store writer: the store says which tasks hold a
  vector) plan both: each page of the tasks is listed once, checked against Label Studio (predictions
  of the detector's version) and the store (vectors of the embedder's version), and cut into batches
  over the tasks that need either. A batch of tasks that need both is recorded in each job (its
  detection part in one, its embedding part in the other) and queued once, as a combined batch on
  ``dinolabel-combined``; a batch that needs one side only goes to that side's queue as usual. When one
  job is cancelled, fails or ends, the other is planned alone by the same steps.
- **One fetch.** A worker serving both models runs a combined batch as its detection batch, loading the
  images through ``SharedImages`` (which keeps each image's hashes and embedder pixels), then as its
  embedding batch from what was kept: each image is fetched and decoded once, a broken one fails its
  task in both jobs with the same reason. The detection rows go through the worker's writer (exactly
  once per task and model version: ``backend.marks``), the vectors to the store writer (exactly once
  per task and embedder version), as for batches of either job alone.
- **Any deployment.** Workers serving one model listen to ``dinolabel-combined`` too: such a worker runs
  its part and queues the other part as a batch of the other job on that model's queue. So nothing waits
  for a worker with both models, and a deployment without one gets both jobs done as before.

A worker that dies during a combined batch holds both parts: the workers' reaper re-queues each part on
its own queue, and each is then run like a batch of its job alone.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from backend.bulk import JOB_TTL, BulkJob, JobSpec
from backend.index_jobs import embed_batch, index_todo, plan_index_page, rank_again_when_done
from backend.jobs import (
    RESULT_TTL,
    cancel_queued,
    detect_batch,
    enqueue_batch,
    label_studio_client,
    next_page,
    plan_detect_page,
    with_label_config,
)
from backend.labeling import LabelConfigError, image_key, parse_label_config
from backend.queues import Queues
from backend.shared_images import SharedImages
from backend.worker import Runtime, current_runtime

log = logging.getLogger(__name__)


# --- planning (the index job's plan steps, on the store writer) ---------------------------------------------


def plan_pair_page(index_job: BulkJob, detect_job: BulkJob, runtime: Runtime, queues: Queues) -> dict[str, Any]:
    """Plan the next page of a paired index job and pre-annotation job; one of them alone when the other
    has ended (final, or planned to the end), or when it is a page ahead (a planner that died between
    recording the two jobs' pages)."""
    index_state, detect_state = index_job.plan_state(), detect_job.plan_state()
    index_live = not index_job.is_final() and not index_state["plan_done"]
    detect_live = not detect_job.is_final() and not detect_state["plan_done"]
    if index_live and detect_live and index_state["cursor"] == detect_state["cursor"]:
        return _plan_both(index_job, detect_job, index_state, runtime, queues)
    if detect_live and (not index_live or detect_state["cursor"] < index_state["cursor"]):
        return plan_detect_page(detect_job, detect_state, runtime, queues)
    if index_live:
        return plan_index_page(index_job, index_state, runtime, queues)
    return {}


def _plan_both(
    index_job: BulkJob, detect_job: BulkJob, state: dict[str, Any], runtime: Runtime, queues: Queues
) -> dict[str, Any]:
    """One page for both jobs (restricted to the same task ids): listed once, checked on both sides."""
    index_spec, detect_spec = index_job.spec(), detect_job.spec()
    project = index_spec.project
    with label_studio_client(index_spec) as client:
        index_spec, detect_spec = with_label_config(client, (index_job, index_spec), (detect_job, detect_spec))
        detect_refused, index_refused = _refusal(parse_label_config, detect_spec), _refusal(image_key, index_spec)
        if not (detect_refused or index_refused):
            tasks, cursor, last = next_page(client, index_job, project, state)
            held = client.tasks_holding(project, [t["id"] for t in tasks], detect_spec.model_version)
    if detect_refused or index_refused:  # that job fails alone, as when each is planned on its own
        for job, refused in ((detect_job, detect_refused), (index_job, index_refused)):
            if refused:
                job.fail(f"planning failed: {refused}")
        if not detect_refused:
            return plan_detect_page(detect_job, detect_job.plan_state(), runtime, queues)
        return {} if index_refused else plan_index_page(index_job, state, runtime, queues)
    key = image_key(index_spec.label_config)
    to_embed, indexed = index_todo(runtime.store(project), tasks, key, index_spec.model_version, sync=False)
    embeds = {entry["id"]: entry for entry in to_embed}
    todo = [t for t in tasks if t["id"] not in held or t["id"] in embeds]
    size = runtime.settings.bulk_batch_size
    pairs = [
        ([t for t in chunk if t["id"] not in held], [embeds[t["id"]] for t in chunk if t["id"] in embeds])
        for chunk in (todo[i : i + size] for i in range(0, len(todo), size))
    ]
    after, listed = state["cursor"], len(tasks)
    detect_numbers = detect_job.plan_page(
        after=after, cursor=cursor, listed=listed, skipped=len(held), batches=[d for d, _ in pairs if d], last=last
    )
    index_numbers = index_job.plan_page(
        after=after, cursor=cursor, listed=listed, skipped=indexed, batches=[e for _, e in pairs if e], last=last
    )
    detects, indexes = iter(detect_numbers or []), iter(index_numbers or [])
    combined = 0
    for detect_part, embed_part in pairs:
        detect_number = next(detects, None) if detect_part and detect_numbers is not None else None
        index_number = next(indexes, None) if embed_part and index_numbers is not None else None
        if detect_number is not None and index_number is not None:
            enqueue_combined(queues, detect_job, detect_number, index_job, index_number, runtime.settings.batch_timeout)
            combined += 1
        elif detect_number is not None:
            enqueue_batch(queues, detect_job, detect_number, timeout=runtime.settings.batch_timeout)
        elif index_number is not None:
            enqueue_batch(queues, index_job, index_number, timeout=runtime.settings.batch_timeout)
    for job in (detect_job, index_job):
        if job.is_final():  # cancelled while this page was queued (or nothing to do): take its part back
            cancel_queued(queues, job)
    rank_again_when_done(runtime, index_job)
    log.info("jobs %s + %s: planned %d tasks after %d, %d to predict, %d to embed, %d batches combined",
             detect_job.id, index_job.id, len(tasks), state["cursor"], len(tasks) - len(held), len(embeds),
             combined)  # fmt: skip
    return {"tasks": len(tasks), "to_predict": len(tasks) - len(held), "to_embed": len(embeds),
            "combined": combined, "last": last}  # fmt: skip


def _refusal(check: Callable[[str], Any], spec: JobSpec) -> str | None:
    """Why ``check`` refuses the job's labeling config, or None."""
    try:
        check(spec.label_config)
    except LabelConfigError as exc:
        return str(exc)
    return None


def enqueue_combined(
    queues: Queues, detect_job: BulkJob, detect_number: int, index_job: BulkJob, index_number: int, timeout: int
) -> None:
    """Queue a detection batch and an embedding batch of the same tasks as one RQ job (marked unheld, with
    the RQ job's id, in both jobs before it is visible, as ``enqueue_batch`` does)."""
    rq_id = uuid.uuid4().hex
    detect_job.queued(detect_number, rq_id)
    index_job.queued(index_number, rq_id)
    queues.combined.enqueue(
        run_combined_batch,
        detect_job.id,
        detect_number,
        index_job.id,
        index_number,
        job_timeout=timeout,
        result_ttl=RESULT_TTL,
        failure_ttl=JOB_TTL,
        description=f"job {detect_job.id} batch {detect_number} + job {index_job.id} batch {index_number}",
        job_id=rq_id,
    )


# --- running (any worker) ------------------------------------------------------------------------------------


def run_combined_batch(detect_id: str, detect_number: int, index_id: str, index_number: int) -> dict[str, Any]:
    """Detect and embed the same tasks with one fetch of each image on a worker serving both models; a
    worker serving one runs its part and queues the other as a batch of the other job."""
    runtime = current_runtime()
    detect_job = BulkJob.fetch(runtime.connection, detect_id)
    index_job = BulkJob.fetch(runtime.connection, index_id)
    queues = Queues.on(runtime.connection)
    for job, number in ((detect_job, detect_number), (index_job, index_number)):
        # Held from the start, the part run here and the part handed on alike: a worker dying anywhere
        # below has the reaper re-queue both (a hand-on marks its part unheld again).
        if not job.is_final() and not job.batch_finished(number):
            job.hold(number, runtime.name)
    if runtime.predictor is None:
        _hand_on(queues, detect_job, detect_number, runtime)
        return {"embedded": embed_batch(runtime, index_job, index_number), "detection": "handed on"}
    if runtime.embedder is None:
        _hand_on(queues, index_job, index_number, runtime)
        return {"detected": detect_batch(runtime, detect_job, detect_number), "embedding": "handed on"}
    shared = None
    if not index_job.is_final() and not index_job.batch_finished(index_number):
        tasks = index_job.batch_tasks(index_number)
        shared = SharedImages.for_batch(runtime.embedder, tasks, max_pixels=runtime.settings.image_max_pixels)
    failed: Exception | None = None
    detected: dict[str, Any] = {}
    try:
        detected = detect_batch(runtime, detect_job, detect_number, shared)
    except Exception as exc:  # counted in its job already; the embedding part still runs
        failed = exc
    embedded = embed_batch(runtime, index_job, index_number, shared)
    if failed is not None:
        raise failed
    return {"detected": detected, "embedded": embedded}


def _hand_on(queues: Queues, job: BulkJob, number: int, runtime: Runtime) -> None:
    """Queue the part of a combined batch this worker cannot run, as a plain batch of its job."""
    if not job.is_final() and not job.batch_finished(number):
        enqueue_batch(queues, job, number, timeout=runtime.settings.batch_timeout)
        log.info("job %s batch %d handed on to the workers serving its model", job.id, number)
