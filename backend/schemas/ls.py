"""HTTP models of the Label Studio ML-backend protocol (what Label Studio 1.23 sends and expects)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


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

    project: str | int | None = None
    label_config: str | None = Field(default=None, alias="schema")
    hostname: str | None = None
    access_token: str | None = None
    extra_params: DetectionOverrides | None = None

    @field_validator("extra_params", mode="before")
    @classmethod
    def _json_string(cls, value: Any) -> Any:
        """Label Studio stores extra params as text in some versions: accept a JSON string too."""
        if isinstance(value, str):
            return json.loads(value) if value.strip() else None
        return value


class SetupResponse(BaseModel):
    model_version: str


class Task(BaseModel):
    """A Label Studio task; only ``id`` and ``data`` matter here, the rest is kept as sent."""

    model_config = ConfigDict(extra="allow")

    id: int | None = None
    data: dict[str, Any]


class PredictParams(BaseModel):
    model_config = ConfigDict(extra="allow")

    context: dict[str, Any] | None = None


class PredictRequest(BaseModel):
    tasks: list[Task]
    project: str | int | None = None
    label_config: str | None = None
    params: PredictParams | None = None


class PredictResponse(BaseModel):
    results: list[dict[str, Any]]
    model_version: str
    job_id: str | None = None  # set when the tasks were handed to a bulk job
