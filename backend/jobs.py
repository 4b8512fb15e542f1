"""RQ job functions, run inside ``dinolabel worker`` processes, and the calls that enqueue them.

The plan/batch/cancel machinery here serves both kinds of bulk job (``JobKind``); what differs per
kind is one plan page and one batch function, and their queues: pre-annotation plan steps run on any
worker's planner and its batches on detector workers; an index job's plan steps run on the store
writer (it reads the store) and its batches on embedder workers (``backend.index_jobs``).

- ``predict_tasks``: the interactive path; an HTTP request is waiting for its return value.
- ``plan_job``: one plan step: lists one page of the job's tasks, skips those that already hold a
  prediction of the model version, queues the others in batches, and asks for the next step while
  fewer than ``bulk_plan_ahead`` tasks are in flight (a finishing batch asks too): Redis holds per job
  what is in flight, not the project. Planning is streamed:
  the first batches run seconds after the request, whatever the project's size. A pre-annotation job
  paired with an index job over the same tasks (a webhook's) is planned by the index job's steps, and
  their batches of the same tasks run as one (``backend.combined``).
- ``run_batch``: predicts one batch and hands the predictions to the worker's writer thread, which
  writes those of many batches in one call to Label Studio's API (``backend.writer``).

Arguments are JSON: ids, URLs and task dicts, never a Label Studio key (RQ keeps them in Redis): the
worker resolves the key for the project. The model comes from the worker's runtime.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import redis
from rq import get_current_job
from rq.job import Job

from backend.bulk import JOB_TTL, BulkJob, JobKind, JobSpec, record_batch
from backend.labeling import LabelConfigError, parse_label_config
from backend.ls_client import MAX_IDS_PER_QUERY, PAGE_SIZE, LabelStudioClient, LabelStudioError
from backend.marks import Marks
from backend.predictor import DEADLINE_PASSED
from backend.queues import Queues
from backend.shared_images import SharedImages
from backend.worker import Runtime, current_runtime
from backend.writer import Submission
from model import DetectionParams, PromptError

log = logging.getLogger(__name__)

RESULT_TTL = 600
"""Seconds an interactive result stays in Redis (the HTTP request reads it at once)."""
PLAN_STEP_TIMEOUT = 600
"""Seconds one plan step (one page listed and checked) may run."""


def predict_tasks(payload: dict[str, Any]) -> dict[str, Any]:
    """Predict a few tasks for a waiting ``/predict``: ``{predictions, failures, late}``; ``late``: the
    ids of the tasks not predicted because the request's deadline passed (the API hands them off).

    A config or prompt the model cannot take (a phrase without tokens, one longer than the text
    encoder reads) is the request's fault: ``{refused: reason}``, which the API answers with a 422.
    """
    runtime = current_runtime()
    try:
        target = parse_label_config(payload["label_config"])
        fetcher = runtime.fetcher(runtime.label_studio(payload.get("project")))
        outcome = runtime.detector().predict(
            payload["tasks"],
            target,
            DetectionParams(**payload["params"]),
            payload["model_version"],
            fetcher,
            payload.get("context"),
            deadline=payload.get("deadline"),  # when the waiting request gives up: work past it is wasted
            interactive=True,  # the model's next pass is this one's, whatever bulk batch is running
        )
    except (LabelConfigError, PromptError) as exc:
        return {"refused": str(exc)}
    return {
        "predictions": outcome.predictions,
        "failures": [{"task_id": f.task_id, "reason": f.reason} for f in outcome.failures],
        "late": [f.task_id for f in outcome.failures if f.reason == DEADLINE_PASSED and f.task_id is not None],
    }


def enqueue_plan(
    queues: Queues,
    job: BulkJob,
    *,
    tasks: Sequence[dict[str, Any]] | None = None,
    task_ids: Sequence[int] | None = None,
) -> bool:
    """Start planning a bulk job: over the project's tasks, or only those given (``tasks`` or ``task_ids``;
    their data is listed from Label Studio again, as it stands when planned)."""
    if tasks is not None or task_ids is not None:
        job.restrict_to([t["id"] for t in tasks] if tasks is not None else list(task_ids or []))
    return request_plan_step(queues, job)


def request_plan_step(queues: Queues, job: BulkJob) -> bool:
    """Queue the job's next plan step unless one is queued or running; True if queued now. A job paired
    with an index job is planned by that job's steps (``backend.combined``)."""
    return _queue_plan_step(queues, job.plan_leader())


