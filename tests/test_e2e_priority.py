"""Our ranking inside a real Label Studio 1.23 (the session's server, tests/labelstudio.py).

The next task is asked for exactly as the labeling stream asks for it (``POST /api/dm/actions?id=
next_task`` with the tab's ordering and filters, see backend/ls_priority.py), annotations are
submitted as the editor submits them, and the order Label Studio hands tasks out in is compared with
the ranking, before and after annotations and after a new ranking. The last test runs ``dinolabel
serve``: annotations submitted in Label Studio reach its webhook, and the next task follows the
re-ranking they scheduled.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backend.ls_client import LabelStudioClient
from backend.ls_priority import (
    OUTDATED,
    TAB_TITLE,
    PriorityFields,
    PriorityFieldTaken,
    remove_priority,
    write_priority,
)
from backend.prioritize import ANNOTATIONS
from tests.labelstudio import DroppingProxy, LabelStudioAPI, LabelStudioServer
from tests.processes import DINOLABEL, wait_for
from tests.test_e2e_index_labelstudio import Backend, Images

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/></RectangleLabels></View>'
)
FIELDS = PriorityFields()
BOX = [
    {
        "from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": 40,
        "original_height": 30, "value": {"x": 10, "y": 10, "width": 20, "height": 20, "rectanglelabels": ["cat"]},
    }
]  # fmt: skip


def new_project(api: LabelStudioAPI, title: str, count: int, **extra: Any) -> list[int]:
    project = api.create_project(title, CONFIG)["id"]
    tasks = [{"data": {"image": f"/data/local-files/?d=img{i}.png", "note": f"n{i}", **extra}} for i in range(count)]
    return [project, *api.import_tasks(project, tasks)]


def ranking(task_ids: list[int], seed: int) -> dict[int, tuple[int, str]]:
    """Ranks 0..n-1 in a random order (never id order), with a few categorical reasons."""
    order = random.Random(seed).sample(task_ids, len(task_ids))
    return {task: (rank, ("diverse", "uncertain", "duplicate")[rank % 3]) for rank, task in enumerate(order)}


def in_rank_order(ranks: dict[int, tuple[int, str]]) -> list[int]:
    return sorted(ranks, key=lambda task: ranks[task][0])


def tab(api: LabelStudioAPI, project: int) -> dict[str, Any]:
    (view,) = [v for v in api.get("/api/dm/views", project=project) if v["data"].get("title") == TAB_TITLE]
    return view


def next_task(api: LabelStudioAPI, project: int, *, button: str = "as displayed") -> int | None:
    """The task the labeling stream gets from our tab (AppStore.js invokeAction("next_task")):
    "Label Tasks As Displayed" sends the tab's ordering and filters; "Label All Tasks" with every task
    ticked sends the selection too; "Label All Tasks" with none ticked sends nothing."""
    view = tab(api, project)
    body: dict[str, Any] = {"ordering": view["data"]["ordering"], "filters": view["data"]["filters"]}
    if button == "all, every task ticked":
        body["selectedItems"] = {"all": True, "excluded": []}
    elif button == "all, none ticked":
        body = {}
    params = {"id": "next_task", "project": project, "tabID": view["id"]}
    response = api.client.post("/api/dm/actions", params=params, json=body)
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    return int(response.json()["id"])


def submit(api: LabelStudioAPI, task: int) -> None:
    api.create_annotation(task, BOX, lead_time=1.5)


def task_data(api: LabelStudioAPI, project: int) -> dict[int, dict[str, Any]]:
    return {task["id"]: task["data"] for task in api.list_tasks(project)}


def test_label_studio_hands_out_tasks_in_rank_order_before_and_after_annotations(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI],
) -> None:
    server, api = label_studio
    project, *task_ids = new_project(api, "priority stream", 50)
    ranks = ranking(task_ids, seed=1)
    expected = in_rank_order(ranks)
    assert expected != sorted(expected)

    with LabelStudioClient(server.url, server.token) as client:
        written = write_priority(client, project, ranks, FIELDS)

    assert written.ranked == 50
    assert written.calls <= 1 + 3 + (5 + 10) + 2, "mark, 3 reasons, 2 digit positions, sweep: never one per task"
    data = task_data(api, project)
    assert {t: (d[FIELDS.rank], d[FIELDS.reason]) for t, d in data.items()} == {
        t: (f"{rank:02d}", reason) for t, (rank, reason) in ranks.items()
    }
    assert all(d["note"] == f"n{i}" and d["image"].endswith(f"img{i}.png") for i, d in enumerate(data.values()))

    # "Label Tasks As Displayed" from our tab: rank order, and each submitted task is not handed out again
    for task in expected[:4]:
        assert next_task(api, project) == task
        assert next_task(api, project) == task, "until it is annotated, the same task"
        submit(api, task)
    # "Label All Tasks" with every task ticked follows the tab too
    assert next_task(api, project, button="all, every task ticked") == expected[4]
    submit(api, expected[4])
    # /api/projects/P/next?view=T under the default (sequential) sampling: the tab's order, with locks
    assert int(api.get(f"/api/projects/{project}/next", view=tab(api, project)["id"])["id"]) == expected[5]
    submit(api, expected[5])
    # "Label All Tasks" with nothing ticked ignores every tab: sequential sampling, id order
    assert next_task(api, project, button="all, none ticked") == min(set(task_ids) - set(expected[:6]))

    # a new ranking of the unlabeled tasks (as after new annotations): followed at once
    unlabeled = expected[6:]
    reranked = ranking(unlabeled, seed=2)
    with LabelStudioClient(server.url, server.token) as client:
        again = write_priority(client, project, reranked, FIELDS)
    assert again.ranked == len(unlabeled) == 44 and again.tab_id == written.tab_id
    data = task_data(api, project)
    assert all((data[t][FIELDS.rank], data[t][FIELDS.reason]) == ("", "") for t in expected[:6]), "labeled: cleared"
    assert all(data[t][FIELDS.rank] == f"{reranked[t][0]:02d}" for t in unlabeled)
    for task in in_rank_order(reranked)[:3]:
        assert next_task(api, project) == task
        submit(api, task)

    removed = subprocess.run(
        [DINOLABEL, "unprioritize", "--project", str(project)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "DINOLABEL_LABEL_STUDIO_URL": server.url, "DINOLABEL_LABEL_STUDIO_API_KEY": server.token},
    )  # fmt: skip
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert "tab 'dinolabel priority' deleted, 'dinolabel_rank' and 'dinolabel_reason' emptied" in removed.stdout
    assert not [v for v in api.get("/api/dm/views", project=project) if v["data"].get("title") == TAB_TITLE]
    data = task_data(api, project)
    assert all(d[FIELDS.rank] == d[FIELDS.reason] == "" for d in data.values())
    assert all(d["note"] == f"n{i}" for i, d in enumerate(data.values()))


def test_a_field_holding_the_users_own_values_is_never_written(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI],
) -> None:
    server, api = label_studio
    project, *task_ids = new_project(api, "priority taken", 5, dinolabel_rank="high")
    before = task_data(api, project)
    with LabelStudioClient(server.url, server.token) as client:
        with pytest.raises(PriorityFieldTaken, match="DINOLABEL_PRIORITY_RANK_FIELD"):
            write_priority(client, project, ranking(task_ids, seed=3), FIELDS)
        assert task_data(api, project) == before
        remove_priority(client, project, FIELDS)  # empties ranks only: "high" is none
    assert task_data(api, project) == before
    assert not api.get("/api/dm/views", project=project)


def test_writes_whose_answers_are_lost_are_sent_again_and_the_ranking_is_exact(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI],
) -> None:
    """The proxy lets Label Studio commit two writes and drops their answers: each write sets a value
    or rewrites a run of '#' that only its tasks hold, so sending it again changes nothing more."""
    server, api = label_studio
    project, *task_ids = new_project(api, "priority lost answers", 30)
    ranks = ranking(task_ids, seed=4)

    writes = 0

    def is_write(method: str, path: str) -> bool:
        """The 3rd write (a reason) and the 9th (a digit): the writes are 1 mark, 3 reasons, 3 first
        digits, 10 second digits and 2 sweeps, and a write sent again counts too."""
        nonlocal writes
        if method == "POST" and path == "/api/dm/actions":
            writes += 1
            return writes in (3, 9)
        return False

    with (
        DroppingProxy(server.url, drops=2, should_drop=is_write) as proxy,
        LabelStudioClient(proxy.url, server.token, backoff=0.05) as client,
    ):
        written = write_priority(client, project, ranks, FIELDS)
    assert [status for _, _, status in proxy.dropped] == [200, 200], "Label Studio did both lost writes"
    assert written.ranked == 30
    data = task_data(api, project)
    assert {t: d[FIELDS.rank] for t, d in data.items()} == {t: f"{rank:02d}" for t, (rank, _) in ranks.items()}
    assert OUTDATED not in {d[FIELDS.reason] for d in data.values()}
    for task in in_rank_order(ranks)[:2]:
        assert next_task(api, project) == task
        submit(api, task)


def test_the_predictions_of_one_model_version_are_listed_with_their_boxes(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI],
) -> None:
    """What a prioritize run reads for the detector's uncertainty: Label Studio serialises predictions
    only with ``fields=all``, and its model-version filter matches parts of versions."""
    server, api = label_studio
    project, *task_ids = new_project(api, "priority predictions", 7)
    ours, other = "grounding-dino-tiny-0123456789", "grounding-dino-tiny-0123"  # the other is a part of ours
    boxes = {task: [{**BOX[0], "score": 0.4 + 0.05 * i}] for i, task in enumerate(task_ids)}
    with LabelStudioClient(server.url, server.token) as client:
        mine = [{"task": t, "result": boxes[t], "model_version": ours} for t in task_ids[:5]]
        client.import_predictions(project, mine)
        client.import_predictions(project, [{"task": t, "result": [], "model_version": other} for t in task_ids[3:]])
        found = client.predictions_of(project, ours, page_size=2)  # three pages of ours
        others = client.predictions_of(project, other)
    assert set(found) == set(task_ids[:5])
    for task, result in found.items():
        assert [(r["score"], r["value"]["rectanglelabels"]) for r in result] == [(boxes[task][0]["score"], ["cat"])]
    assert others == {task: [] for task in task_ids[3:]}


# --- re-ranked by the backend after annotations (its webhook, debounced) ------------------------------------

SECRET = "priority-webhook-secret"


@pytest.fixture(scope="module")
def backend(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI],
    tiny_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Backend]:
    """``dinolabel serve`` (embedded Redis, a worker serving a tiny DINOv2) that re-ranks 2 s after the
    first annotation event, on diversity alone (the project holds no predictions)."""
    server, _ = label_studio
    folder = tmp_path_factory.mktemp("priority-e2e")
    backend = Backend.serving(
        server,
        folder,
        tiny_checkpoint,  # the model version is read from it
        SECRET,
        DINOLABEL_WORKER_MODELS="embedder",
        DINOLABEL_PRIORITY_RERANK_DELAY="2",
        DINOLABEL_PRIORITY_UNCERTAINTY_WEIGHT="0",
    )
    backend.start()
    yield backend
    backend.stop()


def test_annotations_submitted_in_label_studio_re_rank_what_it_hands_out_next(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI], backend: Backend
) -> None:
    server, api = label_studio
    project = api.create_project("priority re-ranked on annotations", CONFIG)["id"]
    images = Images(server, api, project)
    api.import_tasks(project, images.tasks(range(1, 13)))
    indexed = backend.index(project)
    assert indexed.returncode == 0, indexed.stdout + indexed.stderr
    ranked = backend.cli("prioritize", "--project", str(project), "--api", backend.url, "--interval", "0.2")
    assert ranked.returncode == 0, ranked.stdout + ranked.stderr

    def ranking() -> dict[str, Any]:
        response = httpx.get(f"{backend.url}/v1/projects/{project}/priority", timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    first = ranking()
    head = first["head"][0]["task_id"]
    assert next_task(api, project) == head

    # Annotate the three tasks most like the head (its nearest neighbours by our own search): the head is
    # then close to labeled work, and the next ranking puts something else first.
    similar = httpx.get(f"{backend.url}/v1/projects/{project}/similar", params={"task_id": head, "k": 3}, timeout=60)
    assert similar.status_code == 200, similar.text
    annotated = [hit["task_id"] for hit in similar.json()["results"]]
    registered = backend.cli("register-webhook", "--project", str(project), "--backend-url", backend.url)
    assert registered.returncode == 0, registered.stdout + registered.stderr
    for task in annotated:  # Label Studio posts ANNOTATION_CREATED to us inside each of these calls
        submit(api, task)

    def reranked() -> dict[str, Any] | None:
        """The ranking that saw all three annotations, once its run is done."""
        latest = ranking()
        if latest["job_id"] == first["job_id"] or latest["labeled"] != len(annotated):
            return None
        job = httpx.get(f"{backend.url}/v1/priority-jobs/{latest['job_id']}", timeout=30).json()
        return latest if job["status"] == "done" else None

    latest = wait_for(
        reranked, 120, lambda: f"the re-ranking after the annotations\n{backend.log_tail()}", interval=0.5
    )
    job = httpx.get(f"{backend.url}/v1/priority-jobs/{latest['job_id']}", timeout=30).json()
    assert (job["source"], job["labeled"], job["ranked"]) == (ANNOTATIONS, 3, 12 - 3), job
    new_head = latest["head"][0]["task_id"]
    assert new_head not in annotated
    assert new_head != head, "the annotations changed which task comes first"
    assert next_task(api, project) == new_head, "Label Studio hands out the new ranking's head"
    data = task_data(api, project)
    assert all(data[task][FIELDS.rank] == "" for task in annotated), "labeled: their ranks are cleared"
    assert int(data[new_head][FIELDS.rank]) == 0


def test_the_tasks_annotated_with_a_label_are_listed_most_recent_first(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI],
) -> None:
    """What "more like these" reads for a label's boxes (``annotated_with``): annotations only, in one
    listing, the most recently completed task first; the filter matches parts of the results' text."""
    server, api = label_studio
    config = CONFIG.replace('<Label value="cat"/>', '<Label value="cat"/><Label value="dog"/><Label value="catfish"/>')
    project = api.create_project("priority like label", config)["id"]
    task_ids = api.import_tasks(project, [{"data": {"image": f"/data/local-files/?d=img{i}.png"}} for i in range(6)])

    def boxes(label: str) -> list[dict[str, Any]]:
        return [{**BOX[0], "value": {**BOX[0]["value"], "rectanglelabels": [label]}}]

    # Annotated in this order: task 2 (cat), 4 (dog), 0 (cat), 5 (catfish); task 1 holds a cat prediction only.
    for task, label in ((2, "cat"), (4, "dog"), (0, "cat"), (5, "catfish")):
        api.create_annotation(task_ids[task], boxes(label), lead_time=1.0)
    with LabelStudioClient(server.url, server.token) as client:
        client.import_predictions(project, [{"task": task_ids[1], "result": boxes("cat"), "model_version": "m"}])
        cats = client.annotated_with(project, "cat")
        dogs = client.annotated_with(project, "dog", limit=1)
        first = client.annotated_with(project, "cat", limit=1)
    assert [t["id"] for t in cats] == [task_ids[5], task_ids[0], task_ids[2]]
    assert [r["value"]["rectanglelabels"] for r in cats[1]["annotations"][0]["result"]] == [["cat"]], cats[1]
    assert cats[1]["data"] == {"image": "/data/local-files/?d=img0.png"}
    assert [t["id"] for t in dogs] == [task_ids[4]] and [t["id"] for t in first] == [task_ids[5]]
