"""HTTP models of the Label Studio ML-backend protocol (what Label Studio 1.23 sends and expects)."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, field_validator

from backend.json_body import parse_json
from backend.schemas.tasks import MAX_ID, Id, Task

EXAMPLE_CONFIG = (
    '<View><Image name="image" value="$image"/><TextArea name="prompt" toName="image"/>'
    '<RectangleLabels name="label" toName="image"><Label value="cat"/>'
    '<Label value="vehicle" predicted_values="car,truck"/></RectangleLabels></View>'
)
EXAMPLE_TASK = {"id": 1, "data": {"image": "/data/local-files/?d=img.png"}}


def _project_ref(value: Any) -> str | int:
    if isinstance(value, str) and len(value) <= 100:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID:
        return value
    raise ValueError("project must be Label Studio's '<id>.<timestamp>' (text of 100 characters at most) or an id")


ProjectRef = Annotated[
    str | int,
    PlainValidator(_project_ref, json_schema_input_type=Annotated[str, Field(max_length=100)] | Id),
]
"""Label Studio sends ``"<id>.<timestamp>"``; other clients may send the id as a number."""


class DetectionOverrides(BaseModel):
    """Per-project overrides accepted in ``/setup``'s ``extra_params``; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    box_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    text_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    nms_iou: float | None = Field(default=None, gt=0.0, le=1.0)
    max_boxes: int | None = Field(default=None, ge=1)

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class SetupRequest(BaseModel):
    """Sent on connect and before each prediction round."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "project": "1.1795710014",
                    "schema": EXAMPLE_CONFIG,
                    "hostname": "http://label-studio:8080",
                    "access_token": "<the connecting user's token>",
                    "extra_params": {"box_threshold": 0.3},
                }
            ]
        }
    )

    project: ProjectRef | None = None
    label_config: str | None = Field(default=None, alias="schema")
    hostname: str | None = None
    access_token: str | None = None
    extra_params: DetectionOverrides | None = None

    @field_validator("hostname")
    @classmethod
    def _http_address(cls, value: str | None) -> str | None:
        """Label Studio's address, as images and writes will use it: an http(s) URL with a host."""
        if value is None or not value.strip():
            return None
        try:
            parts = urlsplit(value.strip())
            valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
        except ValueError:  # a malformed IPv6 host, a port out of range
            valid = False
        if not valid:
            raise ValueError("hostname must be Label Studio's http(s) address, e.g. http://label-studio:8080")
        return value.strip()

    @field_validator("extra_params", mode="before")
    @classmethod
    def _json_string(cls, value: Any) -> Any:
        """Label Studio stores extra params as text in some versions: accept a JSON string too (strict JSON)."""
        if isinstance(value, str):
            return parse_json(value) if value.strip() else None
        return value


class SetupResponse(BaseModel):
    model_version: str


class PredictParams(BaseModel):
    model_config = ConfigDict(extra="allow")

    context: dict[str, Any] | None = None


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"tasks": [EXAMPLE_TASK], "project": "1.1795710014", "label_config": EXAMPLE_CONFIG},
                {
                    "tasks": [EXAMPLE_TASK],
                    "label_config": EXAMPLE_CONFIG,
                    "params": {
                        "context": {
                            "result": [{"from_name": "prompt", "type": "textarea", "value": {"text": ["red car"]}}]
                        }
                    },
                },
            ]
        }
    )

    tasks: list[Task]
    project: ProjectRef | None = None
    label_config: str | None = None
    params: PredictParams | None = None


class PredictResponse(BaseModel):
    results: list[dict[str, Any] | list[Any]]
    """One entry per task, in order: its prediction, or ``[]`` (none now: handed to a bulk job)."""
    model_version: str
    job_id: str | None = None  # set when tasks were handed to a bulk job


class WebhookEvent(BaseModel):
    """What Label Studio posts to ``/webhook``; only ``TASKS_CREATED``, ``TASKS_DELETED`` and the annotation
    events are read beyond their ``action``."""

    model_config = ConfigDict(extra="allow")

    action: Annotated[str, Field(max_length=128)] | None = None


_ID_SCHEMA = {"type": "integer", "minimum": 0, "maximum": MAX_ID}
_WEBHOOK_PROJECT = {
    "anyOf": [
        {
            "type": "object",
            "required": ["id"],
            "properties": {"id": _ID_SCHEMA, "label_config": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        },
        _ID_SCHEMA,
    ]
}


def _webhook_project(value: Any) -> dict[str, Any] | int:
    number = value.get("id") if isinstance(value, dict) else value
    if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= MAX_ID:
        raise ValueError("project must be an object with an integer id, or the id")
    if isinstance(value, dict) and not isinstance(value.get("label_config"), str | None):
        raise ValueError("project.label_config must be text")
    return value


class TasksCreated(WebhookEvent):
    """``TASKS_CREATED``: the new tasks, and the project (an object with its ``id``, or the id)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "action": "TASKS_CREATED",
                    "project": {"id": 1, "label_config": EXAMPLE_CONFIG},
                    "tasks": [EXAMPLE_TASK],
                }
            ]
        }
    )

    action: Literal["TASKS_CREATED"]
    project: Annotated[dict[str, Any] | int, PlainValidator(_webhook_project), WithJsonSchema(_WEBHOOK_PROJECT)]
    tasks: list[Any] = Field(min_length=1)

    @property
    def project_number(self) -> int:
        return self.project["id"] if isinstance(self.project, dict) else self.project

    @property
    def label_config(self) -> str | None:
        return self.project.get("label_config") if isinstance(self.project, dict) else None


class TasksDeleted(WebhookEvent):
    """``TASKS_DELETED``: the deleted tasks (``{"id": ...}`` each) and their project."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"action": "TASKS_DELETED", "project": {"id": 1}, "tasks": [{"id": 7}]}]}
    )

    action: Literal["TASKS_DELETED"]
    project: Annotated[dict[str, Any] | int, PlainValidator(_webhook_project), WithJsonSchema(_WEBHOOK_PROJECT)]
    tasks: list[Any] = Field(min_length=1)

    @property
    def project_number(self) -> int:
        return self.project["id"] if isinstance(self.project, dict) else self.project


class AnnotationsChanged(WebhookEvent):
    """An annotation event (``backend.routes.ls.ANNOTATION_ACTIONS``): only its project's id is read (a
    re-ranking lists the labeled tasks from Label Studio itself), not the annotations or the task."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {}}]}
    )

    action: Literal["ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"]
    project: Annotated[dict[str, Any] | int, PlainValidator(_webhook_project), WithJsonSchema(_WEBHOOK_PROJECT)]

    @property
    def project_number(self) -> int:
        return self.project["id"] if isinstance(self.project, dict) else self.project


class WebhookResponse(BaseModel):
    status: Literal["queued", "scheduled", "ignored"]
    action: str | None = None
    job_id: str | None = None
    index_job_id: str | None = None  # TASKS_CREATED of a project that is indexed: the job indexing the new tasks
    tasks: int | None = None  # tasks queued
    rejected: int | None = None  # tasks refused (recorded as failures of the job, with their reasons)
    rerank_at: float | None = None  # annotation events ("scheduled"): when the project's re-ranking starts (Unix time)


class Health(BaseModel):
    """``/health``'s body (the same with 503 ``DOWN``); the other fields are listed in the README."""

    model_config = ConfigDict(extra="allow")

    status: Literal["UP", "DEGRADED", "DOWN"]
    model_class: str
    reason: str | None = None
