"""Prioritize runs: rank a project's unlabeled tasks from its stored vectors and write the ranking into
Label Studio (``backend.ls_priority``), as a background job whose status a GET reads.

A run needs the project's store, so it runs on the store writer (``Queues.store``, the queue only that
role takes): the vectors of the current embedder version, the labeled task ids listed from Label Studio
(``is_labeled``, in pages of ``PAGE_SIZE``: never one call per task), duplicates (``find_duplicates`` over the store's
hashes and vectors), the detector's uncertainty per task (below), ``indexer.priority.rank``, then
``write_priority``. The job record (a Redis hash)
holds the status (queued, running, done, failed), the counts, the tab id and, on failure, a reason
that names no secret. The last ranking's head, with each task's explanation, and its HTML report are
kept per project for ``GET /v1/projects/{id}/priority``; the report's thumbnails (``backend.thumbnails``:
the one image fetcher, bounded in count, bytes and time) are fetched once the ranking is written.

**Uncertainty.** With a weight above 0 (``DINOLABEL_PRIORITY_UNCERTAINTY_WEIGHT``, or the request's), the
predictions of the project's current detector model version (its ``/setup`` thresholds, as bulk jobs
and ``/predict`` write them) are listed from Label Studio in pages (``predictions_of``), and each task's
boxes become an uncertainty in [0, 1] (``indexer.uncertainty``). Tasks without such a prediction get no
uncertainty term.

**More like these.** The examples are tasks (``like_task_ids``: their stored vectors), uploaded images or
the annotated boxes of a label (``backend.like_examples``: a worker serving the embedder makes them query
vectors, kept in the job's record as float32 bytes, never the images). ``like`` in the record says which.

A project prioritized once is ranked again when one of its index jobs ends (``after_index_job``), so new
and re-embedded tasks get their places, and after its annotations change (``after_annotations``, debounced:
one run per ``DINOLABEL_PRIORITY_RERANK_DELAY``, started by the store writer, ``start_due_reranks``).
Tasks labeled since the last ranking keep their old rank until then: Label Studio's labeling stream skips
labeled tasks anyway, and the next ranking clears their rank (``write_priority`` empties the fields of
tasks no longer ranked).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from redis import Redis

from backend.bulk import JOB_TTL
from backend.jobs import RESULT_TTL
from backend.ls_client import LabelStudioClient, LabelStudioError
from backend.ls_priority import TAB_TITLE, PriorityFields, PriorityFieldTaken, our_tabs, write_priority
from backend.project_vectors import embedder_version_of
from backend.queues import KEY_PREFIX, Queues
from backend.state import ProjectStore
from backend.thumbnails import fetch_thumbnails
from backend.worker import current_runtime
from indexer.duplicates import find_duplicates
from indexer.index import VectorIndex
from indexer.priority import DUPLICATE, Ranking, rank
from indexer.priority_report import render_priority_html, report_tasks
from indexer.uncertainty import detection_uncertainty

log = logging.getLogger(__name__)

RUN_TIMEOUT = 3600
"""Seconds one run may take on the store writer (listing, ranking and writing 100k tasks fit easily)."""
MAX_BOXES = 300
"""Boxes of one prediction that count towards its uncertainty (the detector returns at most ``max_boxes``)."""
REPORT_THUMBNAIL_SECONDS = 60.0
"""Time the HTML report's thumbnails may take to fetch (at most 180 images: the head of the queue, the
shown duplicates and their originals); images not fetched by then show "no preview"."""
HEAD_KEPT = 200
"""Explanations of the queue's head kept for ``GET .../priority`` (and as many pushed-back duplicates)."""
QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
FINAL = frozenset({DONE, FAILED})
PRIORITIZED_KEY = KEY_PREFIX + "prioritized-projects"
"""Projects prioritized at least once: their index jobs re-rank them when they end."""
_JOB = KEY_PREFIX + "priority-job:"
_LAST = KEY_PREFIX + "priority-last:"
_HTML = KEY_PREFIX + "priority-html:"
_AFTER = KEY_PREFIX + "priority-after-index:"


