"""Which Label Studio address and key go together: one rule for the API, the workers and the CLI.

Two sources name a Label Studio: the operator (``DINOLABEL_LABEL_STUDIO_URL`` and ``_API_KEY``) and
``/setup``, which anyone who can reach the backend may call with any ``hostname`` and
``access_token``. A key must only ever travel to the origin it came with, so the two sources are
never mixed:

- the operator's URL and key, when both are configured;
- the operator's URL alone: ``/setup``'s token only if ``/setup``'s hostname is that same origin,
  otherwise no key;
- no operator URL: ``/setup``'s hostname with ``/setup``'s token.

A key without a URL is refused by ``Settings`` at start-up. Nothing here is stored: job records and
queue payloads carry the project id, and each process resolves the pair from its own settings and
the project's ``/setup`` record (a worker may reach Label Studio by another address than the API).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from backend.config import Settings
from backend.ls_auth import same_origin

__all__ = ["LabelStudioAccess", "label_studio_access"]


@dataclass(frozen=True)
class LabelStudioAccess:
    """A Label Studio base URL and the key that may be sent to it (either may be missing)."""

    url: str | None
    api_key: str | None = field(default=None, repr=False)


def label_studio_access(
    settings: Settings, hostname: str | None = None, access_token: str | None = None
) -> LabelStudioAccess:
    """The Label Studio to talk to, and its key, from ``settings`` and what ``/setup`` sent.

    ``hostname`` and ``access_token`` are the project's ``/setup`` values (None when the project
    never called ``/setup``).
    """
    operator_url = settings.label_studio_url
    if not operator_url:
        return LabelStudioAccess(url=hostname or None, api_key=access_token or None)
    if settings.label_studio_api_key is not None:
        return LabelStudioAccess(url=operator_url, api_key=settings.label_studio_api_key.get_secret_value())
    token = access_token if access_token and hostname and same_origin(hostname, operator_url) else None
    return LabelStudioAccess(url=operator_url, api_key=token)
