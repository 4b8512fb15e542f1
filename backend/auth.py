"""Optional HTTP basic auth, as Label Studio's model connection settings send it, and an optional API key.

Two credentials, two audiences:

- basic auth (``DINOLABEL_BASIC_AUTH_USER``/``_PASS``) is what Label Studio's model connection sends; when
  set, every route needs it except ``/webhook`` (which checks its own secret);
- the API key (``DINOLABEL_API_KEY``) is for scripts and the CLI on the ``/v1`` routes (jobs, search,
  duplicates): when set, a ``/v1`` request needs ``Authorization: Bearer <key>``, or the basic-auth
  credentials when those are configured too (one header cannot carry both, so either opens ``/v1``).
  Label Studio's routes (``/predict``, ``/setup``, ``/health``, ``/webhook``) keep the basic-auth rule.

Both are compared as bytes in constant time, and never logged.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from backend.config import Settings

# Label Studio cannot send basic auth with webhooks: /webhook checks its shared secret (or these
# credentials) itself, and acknowledges other events without either.
OPEN_PATHS = frozenset({"/webhook"})
API_PREFIX = "/v1/"
"""Routes that take the API key."""


def basic_auth_valid(settings: Settings, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """True when basic auth is configured and the ``Authorization`` header carries its user and password.

    Compared as bytes, in constant time: any header, ASCII or not, is a plain no. Non-ASCII credentials
    are accepted in the two charsets clients use: UTF-8 (RFC 7617, browsers, httpx, curl) and latin-1
    (``requests``, so Label Studio's model connection).
    """
    if not settings.basic_auth_user:
        return False
    password = settings.basic_auth_pass.get_secret_value() if settings.basic_auth_pass else ""
    pair = f"{settings.basic_auth_user}:{password}"
    expected = [pair.encode()]
    if not pair.isascii() and all(ord(c) < 256 for c in pair):
        expected.append(pair.encode("latin-1"))
    header = dict(headers).get(b"authorization", b"")
    scheme, _, encoded = header.partition(b" ")
    if scheme.lower() != b"basic":
        return False
    try:
        sent = base64.b64decode(encoded.strip(), validate=True)
    except binascii.Error:
        return False
    return any([secrets.compare_digest(sent, candidate) for candidate in expected])


def api_key_valid(settings: Settings, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """True when an API key is configured and ``Authorization: Bearer <key>`` carries it (constant time)."""
    if settings.api_key is None:
        return False
    header = dict(headers).get(b"authorization", b"")
    scheme, _, sent = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return secrets.compare_digest(sent.strip(), settings.api_key.get_secret_value().encode())


class AuthMiddleware:
    """Refuses requests without the credentials their route needs (401 with the challenges it accepts)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        basic = bool(self.settings.basic_auth_user)
        if scope["path"].startswith(API_PREFIX) and self.settings.api_key is not None:
            allowed = api_key_valid(self.settings, scope["headers"]) or basic_auth_valid(
                self.settings, scope["headers"]
            )
            challenges = [b'Bearer realm="dinolabel"'] + ([b'Basic realm="dinolabel"'] if basic else [])
            reason = "an API key is required: send Authorization: Bearer <DINOLABEL_API_KEY>"
            if basic:
                reason += ", or this service's basic-auth credentials"
        else:
            allowed = not basic or basic_auth_valid(self.settings, scope["headers"])
            challenges = [b'Basic realm="dinolabel"']
            reason = "basic auth required: set the user and password in Label Studio's model settings"
        if allowed:
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": reason}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    *((b"www-authenticate", challenge) for challenge in challenges),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