class NoSuchPriorityJob(LookupError):
    """No prioritize job with that id (never existed, or expired)."""


@dataclass(frozen=True)
class Examples:
    """Query vectors of "more like these" examples that are not tasks (uploaded images, a label's boxes)."""

    vectors: np.ndarray  # float32 (q, d)
    embedder: str  # the version that embedded them: the run refuses vectors of another one


def submit(
    connection: Redis,
    project: int,
    *,
    like_task_ids: Sequence[int] = (),
    like_images: Examples | None = None,
    uncertainty_weight: float | None = None,
    source: str = "api",
) -> dict[str, Any]:
    """Record a prioritize job and queue it on the store writer; returns its record. ``like_images``: the
    vectors of uploaded example images."""
    job_id = create(
        connection, project, like_task_ids=like_task_ids, uncertainty_weight=uncertainty_weight, source=source
    )
    if like_images is not None:
        add_examples(connection, job_id, like_images, like_images=len(like_images.vectors))
    start(connection, job_id, project)
    return read_job(connection, job_id)


def create(
    connection: Redis,
    project: int,
    *,
    like_task_ids: Sequence[int] = (),
    like_label: str | None = None,
    uncertainty_weight: float | None = None,
    source: str = "api",
) -> str:
    """Record a prioritize job (queued, not started: ``start`` queues the run); returns its id."""
    job_id = uuid.uuid4().hex
    record = {
        "id": job_id, "project": project, "status": QUEUED, "source": source, "created_at": time.time(),
        "like_task_ids": json.dumps(list(like_task_ids)), "like_label": like_label or "",
        "uncertainty_weight": "" if uncertainty_weight is None else repr(float(uncertainty_weight)),
    }  # fmt: skip
    key = _JOB + job_id
    with connection.pipeline() as pipe:
        pipe.hset(key, mapping=record)
        pipe.expire(key, JOB_TTL)
        pipe.sadd(PRIORITIZED_KEY, str(project))
        pipe.execute()
    return job_id


def start(connection: Redis, job_id: str, project: int) -> None:
    """Queue the run of a recorded job (of ``project``) on the store writer."""
    Queues.on(connection).store.enqueue(
        run_prioritize,
        job_id,
        job_timeout=RUN_TIMEOUT,
        result_ttl=RESULT_TTL,
        description=f"prioritize project {project}",
    )


def add_examples(
    connection: Redis, job_id: str, examples: Examples, *, like_images: int | None = None, like_boxes: int | None = None
) -> None:
    """Keep the examples' query vectors in the job's record (float32 bytes, base64: at most ``MAX_LIKE_IMAGES``
    or ``like_examples.MAX_LABEL_BOXES`` vectors), with how many images or boxes they came from."""
    vectors = np.ascontiguousarray(examples.vectors, dtype=np.float32)
    if vectors.ndim != 2 or not len(vectors):
        raise ValueError(f"examples must be (q, d) vectors, q >= 1; got shape {vectors.shape}")
    record = {
        "like_vectors": base64.b64encode(vectors.tobytes()).decode("ascii"), "like_dim": vectors.shape[1],
        "like_embedder": examples.embedder,
        "like_images": "" if like_images is None else like_images,
        "like_boxes": "" if like_boxes is None else like_boxes,
    }  # fmt: skip
    connection.hset(_JOB + job_id, mapping=record)


def examples_of(connection: Redis, job_id: str) -> Examples | None:
    """The query vectors ``add_examples`` kept for the job, or None."""
    raw = connection.hmget(_JOB + job_id, ["like_vectors", "like_dim", "like_embedder"])
    if not raw[0]:
        return None
    vectors = np.frombuffer(base64.b64decode(raw[0]), dtype=np.float32).reshape(-1, int(raw[1]))
    return Examples(vectors, raw[2].decode())


