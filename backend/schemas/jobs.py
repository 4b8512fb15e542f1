"""HTTP models of the job API (``/v1``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from backend.schemas.tasks import Id


class PreannotateRequest(BaseModel):
    """Optional body of ``POST /v1/projects/{id}/preannotate``: restrict the job to some tasks."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"task_ids": [1, 2, 3]}]})

    task_ids: list[Id] | None = Field(default=None, min_length=1)


class IndexRequest(BaseModel):
    """Optional body of ``POST /v1/projects/{id}/index``: some tasks only, or a full re-sync."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"task_ids": [1, 2, 3]}, {"sync": True}]})

    task_ids: list[Id] | None = Field(default=None, min_length=1)
    sync: bool = Field(
        default=False,
        description="re-check every task's image (re-embed the changed ones) and remove the vectors of tasks "
        "no longer in the project; cannot be combined with task_ids",
    )


class Failure(BaseModel):
    task_id: int | None
    reason: str
    at: float


class JobPublic(BaseModel):
    """A bulk job's progress: ``done + skipped + failed + remaining == total`` once planned."""

    id: str
    project: int
    model_version: str = Field(description="the detector's model version, or for an index job the embedder's")
    source: str
    kind: str = Field(default="preannotate", description="`preannotate` or `index`")
    status: str
    total: int
    done: int
    skipped: int
    failed: int
    remaining: int
    created_at: float
    finished_at: float | None
    tasks_per_second: float
    eta_seconds: float | None = Field(default=None, description="remaining / tasks_per_second while running")
    failures: list[Failure]
    failures_total: int
