"""What the search and duplicates routes ask of Label Studio, asked of a real Label Studio 1.23 server:
one listing for chosen task ids (data and ``is_labeled``), and the labeled tasks of a project in pages."""

from __future__ import annotations

import pytest

from backend.ls_client import LabelStudioClient
from tests.labelstudio import LabelStudioAPI, LabelStudioServer

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]

CONFIG = (
    '<View><Image name="picture" value="$photo"/><Choices name="kind" toName="picture">'
    '<Choice value="cat"/><Choice value="dog"/></Choices></View>'
)
CHOICE = [{"from_name": "kind", "to_name": "picture", "type": "choices", "value": {"choices": ["cat"]}}]


def test_task_listings_by_id_and_labeled_pages_against_a_real_label_studio(
    label_studio: tuple[LabelStudioServer, LabelStudioAPI],
) -> None:
    server, api = label_studio
    project = api.create_project("search listings", CONFIG)["id"]
    ids = api.import_tasks(project, [{"data": {"photo": f"/data/local-files/?d=p{i}.png"}} for i in range(5)])
    labeled = {ids[1], ids[3], ids[4]}
    for task in labeled:
        api.create_annotation(task, CHOICE)
    with LabelStudioClient(server.url, server.token) as client:
        listed = client.tasks_by_id(project, [ids[4], ids[0], ids[3], 10**9])
        assert set(listed) == {ids[4], ids[0], ids[3]}  # an id that is no task of the project is left out
        assert listed[ids[0]] == {"id": ids[0], "data": {"photo": "/data/local-files/?d=p0.png"}, "is_labeled": False}
        assert listed[ids[4]]["is_labeled"] and listed[ids[3]]["is_labeled"]
        assert client.labeled_task_ids(project, page_size=2) == labeled  # three pages
        assert client.labeled_task_ids(project) == labeled
