"""Optional HTTP basic auth, as Label Studio's model connection settings send it."""

from __future__ import annotations

import base64
import binascii
import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from backend.config import Settings

# Label Studio cannot send basic auth with webhooks (issue 3 secures them with a shared header).
OPEN_PATHS = frozenset({"/webhook"})


class BasicAuthMiddleware:
    """Refuses requests without the configured user and password (401 with a challenge)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.user = settings.basic_auth_user or ""
        self.password = settings.basic_auth_pass.get_secret_value() if settings.basic_auth_pass else ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorised(scope):
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

    def _authorised(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return secrets.compare_digest(user, self.user) & secrets.compare_digest(password, self.password)
