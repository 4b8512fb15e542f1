"""Bulk job bookkeeping in Redis: job records and live workers.

One machinery serves every kind of job (``JobKind``): a pre-annotation job writes predictions to Label
Studio, an index job writes vectors to the project's store; both are planned page by page, run in
batches, counted once per batch, cancelled and followed the same way.

Label Studio is the truth about what a task holds: a job plans the tasks that lack a prediction of the
model version there (a prediction deleted in Label Studio is predicted again). The per-task write marks
that guard work in flight (a job run twice, two jobs at once, a worker that dies mid-batch, a
``/predict`` of the same task) are in ``backend.marks``.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from redis import Redis

from backend.queues import KEY_PREFIX

JOB_TTL = 7 * 24 * 3600
"""Seconds a finished job's record (counts, failures) stays readable."""
WORKER_TTL = 10
"""Seconds a worker counts as alive after its last heartbeat."""
MAX_FAILURES_KEPT = 10_000
STATS_KEY = KEY_PREFIX + "stats"
"""Hash of cluster-wide counters the workers add to (batches, batch_seconds, tasks_predicted, tasks_failed)."""


def record_batch(connection: Redis, *, seconds: float, predicted: int, failed: int) -> None:
    """Add one finished batch to the cluster-wide counters that ``/metrics`` exports."""
    with connection.pipeline() as pipe:
        pipe.hincrbyfloat(STATS_KEY, "batch_seconds", seconds)
        pipe.hincrby(STATS_KEY, "batches", 1)
        pipe.hincrby(STATS_KEY, "tasks_predicted", predicted)
        pipe.hincrby(STATS_KEY, "tasks_failed", failed)
        pipe.execute()


class JobStatus(StrEnum):
    PLANNING = "planning"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


FINAL = frozenset({JobStatus.DONE, JobStatus.CANCELLED, JobStatus.FAILED})


class JobKind(StrEnum):
    PREANNOTATE = "preannotate"
    INDEX = "index"


class NoSuchJob(LookupError):
    """No bulk job with that id (never existed, or expired)."""


@dataclass(frozen=True)
class JobSpec:
    """What a bulk job needs besides its tasks; JSON-safe, stored with the job.

    ``model_version`` is the detector's model version of a pre-annotation job, the embedder's version
    of an index job. ``params`` are a pre-annotation job's detection parameters; an index job has
    ``{"sync": true}`` when it re-checks every image. Records written before ``kind`` existed read as
    pre-annotation jobs.

    No Label Studio URL or key: records in Redis hold no secret, and each worker resolves them for
    the project (``backend.ls_credentials``).
    """

    project: int
    model_version: str
    label_config: str
    params: dict[str, Any]
    source: str = "api"
    kind: str = JobKind.PREANNOTATE


