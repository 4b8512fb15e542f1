"""Write marks on a real Redis: bulk batches against each other, and against ``/predict`` (backend.marks)."""

from __future__ import annotations

import time

import pytest
import redis

from backend.bulk import Workers
from backend.marks import ANSWER_WINDOW, Marks

pytestmark = pytest.mark.redis


@pytest.fixture
def marks(redis_url: str) -> Marks:
    connection = redis.Redis.from_url(redis_url)
    Workers.beat(connection, "alive", {"state": "ready"})
    return Marks(connection, 7, "v1")


def later() -> float:
    return time.time() + ANSWER_WINDOW


def test_marks_give_each_task_to_one_writer(redis_url: str) -> None:
    connection = redis.Redis.from_url(redis_url)
    marks = Marks(connection, 7, "v1")
    Workers.beat(connection, "alive-worker", {"state": "ready"})
    assert marks.claim([1, 2], "alive-worker") == {1: "claimed", 2: "claimed"}
    assert marks.claim([1, 3], "other") == {1: "busy", 3: "claimed"}  # held by a live worker
    marks.finish([1], "job-a")
    assert marks.claim([1], "other") == {1: "done"}, "claimed, to be checked against Label Studio"
    assert marks.claim([1], "alive-worker") == {1: "taken"}, "'other' never beat: it counts as dead"
    marks.finish([1], "job-a")
    # task 3 is held by "other", which never beat: it counts as dead and can be taken over.
    assert marks.claim([3], "alive-worker") == {3: "taken"}
    marks.release([3], "someone-else")
    assert marks.claim([3], "alive-worker") == {3: "claimed"}, "only the holder releases"
    marks.release([3], "alive-worker")
    assert marks.done_by([1, 2, 3]) == {1: "job-a", 2: None, 3: None}


def test_predict_takes_a_task_a_batch_claimed_and_the_writer_drops_its_row(marks: Marks) -> None:
    assert marks.claim([1, 2, 3], "alive") == dict.fromkeys([1, 2, 3], "claimed")
    assert marks.answering([2, 4], later(), request_size=2) == [2, 4], "claimed, not yet writing: /predict answers it"
    assert marks.keep_for_write([1, 2, 3], "alive") == [1, 3]
    assert marks.keep_for_write([1, 3], "alive") == [1, 3], "the same rows again (a refused call split)"
    assert marks.answering([1, 3], later(), request_size=2) == [], "in an import call under way: left to the bulk job"
    assert marks.claim([4], "alive") == {4: "busy"}, "a fresh /predict mark: a batch starting now skips it"


def test_a_write_leaves_its_tasks_to_the_bulk_job_for_the_window_only(marks: Marks) -> None:
    marks.claim([1, 2], "alive")
    marks.keep_for_write([1, 2], "alive")
    marks.wrote([1], "job-a")
    marks.release([2], "alive")  # refused by Label Studio: given back
    assert marks.done_by([1, 2]) == {1: "job-a", 2: None}
    assert marks.answering([1, 2], later(), request_size=2) == [2], "task 1 written since Label Studio chose it, maybe"
    # Long ago: Label Studio would not have sent task 1 unless its prediction was deleted since...
    marks.connection.zadd(marks.written_key, {"1": time.time() - ANSWER_WINDOW - 60})
    assert marks.answering([1], later(), request_size=1) == [1]
    # ...unless the request is large: Label Studio serialises 10,000 tasks before it sends them.
    marks.connection.hset(marks.key, "1", "done:job-a")
    assert marks.answering([1], later(), request_size=10_000) == []


def test_a_stale_predict_mark_counts_as_written_and_unanswer_frees_a_task(marks: Marks) -> None:
    marks.answering([1, 2, 3], time.time() - 1, request_size=3)  # answered, and Label Studio had its time to store it
    marks.answering([4], later(), request_size=1)
    assert marks.done_by([1, 4]) == {1: "predict", 4: "predict"}
    assert marks.claim([1, 4], "alive") == {1: "done", 4: "busy"}, "task 1: ask Label Studio first"
    marks.unanswer([2, 1])  # handed to a bulk job after all (task 1 is the batch's now: kept)
    assert marks.claim([2, 3], "alive") == {2: "claimed", 3: "done"}
    assert marks.keep_for_write([1, 2, 3], "alive") == [1, 2, 3]


def test_only_the_holder_releases_and_a_dead_writers_tasks_are_taken_over(marks: Marks) -> None:
    marks.claim([1, 2], "gone")  # a worker without heartbeat: dead
    assert marks.keep_for_write([1], "gone") == [1]
    marks.release([1, 2], "alive")
    assert marks.claim([1, 2], "alive") == {1: "taken", 2: "taken"}, "writing or pending on a dead worker"
    assert marks.keep_for_write([1, 2], "gone") == [], "the dead worker's writer must not write them now"
    marks.keep_for_write([1], "alive")
    marks.release([1, 2], "alive")  # writing: or pending: on its holder: both released
    assert marks.claim([1, 2], "other") == {1: "claimed", 2: "claimed"}