def fail(connection: Redis, job_id: str, reason: str) -> None:
    """End the job failed with ``reason`` (ours: it names no secret)."""
    connection.hset(_JOB + job_id, mapping={"status": FAILED, "error": reason[:500], "finished_at": time.time()})


def mark_running(connection: Redis, job_id: str) -> None:
    """The job's work began (its examples' embedding, or its run); its first start is kept."""
    key = _JOB + job_id
    with connection.pipeline() as pipe:
        pipe.hsetnx(key, "started_at", time.time())
        pipe.hset(key, "status", RUNNING)
        pipe.execute()


def read_job(connection: Redis, job_id: str) -> dict[str, Any]:
    """The job's record as JSON-friendly values (numbers as numbers, absent ones as None)."""
    raw = connection.hgetall(_JOB + job_id)
    if not raw:
        raise NoSuchPriorityJob(f"no prioritize job {job_id!r} (unknown, or expired)")
    data = {k.decode(): v.decode() for k, v in raw.items()}

    def number(name: str, kind: type = int) -> Any:
        value = data.get(name)
        return kind(value) if value not in (None, "") else None

    return {
        "id": data["id"],
        "project": int(data["project"]),
        "status": data["status"],
        "source": data.get("source", "api"),
        "created_at": float(data["created_at"]),
        "started_at": number("started_at", float),
        "finished_at": number("finished_at", float),
        "like_task_ids": json.loads(data.get("like_task_ids") or "[]"),
        "like_label": data.get("like_label") or None,
        "like_images": number("like_images"),
        "like_boxes": number("like_boxes"),
        "like": _like_text(data),
        "uncertainty_weight": number("uncertainty_weight", float),
        "embedder": data.get("embedder") or None,
        "detector": data.get("detector") or None,
        "predicted": number("predicted"),
        "moved_by_uncertainty": number("moved_by_uncertainty"),
        "vectors": number("vectors"),
        "labeled": number("labeled"),
        "ranked": number("ranked"),
        "duplicates": number("duplicates"),
        "write_calls": number("write_calls"),
        "tab_id": number("tab_id"),
        "error": data.get("error") or None,
        "skipped": data.get("skipped") or None,
    }


def _like_text(data: dict[str, str]) -> str | None:
    """Which examples "more like these" uses: ``tasks 4, 17``, ``label 'bicycle': 12 annotated boxes``,
    ``3 uploaded images``; None without examples."""
    tasks = json.loads(data.get("like_task_ids") or "[]")
    if tasks:
        shown = ", ".join(str(task) for task in tasks[:10])
        return f"tasks {shown}" + (f" ({len(tasks)} in all)" if len(tasks) > 10 else "")
    if data.get("like_label"):
        boxes = data.get("like_boxes")
        return f"label {data['like_label']!r}" + (f": {boxes} annotated boxes" if boxes else "")
    if data.get("like_images"):
        count = int(data["like_images"])
        return f"{count} uploaded image" + ("s" if count > 1 else "")
    return None


def last_ranking(connection: Redis, project: int) -> dict[str, Any] | None:
    """The head of the project's last ranking with explanations, or None when it was never ranked."""
    raw = connection.get(_LAST + str(project))
    return json.loads(raw) if raw else None


def last_report(connection: Redis, project: int) -> str | None:
    raw = connection.get(_HTML + str(project))
    return raw.decode() if raw else None


INDEX_JOB = "index job "
"""The ``source`` of the runs that an index job's end starts (followed by the job's id)."""


def prioritized(connection: Redis, project: int) -> bool:
    return bool(connection.sismember(PRIORITIZED_KEY, str(project)))


def after_index_job(connection: Redis, job_id: str, project: int) -> None:
    """An index job of ``project`` ended: re-rank the project if it was prioritized before (once per job)."""
    if prioritized(connection, project) and connection.set(_AFTER + job_id, "1", nx=True, ex=JOB_TTL):
        submit(connection, project, source=INDEX_JOB + job_id)
        log.info("project %d: index job %s ended, ranking again", project, job_id)


