"""Lists of Label Studio tasks from outside, checked once where they enter, one task at a time.

A webhook's tasks (and any list a job is given) are untrusted: a task that is not
``{"id": <integer>, "data": {...}}`` is refused *alone*, with its reason, and the others go on. Before
this, one task whose ``data`` was a string failed every task of its batch, and an id that was an object
left its job planning forever. Refusals become failures of the job (``BulkJob.create(rejected=...)``),
so they are visible in ``GET /v1/jobs/{id}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from backend.schemas.tasks import Id, Task

_ID: TypeAdapter[int] = TypeAdapter(Id)


@dataclass(frozen=True)
class Rejection:
    """A task refused where it entered: its id when it had a usable one, and why."""

    task_id: int | None
    reason: str


@dataclass(frozen=True)
class CheckedTasks:
    """The usable tasks as ``{"id": int, "data": dict}``, in the order given, and the refused ones."""

    tasks: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def check_tasks(raw: Sequence[object]) -> CheckedTasks:
    """Keep each task with an integer id in range and an object as ``data``; refuse the others.

    A task id given twice is kept once (the first): predicting it twice would write two predictions.
    """
    checked = CheckedTasks()
    seen: set[int] = set()
    for index, item in enumerate(raw):
        try:
            task = Task.model_validate(item)
        except ValidationError as exc:
            checked.rejected.append(Rejection(usable_id(item), f"task #{index} refused: {describe(exc)}"))
            continue
        if task.id is None:
            checked.rejected.append(Rejection(None, f"task #{index} refused: it has no id"))
        elif task.id in seen:
            checked.rejected.append(Rejection(task.id, f"task #{index} refused: id {task.id} is given twice"))
        else:
            seen.add(task.id)
            checked.tasks.append({"id": task.id, "data": task.data})
    return checked


def usable_id(item: object) -> int | None:
    """The task's id if it is a valid one (to name the task in its failure), else None."""
    if not isinstance(item, dict):
        return None
    try:
        return _ID.validate_python(item.get("id"))
    except ValidationError:
        return None


def describe(exc: ValidationError, *, most: int = 3) -> str:
    """A validation error in words, without the refused values: ``data: Input should be a valid dictionary``."""
    problems = exc.errors(include_url=False, include_input=False, include_context=False)
    words = [f"{'.'.join(str(p) for p in e['loc']) or 'task'}: {e['msg']}" for e in problems[:most]]
    if len(problems) > most:
        words.append(f"and {len(problems) - most} more")
    return "; ".join(words)
