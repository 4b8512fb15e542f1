"""The writer thread coalesces batches into import calls, by count and by time, against a fake Label Studio."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backend.writer import Submission, Writer
from tests.backend.conftest import FakeProjectAPI

VERSION = "v1"


@pytest.fixture
def project(fake_project: FakeProjectAPI) -> FakeProjectAPI:
    fake_project.tasks.update({t: {"image": f"/data/{t}.png"} for t in range(1, 21)})
    return fake_project


@pytest.fixture
def outcomes() -> dict[int, tuple[list[int], list[int], str | None]]:
    return {}


def submission(project: FakeProjectAPI, number: int, task_ids: range | list[int], outcomes: dict) -> Submission:
    rows = [{"task": t, "result": [], "score": 0.0, "model_version": VERSION} for t in task_ids]
    target = (project.url, None, project.project, VERSION)
    return Submission(target, rows, lambda *out: outcomes.__setitem__(number, out))


@pytest.fixture
def writer() -> Iterator[Writer]:
    writer = Writer(size=10, wait=30.0, retries=0)
    writer.start()
    yield writer
    writer.stop()


def test_batches_are_written_together_up_to_the_size(project: FakeProjectAPI, writer: Writer, outcomes: dict) -> None:
    project.import_gate.clear()  # Label Studio busy with a first call: the others pile up meanwhile
    for number, start in enumerate(range(1, 21, 4)):
        writer.submit(submission(project, number, range(start, min(start + 4, 21)), outcomes))
    project.import_gate.set()
    assert writer.flush(timeout=30)
    assert [len(rows) for rows in project.posted] == writer.calls == [8, 8, 4], "size 10: two batches of 4 a call"
    assert project.per_task(VERSION) == dict.fromkeys(range(1, 21), 1)
    assert outcomes[0] == ([1, 2, 3, 4], [], None) and len(outcomes) == 5


def test_a_lone_batch_is_sent_after_the_wait(project: FakeProjectAPI, outcomes: dict) -> None:
    writer = Writer(size=1000, wait=0.2, retries=0)
    writer.start()
    try:
        writer.submit(submission(project, 0, [1, 2], outcomes))
        assert writer.flush(timeout=30)
    finally:
        writer.stop()
    assert writer.calls == [2] and outcomes[0] == ([1, 2], [], None)


def test_a_refused_batch_does_not_fail_the_others(project: FakeProjectAPI, writer: Writer, outcomes: dict) -> None:
    project.import_gate.clear()
    writer.submit(submission(project, 0, [1, 2], outcomes))
    writer.submit(submission(project, 1, [3, 99], outcomes))  # task 99 is not in the project: 400
    writer.submit(submission(project, 2, [4], outcomes))
    project.import_gate.set()
    assert writer.flush(timeout=30)
    assert outcomes[0] == ([1, 2], [], None) and outcomes[2] == ([4], [], None)
    written, uncertain, error = outcomes[1]
    assert written == [] and uncertain == [] and "HTTP 400" in error
    assert project.per_task(VERSION) == {1: 1, 2: 1, 4: 1}


def test_a_write_whose_answer_is_lost_is_reported_uncertain(
    project: FakeProjectAPI, writer: Writer, outcomes: dict
) -> None:
    project.faults = ["500"] * 12  # every write and every check fails
    writer.submit(submission(project, 0, [5, 6], outcomes))
    writer.stop()
    assert outcomes[0][0] == [] and outcomes[0][1] == [5, 6] and "failed" in outcomes[0][2]


def test_rows_answered_meanwhile_are_dropped_right_before_the_call(
    project: FakeProjectAPI, writer: Writer, outcomes: dict
) -> None:
    asked: list[list[int]] = []

    def keep(ids: list[int]) -> list[int]:  # what Marks.keep_for_write says: tasks 2 and 5 were answered
        asked.append(ids)
        return [t for t in ids if t not in (2, 5)]

    first = submission(project, 0, [1, 2, 3], outcomes)
    first.keep = keep
    writer.submit(first)
    only = submission(project, 1, [5], outcomes)
    only.keep = keep
    writer.submit(only)
    assert writer.flush(timeout=30)
    assert asked == [[1, 2, 3], [5]], "asked once per batch, right before the call"
    assert [sorted(r["task"] for r in rows) for rows in project.posted] == [[1, 3]]
    assert writer.calls == [2], "a batch left without rows makes no call"
    assert outcomes == {0: ([1, 3], [], None), 1: ([], [], None)}
    assert project.per_task(VERSION) == {1: 1, 3: 1}