# Plans one page atomically (KEYS: job hash, batches hash; ARGV: cursor, listed, skipped, plan_done,
# JOB_TTL, now, the cursor the page was listed after, then per batch: number, tasks JSON, size).
# Nothing is written once the job is final, or when the cursor moved (the page was planned already).
_PLAN_PAGE = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'planning' and status ~= 'running' then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'cursor')) ~= tonumber(ARGV[7]) then return 0 end
local planned = 0
for i = 8, #ARGV, 3 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  planned = planned + tonumber(ARGV[i + 2])
end
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('HINCRBY', KEYS[1], 'in_flight', planned)
redis.call('HINCRBY', KEYS[1], 'listed', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'skipped', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'batches', (#ARGV - 7) / 3)
redis.call('HSET', KEYS[1], 'cursor', ARGV[1], 'status', 'running')
if not redis.call('HGET', KEYS[1], 'started_at') then redis.call('HSET', KEYS[1], 'started_at', ARGV[6]) end
if ARGV[4] == '1' then
  local rejected = tonumber(redis.call('HGET', KEYS[1], 'rejected') or '0')
  local total = tonumber(redis.call('HGET', KEYS[1], 'listed')) + rejected
  redis.call('HSET', KEYS[1], 'plan_done', '1', 'total', total)
  if tonumber(redis.call('HGET', KEYS[1], 'in_flight')) <= 0 then
    redis.call('HSET', KEYS[1], 'status', 'done', 'finished_at', ARGV[6])
  end
end
return 1
"""

# Counts a finished batch once, however often it is run, and frees its task list (KEYS: job hash,
# batches hash, holders hash, RQ jobs hash; ARGV: number, done, skipped, failed, now).
_FINISH_BATCH = """
local tasks = redis.call('HGET', KEYS[2], ARGV[1])
if not tasks then return 0 end
local size = #cjson.decode(tasks)
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'done', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'skipped', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'failed', ARGV[4])
local left = redis.call('HINCRBY', KEYS[1], 'in_flight', -size)
local h = redis.call('HMGET', KEYS[1], 'status', 'plan_done')
if h[1] == 'running' and h[2] == '1' and left <= 0 then
  redis.call('HSET', KEYS[1], 'status', 'done', 'finished_at', ARGV[5])
end
return 1
"""


class BulkJob:
    """One bulk job (pre-annotation or index): counters and status in a hash, failures in a list.

    Planning is streamed: each plan step lists one page of the project's tasks after ``cursor`` (the
    last task id planned), checks which already hold the job's output (a prediction of the version in
    Label Studio, a vector of the version in the store), and records the page's
    batches and the new cursor in one atomic step; a planner killed mid-way resumes at the cursor and
    never plans a task twice. Only the batches in flight are kept (a finished batch's task list is
    deleted), so Redis holds per job what is queued or running, not the project.
    """

    prefix = KEY_PREFIX + "job:"
    active_key = KEY_PREFIX + "jobs:active"

    def __init__(self, job_id: str, connection: Redis) -> None:
        self.id = job_id
        self.connection = connection

    @classmethod
    def key_for(cls, job_id: str) -> str:
        return cls.prefix + job_id

    @property
    def key(self) -> str:
        return self.key_for(self.id)

    @property
    def failures_key(self) -> str:
        return self.key + ":failures"

    @property
    def batches_key(self) -> str:
        """batch number -> JSON list of its tasks, while the batch is queued or running."""
        return self.key + ":batches"

    @property
    def holders_key(self) -> str:
        """batch number -> the worker running it (absent while queued), to find a dead worker's batches."""
        return self.key + ":holders"

    @property
    def rq_jobs_key(self) -> str:
        """batch number -> the RQ job that runs it (the latest one, when re-queued)."""
        return self.key + ":rq-jobs"

    @property
    def ids_key(self) -> str:
        """The task ids a job is restricted to (a sorted set, score = id), until planned."""
        return self.key + ":ids"

    @property
    def plan_key(self) -> str:
        """``queued:<rq job>`` or ``running:<worker>`` while a plan step is pending; absent otherwise."""
        return self.key + ":plan"

    @classmethod
    def create(cls, connection: Redis, spec: JobSpec, *, rejected: Sequence[tuple[int | None, str]] = ()) -> BulkJob:
        """A job over the project's tasks (``restrict_to`` narrows it); nothing is planned yet.

        ``rejected`` tasks (refused where they entered) count as its first failures, and in its total.
        """
        job = cls(secrets.token_hex(8), connection)
        now = time.time()
        with connection.pipeline() as pipe:
            pipe.hset(
                job.key,
                mapping={
                    "project": spec.project,
                    "model_version": spec.model_version,
                    "source": spec.source,
                    "kind": spec.kind,
                    "status": JobStatus.PLANNING,
                    "total": len(rejected),
                    "done": 0,
                    "skipped": 0,
                    "failed": len(rejected),
                    "rejected": len(rejected),
                    "batches": 0,
                    "listed": 0,
                    "in_flight": 0,
                    "cursor": 0,
                    "restricted": 0,
                    "created_at": now,
                    "spec": json.dumps(asdict(spec)),
                },
            )
            pipe.expire(job.key, JOB_TTL)
            pipe.sadd(cls.active_key, job.id)
            if rejected:
                entries = [json.dumps({"task_id": t, "reason": r, "at": now}) for t, r in rejected]
                pipe.rpush(job.failures_key, *entries)
                pipe.ltrim(job.failures_key, -MAX_FAILURES_KEPT, -1)
                pipe.expire(job.failures_key, JOB_TTL)
            pipe.execute()
        return job

    @classmethod
    def fetch(cls, connection: Redis, job_id: str) -> BulkJob:
        job = cls(job_id, connection)
        if not connection.exists(job.key):
            raise NoSuchJob(f"no job {job_id!r} (unknown, or expired after {JOB_TTL // 86400} days)")
        return job

    @classmethod
    def active(cls, connection: Redis) -> list[BulkJob]:
        """Jobs not final yet; ids whose record expired are dropped from the set on the way."""
        jobs = [cls(_text(i), connection) for i in connection.smembers(cls.active_key)]
        gone = [job.id for job in jobs if not connection.exists(job.key)]
        if gone:
            connection.srem(cls.active_key, *gone)
        return [job for job in jobs if job.id not in gone]

    def spec(self) -> JobSpec:
        return JobSpec(**json.loads(_text(self.connection.hget(self.key, "spec"))))

    def kind(self) -> JobKind:
        """What the job makes (read from its record; one written before kinds existed is a pre-annotation)."""
        value = self.connection.hget(self.key, "kind")
        return JobKind(_text(value)) if value is not None else JobKind.PREANNOTATE

    def pair_with(self, index_job: BulkJob) -> None:
        """Link this pre-annotation job with an index job over the same tasks (a webhook's): the index job's
        plan steps plan both, and a batch of tasks that both need runs as one (``backend.combined``)."""
        with self.connection.pipeline() as pipe:
            pipe.hset(self.key, "partner", index_job.id)
            pipe.hset(index_job.key, "partner", self.id)
            pipe.execute()

    def partner(self) -> BulkJob | None:
        """The job this one is paired with (``pair_with``), while its record exists."""
        value = self.connection.hget(self.key, "partner")
        if value is None:
            return None
        other = BulkJob(_text(value), self.connection)
        return other if self.connection.exists(other.key) else None

    def plan_leader(self) -> BulkJob:
        """The job whose plan steps plan this one: its index partner when paired, else itself.

        It runs for every finished batch: one read of the record, and a second only for a paired
        pre-annotation job (does its partner's record still exist?)."""
        partner, kind = self.connection.hmget(self.key, "partner", "kind")
        if partner is None or (kind is not None and _text(kind) == JobKind.INDEX):
            return self
        other = BulkJob(_text(partner), self.connection)
        return other if self.connection.exists(other.key) else self

    def set_label_config(self, label_config: str) -> None:
        """Planning read the config from Label Studio (the job was started without one)."""
        spec = json.loads(_text(self.connection.hget(self.key, "spec")))
        spec["label_config"] = label_config
        self.connection.hset(self.key, "spec", json.dumps(spec))

    def status(self) -> JobStatus:
        value = self.connection.hget(self.key, "status")
        if value is None:
            raise NoSuchJob(f"no job {self.id!r}")
        return JobStatus(_text(value))

    def is_final(self) -> bool:
        return self.status() in FINAL

    # -- planning

    def plan_state(self) -> dict[str, Any]:
        """Where planning stands: ``cursor`` (last task id planned), ``listed``, ``plan_done``,
        ``in_flight`` (tasks in batches not finished), ``restricted`` (only some task ids)."""
        raw = self.connection.hmget(self.key, "cursor", "listed", "plan_done", "in_flight", "restricted", "batches")
        cursor, listed, plan_done, in_flight, restricted, batches = (_text(v) if v is not None else "0" for v in raw)
        return {
            "cursor": int(cursor),
            "listed": int(listed),
            "plan_done": plan_done == "1",
            "in_flight": int(in_flight),
            "restricted": restricted == "1",
            "batches": int(batches),
        }

    def restrict_to(self, task_ids: Sequence[int]) -> None:
        """Plan only these tasks (those of them that exist in the project)."""
        ids = sorted(set(task_ids))
        with self.connection.pipeline() as pipe:
            pipe.hset(self.key, mapping={"restricted": 1, "total": len(ids) + self._rejected()})
            if ids:
                pipe.zadd(self.ids_key, {str(t): t for t in ids})
                pipe.expire(self.ids_key, JOB_TTL)
            pipe.execute()

    def claim_plan_step(self, value: str) -> bool:
        """Mark a plan step as pending unless one is: at most one step per job is queued or running."""
        return bool(self.connection.set(self.plan_key, value, nx=True, ex=JOB_TTL))

    _SWAP = """
    if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
    if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
    return 1
    """

    def plan_step_running(self, rq_job: str, worker: str) -> bool:
        """The queued step ``rq_job`` starts on ``worker``; False if it is not the pending step (a step
        queued twice, or after the job was cancelled), which then does nothing."""
        return bool(
            self.connection.eval(self._SWAP, 1, self.plan_key, f"queued:{rq_job}", f"running:{worker}", JOB_TTL)
        )

    def end_plan_step(self, worker: str | None = None) -> None:
        """The step running on ``worker`` ended (any pending step, without a worker)."""
        if worker is None:
            self.connection.delete(self.plan_key)
        else:
            self.connection.eval(self._SWAP, 1, self.plan_key, f"running:{worker}", "", JOB_TTL)

    def pending_plan_step(self) -> str:
        """``queued:<rq job>``, ``running:<worker>``, or "" when no plan step is pending."""
        value = self.connection.get(self.plan_key)
        return _text(value) if value is not None else ""

    def set_total(self, total: int) -> None:
        """The number of tasks the job covers, as Label Studio counted them on the first page (plus
        the tasks refused where they entered, which are failures of the job already)."""
        self.connection.hset(self.key, "total", total + self._rejected())

    def _rejected(self) -> int:
        return int(self.connection.hget(self.key, "rejected") or 0)

    def next_ids(self, after: int, count: int) -> list[int]:
        """The next ``count`` task ids of a restricted job after ``after``."""
        return [int(_text(t)) for t in self.connection.zrangebyscore(self.ids_key, f"({after}", "+inf", 0, count)]

    def plan_page(
        self,
        *,
        after: int,
        cursor: int,
        listed: int,
        skipped: int,
        batches: Sequence[Sequence[dict[str, Any]]],
        last: bool,
    ) -> list[int] | None:
        """Record one page listed after task ``after``: its batches, the tasks skipped, the new cursor;
        ``last`` ends the planning (then ``total`` becomes what was listed). Returns the new batch
        numbers, or None when nothing was recorded (the job is final, or the page was planned already)."""
        first = int(self.connection.hincrby(self.key, "batches", 0))
        numbers = list(range(first, first + len(batches)))
        args: list[Any] = [cursor, listed, skipped, int(last), JOB_TTL, time.time(), after]
        for number, tasks in zip(numbers, batches, strict=True):
            args += [str(number), json.dumps(list(tasks)), len(tasks)]
        if not self.connection.eval(_PLAN_PAGE, 2, self.key, self.batches_key, *args):
            return None
        if last:
            self.connection.delete(self.ids_key)
        if self.is_final():
            self.connection.srem(self.active_key, self.id)
        return numbers

    def unqueued_batches(self) -> list[int]:
        """Batches recorded by planning but never put on the queue (a planner killed in between)."""
        pending = {int(_text(n)) for n in self.connection.hkeys(self.batches_key)}
        return sorted(pending - set(self.rq_jobs()))

    def start(self, batches: Sequence[Sequence[dict[str, Any]]], skipped: int) -> None:
        """Plan the whole job at once from ``batches`` (tests and small jobs); done at once when empty."""
        listed = sum(len(b) for b in batches) + skipped
        self.plan_page(after=0, cursor=0, listed=listed, skipped=skipped, batches=batches, last=True)

    # -- batches

    def batch_tasks(self, number: int) -> list[dict[str, Any]]:
        raw = self.connection.hget(self.batches_key, str(number))
        if raw is None:
            raise NoSuchJob(f"job {self.id} has no batch {number} in flight")
        return json.loads(raw)

    def batch_finished(self, number: int) -> bool:
        """A batch planned and counted (its task list is gone once it finished)."""
        return not self.connection.hexists(self.batches_key, str(number))

    def holders(self) -> dict[int, str]:
        """Running batches and their workers."""
        return {int(_text(n)): _text(w) for n, w in self.connection.hgetall(self.holders_key).items()}

    def rq_jobs(self) -> dict[int, str]:
        return {int(_text(n)): _text(j) for n, j in self.connection.hgetall(self.rq_jobs_key).items()}

    def hold(self, number: int, worker: str) -> None:
        """A worker starts a batch (atomic field writes: no read-modify-write to race with)."""
        self._set(self.holders_key, number, worker)

    def queued(self, number: int, rq_job: str | None = None) -> None:
        """A batch is (again) waiting on the queue: nobody holds it; ``rq_job`` is its new RQ job."""
        self.connection.hdel(self.holders_key, str(number))
        if rq_job is not None:
            self._set(self.rq_jobs_key, number, rq_job)

    def _set(self, key: str, number: int, value: str) -> None:
        with self.connection.pipeline() as pipe:
            pipe.hset(key, str(number), value)
            pipe.expire(key, JOB_TTL)
            pipe.execute()

    def finish_batch(self, number: int, *, done: int, skipped: int, failures: Sequence[tuple[int, str]]) -> bool:
        """Count a batch's outcome once (a re-run batch is not counted twice); True if counted now."""
        if failures:
            entries = [json.dumps({"task_id": t, "reason": r, "at": time.time()}) for t, r in failures]
            with self.connection.pipeline() as pipe:
                pipe.rpush(self.failures_key, *entries)
                pipe.ltrim(self.failures_key, -MAX_FAILURES_KEPT, -1)
                pipe.expire(self.failures_key, JOB_TTL)
                pipe.execute()
        counted = self.connection.eval(
            _FINISH_BATCH, 4, self.key, self.batches_key, self.holders_key, self.rq_jobs_key, str(number), done,
            skipped, len(failures), time.time(),
        )  # fmt: skip
        if self.status() in FINAL:
            self.connection.srem(self.active_key, self.id)
        return bool(counted)

    def fail(self, reason: str) -> None:
        """Planning failed: the job ends with the reason as its only failure."""
        self.connection.rpush(self.failures_key, json.dumps({"task_id": None, "reason": reason, "at": time.time()}))
        self.connection.expire(self.failures_key, JOB_TTL)
        self.connection.hset(self.key, mapping={"status": JobStatus.FAILED, "finished_at": time.time()})
        self._forget_plan()

    def cancel(self) -> bool:
        """Stop what has not started; batches already running finish. False if already final."""
        if self.is_final():
            return False
        self.connection.hset(self.key, mapping={"status": JobStatus.CANCELLED, "finished_at": time.time()})
        self._forget_plan()
        return True

    def _forget_plan(self) -> None:
        """A final job plans nothing more: drop what only planning needs (its plan step ends itself)."""
        self.connection.delete(self.ids_key)
        self.connection.srem(self.active_key, self.id)

    def summary(self, *, failures: int = 100) -> dict[str, Any]:
        """The job as the API shows it: counts, status, rate and ETA, the latest failures with reasons."""
        raw = {_text(k): _text(v) for k, v in self.connection.hgetall(self.key).items()}
        if not raw:
            raise NoSuchJob(f"no job {self.id!r}")
        listed = [json.loads(f) for f in self.connection.lrange(self.failures_key, -failures, -1)]
        counts = {k: int(raw.get(k, 0)) for k in ("total", "done", "skipped", "failed")}
        started = float(raw.get("started_at") or raw["created_at"])
        end = float(raw["finished_at"]) if raw.get("finished_at") else time.time()
        elapsed = max(end - started, 1e-9)
        remaining = max(counts["total"] - counts["done"] - counts["skipped"] - counts["failed"], 0)
        rate = counts["done"] / elapsed if raw.get("started_at") else 0.0
        running = raw["status"] in (JobStatus.PLANNING, JobStatus.RUNNING)
        return {
            "id": self.id,
            "project": int(raw["project"]),
            "model_version": raw["model_version"],
            "source": raw.get("source", "api"),
            "kind": raw.get("kind", JobKind.PREANNOTATE),
            "status": raw["status"],
            **counts,
            "remaining": remaining,
            "created_at": float(raw["created_at"]),
            "finished_at": float(raw["finished_at"]) if raw.get("finished_at") else None,
            "tasks_per_second": rate,
            "eta_seconds": remaining / rate if running and rate > 0 else None,
            "failures": listed,
            "failures_total": int(self.connection.llen(self.failures_key)),
        }