# --- re-ranking after annotations (debounced) ----------------------------------------------------------------

RERANK_DUE_KEY = KEY_PREFIX + "priority-rerank-due"
"""Re-rankings that annotation events scheduled: a sorted set of project -> when it is due (Unix time). Only
prioritized projects get a member, one each; the set expires ``JOB_TTL`` after its last event."""
_RERANK_RUN = KEY_PREFIX + "priority-rerank-run:"
ANNOTATIONS = "annotations"
"""The ``source`` of the runs that annotation events start."""

# Atomic: a project never prioritized gets no member (fake events for any project id store nothing), and
# NX keeps the first event's due time, so later events join the run it scheduled.
_SCHEDULE = """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then return false end
local added = redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {added, redis.call('ZSCORE', KEYS[1], ARGV[1])}
"""


def after_annotations(connection: Redis, project: int, delay: float) -> float | None:
    """Annotations of ``project`` changed in Label Studio: re-rank it ``delay`` seconds from now, or join
    the re-ranking already scheduled (one run for any number of events). Returns when it is due; None
    when nothing is scheduled (``delay`` 0, or a project never prioritized).

    A ranking is cheap to compute but costs Label Studio many writes (``backend.ls_priority``), and an
    annotator submits every few seconds: hence one run per ``delay``, however many events, fake ones too.
    """
    if delay <= 0:
        return None
    scheduled = connection.register_script(_SCHEDULE)(
        keys=[RERANK_DUE_KEY, PRIORITIZED_KEY], args=[str(project), repr(time.time() + delay), JOB_TTL]
    )
    if scheduled is None:
        return None
    added, due = scheduled
    if added:
        log.info("project %d: annotations changed, ranking again in %.0f s", project, delay)
    return float(due)


def start_due_reranks(connection: Redis, now: float | None = None) -> list[str]:
    """Queue the re-rankings that are due (the store writer looks every second); the ids of the jobs queued.

    A project whose last re-ranking is still queued or running waits for it to end: the events that came
    meanwhile (that run may have listed the labeled tasks before them) get exactly one more run, after it.
    A due project is taken by removing it from the set, so two callers never queue the same run. A run
    that died with its store writer holds the next one back for at most ``RUN_TIMEOUT``.
    """
    now = time.time() if now is None else now
    queued = []
    for member in connection.zrangebyscore(RERANK_DUE_KEY, "-inf", now):
        project = int(member)
        if _rerank_running(connection, project) or not connection.zrem(RERANK_DUE_KEY, member):
            continue
        job = submit(connection, project, source=ANNOTATIONS)
        connection.set(_RERANK_RUN + str(project), job["id"], ex=RUN_TIMEOUT)
        queued.append(job["id"])
        log.info("project %d: ranking again after annotations (job %s)", project, job["id"])
    return queued


def _rerank_running(connection: Redis, project: int) -> bool:
    job_id = connection.get(_RERANK_RUN + str(project))
    status = connection.hget(_JOB + job_id.decode(), "status") if job_id else None
    return status is not None and status.decode() not in FINAL


# --- the run (store writer) -------------------------------------------------------------------------------


