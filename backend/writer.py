"""Writes bulk predictions to Label Studio off the model's thread, in calls sized for Label Studio.

A batch hands its rows to its worker's ``Writer`` and returns: the model goes on with the next batch
(or an annotator's ``/predict``) while Label Studio imports. Label Studio's cost is mostly per call
(measured on a 100k-task project: ~3.6 s per import plus ~1.3 ms per prediction), so the writer
coalesces the rows of many batches into one import per project and model version: up to ``size``
rows, sent at the latest ``wait`` seconds after the first row arrived, and whenever the previous call
returns with rows waiting. The calls grow with the model's rate by themselves: rows pile up while a
call runs, and the next call takes them all.

A batch is counted (and its tasks marked done) only once its rows are written, by its ``on_written``
callback; until then the batch stays held by this worker. If the process dies, another worker re-queues
the batch and asks Label Studio which tasks hold a prediction before predicting them again.

Right before an import call, each batch's ``keep`` says which of its rows may still go: a ``/predict``
may have answered one of its tasks while the row waited here (``backend.marks``), and Label Studio
stores that answer itself. Those rows are dropped, never written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis

from backend.ls_client import LabelStudioClient, LabelStudioError, WriteUncertain

log = logging.getLogger(__name__)

T = TypeVar("T")
Target = tuple[str, str | None, int, str]
"""Where rows go: Label Studio URL, token, project, model version."""


@dataclass
class Submission:
    """One batch's rows, and what to do once they are written (or not)."""

    target: Target
    rows: list[dict[str, Any]]
    on_written: Callable[[list[int], list[int], str | None], None]
    """Called with the task ids written, those whose write may have gone through, and the error."""
    keep: Callable[[list[int]], list[int]] | None = None
    """Called right before the import call with the rows' task ids: those that may still be written."""
    at: float = field(default_factory=time.monotonic)


class Writer(threading.Thread):
    """The worker's writer thread (one per worker process)."""

    def __init__(self, *, size: int, wait: float, retries: int) -> None:
        super().__init__(name="dinolabel-writer", daemon=True)
        self.size = size
        self.wait = wait
        self.retries = retries
        self.max_pending = 4 * size
        self.calls: list[int] = []  # rows per import call, for the benchmark and the tests
        self._pending: list[Submission] = []
        self._writing = 0  # rows in the call under way
        self._cond = threading.Condition()
        self._stopped = False
        self._flushing = 0  # callers waiting in flush(): pending rows go out without waiting

    def submit(self, submission: Submission) -> None:
        """Queue a batch's rows; blocks while ``4 * size`` rows wait already (Label Studio is slower
        than the model: the model waits, rather than memory growing)."""
        with self._cond:
            while self._rows() >= self.max_pending and not self._stopped:
                self._cond.wait(0.5)
            self._pending.append(submission)
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted row is written; False on time-out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._pending or self._writing:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cond.wait(0.1 if left is None else min(left, 0.1))
            finally:
                self._flushing -= 1
        return True

    def drop_pending(self) -> int:
        """Forget rows not written yet (their batches are re-queued by the worker that takes them over),
        after the call under way ended; returns how many rows were dropped."""
        with self._cond:
            dropped, self._pending = self._rows(), []
            while self._writing:
                self._cond.wait(0.1)
            self._cond.notify_all()
        return dropped

    def stop(self, timeout: float = 30.0) -> None:
        """Write what is pending (at most ``timeout`` seconds), then end the thread."""
        self.flush(timeout)
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self.is_alive():
            self.join(timeout=5)

    def _rows(self) -> int:
        return sum(len(s.rows) for s in self._pending)

    def run(self) -> None:
        while True:
            with self._cond:
                group = self._next_group()
                while group is None and not self._stopped:
                    self._cond.wait(self._next_deadline())
                    group = self._next_group()
                if group is None:
                    return
                self._writing = sum(len(s.rows) for s in group)
            try:
                self._write(group)
            except Exception:  # a bug: the batches stay held by this worker
                log.exception("writing %d rows failed", self._writing)
            finally:
                with self._cond:
                    self._writing = 0
                    self._cond.notify_all()

    def _next_deadline(self) -> float:
        if not self._pending:
            return 1.0
        return max(self._pending[0].at + self.wait - time.monotonic(), 0.01)

    def _next_group(self) -> list[Submission] | None:
        """The submissions of one target to write now: enough rows, or the oldest waited long enough
        (or everything, when flushing or stopping). Called with the lock held."""
        if not self._pending:
            return None
        target = self._pending[0].target
        same = [s for s in self._pending if s.target == target]
        rows = sum(len(s.rows) for s in same)
        waited = time.monotonic() - self._pending[0].at
        if rows < self.size and waited < self.wait and not (self._stopped or self._flushing):
            return None
        group, count = [], 0
        for submission in same:
            if group and count + len(submission.rows) > self.size:
                break
            group.append(submission)
            count += len(submission.rows)
        self._pending = [s for s in self._pending if s not in group]
        self._cond.notify_all()
        return group

    def _write(self, group: list[Submission]) -> None:
        kept = [s for s in group if self._keep(s)]
        if kept:
            self._import(kept)

    def _keep(self, submission: Submission) -> bool:
        """Drop the submission's rows that must not be written any more; False if none is left (then
        its batch has been told already)."""
        if submission.keep is None:
            return True
        ids = [row["task"] for row in submission.rows]
        kept = set(self._while_redis_is_down(lambda: submission.keep(ids), f"checking {len(ids)} rows"))
        if len(kept) < len(ids):
            log.info("dropped %d rows answered by /predict meanwhile", len(ids) - len(kept))
            submission.rows = [row for row in submission.rows if row["task"] in kept]
        if not submission.rows:
            self._tell(submission, [], [], None)
            return False
        return True

    def _import(self, group: list[Submission]) -> None:
        url, key, project, _ = group[0].target
        rows = [row for s in group for row in s.rows]
        error: str | None = None
        uncertain = False
        started = time.perf_counter()
        try:
            with LabelStudioClient(url, key, retries=self.retries) as client:
                client.import_predictions(project, rows)
        except LabelStudioError as exc:
            error, uncertain = str(exc), isinstance(exc, WriteUncertain)
        self.calls.append(len(rows))
        if error is not None and not uncertain and len(group) > 1:
            # Refused (a task deleted meanwhile, say): one batch's rows must not fail the others'.
            for submission in group:
                self._import([submission])
            return
        log.info("wrote %d predictions of %d batches in %.2f s", len(rows), len(group), time.perf_counter() - started)
        for submission in group:
            ids = [row["task"] for row in submission.rows]
            if error is None:
                self._tell(submission, ids, [], None)
            else:
                self._tell(submission, [], ids if uncertain else [], f"writing the prediction failed: {error}")

    def _tell(self, submission: Submission, written: list[int], uncertain: list[int], error: str | None) -> None:
        """Run a batch's callback; while Redis is unreachable, again with back-off: the rows are in Label
        Studio, only the bookkeeping is left (and it is idempotent)."""
        self._while_redis_is_down(
            lambda: submission.on_written(written, uncertain, error), f"recording {len(written)} written rows"
        )

    @staticmethod
    def _while_redis_is_down(call: Callable[[], T], what: str) -> T:
        """``call()``, again with back-off for as long as Redis is unreachable."""
        delay = 0.5
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("%s: Redis unreachable (%s); again in %.1f s", what, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