class Workers:
    """Live workers: each refreshes a key with a short TTL and its state (model, device, errors)."""

    prefix = KEY_PREFIX + "worker:"

    @staticmethod
    def new_name() -> str:
        return f"{socket.gethostname()}.{secrets.token_hex(3)}"

    @classmethod
    def beat(cls, connection: Redis, name: str, state: dict[str, Any]) -> None:
        connection.set(cls.prefix + name, json.dumps(state), ex=WORKER_TTL)

    @classmethod
    def gone(cls, connection: Redis, name: str) -> None:
        connection.delete(cls.prefix + name)

    @classmethod
    def alive(cls, connection: Redis, name: str) -> bool:
        return bool(connection.exists(cls.prefix + name))

    @classmethod
    def all(cls, connection: Redis, *, role: str = "worker") -> dict[str, dict[str, Any]]:
        """Live processes of one role: model workers (``worker``), or the ``store-writer``."""
        keys = list(connection.scan_iter(match=cls.prefix + "*", count=500))
        values = connection.mget(keys) if keys else []
        states = {_text(k)[len(cls.prefix) :]: v for k, v in zip(keys, values, strict=True) if v is not None}
        parsed = {name: json.loads(value) for name, value in states.items()}
        return {name: state for name, state in parsed.items() if state.get("role", "worker") == role}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