def _queue_plan_step(queues: Queues, leader: BulkJob) -> bool:
    """``request_plan_step`` for a job that is its own plan leader (``BulkJob.plan_leader``)."""
    rq_id = uuid.uuid4().hex
    if not leader.claim_plan_step(f"queued:{rq_id}"):
        return False
    queue = queues.index_plan if leader.kind() == JobKind.INDEX else queues.plan
    queue.enqueue(
        plan_job,
        leader.id,
        job_id=rq_id,
        job_timeout=PLAN_STEP_TIMEOUT,
        result_ttl=RESULT_TTL,
        description=f"plan job {leader.id}",
    )
    return True


def enqueue_batch(queues: Queues, job: BulkJob, number: int, *, timeout: int, at_front: bool = False) -> Job:
    """Queue one batch (again, when its worker died); ``timeout`` bounds its run in seconds.

    The batch is marked unheld, with its RQ job's id, *before* it is visible on the queue, so a worker
    that takes it at once is never overwritten as "nobody" (the reaper would not re-queue it).
    """
    rq_id = uuid.uuid4().hex
    job.queued(number, rq_id)
    if job.kind() == JobKind.INDEX:
        from backend.index_jobs import run_index_batch

        queue, function = queues.embed, run_index_batch
    else:
        queue, function = queues.bulk, run_batch
    rq_job = queue.enqueue(
        function,
        job.id,
        number,
        job_timeout=timeout,
        result_ttl=RESULT_TTL,
        failure_ttl=JOB_TTL,
        at_front=at_front,
        description=f"job {job.id} batch {number}",
        job_id=rq_id,
    )
    return rq_job


def cancel_if_queued(rq_job: Job) -> bool:
    """Cancel an RQ job that no worker has taken yet; a started one runs on. True if cancelled."""
    if rq_job.get_status() != "queued":
        return False
    rq_job.cancel()
    return True


def label_studio_client(spec: JobSpec) -> LabelStudioClient:
    """A client for the job's Label Studio, with the key this process resolves for the project."""
    runtime = current_runtime()
    access = runtime.label_studio(spec.project)
    return LabelStudioClient(access.url or "", access.api_key, retries=runtime.settings.label_studio_retries)


def plan_job(job_id: str) -> dict[str, Any]:
    """One plan step (see the module's docstring); a job that cannot be planned fails with the reason."""
    runtime = current_runtime()
    job = BulkJob.fetch(runtime.connection, job_id)
    queues = Queues.on(runtime.connection)
    step = get_current_job()
    if not job.plan_step_running(step.id if step else "", runtime.name):
        return {"status": "stale step"}
    leader = job.plan_leader()
    partner = job.partner() if leader is job else None  # a paired job's steps are its index job's
    live = [j for j in (job, partner) if j is not None and not j.is_final()]
    if not live:
        job.end_plan_step(runtime.name)
        return {"status": str(job.status())}
    for planned in live:  # batches recorded by a planner that died before it queued them
        for number in planned.unqueued_batches():
            enqueue_batch(queues, planned, number, timeout=runtime.settings.batch_timeout)
    outcome: dict[str, Any] = {}
    if _wants_plan(live, runtime.settings.bulk_plan_ahead):
        try:
            if partner is not None:
                from backend.combined import plan_pair_page

                outcome = plan_pair_page(job, partner, runtime, queues)
            elif job.kind() == JobKind.INDEX:
                from backend.index_jobs import plan_index_page

                outcome = plan_index_page(job, job.plan_state(), runtime, queues)
            else:
                outcome = plan_detect_page(job, job.plan_state(), runtime, queues)
        except redis.RedisError:
            raise  # the worker recovers; a new step starts where this one stopped
        except (LabelStudioError, LabelConfigError) as exc:
            for failed in live:
                failed.fail(f"planning failed: {exc}")
            outcome = {"status": "failed", "reason": str(exc)}
        except Exception as exc:  # whatever it is, planning ends, and the job says so
            log.exception("job %s: planning failed", job_id)
            for failed in live:
                failed.fail(f"planning failed: {type(exc).__name__}")
            outcome = {"status": "failed", "reason": type(exc).__name__}
    job.end_plan_step(runtime.name)
    _keep_planning(queues, leader, runtime.settings.bulk_plan_ahead)
    return outcome


def keep_planning(queues: Queues, job: BulkJob, plan_ahead: int) -> bool:
    """Ask for the next plan step if the job (or the job it is paired with: they are planned together)
    still has tasks to plan and fewer than ``plan_ahead`` in flight."""
    return _keep_planning(queues, job.plan_leader(), plan_ahead)


def _keep_planning(queues: Queues, leader: BulkJob, plan_ahead: int) -> bool:
    """``keep_planning`` for a job that is its own plan leader."""
    live = [j for j in (leader, leader.partner()) if j is not None and not j.is_final()]
    if not _wants_plan(live, plan_ahead):
        return False
    return _queue_plan_step(queues, leader)


