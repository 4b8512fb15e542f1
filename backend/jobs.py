"""RQ job functions, run inside ``dinolabel worker`` processes, and the calls that enqueue them.

- ``predict_tasks``: the interactive path; an HTTP request is waiting for its return value.
- ``plan_job``: pages through a project's tasks (or takes the tasks given), skips those that already
  hold a prediction of the model version, and enqueues batches.
- ``run_batch``: predicts one batch and writes the predictions through Label Studio's API.

Arguments are JSON: ids, URLs and task dicts. The model comes from the worker's runtime.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from rq.job import Job

from backend.bulk import BulkJob, JobSpec, Marks, record_batch
from backend.labeling import LabelConfigError, parse_label_config
from backend.ls_client import LabelStudioClient, LabelStudioError, WriteUncertain
from backend.queues import Queues
from backend.worker import Runtime, current_runtime
from model import DetectionParams

log = logging.getLogger(__name__)

RESULT_TTL = 600
"""Seconds an interactive result stays in Redis (the HTTP request reads it at once)."""


def predict_tasks(payload: dict[str, Any]) -> dict[str, Any]:
    """Predict a few tasks for a waiting ``/predict``: ``{predictions, failures}``."""
    runtime = current_runtime()
    target = parse_label_config(payload["label_config"])
    fetcher = runtime.fetcher(payload.get("label_studio_url"), payload.get("api_key"))
    outcome = runtime.predictor.predict(
        payload["tasks"],
        target,
        DetectionParams(**payload["params"]),
        payload["model_version"],
        fetcher,
        payload.get("context"),
    )
    return {
        "predictions": outcome.predictions,
        "failures": [{"task_id": f.task_id, "reason": f.reason} for f in outcome.failures],
    }


def enqueue_plan(
    queues: Queues,
    job: BulkJob,
    *,
    tasks: Sequence[dict[str, Any]] | None = None,
    task_ids: Sequence[int] | None = None,
) -> Job:
    """Queue the planning of a bulk job: the given ``tasks``, or the project's (only ``task_ids``)."""
    return queues.plan.enqueue(
        plan_job,
        job.id,
        list(tasks) if tasks is not None else None,
        list(task_ids) if task_ids is not None else None,
        job_timeout=3600,
        result_ttl=RESULT_TTL,
        description=f"plan job {job.id}",
    )


def enqueue_batch(queues: Queues, job: BulkJob, number: int, *, timeout: int, at_front: bool = False) -> Job:
    """Queue one batch (again, when its worker died); ``timeout`` bounds its run in seconds.

    The batch is marked unheld *before* it is visible on the queue, so a worker that takes it at once
    is never overwritten as "nobody".
    """
    job.queued(number)
    rq_job = queues.bulk.enqueue(
        run_batch,
        job.id,
        number,
        job_timeout=timeout,
        result_ttl=RESULT_TTL,
        failure_ttl=7 * 24 * 3600,
        at_front=at_front,
        description=f"job {job.id} batch {number}",
    )
    job.queued(number, rq_job.id)
    return rq_job


def cancel_if_queued(rq_job: Job) -> bool:
    """Cancel an RQ job that no worker has taken yet; a started one runs on. True if cancelled."""
    if rq_job.get_status() != "queued":
        return False
    rq_job.cancel()
    return True


def _client(spec: JobSpec) -> LabelStudioClient:
    runtime = current_runtime()
    url, key = runtime.label_studio(spec.label_studio_url, spec.api_key)
    return LabelStudioClient(url or "", key, retries=runtime.settings.label_studio_retries)


def plan_job(
    job_id: str, tasks: list[dict[str, Any]] | None = None, task_ids: list[int] | None = None
) -> dict[str, Any]:
    """Decide what the job predicts and enqueue it in batches; planning errors fail the job."""
    runtime = current_runtime()
    job = BulkJob.fetch(runtime.connection, job_id)
    if job.is_final():
        return {"status": str(job.status())}
    spec = job.spec()
    try:
        with _client(spec) as client:
            if not spec.label_config:
                job.set_label_config(client.project(spec.project)["label_config"])
                spec = job.spec()
            parse_label_config(spec.label_config)
            if tasks is None:
                wanted = set(task_ids or [])
                tasks = [t for t in client.iter_tasks(spec.project) if not wanted or t["id"] in wanted]
            existing = client.tasks_holding(spec.project, [t["id"] for t in tasks], spec.model_version)
    except (LabelStudioError, LabelConfigError) as exc:
        job.fail(f"planning failed: {exc}")
        return {"status": "failed", "reason": str(exc)}
    todo = [t for t in tasks if t["id"] not in existing]
    size = runtime.settings.bulk_batch_size
    batches = [todo[i : i + size] for i in range(0, len(todo), size)]
    job.start(batches, skipped=len(tasks) - len(todo))
    queues = Queues.on(runtime.connection)
    for number in range(len(batches)):
        enqueue_batch(queues, job, number, timeout=runtime.settings.batch_timeout)
    log.info("job %s: %d tasks, %d to predict in %d batches", job_id, len(tasks), len(todo), len(batches))
    return {"tasks": len(tasks), "to_predict": len(todo), "batches": len(batches)}


