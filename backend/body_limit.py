"""A cap on request bodies, for every route: ``DINOLABEL_MAX_REQUEST_BYTES``.

Pure ASGI, so it sees the bytes before FastAPI buffers and parses them: a declared
``Content-Length`` over the limit is refused before anything is read, and a chunked (or lying) body
is cut off as soon as the bytes received pass the limit. Either way the answer is a 413 that names
the limit.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimitMiddleware"]


class BodyTooLarge(Exception):
    """Raised from ``receive`` once a body passes the limit; the middleware answers 413."""


async def _refuse(send: Send, limit: int) -> None:
    """Send the 413 that names the limit and the setting that raises it."""
    body = json.dumps(
        {"detail": f"request body too large: the limit is {limit:,} bytes (DINOLABEL_MAX_REQUEST_BYTES)"}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),  # the rest of the body is not read
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Answers 413 to requests whose body is (or turns out to be) larger than ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _refuse(send, self.max_bytes)
            return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:  # whatever the app makes of the interrupted body (FastAPI: a 400), it is a 413
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:  # after the cut, any error is the app's view of the interrupted body
                raise
        if exceeded and not started:
            await _refuse(send, self.max_bytes)
