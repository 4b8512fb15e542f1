"""Request bodies are parsed as strict JSON: standard numbers, well-formed strings, a bounded depth.

Python's ``json`` module accepts what JSON does not (``NaN``, ``Infinity``, ``1e999`` read as infinity,
lone UTF-16 surrogates in strings) and raises ``RecursionError`` on deep nesting. Each of those got
past validation and broke later: a 422 that cannot be rendered (``NaN`` in the error), a 500 on
``[[[[...``, a string that cannot be encoded for a reply. Every route of ours uses
:class:`StrictJSONRoute`, so whatever reads ``await request.json()`` (FastAPI for declared bodies, a
handler reading the body itself) gets either clean JSON or a ``json.JSONDecodeError`` with the reason,
which FastAPI answers with a 422 and our handlers with a 4xx.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)

MAX_JSON_DEPTH = 64
"""Most nested arrays/objects in a request body; Label Studio's deepest (polygon points in a task's
annotations) is about 10."""


class StrictJSONRequest(Request):
    """A request whose ``json()`` refuses what strict JSON refuses (see the module docstring)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route that hands its handler (and FastAPI's body parsing) a :class:`StrictJSONRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


async def read_model(request: Request, model: type[Model]) -> Model:
    """The body as ``model``, for a handler that reads its body itself (one that also takes uploads):
    refused exactly as FastAPI refuses a declared body (a 422 naming the problem and its place)."""
    try:
        return model.model_validate(await request.json())
    except json.JSONDecodeError as exc:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error", "ctx": {"error": exc.msg}}]
        ) from None
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False, include_input=False)]
        ) from None


def parse_json(body: bytes | str) -> Any:
    """Decode strict JSON; anything else raises ``json.JSONDecodeError`` saying what was wrong."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
    except UnicodeDecodeError:
        raise json.JSONDecodeError("the body is not UTF-8 text", "", 0) from None
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError(f"nested deeper than {MAX_JSON_DEPTH} levels", text, 0) from None
    except ValueError as exc:  # _no_constant, _finite_float, integers longer than Python reads
        raise json.JSONDecodeError(str(exc), text, 0) from None
    _check_nesting_and_strings(value, text)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {literal[:20]} is out of range")
    return value


def _check_nesting_and_strings(value: Any, text: str) -> None:
    """Depth at most MAX_JSON_DEPTH; every string (keys too) encodable as UTF-8 (no lone surrogates)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            items: Any = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            _check_string(node, text)
            continue
        if depth > MAX_JSON_DEPTH:
            raise json.JSONDecodeError(f"nested deeper than {MAX_JSON_DEPTH} levels", text, 0)
        for key, child in items:
            _check_string(key, text)
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
            else:
                _check_string(child, text)


def _check_string(value: Any, text: str) -> None:
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise json.JSONDecodeError("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)", text, 0) from None