def run_batch(job_id: str, number: int) -> dict[str, Any]:
    """Predict one batch and write it to Label Studio, exactly once per task and model version."""
    runtime = current_runtime()
    job = BulkJob.fetch(runtime.connection, job_id)
    if job.is_final() or job.batch_finished(number):
        return {"status": "skipped"}
    job.hold(number, runtime.name)
    spec = job.spec()
    tasks = {t["id"]: t for t in job.batch_tasks(number)}
    marks = Marks(runtime.connection, spec.project, spec.model_version)
    writers = marks.done_by(tasks)
    claims = marks.claim(tasks, runtime.name)
    done_here: list[int] = []
    skipped = sum(1 for c in claims.values() if c == "busy")
    todo = [t for t, c in claims.items() if c != "busy"]
    failures: list[tuple[int, str]] = []
    started = time.perf_counter()
    try:
        with _client(spec) as client:
            # Written before (by a dead worker, by another job, by this batch run earlier): Label Studio
            # says whether the prediction is still there; one deleted since is predicted again.
            check = [t for t, c in claims.items() if c in ("taken", "done")]
            held = client.tasks_holding(spec.project, check, spec.model_version) if check else set()
            marks.finish(held, job_id)
            done_here = [t for t in held if writers[t] == job_id or claims[t] == "taken"]
            skipped += len(held) - len(done_here)
            todo = [t for t in todo if t not in held]
            written, uncertain = _predict_and_write(client, runtime, spec, [tasks[t] for t in todo], failures)
    except Exception as exc:  # a time-out, Label Studio gone for good...: the batch ends, the job goes on
        log.exception("job %s batch %d failed", job_id, number)
        reason = f"batch failed: {type(exc).__name__}: {exc}"
        _unclaim(marks, runtime.name, job_id, todo, claims, writers, uncertain=[])
        job.finish_batch(number, done=len(done_here), skipped=skipped, failures=[(t, reason) for t in todo])
        raise
    marks.finish(written, job_id)
    _unclaim(marks, runtime.name, job_id, [t for t, _ in failures], claims, writers, uncertain=uncertain)
    job.finish_batch(number, done=len(written) + len(done_here), skipped=skipped, failures=failures)
    seconds = time.perf_counter() - started
    record_batch(runtime.connection, seconds=seconds, predicted=len(written), failed=len(failures))
    return {"written": len(written), "skipped": skipped, "failed": len(failures), "seconds": round(seconds, 3)}


def _unclaim(
    marks: Marks,
    owner: str,
    job_id: str,
    task_ids: list[int],
    claims: dict[int, str],
    writers: dict[int, str | None],
    *,
    uncertain: list[int],
) -> None:
    """Give back tasks this batch did not write. A task that was marked done before, or taken from a
    dead worker, or whose write may have gone through, stays marked done: whoever claims it next asks
    Label Studio first. The others are released."""
    maybe_held = set(uncertain) | {t for t in task_ids if claims.get(t) in ("done", "taken")}
    for writer in {writers.get(t) or job_id for t in maybe_held}:
        marks.finish([t for t in maybe_held if (writers.get(t) or job_id) == writer], writer)
    marks.release([t for t in task_ids if t not in maybe_held], owner)


def _predict_and_write(
    client: LabelStudioClient,
    runtime: Runtime,
    spec: JobSpec,
    tasks: list[dict[str, Any]],
    failures: list[tuple[int, str]],
) -> tuple[list[int], list[int]]:
    """Predict ``tasks`` and import the successful ones in one call: the ids written, and those whose
    write may or may not have gone through (Label Studio's answer kept getting lost)."""
    if not tasks:
        return [], []
    target = parse_label_config(spec.label_config)
    fetcher = runtime.fetcher(spec.label_studio_url, spec.api_key)
    outcome = runtime.predictor.predict(tasks, target, DetectionParams(**spec.params), spec.model_version, fetcher)
    failed = {f.task_id: f.reason for f in outcome.failures}
    failures.extend(failed.items())
    rows = [{"task": t["id"], **p} for t, p in zip(tasks, outcome.predictions, strict=True) if t["id"] not in failed]
    try:
        client.import_predictions(spec.project, rows)
    except LabelStudioError as exc:
        failures.extend((row["task"], f"writing the prediction failed: {exc}") for row in rows)
        return [], [row["task"] for row in rows] if isinstance(exc, WriteUncertain) else []
    return [row["task"] for row in rows], []


def cancel_queued(queues: Queues, job: BulkJob) -> int:
    """Remove a cancelled job's batches that have not started from the bulk queue."""
    fetch = Job.fetch_many(list(job.rq_jobs().values()), connection=queues.bulk.connection,
                           serializer=queues.bulk.serializer)  # fmt: skip
    return sum(cancel_if_queued(rq_job) for rq_job in fetch if rq_job is not None)
