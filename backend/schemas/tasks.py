"""A Label Studio task as it enters (``/predict``, ``/webhook``), and the ids the API takes."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

MAX_ID = 2**63 - 1
"""Label Studio's ids are 64-bit database keys; a larger number names nothing."""

Id = Annotated[StrictInt, Field(ge=0, le=MAX_ID)]
"""A task or project id: a JSON integer (not a boolean, a fraction or a numeric string), in range."""


class Task(BaseModel):
    """Only ``id`` and ``data`` are used; the rest of what Label Studio sends is accepted as is."""

    model_config = ConfigDict(extra="allow")

    id: Id | None = None
    data: dict[str, Any]
