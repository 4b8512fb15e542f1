"""httpx authentication for Label Studio, for both kinds of token it hands out.

Label Studio 1.2x issues *personal access tokens* (JWT refresh tokens, exchanged at
``/api/token/refresh/`` for short-lived access tokens sent as ``Bearer``) and, where enabled,
*legacy API tokens* (sent as ``Token``). Users paste either into our settings, so we tell them apart
by shape instead of asking. Image downloads run in a thread pool, so refreshing is serialised.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
from collections.abc import AsyncGenerator, Generator
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

__all__ = ["LabelStudioAuth", "LabelStudioAuthError", "TokenKind", "same_origin", "token_kind"]

TokenKind = Literal["legacy", "personal", "access"]

REFRESH_PATH = "/api/token/refresh/"
# Refresh this long before the access token's ``exp``: covers clock skew and slow downloads.
REFRESH_MARGIN_S = 30.0

_B64URL_SEGMENT = re.compile(r"[A-Za-z0-9_-]+={0,2}")


class LabelStudioAuthError(Exception):
    """Label Studio refused to exchange the personal access token (or could not be reached)."""


def _b64url_json(segment: str) -> Any:
    """Decode one JWT segment; raises ValueError when it is not base64url-encoded JSON."""
    padded = segment + "=" * (-len(segment) % 4)
    try:
        return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (binascii.Error, UnicodeError) as exc:
        raise ValueError(str(exc)) from exc


def jwt_payload(token: str) -> dict[str, Any] | None:
    """The unverified payload of a JWT-shaped token, or None when the token is not a JWT.

    We never verify signatures: Label Studio does that; we only read ``token_type`` and ``exp``.
    """
    parts = token.split(".")
    if len(parts) != 3 or not all(_B64URL_SEGMENT.fullmatch(p) for p in parts[:2]):
        return None
    try:
        payload = _b64url_json(parts[1])
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def token_kind(token: str) -> TokenKind:
    """Classify a token: JWT refresh token (personal access token), bare JWT access token, or legacy."""
    payload = jwt_payload(token)
    if payload is None:
        return "legacy"
    if payload.get("token_type") == "access":
        return "access"
    return "personal"


def _origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    """Scheme, host and effective port: what decides whether a request goes to Label Studio."""
    parts = urlsplit(str(url))
    scheme = parts.scheme.lower()
    default = {"http": 80, "https": 443}.get(scheme)
    try:
        port = parts.port or default
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port


def same_origin(a: str | httpx.URL, b: str | httpx.URL) -> bool:
    """Scheme, host and effective port all equal: the unit a Label Studio credential belongs to.

    URLs without an http(s) scheme or a host have no origin and match nothing (not even each other).
    """
    origin = _origin(a)
    return origin[0] in ("http", "https") and bool(origin[1]) and origin == _origin(b)


class LabelStudioAuth(httpx.Auth):
    """Adds Label Studio credentials to requests aimed at ``base_url`` (and only those).

    Requests to any other scheme/host/port pass through untouched, so a presigned S3 URL never
    sees the Label Studio token even if this auth ends up on a shared client.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``transport`` is used for the refresh call only (tests inject one; production leaves it)."""
        token = token.strip()
        if not token:
            raise ValueError("Label Studio token is empty")
        self.base_url = base_url.rstrip("/")
        self._origin = _origin(self.base_url)
        self._token = token
        self._kind: TokenKind = token_kind(token)
        self._timeout = timeout
        self._transport = transport
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._access: str | None = token if self._kind == "access" else None
        self._access_exp: float | None = self._exp_of(token) if self._kind == "access" else None
        self.refresh_count = 0

    @property
    def kind(self) -> TokenKind:
        """Which kind of token this is, decided once from its shape."""
        return self._kind

    def applies_to(self, url: str | httpx.URL) -> bool:
        """True when ``url`` is on Label Studio's scheme+host+port."""
        return _origin(url) == self._origin

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Attach credentials; for personal tokens, refresh ahead of expiry and once more on a 401."""
        if not self.applies_to(request.url):
            yield request
            return
        if self._kind == "legacy":
            request.headers["Authorization"] = f"Token {self._token}"
            yield request
            return
        access = self._current_access()
        request.headers["Authorization"] = f"Bearer {access}"
        response = yield request
        if response.status_code == 401 and self._kind == "personal":
            access = self._current_access(stale=access)
            request.headers["Authorization"] = f"Bearer {access}"
            yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:  # pragma: no cover - guard only
        """Refreshing does blocking I/O under a thread lock, so async clients are not supported."""
        raise RuntimeError("LabelStudioAuth is for synchronous httpx clients only")
        yield request  # makes this an (async) generator, as httpx expects

    def close(self) -> None:
        """Close the connection pool used for token refreshes."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- internals -------------------------------------------------------------------------------

    @staticmethod
    def _exp_of(token: str) -> float | None:
        """``exp`` claim of a JWT, or None when absent/unreadable (then we refresh only on 401)."""
        payload = jwt_payload(token)
        exp = payload.get("exp") if payload else None
        return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None

    def _expiring(self) -> bool:
        return self._access_exp is not None and self._access_exp - time.time() <= REFRESH_MARGIN_S

    def _current_access(self, *, stale: str | None = None) -> str:
        """A usable access token; ``stale`` names one the server just rejected.

        If another thread already replaced the stale token, its replacement is reused instead of
        refreshing again, so a burst of 401s costs one refresh.
        """
        with self._lock:
            usable = self._access is not None and self._access != stale and not self._expiring()
            if usable or self._kind == "access":
                if self._access is None:  # pragma: no cover - "access" kind always has one
                    raise LabelStudioAuthError("no access token")
                return self._access
            self._access, self._access_exp = self._refresh()
            return self._access

    def _refresh(self) -> tuple[str, float | None]:
        """Exchange the personal access token for a new access token (caller holds the lock)."""
        url = self.base_url + REFRESH_PATH
        if self._client is None:
            self._client = httpx.Client(transport=self._transport, timeout=self._timeout, follow_redirects=False)
        try:
            response = self._client.post(url, json={"refresh": self._token})
        except httpx.HTTPError as exc:
            raise LabelStudioAuthError(
                f"could not refresh the Label Studio access token at {url}: {type(exc).__name__}: {exc}"
            ) from exc
        if response.status_code != 200:
            hint = (
                " (the personal access token is invalid, expired or revoked)"
                if response.status_code in (401, 403)
                else ""
            )
            raise LabelStudioAuthError(
                f"Label Studio refused to refresh the access token: POST {url} answered "
                f"HTTP {response.status_code}{hint}"
            )
        try:
            access = response.json()["access"]
        except (ValueError, KeyError, TypeError) as exc:
            raise LabelStudioAuthError(f"unexpected answer from POST {url}: no 'access' field") from exc
        if not isinstance(access, str) or not access:
            raise LabelStudioAuthError(f"unexpected answer from POST {url}: empty 'access' field")
        self.refresh_count += 1
        return access, self._exp_of(access)
