"""Write marks: per project and model version, who is giving which task its prediction.

Label Studio is the truth about what a task holds; the marks only guard work in flight, so that two
writers of one model version never give a task two predictions. A task's mark is one of:

- ``pending:<worker>``: a bulk batch on that worker claimed it (predicting, or its row waits in the
  worker's writer);
- ``writing:<worker>``: its row is in an import call to Label Studio under way;
- ``done:<job>``: bulk job ``<job>`` wrote it (Label Studio accepted it, or may have);
- ``predict:<until>``: a ``/predict`` is answering it, and Label Studio stores the answer itself, by
  ``<until>`` (epoch seconds) at the latest; past that it counts as written by ``predict``.

**``/predict`` against bulk jobs.** Label Studio sends a ``/predict`` only the tasks without a
prediction of the version, chosen when the request starts, and stores the answer when it comes back
(``ml/models.py:342-366`` in Label Studio 1.23). A bulk write of one of them in between gives it two
predictions. So each side checks the other atomically, right before it commits:

- ``/predict``, as a request arrives and again as it answers (:meth:`Marks.answering`), takes every
  task whose mark is not ``writing:`` and that no bulk job wrote since Label Studio may have chosen it
  (``ANSWER_WINDOW`` plus a little per task of the request): its mark becomes ``predict:``, and the
  bulk batch that claimed it drops its row. The annotator gets boxes from the model at once, not
  after a bulk write and a reload. A task being written, or written since Label Studio chose it, is
  left to the bulk job: ``/predict`` answers no prediction for it, and the bulk job's is there for
  Label Studio to show.
- The writer, right before an import call (:meth:`Marks.keep_for_write`), writes only the rows whose
  task is still ``pending:`` on its worker, and marks them ``writing:``; a batch counts the others as
  skipped.
- A batch starting later treats a fresh ``predict:`` mark as busy (skipped) and a stale one as
  written (it asks Label Studio whether the prediction is there, as for a ``done:`` mark).

A claim held by a live worker is left alone; one of a dead worker is taken over, and a ``done`` mark
is claimed too: either way the claimer asks Label Studio whether the task now holds a prediction
before predicting it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from redis import Redis

from backend.bulk import Workers
from backend.queues import KEY_PREFIX

MARKS_TTL = 7 * 24 * 3600
"""Seconds the write marks of a project and model version are kept after their last change: as long as
a job planned before a write may still run a batch (a job record's life)."""
ANSWER_WINDOW = 120.0
"""Seconds Label Studio may take on its side of one ``/predict`` of a few tasks: from choosing them (those
lacking a prediction of the version) to sending them, and from our answer (at most
``DINOLABEL_INTERACTIVE_MAX_TASKS`` predictions) to storing it. Measured with Label Studio 1.23.2 on
SQLite on a 2-core machine under a load of 8-10 (``bench/predict_race.py``): 0.6 s and 5.0 s for 16
tasks."""
CHOOSE_SECONDS_PER_TASK = 0.05
"""What each task of a large request adds to the time between Label Studio choosing the tasks and
sending them (it serialises them all first): measured 21 s for 1,000 tasks in the same run."""
MAX_LOOKBACK = 900.0
"""Seconds a bulk write is remembered for ``/predict`` (and the longest look back): requests of up to
about 15,000 tasks are covered."""


class Marks:
    """Per project and model version: which tasks have (or are getting) a prediction from us.

    Pre-annotation only: an index job's writes are upserts of one row per task into the store, which
    a batch run twice leaves as it was."""

    prefix = KEY_PREFIX + "marks:"

    # Claim tasks for a bulk batch, all in one call: a batch's claims cost one round trip, not one per
    # task (KEYS: marks hash; ARGV: owner, alive prefix, now, then the task ids; one state per task).
    _CLAIM = """
    local mine = 'pending:' .. ARGV[1]
    local out = {}
    for i = 4, #ARGV do
      local task = ARGV[i]
      local current = redis.call('HGET', KEYS[1], task)
      local state
      if not current then
        redis.call('HSET', KEYS[1], task, mine)
        state = 'claimed'
      else
        local kind, rest = string.match(current, '^(%a+):(.*)$')
        if kind == 'done' then
          redis.call('HSET', KEYS[1], task, mine)
          state = 'done'
        elseif kind == 'predict' then
          if tonumber(rest) > tonumber(ARGV[3]) then
            state = 'busy'
          else
            redis.call('HSET', KEYS[1], task, mine)
            state = 'done'
          end
        elseif rest == ARGV[1] then
          state = 'claimed'
        elseif redis.call('EXISTS', ARGV[2] .. rest) == 1 then
          state = 'busy'
        else
          redis.call('HSET', KEYS[1], task, mine)
          state = 'taken'
        end
      end
      out[#out + 1] = state
    end
    return out
    """
    # Give back tasks their holder did not write (KEYS: marks hash; ARGV: owner, then the task ids).
    _RELEASE = """
    for i = 2, #ARGV do
      local current = redis.call('HGET', KEYS[1], ARGV[i])
      if current == 'pending:' .. ARGV[1] or current == 'writing:' .. ARGV[1] then
        redis.call('HDEL', KEYS[1], ARGV[i])
      end
    end
    return 1
    """
    # A row goes into an import call only if its task is still the worker's (KEYS: marks hash; ARGV: task, owner).
    _KEEP = """
    local current = redis.call('HGET', KEYS[1], ARGV[1])
    if current ~= 'pending:' .. ARGV[2] and current ~= 'writing:' .. ARGV[2] then return 0 end
    redis.call('HSET', KEYS[1], ARGV[1], 'writing:' .. ARGV[2])
    return 1
    """
    # /predict takes a task unless a bulk write of it is under way or recent (KEYS: marks hash, written
    # zset; ARGV: task, until, now, look back).
    _ANSWER = """
    local current = redis.call('HGET', KEYS[1], ARGV[1])
    if current and string.sub(current, 1, 8) == 'writing:' then return 0 end
    local at = redis.call('ZSCORE', KEYS[2], ARGV[1])
    if at and tonumber(at) > tonumber(ARGV[3]) - tonumber(ARGV[4]) then return 0 end
    redis.call('HSET', KEYS[1], ARGV[1], 'predict:' .. ARGV[2])
    return 1
    """
    _UNANSWER = """
    local current = redis.call('HGET', KEYS[1], ARGV[1])
    if current and string.sub(current, 1, 8) == 'predict:' then redis.call('HDEL', KEYS[1], ARGV[1]) end
    return 1
    """

    def __init__(self, connection: Redis, project: int, model_version: str) -> None:
        self.connection = connection
        self.key = f"{self.prefix}{project}:{model_version}"

    @property
    def written_key(self) -> str:
        """Sorted set: task -> when a bulk job last wrote it (kept ``MAX_LOOKBACK`` seconds)."""
        return self.key + ":written"

    # -- bulk batches

    def claim(self, task_ids: Iterable[int], owner: str) -> dict[int, str]:
        """Per task: ``claimed`` (new), ``taken`` (from a dead worker) or ``done`` (written before): all
        three are now held by ``owner``, the last two to be checked against Label Studio first; or
        ``busy`` (a live worker holds it, or a ``/predict`` is answering it)."""
        ids = list(task_ids)
        if not ids:
            return {}
        states = self.connection.eval(self._CLAIM, 1, self.key, owner, Workers.prefix, time.time(), *map(str, ids))
        self.connection.expire(self.key, MARKS_TTL)
        return {t: _text(state) for t, state in zip(ids, states, strict=True)}

    def keep_for_write(self, task_ids: Iterable[int], owner: str) -> list[int]:
        """Right before an import call: the tasks still held by ``owner``, now marked ``writing:``. The
        others were taken by a ``/predict`` meanwhile (or by another worker): their rows must not go."""
        return [t for t in task_ids if self.connection.eval(self._KEEP, 1, self.key, str(t), owner)]

    def finish(self, task_ids: Iterable[int], job_id: str) -> None:
        """``job_id`` wrote these tasks (or found them written): ``done:<job_id>``."""
        ids = [str(t) for t in task_ids]
        if ids:
            self.connection.hset(self.key, mapping=dict.fromkeys(ids, f"done:{job_id}"))
            self.connection.expire(self.key, MARKS_TTL)

    def wrote(self, task_ids: Iterable[int], job_id: str) -> None:
        """An import call of ``job_id`` wrote these tasks just now (or may have): ``done:<job_id>``, and
        remembered as recent, in one step, so that a ``/predict`` chosen before the write leaves them."""
        ids = [str(t) for t in task_ids]
        if not ids:
            return
        now = time.time()
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.zadd(self.written_key, dict.fromkeys(ids, now))
            pipe.zremrangebyscore(self.written_key, "-inf", now - MAX_LOOKBACK)
            pipe.expire(self.written_key, int(MAX_LOOKBACK))
            pipe.hset(self.key, mapping=dict.fromkeys(ids, f"done:{job_id}"))
            pipe.expire(self.key, MARKS_TTL)
            pipe.execute()

    def release(self, task_ids: Iterable[int], owner: str) -> None:
        """Drop ``owner``'s claims on these tasks (a claim someone else took over stays)."""
        ids = [str(t) for t in task_ids]
        if ids:
            self.connection.eval(self._RELEASE, 1, self.key, owner, *ids)

    def done_by(self, task_ids: Iterable[int]) -> dict[int, str | None]:
        """For tasks marked done, the job that wrote them (``predict`` for the interactive path)."""
        ids = list(task_ids)
        values = [_text(v) if v is not None else "" for v in self.connection.hmget(self.key, [str(t) for t in ids])]
        return {
            t: v[5:] if v.startswith("done:") else "predict" if v.startswith("predict:") else None
            for t, v in zip(ids, values, strict=True)
        }  # fmt: skip

    # -- /predict

    def answering(self, task_ids: Iterable[int], until: float, *, request_size: int) -> list[int]:
        """The tasks a ``/predict`` of ``request_size`` tasks may answer, now marked ``predict:<until>``:
        all but those a bulk job is writing, or wrote since Label Studio may have chosen them (the last
        ``ANSWER_WINDOW`` seconds, plus ``CHOOSE_SECONDS_PER_TASK`` per task of the request, at most
        ``MAX_LOOKBACK``): answer no prediction for those.

        Called as the request arrives (``until``: its deadline plus the window) and again just before
        it answers (``until``: now plus the window, for Label Studio to store the answer)."""
        now = time.time()
        lookback = min(ANSWER_WINDOW + CHOOSE_SECONDS_PER_TASK * request_size, MAX_LOOKBACK)
        keys = (self.key, self.written_key)
        taken = [t for t in task_ids if self.connection.eval(self._ANSWER, 2, *keys, str(t), until, now, lookback)]
        self.connection.expire(self.key, MARKS_TTL)
        return taken

    def unanswer(self, task_ids: Iterable[int]) -> None:
        """A ``/predict`` hands these tasks to a bulk job after all: drop its ``predict:`` marks, or the
        job would skip them as busy."""
        for t in task_ids:
            self.connection.eval(self._UNANSWER, 1, self.key, str(t))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
