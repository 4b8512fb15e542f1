"""Optional HTTP basic auth, as Label Studio's model connection settings send it."""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from backend.config import Settings

# Label Studio cannot send basic auth with webhooks: /webhook checks its shared secret (or these
# credentials) itself, and acknowledges other events without either.
OPEN_PATHS = frozenset({"/webhook"})


def basic_auth_valid(settings: Settings, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """True when basic auth is configured and the ``Authorization`` header carries its user and password.

    Compared as bytes (UTF-8 on our side), in constant time: any header, ASCII or not, is a plain no.
    """
    if not settings.basic_auth_user:
        return False
    password = settings.basic_auth_pass.get_secret_value() if settings.basic_auth_pass else ""
    expected = f"{settings.basic_auth_user}:{password}".encode()
    header = dict(headers).get(b"authorization", b"")
    scheme, _, encoded = header.partition(b" ")
    if scheme.lower() != b"basic":
        return False
    try:
        sent = base64.b64decode(encoded.strip(), validate=True)
    except binascii.Error:
        return False
    return secrets.compare_digest(sent, expected)


class BasicAuthMiddleware:
    """Refuses requests without the configured user and password (401 with a challenge)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or basic_auth_valid(self.settings, scope["headers"]):
            await self.app(scope, receive, send)
            return
        body = b'{"detail":"basic auth required: set the user and password in Label Studio\'s model settings"}'
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b'Basic realm="dinolabel"'),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