def _wants_plan(jobs: Sequence[BulkJob], plan_ahead: int) -> bool:
    """Whether one of these jobs (not final) has tasks left to plan, and none has ``plan_ahead`` in flight."""
    states = [j.plan_state() for j in jobs]
    return any(not s["plan_done"] for s in states) and all(s["in_flight"] < plan_ahead for s in states)


def with_label_config(client: LabelStudioClient, *jobs: tuple[BulkJob, JobSpec]) -> list[JobSpec]:
    """The specs of ``jobs`` (each with the spec read from its record), those started without a labeling
    config given the project's, read from Label Studio once and recorded in the job."""
    if all(spec.label_config for _, spec in jobs):
        return [spec for _, spec in jobs]
    config = client.project(jobs[0][1].project)["label_config"]
    for job, spec in jobs:
        if not spec.label_config:
            job.set_label_config(config)
    return [spec if spec.label_config else replace(spec, label_config=config) for _, spec in jobs]


def next_page(
    client: LabelStudioClient, job: BulkJob, project: int, state: dict[str, Any]
) -> tuple[list[dict[str, Any]], int, bool]:
    """List the job's next page after its cursor (``state``: ``BulkJob.plan_state``): ``(tasks, cursor,
    last)``, the new cursor, and whether this page ends the planning.

    A restricted job lists those of its next task ids that exist in the project; any other job the
    project's tasks after the cursor, and its first page sets the job's total as Label Studio counts it.
    """
    after = state["cursor"]
    if state["restricted"]:
        ids = job.next_ids(after, MAX_IDS_PER_QUERY)
        tasks = client.task_page(project, ids=ids)[0] if ids else []
        return tasks, (ids[-1] if ids else after), len(ids) < MAX_IDS_PER_QUERY
    tasks, total = client.task_page(project, after=after, page_size=PAGE_SIZE)
    if state["listed"] == 0:
        job.set_total(total)
    return tasks, (tasks[-1]["id"] if tasks else after), len(tasks) < PAGE_SIZE


def plan_detect_page(job: BulkJob, state: dict[str, Any], runtime: Runtime, queues: Queues) -> dict[str, Any]:
    """List one page after the cursor, check it against Label Studio, record and queue its batches."""
    spec = job.spec()
    with label_studio_client(spec) as client:
        (spec,) = with_label_config(client, (job, spec))
        parse_label_config(spec.label_config)
        tasks, cursor, last = next_page(client, job, spec.project, state)
        if state["restricted"]:
            held = client.tasks_holding(spec.project, [t["id"] for t in tasks], spec.model_version)
        elif tasks:  # a page of consecutive ids: checked in one query
            held = client.tasks_holding_between(spec.project, tasks[0]["id"], tasks[-1]["id"], spec.model_version)
        else:
            held = set()
    todo = [t for t in tasks if t["id"] not in held]
    size = runtime.settings.bulk_batch_size
    batches = [todo[i : i + size] for i in range(0, len(todo), size)]
    numbers = job.plan_page(
        after=state["cursor"], cursor=cursor, listed=len(tasks), skipped=len(held), batches=batches, last=last
    )
    if numbers is None:  # cancelled meanwhile
        return {"status": str(job.status())}
    for number in numbers:
        enqueue_batch(queues, job, number, timeout=runtime.settings.batch_timeout)
    if job.is_final():  # cancelled while this page was queued: take it back
        cancel_queued(queues, job)
    log.info("job %s: planned %d tasks after %d, %d to predict", job.id, len(tasks), state["cursor"], len(todo))
    return {"tasks": len(tasks), "to_predict": len(todo), "batches": len(batches), "last": last}


def run_batch(job_id: str, number: int) -> dict[str, Any]:
    """Predict one batch and hand its rows to the worker's writer; the batch is counted once written."""
    runtime = current_runtime()
    return detect_batch(runtime, BulkJob.fetch(runtime.connection, job_id), number)


