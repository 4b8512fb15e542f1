"""The Label Studio client's retry rules, against a fake project API on a real socket.

Reads are retried with back-off (``Retry-After`` honoured); a write whose answer was lost is never
sent again blindly: the client asks which tasks hold the prediction and writes only the others.
"""

from __future__ import annotations

import email.utils
import json
import time

import httpx
import pytest

from backend.ls_client import LabelStudioClient, LabelStudioError, WriteUncertain, retry_after
from tests.backend.conftest import FakeProjectAPI
from tests.labelstudio import free_port

VERSION = "dino-0123456789"
IMPORT = "/api/projects/1/import/predictions"


@pytest.fixture
def project(fake_project: FakeProjectAPI) -> FakeProjectAPI:
    fake_project.tasks.update({t: {"image": f"/data/{t}.png"} for t in (11, 12, 13, 14)})
    fake_project.stall_seconds = 1.5
    return fake_project


def client(url: str, waits: list[float], **kwargs: object) -> LabelStudioClient:
    """A client that records its back-off waits instead of sleeping them (and so runs fast)."""
    return LabelStudioClient(url, None, timeout=0.5, write_timeout=0.5, retries=3, sleep=waits.append, **kwargs)


def rows(*task_ids: int, version: str = VERSION) -> list[dict]:
    return [{"task": t, "result": [], "score": 0.5, "model_version": version} for t in task_ids]


def methods(project: FakeProjectAPI) -> list[str]:
    return [f"{r.method} {r.path}" for r in project.seen()]


def test_reads_are_retried_with_exponential_back_off(project: FakeProjectAPI) -> None:
    project.faults = ["500", "stall", "500"]
    waits: list[float] = []
    with client(project.url, waits) as ls:
        assert ls.tasks_holding(1, [11, 12], VERSION) == set()
    assert methods(project) == ["GET /api/tasks"] * 4, "three failures (500, a read time-out, 500), then the answer"
    assert waits == [0.5, 1.0, 2.0]


def test_retry_after_is_honoured(project: FakeProjectAPI) -> None:
    project.faults = ["429:3", "429", "500"]
    waits: list[float] = []
    with client(project.url, waits) as ls:
        ls.tasks_holding(1, [11], VERSION)
    assert waits == [3.0, 1.0, 2.0], "at least Retry-After, else the back-off"
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    response = httpx.Response(429, headers={"Retry-After": later})
    assert 110 < retry_after(response) <= 120
    assert retry_after(httpx.Response(503)) is None


def test_reads_give_up_after_the_retries(project: FakeProjectAPI) -> None:
    project.faults = ["500"] * 10
    waits: list[float] = []
    with client(project.url, waits) as ls, pytest.raises(LabelStudioError, match="after 4 tries: HTTP 500"):
        ls.tasks_holding(1, [11], VERSION)
    assert len(project.seen()) == 4


def test_a_client_error_is_not_retried(project: FakeProjectAPI) -> None:
    waits: list[float] = []
    with client(project.url, waits) as ls, pytest.raises(LabelStudioError, match="HTTP 400") as caught:
        ls.import_predictions(1, rows(11, 99))
    assert caught.value.status == 400 and not isinstance(caught.value, WriteUncertain)
    assert methods(project) == [f"POST {IMPORT}"] and waits == []


@pytest.mark.parametrize("fault", ["commit-then-drop", "commit-then-500", "commit-then-stall"])
def test_a_write_whose_answer_is_lost_is_checked_not_repeated(project: FakeProjectAPI, fault: str) -> None:
    project.predictions.extend(rows(14, version="other-model"))
    project.faults = [fault]
    waits: list[float] = []
    with client(project.url, waits) as ls:
        ls.import_predictions(1, rows(11, 12, 13, 14))
    assert methods(project) == [f"POST {IMPORT}", "GET /api/tasks"], "one write, one check, nothing re-sent"
    assert project.per_task(VERSION) == {11: 1, 12: 1, 13: 1, 14: 1}
    check = json.loads(project.seen("/api/tasks")[0].query["query"][0])
    assert check["selectedItems"] == {"all": False, "included": [11, 12, 13, 14]}


def test_a_write_that_failed_before_committing_writes_only_what_is_missing(project: FakeProjectAPI) -> None:
    project.predictions.extend(rows(12))  # stored meanwhile by someone else (Label Studio's own /predict)
    project.faults = ["500"]
    waits: list[float] = []
    with client(project.url, waits) as ls:
        ls.import_predictions(1, rows(11, 12, 13))
    assert methods(project) == [f"POST {IMPORT}", "GET /api/tasks", f"POST {IMPORT}"]
    assert [[r["task"] for r in posted] for posted in project.posted] == [[11, 13]], "task 12 was not written again"
    assert project.per_task(VERSION) == {11: 1, 12: 1, 13: 1}
    assert waits == [0.5], "a pause before the check, so that a commit in progress can land"


def test_versions_are_compared_exactly(project: FakeProjectAPI) -> None:
    project.predictions.extend(rows(11, version=VERSION + "-longer") + rows(12, version="x" + VERSION))
    project.predictions.extend(rows(13))
    with client(project.url, []) as ls:
        assert ls.tasks_holding(1, [11, 12, 13, 14], VERSION) == {13}


def test_a_write_refused_for_load_is_sent_again_as_it_was(project: FakeProjectAPI) -> None:
    project.faults = ["429:2"]
    waits: list[float] = []
    with client(project.url, waits) as ls:
        ls.import_predictions(1, rows(11, 12))
    assert methods(project) == [f"POST {IMPORT}"] * 2 and waits == [2.0]
    assert project.per_task(VERSION) == {11: 1, 12: 1}


def test_a_write_that_never_connected_is_sent_again() -> None:
    waits: list[float] = []
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with client(url, waits) as ls, pytest.raises(LabelStudioError, match="after 4 tries: ConnectError") as caught:
        ls.import_predictions(1, rows(11))
    assert not isinstance(caught.value, WriteUncertain) and waits == [0.5, 1.0, 2.0]


def test_a_write_still_uncertain_after_the_retries_says_so(project: FakeProjectAPI) -> None:
    project.faults = ["500", None, "500", None, "500", None, "500"]  # every write fails, every check answers
    waits: list[float] = []
    with client(project.url, waits) as ls, pytest.raises(WriteUncertain):
        ls.import_predictions(1, rows(11))
    assert methods(project) == [f"POST {IMPORT}", "GET /api/tasks"] * 3 + [f"POST {IMPORT}"]
    assert project.per_task(VERSION) == {}


def test_a_data_field_write_names_its_tasks_and_at_most_a_bounded_number(project: FakeProjectAPI) -> None:
    """The Data Manager action would otherwise write every task of the project, or send one SQL ``IN``
    list longer than SQLite takes: both are refused before anything is sent."""
    from backend.ls_client import MAX_IDS_PER_ACTION

    with client(project.url, []) as ls:
        with pytest.raises(ValueError, match="name the tasks"):
            ls.set_data_field(1, "rank", "String", "")
        with pytest.raises(ValueError, match=f"between 1 and {MAX_IDS_PER_ACTION}"):
            ls.set_data_field(1, "rank", "String", "", ids=list(range(MAX_IDS_PER_ACTION + 1)))
        with pytest.raises(ValueError, match="between 1"):
            ls.set_data_field(1, "rank", "String", "", ids=[])
    assert methods(project) == []
