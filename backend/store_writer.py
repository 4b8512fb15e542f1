"""The store writer: the one process that writes the projects' vector stores.

Workers embed anywhere and cannot read the stores (they live under the API's ``DINOLABEL_DATA_DIR``).
So everything that reads or changes a store runs here, taken from queues that only this role listens
to (``Queues.for_store_writer``): the vectors of embedded batches (``store_index_batch``), deletions
(``delete_vectors``) and the plan steps of index jobs (they skip tasks whose vector is current). It is
a thread of ``dinolabel serve`` by default (``DINOLABEL_STORE_WRITER``), or a process of its own
(``dinolabel store-writer``) on the machine that holds the stores; run exactly one per deployment
(``VectorStore`` refuses a second writer of a project).

It beats like a worker (role ``store-writer``), so the plan steps and stores in its hands are known to
be alive, and it survives Redis outages as the workers do.

It also starts the re-rankings that annotation events scheduled once they are due (``DueReranks``,
``backend.prioritize.start_due_reranks``). RQ could delay a job itself (``enqueue_in``), but only with its
scheduler running, which forks a process of its own from a worker (not something to do from a thread of
``serve``), and a delayed job can neither be joined by later events nor wait for the run before it: the
due set in Redis does both, and exactly one process looks at it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

import redis
from redis import Redis
from rq.serializers import JSONSerializer

from backend.bulk import Workers
from backend.config import Settings
from backend.prioritize import start_due_reranks
from backend.queues import Queues
from backend.worker import (
    Heartbeat,
    PredictionWorker,
    Runtime,
    _local,
    _stop_pubsub,
    restart_plan_steps_of,
    wait_for_redis,
)
from backend.writer import Writer

log = logging.getLogger(__name__)

ROLE = "store-writer"
RERANK_POLL_SECONDS = 1.0
"""How often the store writer looks for due re-rankings: one Redis call when none is due."""


def run_store_writer(
    settings: Settings,
    connection: Redis,
    *,
    burst: bool = False,
    stop: threading.Event | None = None,
    state: dict[str, Any] | None = None,
) -> None:
    """Take store jobs and index plan steps until stopped (``stop`` set, SIGTERM, or ``burst`` and idle)."""
    name = f"{Workers.new_name()}.store"
    state = state if state is not None else {}
    state.update(name=name, pid=os.getpid(), role=ROLE, state="ready", busy=None)
    heartbeat = Heartbeat(connection, name, state, settings.batch_timeout)
    heartbeat.start()
    reranks = DueReranks(connection)
    reranks.start()
    # It writes nothing to Label Studio: its Writer is never started (an inert one keeps Runtime simple).
    writer = Writer(size=settings.bulk_write_size, wait=settings.bulk_write_wait, retries=0)
    runtime = Runtime(settings=settings, connection=connection, name=name, writer=writer)
    _local.runtime = runtime
    queues = Queues.on(connection)
    log.info("store writer %s: stores under %s", name, settings.index_dir)
    try:
        while not (stop and stop.is_set()):
            worker: PredictionWorker | None = None
            try:
                worker = PredictionWorker(
                    queues.for_store_writer(),
                    connection=connection,
                    name=f"{name}.{int(time.time())}",
                    serializer=JSONSerializer,
                    worker_ttl=30,
                    stop=stop,
                    published=state,
                )
                worker.work(burst=burst, logging_level=settings.log_level.upper())
            except Exception as exc:  # Redis gone mid-job: what it ran is restarted once Redis is back
                log.error("store writer %s: the work loop failed (%s: %s)", name, type(exc).__name__, exc)
                _stop_pubsub(worker)
            if burst or (worker and worker._shutdown_requested_date is not None) or (stop and stop.is_set()):
                break
            wait_for_redis(connection, stop, f"store writer {name}")
            with contextlib.suppress(redis.RedisError):
                restart_plan_steps_of(connection, name)
    finally:
        runtime.close_stores()
        reranks.stopped.set()
        heartbeat.stopped.set()
        reranks.join(timeout=5)
        heartbeat.join(timeout=5)
        _local.runtime = None


class DueReranks(threading.Thread):
    """Queues the due re-rankings every ``RERANK_POLL_SECONDS`` (they run on the store writer's queue)."""

    def __init__(self, connection: Redis) -> None:
        super().__init__(name="dinolabel-due-reranks", daemon=True)
        self.connection = connection
        self.stopped = threading.Event()

    def run(self) -> None:
        failing = False  # said once until a pass succeeds again
        while not self.stopped.wait(RERANK_POLL_SECONDS):
            try:
                start_due_reranks(self.connection)
            except redis.RedisError as exc:  # an outage: what is due stays due, and is queued once Redis is back
                if not failing:
                    log.warning("due re-rankings: Redis unreachable (%s)", exc)
                failing = True
            except Exception:  # a bug: in the log, and the next pass tries again
                if not failing:
                    log.exception("due re-rankings: the pass failed")
                failing = True
            else:
                failing = False