def detect_batch(runtime: Runtime, job: BulkJob, number: int, shared: SharedImages | None = None) -> dict[str, Any]:
    """Predict batch ``number`` of a pre-annotation job and hand its rows to the worker's writer.

    Exactly once per task and model version: the batch claims its tasks (write marks), and stays held
    by this worker until the writer wrote its rows, so a worker that dies meanwhile has its batch re-run
    by another, which asks Label Studio what it holds first. A task that a ``/predict`` answers while its
    row waits is dropped by the writer and counted as skipped (``backend.marks``). ``shared``: the
    images are loaded through it, which keeps what the embedder needs of them (``backend.combined``).
    """
    job_id = job.id
    if job.is_final() or job.batch_finished(number):
        return {"status": "skipped"}
    owner = runtime.name
    job.hold(number, owner)
    spec = job.spec()
    tasks = {t["id"]: t for t in job.batch_tasks(number)}
    marks = Marks(runtime.connection, spec.project, spec.model_version)
    writers = marks.done_by(tasks)
    claims = marks.claim(tasks, owner)
    done_here: list[int] = []
    skipped = sum(1 for c in claims.values() if c == "busy")
    todo = [t for t, c in claims.items() if c != "busy"]
    started = time.perf_counter()
    try:
        check = [t for t, c in claims.items() if c in ("taken", "done")]
        if check:
            # Written before (by a dead worker, by another job, by this batch run earlier): Label Studio
            # says whether the prediction is still there; one deleted since is predicted again.
            with label_studio_client(spec) as client:
                held = client.tasks_holding(spec.project, check, spec.model_version)
            marks.finish(held, job_id)
            done_here = [t for t in held if writers[t] == job_id or claims[t] == "taken"]
            skipped += len(held) - len(done_here)
            todo = [t for t in todo if t not in held]
        rows, failures = _predict(runtime, spec, [tasks[t] for t in todo], shared)
    except Exception as exc:  # a time-out, Label Studio gone for good...: the batch ends, the job goes on
        log.exception("job %s batch %d failed", job_id, number)
        reason = f"batch failed: {type(exc).__name__}: {exc}"
        _unclaim(marks, owner, job_id, todo, claims, writers, uncertain=[])
        job.finish_batch(number, done=len(done_here), skipped=skipped, failures=[(t, reason) for t in todo])
        keep_planning(Queues.on(runtime.connection), job, runtime.settings.bulk_plan_ahead)
        raise
    seconds = time.perf_counter() - started

    answered: set[int] = set()  # rows dropped by the writer: a /predict answered their tasks meanwhile

    def keep(ids: list[int]) -> list[int]:
        kept = marks.keep_for_write(ids, owner)
        answered.update(set(ids) - set(kept))
        return kept

    def written(ids: list[int], uncertain: list[int], error: str | None) -> None:
        lost = [(row["task"], error) for row in rows if row["task"] not in answered] if error is not None else []
        marks.wrote(ids + uncertain, job_id)
        _unclaim(marks, owner, job_id, [t for t, _ in failures + lost], claims, writers, uncertain=uncertain)
        job.finish_batch(
            number, done=len(ids) + len(done_here), skipped=skipped + len(answered), failures=failures + lost
        )
        keep_planning(Queues.on(runtime.connection), job, runtime.settings.bulk_plan_ahead)
        record_batch(runtime.connection, seconds=seconds, predicted=len(ids), failed=len(failures) + len(lost))

    if rows:
        access = runtime.label_studio(spec.project)
        target = (access.url or "", access.api_key, spec.project, spec.model_version)
        runtime.writer.submit(Submission(target, rows, written, keep))
    else:
        written([], [], None)
    return {"predicted": len(rows), "skipped": skipped, "failed": len(failures), "seconds": round(seconds, 3)}


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


def _predict(
    runtime: Runtime, spec: JobSpec, tasks: list[dict[str, Any]], shared: SharedImages | None = None
) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """Predict ``tasks``: the import rows of those that succeeded, and the failures with reasons."""
    if not tasks:
        return [], []
    target = parse_label_config(spec.label_config)
    fetcher = runtime.fetcher(runtime.label_studio(spec.project))
    params, detector = DetectionParams(**spec.params), runtime.detector()
    if shared is None:
        outcome = detector.predict(tasks, target, params, spec.model_version, fetcher)
    else:
        outcome = detector.predict(
            tasks, target, params, spec.model_version, fetcher, load=shared.loader(fetcher, target.value_key)
        )
    failed = {f.task_id: f.reason for f in outcome.failures}
    rows = [{"task": t["id"], **p} for t, p in zip(tasks, outcome.predictions, strict=True) if t["id"] not in failed]
    return rows, list(failed.items())


def cancel_queued(queues: Queues, job: BulkJob) -> int:
    """Remove a cancelled job's batches that have not started, and its queued plan step, from the queues.

    While the job it is paired with goes on, what they share stays: the combined batches (the partner's
    part runs, this job's is skipped) and the plan steps (they plan the partner too).
    """
    ids = list(job.rq_jobs().values())
    partner = job.partner()
    shared = partner is not None and not partner.is_final()
    if shared and partner is not None:
        theirs = set(partner.rq_jobs().values())
        ids = [i for i in ids if i not in theirs]
    leader = job.plan_leader()  # a paired detection job's plan steps are its index partner's
    step = leader.pending_plan_step()
    if step.startswith("queued:") and not shared:
        ids.append(step.removeprefix("queued:"))
    fetch = Job.fetch_many(ids, connection=queues.bulk.connection, serializer=queues.bulk.serializer)
    cancelled = sum(cancel_if_queued(rq_job) for rq_job in fetch if rq_job is not None)
    if not shared:
        leader.end_plan_step()
    return cancelled
