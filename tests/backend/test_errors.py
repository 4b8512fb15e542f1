"""Hostile and careless requests get a 4xx with a reason, never a 500 (issue 6, items 7 and 8).

The real app (embedded Redis and worker, tiny model) with small limits, so each cap is reached with
small requests; each answer is checked for its status, the field or limit it names, and that no
exception text of ours is in it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from backend.config import Settings
from backend.main import create_app
from backend.routes.ls import SECRET_HEADER
from tests.backend.test_ls_api import wait_until_up
from tests.images import png

CONFIG = (
    '<View><Image name="image" value="$image"/><TextArea name="prompt" toName="image"/>'
    '<RectangleLabels name="label" toName="image"><Label value="cat"/><Label value="dog"/></RectangleLabels></View>'
)
SECRET = "sécret-ünicode"
TASK = {"id": 1, "data": {"image": "/data/local-files/?d=img.png"}}
JSON = {"content-type": "application/json"}
LIMITS = {
    "max_tasks_per_request": 4,
    "max_labels": 4,
    "max_phrases": 6,
    "max_prompt_phrases": 3,
    "max_phrase_length": 30,
}


@pytest.fixture(scope="module")
def client(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    docs = tmp_path_factory.mktemp("docs")
    (docs / "img.png").write_bytes(png(64, 48, 3))
    settings = Settings(
        detector_checkpoint=str(tiny_checkpoint),
        device="cpu",
        data_dir=tmp_path_factory.mktemp("data"),
        local_files_document_root=docs,
        label_studio_url="http://127.0.0.1:9",  # nothing listens: planning fails at once (no retries)
        label_studio_retries=0,
        webhook_secret=SecretStr(SECRET),
        box_threshold=0.3,
        **LIMITS,
    )
    with TestClient(create_app(settings)) as client:
        wait_until_up(client)
        yield client


def no_exception_text(response: object) -> bool:
    text = response.text  # type: ignore[attr-defined]
    return not any(word in text for word in ("Traceback", "Error:", "Exception", 'File "'))


def config(*labels: str) -> str:
    image = '<Image name="image" value="$image"/>'
    return f'<View>{image}<RectangleLabels name="label" toName="image">{"".join(labels)}</RectangleLabels></View>'


def label(value: str, predicted: str | None = None) -> str:
    extra = f' predicted_values="{predicted}"' if predicted is not None else ""
    return f'<Label value="{value}"{extra}/>'


def prompt(*texts: str) -> dict:
    return {"context": {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                                    "value": {"text": list(texts)}}]}}  # fmt: skip


def predict_body(**extra: object) -> dict:
    return {"tasks": [TASK], "project": "7.1", "label_config": CONFIG, **extra}


# --- item 7: what used to be a 500 -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "raw", "reason"),
    [
        ("/setup", '{"project": "1", "extra_params": {"box_threshold": NaN}}', "NaN is not a JSON number"),
        ("/setup", '{"project": "1", "extra_params": {"nms_iou": -Infinity}}', "-Infinity is not a JSON number"),
        ("/setup", '{"project": "1", "extra_params": {"box_threshold": 1e999}}', "out of range"),
        ("/predict", '{"tasks": [{"id": Infinity, "data": {}}]}', "Infinity is not a JSON number"),
        ("/predict", '{"tasks": [{"id": 1, "data": {"image": "\\ud800"}}]}', "lone UTF-16 surrogate"),
        ("/predict", '{"tasks": [{"id": 1' + "0" * 5000 + ', "data": {}}]}', "digits"),
        ("/v1/projects/1/preannotate", '{"task_ids": [NaN]}', "NaN is not a JSON number"),
    ],
)
def test_bodies_that_are_not_strict_json_get_a_422_with_the_reason(
    client: TestClient, path: str, raw: str, reason: str
) -> None:
    response = client.post(path, content=raw.encode(), headers=JSON)
    assert response.status_code == 422, response.text
    (problem,) = response.json()["detail"]
    assert problem["type"] == "json_invalid" and reason in problem["msg"]


def test_nan_inside_a_json_string_field_is_refused_too(client: TestClient) -> None:
    response = client.post("/setup", json={"project": "1", "extra_params": '{"box_threshold": NaN}'})
    assert response.status_code == 422
    (problem,) = response.json()["detail"]
    assert problem["loc"] == ["body", "extra_params"] and "NaN is not a JSON number" in problem["msg"]


def nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_is_bounded_at_64_levels(client: TestClient) -> None:
    # body, tasks, task, data: four levels; 60 more reach the limit exactly.
    at_limit = {"tasks": [{"id": 1, "data": {**TASK["data"], "x": nested(60)}}], "label_config": CONFIG}
    served = client.post("/predict", json=at_limit)
    assert served.status_code == 200 and served.json()["results"][0]["result"], served.text
    over = client.post("/predict", json={**at_limit, "tasks": [{"id": 1, "data": {"x": nested(61)}}]})
    assert over.status_code == 422 and "nested deeper than 64 levels" in over.text
    for depth in (900, 100_000):  # the second is deeper than Python's own parser goes: the same answer
        deep = "[" * depth + "]" * depth
        for path in ("/predict", "/setup", "/v1/projects/1/preannotate"):
            response = client.post(path, content=deep.encode(), headers=JSON)
            assert response.status_code == 422 and "nested deeper than 64 levels" in response.text, path
        hook = client.post("/webhook", content=deep.encode(), headers=JSON)
        assert hook.status_code == 400 and hook.json()["detail"] == (
            "the webhook body is not JSON: nested deeper than 64 levels"
        )


def test_a_project_that_is_not_an_ascii_id_names_no_project(client: TestClient) -> None:
    for project in ("²", "٣.1", "1" * 40):  # digits to str.isdigit, not to int (or out of range)
        assert client.post("/setup", json={"project": project, "schema": CONFIG}).status_code == 200
        served = client.post("/predict", json={**predict_body(), "project": project})
        assert served.status_code == 200 and served.json()["results"][0]["result"], served.text
    for project in (True, 1.5, 2**64, [1], "x" * 101):
        response = client.post("/predict", json={**predict_body(), "project": project})
        assert response.status_code == 422, project
        assert response.json()["detail"][0]["loc"] == ["body", "project"]


@pytest.mark.parametrize(
    "context",
    [
        {"result": [{"from_name": "prompt", "value": [1, 2]}]},
        {"result": [{"from_name": "prompt", "value": {"text": {"a": 1}}}]},
        {"result": [{"from_name": "prompt", "value": {"text": [1, None, {"x": "y"}]}}]},
        {"result": [{"from_name": "prompt", "value": "car"}]},
        {"result": {"from_name": "prompt"}},
        {"result": "car"},
        {"result": [None, 3, "x"]},
    ],
)
def test_a_malformed_context_is_ignored_and_the_labels_are_detected(client: TestClient, context: dict) -> None:
    response = client.post("/predict", json=predict_body(params={"context": context}))
    assert response.status_code == 200, response.text
    regions = response.json()["results"][0]["result"]
    assert regions and {r["value"]["rectanglelabels"][0] for r in regions} <= {"cat", "dog"}
    assert all("meta" not in r for r in regions), "no typed prompt was read"


def test_a_label_the_model_cannot_read_is_a_422_with_the_models_reason(client: TestClient) -> None:
    unreadable = config(label("\u200b"), label("cat"))  # a zero-width space: no token at all
    response = client.post("/predict", json={"tasks": [TASK], "label_config": unreadable})
    assert response.status_code == 422
    reason = f"phrase {chr(0x200B)!r} produced no tokens"
    assert response.json()["detail"] == f"the model cannot take this request: {reason}"
    assert no_exception_text(response)


def test_non_ascii_webhook_secrets_are_compared_not_crashed_on(client: TestClient) -> None:
    event = {"action": "TASKS_CREATED", "project": {"id": 5, "label_config": CONFIG}, "tasks": [TASK]}
    for header in ("é".encode("latin-1"), "sécret".encode(), b"\xff\xfe", b"secret"):
        response = client.post("/webhook", json=event, headers={SECRET_HEADER: header})
        assert response.status_code == 401, header
    queued = client.post("/webhook", json=event, headers={SECRET_HEADER: SECRET.encode()})
    assert queued.status_code == 200 and queued.json()["status"] == "queued", queued.text


def test_non_ascii_basic_auth_is_checked_on_both_sides(tiny_checkpoint: Path, tmp_path: Path) -> None:
    settings = Settings(
        detector_checkpoint=str(tiny_checkpoint),
        data_dir=tmp_path,
        embedded_worker=False,
        basic_auth_user="ünïcode",
        basic_auth_pass=SecretStr("pässwörd"),
    )

    def basic(raw: bytes) -> dict[str, bytes]:
        return {"Authorization": b"Basic " + base64.b64encode(raw)}

    with TestClient(create_app(settings)) as client:
        for charset in ("utf-8", "latin-1"):  # RFC 7617 and browsers; requests, so Label Studio
            assert client.get("/health", headers=basic("ünïcode:pässwörd".encode(charset))).status_code == 200
        for refused in (
            basic("ünïcode:pässwörd".encode("utf-16")),
            basic(b"\xff\xfe:\x80"),
            basic("ünïcode:wrong".encode()),
            {"Authorization": "Basic ünïcode".encode("latin-1")},
            {"Authorization": b"Basic !!!"},
        ):
            response = client.get("/health", headers=refused)
            assert response.status_code == 401 and no_exception_text(response), refused


def test_a_bad_label_studio_address_in_setup_is_refused(client: TestClient) -> None:
    for hostname in ("http://[", "http://x:99999", "ftp://label-studio", "label-studio:8080"):
        response = client.post("/setup", json={"project": "9.1", "schema": CONFIG, "hostname": hostname})
        assert response.status_code == 422, hostname
        assert response.json()["detail"][0]["loc"] == ["body", "hostname"]


# --- item 8: caps on the work one request can ask for -------------------------------------------------


@pytest.mark.parametrize(
    ("label_config", "setting"),
    [
        (config(*(label(f"thing{i}") for i in range(5))), "DINOLABEL_MAX_LABELS"),
        (config(label("cat", "kitten,tabby,tom"), label("dog", "puppy,hound,cur,mutt")), "DINOLABEL_MAX_PHRASES"),
        (config(label("a" * 31)), "DINOLABEL_MAX_PHRASE_LENGTH"),
        (config(label("cat", "kitten, " + "b" * 31)), "DINOLABEL_MAX_PHRASE_LENGTH"),
    ],
)
def test_configs_past_a_limit_are_refused_naming_it(client: TestClient, label_config: str, setting: str) -> None:
    setup = client.post("/setup", json={"project": "11.1", "schema": label_config})
    assert setup.status_code == 422 and setting in setup.json()["detail"], setup.text
    response = client.post("/predict", json={"tasks": [TASK], "label_config": label_config})
    assert response.status_code == 422 and setting in response.json()["detail"]


def test_configs_at_the_limits_are_served(client: TestClient) -> None:
    at_limits = config(label("cat", "cat,kitten,tabby"), label("dog"), label("bird"), label("c" * 30))  # 4 and 6
    assert client.post("/setup", json={"project": "12.1", "schema": at_limits}).status_code == 200
    response = client.post("/predict", json={"tasks": [TASK], "label_config": at_limits})
    assert response.status_code == 200 and response.json()["results"][0]["result"]


def test_typed_prompts_past_a_limit_are_refused_naming_it(client: TestClient) -> None:
    served = client.post("/predict", json=predict_body(params=prompt("red car. kitten", "dog")))
    assert served.status_code == 200, served.text
    regions = served.json()["results"][0]["result"]
    assert regions and all(r["meta"]["text"][0] for r in regions), "the typed prompt was detected"
    too_many = client.post("/predict", json=predict_body(params=prompt("red car. kitten", "dog; bird")))
    assert too_many.status_code == 422
    assert too_many.json()["detail"] == (
        "params.context: the typed prompt has 4 phrases; at most 3 are served (DINOLABEL_MAX_PROMPT_PHRASES)"
    )
    too_long = client.post("/predict", json=predict_body(params=prompt("x" * 31)))
    assert too_long.status_code == 422 and "DINOLABEL_MAX_PHRASE_LENGTH" in too_long.json()["detail"]
    # 5,000 typed phrases (issue 6: ~11 s of the worker) are refused before anything is queued.
    flood = client.post("/predict", json=predict_body(params=prompt(", ".join(f"w{i}" for i in range(5000)))))
    assert flood.status_code == 422 and "5000 phrases" in flood.json()["detail"]


def test_too_many_tasks_in_one_request_are_refused_naming_the_limit(client: TestClient) -> None:
    four = [{**TASK, "id": i} for i in range(4)]
    served = client.post("/predict", json={"tasks": four, "label_config": CONFIG})
    assert served.status_code == 200 and len(served.json()["results"]) == 4
    expected = "tasks: 5 in one request; at most 4 are taken (DINOLABEL_MAX_TASKS_PER_REQUEST)"
    five = [*four, {**TASK, "id": 4}]
    response = client.post("/predict", json={"tasks": five, "label_config": CONFIG})
    assert response.status_code == 422 and response.json()["detail"] == expected
    event = {"action": "TASKS_CREATED", "project": 5, "tasks": five}
    hook = client.post("/webhook", json=event, headers={SECRET_HEADER: SECRET.encode()})
    assert hook.status_code == 422 and hook.json()["detail"] == expected
    job = client.post("/v1/projects/5/preannotate", json={"task_ids": list(range(5))})
    assert job.status_code == 422 and job.json()["detail"] == expected.replace("tasks:", "task_ids:")
