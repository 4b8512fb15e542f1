"""HTTP models of the labeling priority API (``/v1/projects/{id}/prioritize``, ``.../priority``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from backend.schemas.tasks import Id

MAX_LIKE_TASKS = 1000
"""Example tasks one "more like these" request may name (each is a query vector)."""


class PrioritizeRequest(BaseModel):
    """Optional body of ``POST /v1/projects/{id}/prioritize``."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"like_task_ids": [4, 17]}, {"uncertainty_weight": 0.3}]}
    )

    like_task_ids: list[Id] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_LIKE_TASKS,
        description="example tasks (indexed): their nearest unlabeled tasks go to the front, balanced across "
        "k-means clusters",
    )
    uncertainty_weight: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="w in score = (1 - w) * distance + w * uncertainty (default 0.3); it takes effect where "
        "per-task uncertainties are given, which no run feeds yet",
    )


class PriorityJobPublic(BaseModel):
    """A prioritize run: queued, running, done or failed (``error`` says why, naming no secret)."""

    id: str
    project: int
    status: str = Field(description="`queued`, `running`, `done` or `failed`")
    source: str = Field(description="`api`, or the index job whose end started it")
    created_at: float
    started_at: float | None
    finished_at: float | None
    like_task_ids: list[int]
    uncertainty_weight: float | None
    embedder: str | None = Field(description="the embedder version whose vectors were ranked")
    vectors: int | None = Field(description="tasks with a vector of that version")
    labeled: int | None = Field(description="labeled tasks listed from Label Studio (seeds, not ranked)")
    ranked: int | None = Field(description="tasks holding a rank in Label Studio afterwards")
    duplicates: int | None = Field(description="ranked last as duplicates of a labeled or higher-ranked task")
    write_calls: int | None = Field(description="Label Studio write calls the ranking took")
    tab_id: int | None = Field(description='the "dinolabel priority" Data Manager tab')
    error: str | None


class TaskPriority(BaseModel):
    """Why one task ranks where it does (``indexer.priority.Ranking.explain``)."""

    task_id: int
    rank: int
    reason: str = Field(description="`like`, `diverse`, `tail` or `duplicate`")
    distance: float | None = Field(description="cosine distance to `nearest` when placed")
    nearest: int | None = Field(description="the nearest labeled or higher-ranked task when placed")
    nearest_is_labeled: bool | None
    duplicate_of: int | None
    uncertainty: float | None
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
