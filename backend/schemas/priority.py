"""HTTP models of the labeling priority API (``/v1/projects/{id}/prioritize``, ``.../priority``)."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from backend.schemas.tasks import Id

MAX_LIKE_TASKS = 1000
"""Example tasks one "more like these" request may name (each is a query vector)."""
MAX_LIKE_IMAGES = 16
"""Example images one request may upload (each is checked like a search upload and becomes a query vector)."""


class PrioritizeRequest(BaseModel):
    """Optional body of ``POST /v1/projects/{id}/prioritize``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"like_task_ids": [4, 17]}, {"like_label": "bicycle"}, {"uncertainty_weight": 0.3}]
        },
    )

    like_task_ids: list[Id] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_LIKE_TASKS,
        description="example tasks (indexed): their nearest unlabeled tasks go to the front, balanced across "
        "k-means clusters",
    )
    like_label: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="a label of the project's labeling config: the boxes annotated with it (the most recent, at "
        "most 32, spread over tasks) are the examples",
    )
    uncertainty_weight: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="w in score = (1 - w) * distance + w * uncertainty, where uncertainty in [0, 1] comes from "
        "the boxes of each task's prediction by the current detector model version (tasks without one get no "
        "uncertainty term); default DINOLABEL_PRIORITY_UNCERTAINTY_WEIGHT (0.3); 0: diversity alone",
    )

    @model_validator(mode="after")
    def one_kind_of_examples(self) -> Self:
        if self.like_task_ids is not None and self.like_label is not None:
            raise ValueError("like_task_ids and like_label: name example tasks or a label, not both")
        return self


class PriorityJobPublic(BaseModel):
    """A prioritize run: queued, running, done or failed (``error`` says why, naming no secret)."""

    id: str
    project: int
    status: str = Field(description="`queued`, `running`, `done` or `failed`")
    source: str = Field(
        description="`api`, `annotations` (annotation events), or `index job ID` (the index job whose end started it)"
    )
    created_at: float
    started_at: float | None
    finished_at: float | None
    like_task_ids: list[int]
    like_label: str | None = Field(default=None, description="the label whose annotated boxes are the examples")
    like_images: int | None = Field(default=None, description="uploaded example images")
    like_boxes: int | None = Field(default=None, description="annotated boxes of `like_label` embedded as examples")
    like: str | None = Field(
        default=None,
        description="the examples of \"more like these\": `tasks 4, 17`, `label 'bicycle': 12 annotated boxes` or "
        "`3 uploaded images`; null: none",
    )
    uncertainty_weight: float | None = Field(description="the weight asked for; once done, the weight used")
    embedder: str | None = Field(description="the embedder version whose vectors were ranked")
    detector: str | None = Field(default=None, description="the detector model version whose predictions were read")
    predicted: int | None = Field(
        default=None, description="ranked tasks holding a prediction of that version (each with an uncertainty)"
    )
    moved_by_uncertainty: int | None = Field(
        default=None, description="ranked tasks that their uncertainty moved ahead (reason `uncertain`)"
    )
    vectors: int | None = Field(description="tasks with a vector of that version")
    labeled: int | None = Field(description="labeled tasks listed from Label Studio (seeds, not ranked)")
    ranked: int | None = Field(description="tasks holding a rank in Label Studio afterwards")
    duplicates: int | None = Field(description="ranked last as duplicates of a labeled or higher-ranked task")
    write_calls: int | None = Field(description="Label Studio write calls the ranking took")
    tab_id: int | None = Field(description='the "dinolabel priority" Data Manager tab')
    error: str | None
    skipped: str | None = Field(
        default=None,
        description="an automatic re-ranking that found the project's ranking removed (its tab gone) says so "
        "here and ends without writing; the project is re-ranked again once prioritized again",
    )


class TaskPriority(BaseModel):
    """Why one task ranks where it does (``indexer.priority.Ranking.explain``)."""

    task_id: int
    rank: int
    reason: str = Field(description="`like`, `diverse`, `tail` or `duplicate`")
    distance: float | None = Field(description="cosine distance to `nearest` when placed")
    nearest: int | None = Field(description="the nearest labeled or higher-ranked task when placed")
    nearest_is_labeled: bool | None
    duplicate_of: int | None
    uncertainty: float | None = Field(description="the detector's uncertainty in [0, 1]; null: no prediction")
    uncertainty_moved: bool = Field(
        default=False,
        description="the uncertainty moved the task ahead: without it, the task ranked next would have come first "
        "(the Data Manager's reason column says `uncertain`)",
    )
    like: float | None = Field(description='best cosine to the "more like these" examples')
    text: str


class PriorityRanking(BaseModel):
    """The head of the project's last ranking, and the first tasks pushed back as duplicates."""

    project: int
    job_id: str
    ranked_at: float
    embedder: str
    ranked: int
    labeled: int
    duplicates: int
    head: list[TaskPriority]
    pushed_back: list[TaskPriority]