def run_prioritize(job_id: str) -> dict[str, Any]:
    """Rank the project and write the ranking; the job ends done, or failed with a reason."""
    runtime = current_runtime()
    connection = runtime.connection
    key = _JOB + job_id
    job = read_job(connection, job_id)
    project = job["project"]
    mark_running(connection, job_id)
    try:
        outcome = _prioritize(runtime, job)
    except _Unprioritized as exc:
        connection.srem(PRIORITIZED_KEY, str(project))
        log.info("prioritize job %s: %s", job_id, exc)
        connection.hset(key, mapping={"status": DONE, "skipped": str(exc), "finished_at": time.time()})
        return {"status": DONE, "skipped": str(exc)}
    except (LabelStudioError, PriorityFieldTaken, _Refused) as exc:  # our own messages: no secret in them
        reason = str(exc)
    except Exception as exc:  # a bug, a broken store: the details go to the log only
        log.exception("prioritize job %s of project %d failed", job_id, project)
        reason = f"ranking failed: {type(exc).__name__} (see the service log)"
    else:
        connection.hset(key, mapping={**outcome, "status": DONE, "finished_at": time.time()})
        return {"status": DONE, **outcome}
    log.warning("prioritize job %s of project %d failed: %s", job_id, project, reason)
    fail(connection, job_id, reason)
    return {"status": FAILED}


class _Refused(Exception):
    """The run cannot go on for a reason the user can act on (the message says which)."""


class _Unprioritized(Exception):
    """An automatic re-ranking found our tab gone (``dinolabel unprioritize``, or deleted in Label Studio)."""


def _prioritize(runtime: Any, job: dict[str, Any]) -> dict[str, Any]:
    settings = runtime.settings
    project = job["project"]
    if not runtime.has_store(project):
        raise _Refused(f"project {project} has no vectors: index it first (dinolabel index --project {project})")
    version = embedder_version_of(settings)
    store = runtime.store(project)
    ids, vectors = store.load_vectors(version)
    if not len(ids):
        raise _Refused(f"project {project} has no vectors of the current embedder {version}: index it first")
    access = runtime.label_studio(project)
    if not access.url:
        raise _Refused(f"no Label Studio address for project {project}")
    like = None
    if job["like_task_ids"]:
        wanted = np.asarray(job["like_task_ids"], dtype=np.int64)
        found = np.isin(wanted, ids)
        if not found.all():
            missing = wanted[~found][:10].tolist()
            raise _Refused(f"like_task_ids without a vector of the current embedder (not indexed?): {missing}")
        like = _rows(ids, vectors, wanted)
    elif job["like_label"] or job["like_images"]:
        like = _example_vectors(runtime.connection, job["id"], version, vectors.shape[1])
    fields = PriorityFields(settings.priority_rank_field, settings.priority_reason_field)
    projects = ProjectStore(settings, runtime.connection)
    record = projects.get(project)
    params = record.params
    with LabelStudioClient(access.url, access.api_key, retries=settings.label_studio_retries) as client:
        automatic = job["source"] == ANNOTATIONS or job["source"].startswith(INDEX_JOB)
        if automatic and not our_tabs(client, project):
            # The ranking was removed since (the CLI's unprioritize talks to Label Studio only): re-ranks
            # stop here instead of writing it back, until someone prioritizes the project again.
            raise _Unprioritized(f"project {project}: the {TAB_TITLE!r} tab is gone, so it is no longer re-ranked")
        labeled = sorted(client.labeled_task_ids(project))
        report = find_duplicates(
            store.hash_table(),
            labeled=labeled,
            index=VectorIndex.build(ids, vectors, embedder=version),
            vector_blocks=[(ids, vectors)],
        )
        weight = settings.priority_uncertainty_weight
        if job["uncertainty_weight"] is not None:
            weight = job["uncertainty_weight"]
        detector = projects.model_version(params)
        uncertainty = _uncertainties(client, project, detector, params.box_threshold) if weight > 0 else {}
        ranking = rank(
            ids,
            vectors,
            labeled,
            duplicates=report,
            like=like,
            uncertainty=uncertainty or None,
            uncertainty_weight=weight,
        )
        written = write_priority(client, project, ranking.ranks(), fields)
    thumbnails = fetch_thumbnails(
        project, report_tasks(ranking), access, record.label_config, settings, budget_s=REPORT_THUMBNAIL_SECONDS
    )
    _keep(runtime.connection, project, job["id"], ranking, version, thumbnails)
    return {
        "embedder": version,
        "vectors": len(ids),
        "labeled": len(labeled),
        "ranked": len(ranking),
        "duplicates": int((ranking.reason == DUPLICATE).sum()),
        "uncertainty_weight": repr(float(weight)),
        "detector": detector,
        "predicted": int(np.isin(ranking.task_ids, np.fromiter(uncertainty, dtype=np.int64)).sum()),
        "moved_by_uncertainty": int(ranking.moved_by_uncertainty().sum()),
        "write_calls": written.calls,
        "tab_id": written.tab_id,
    }


