"""HTTP models of search and duplicates (``/v1/projects/{id}/similar``, ``/search``, ``/duplicates``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

LabelStudioState = Literal["ok", "unreachable", "unknown"]
"""Whether Label Studio added image URLs and labeled states: ``ok``; ``unreachable`` (it did not answer
or refused); ``unknown`` (no address is known for the project)."""


class SearchByURL(BaseModel):
    """JSON body of ``POST .../search``: an image on Label Studio's own origin (absolute, or a path such
    as ``/data/upload/12/cat.jpg``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"url": "/data/upload/1/cat.jpg"}]})

    url: str = Field(min_length=1, max_length=8192)


class SearchHit(BaseModel):
    task_id: int
    score: float = Field(description="cosine similarity of the embeddings, 1.0 = same direction")
    image: str | None = Field(default=None, description="the task's image URL; null when Label Studio was not asked")
    labeled: bool | None = Field(default=None, description="Label Studio's is_labeled; null when it was not asked")


class SearchResponse(BaseModel):
    """Top-k tasks, most similar first (the query task itself excluded)."""

    project: int
    task_id: int | None = Field(default=None, description="the query task (GET .../similar)")
    k: int
    embedder: str
    label_studio: LabelStudioState
    warning: str | None = None
    results: list[SearchHit]


class DuplicateMember(BaseModel):
    task_id: int
    similarity: float


class DuplicateGroupPublic(BaseModel):
    keeper: int
    min_similarity: float
    members: list[DuplicateMember]


class DuplicateStage(BaseModel):
    stage: Literal["bytes", "pixels", "perceptual", "embedding"]
    threshold: float
    seconds: float
    groups: list[DuplicateGroupPublic]


class DuplicatesResponse(BaseModel):
    """Each pass's groups (keeper first); ``duplicate_ids``: every task the report suggests removing."""

    project: int
    label_studio: LabelStudioState
    warning: str | None = None
    duplicate_ids: list[int]
    stages: list[DuplicateStage]
