"""The body of every error answer (4xx, 5xx), as ``backend/errors.py`` renders it."""

from __future__ import annotations

from pydantic import BaseModel


class FieldProblem(BaseModel):
    """One refused field of a request: where (``["body", "tasks", 0, "id"]``), what is wrong, a code."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """``detail``: the reason in words, or for a malformed request the list of refused fields."""

    detail: str | list[FieldProblem]