def _uncertainties(client: LabelStudioClient, project: int, detector: str, box_threshold: float) -> dict[int, float]:
    """Per task holding a prediction of ``detector``: how unsure its boxes are (``indexer.uncertainty``)."""
    return {
        task: detection_uncertainty(*_boxes(result), box_threshold)
        for task, result in client.predictions_of(project, detector).items()
    }


def _boxes(result: list[Any]) -> tuple[list[float], list[str], list[tuple[float, float, float, float]]]:
    """Scores, labels and ``x0, y0, x1, y1`` (percent) of a prediction's scored rectangles (at most
    ``MAX_BOXES``); other regions, and malformed ones, do not count."""
    scores: list[float] = []
    labels: list[str] = []
    boxes: list[tuple[float, float, float, float]] = []
    for region in result:
        if len(scores) == MAX_BOXES:
            break
        if not isinstance(region, dict) or region.get("type") != "rectanglelabels":
            continue
        value = region.get("value")
        try:
            x, y, width, height = (float(value[k]) for k in ("x", "y", "width", "height"))  # type: ignore[index]
            score = float(region["score"])
            names = value["rectanglelabels"]  # type: ignore[index]
        except (KeyError, TypeError, ValueError):
            continue
        if not all(math.isfinite(v) for v in (x, y, width, height, score)) or not isinstance(names, list):
            continue
        scores.append(score)
        labels.append(str(names[0]) if names else "")
        boxes.append((x, y, x + width, y + height))
    return scores, labels, boxes


def _example_vectors(connection: Redis, job_id: str, version: str, dim: int) -> np.ndarray:
    """The job's example vectors, checked against the store's embedder version and width."""
    examples = examples_of(connection, job_id)
    if examples is None:
        raise _Refused("the examples were not embedded (their job record lost them)")
    if examples.embedder != version or examples.vectors.shape[1] != dim:
        raise _Refused(
            f"the examples were embedded by {examples.embedder}, the store holds {version} vectors: give the "
            "workers and the store writer the same DINOLABEL_EMBEDDER_* settings"
        )
    return examples.vectors


def _rows(ids: np.ndarray, vectors: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    position = {int(task): i for i, task in enumerate(ids.tolist())}
    return vectors[[position[int(task)] for task in wanted.tolist()]]


def _keep(
    connection: Redis, project: int, job_id: str, ranking: Ranking, version: str, thumbnails: dict[int, bytes]
) -> None:
    """Keep the ranking's head (explanations) and its HTML report (with ``thumbnails``) for the GET route."""
    is_dup = ranking.reason == DUPLICATE
    head = [p for p in range(len(ranking)) if not is_dup[p]][:HEAD_KEPT]
    pushed = np.flatnonzero(is_dup)[:HEAD_KEPT].tolist()
    summary = {
        "project": project,
        "job_id": job_id,
        "ranked_at": time.time(),
        "embedder": version,
        "ranked": len(ranking),
        "labeled": len(ranking.labeled),
        "duplicates": int(is_dup.sum()),
        "head": [ranking.explain(p) for p in head],
        "pushed_back": [ranking.explain(p) for p in pushed],
    }
    html = render_priority_html(ranking, thumbnails, title=f"Labeling priority of project {project}")
    with connection.pipeline() as pipe:
        pipe.set(_LAST + str(project), json.dumps(summary))
        pipe.set(_HTML + str(project), html)
        pipe.execute()
