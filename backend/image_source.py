"""Resolve the image value of a Label Studio task into raw bytes.

A task's ``$image`` can be an upload (``/data/upload/<project>/<file>``), a Local Files storage URL
(``/data/local-files/?d=<path>``, sometimes absolute on the Label Studio host), a cloud URI that only
Label Studio can presign (``s3://``, ``gs://``, ``azure-blob://``), a plain web URL or a data URI.
Each needs different credentials, and the Label Studio token must never leak, so the rules live in
one place: the token goes only to Label Studio's file routes (uploads, local files, storage data,
presign), never to its API or to any other host. Files that sit on a shared disk are read directly,
which is faster and spares Label Studio, and never from outside the folder they belong to (symlinks
resolved). Which addresses may be fetched at all, and the total time a fetch may take, are kept by
``backend.fetch_network``. Decoding is not done here (see ``model.images``), and no failure reason
ever quotes what a server sent: task data is untrusted, and reasons reach job records.
"""

from __future__ import annotations

import base64
import binascii
import os
import posixpath
import re
import stat
from collections.abc import Iterable
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self
from urllib.parse import (
    parse_qs,
    parse_qsl,
    quote,
    unquote,
    unquote_to_bytes,
    urlencode,
    urlsplit,
    urlunsplit,
)

import httpx

from backend.fetch_network import AddressPolicy, AddressRefused, GuardedTransport, fetch_deadline, time_left
from backend.ls_auth import LabelStudioAuth, LabelStudioAuthError, same_origin

if TYPE_CHECKING:
    from backend.config import Settings
    from backend.ls_credentials import LabelStudioAccess

__all__ = ["ImageFetchError", "ImageFetcher", "redact_url"]

USER_AGENT = "dinolabel-image-fetcher (Label Studio ML backend)"
CLOUD_PREFIXES = ("s3://", "gs://", "azure-blob://", "azure-spi://", "azure_spi://")
MAX_REDIRECTS = 5

_UPLOAD_PREFIX = "/data/upload/"
_UPLOAD_DIR = "upload/"  # where uploads sit under Label Studio's MEDIA_ROOT
_LOCAL_FILES_PATHS = frozenset({"/data/local-files", "/data/local-files/"})
# Newer Label Studio serves uploads kept in cloud-backed media storage through this proxy.
_STORAGE_DATA_PATHS = frozenset({"/storage-data/uploaded", "/storage-data/uploaded/"})
# Label Studio routes that serve files: the only paths that get the token (the API never does).
_PRESIGN_PATH = re.compile(r"/tasks/\d+/(?:presign|resolve)/?")
_SECRET_WORDS = ("sig", "token", "key", "secret", "password", "credential", "policy", "auth")


class ImageFetchError(Exception):
    """An image could not be fetched; the message names the (redacted) URL and the reason.

    Reasons say what happened (status, time-out, refusal, size) and never quote fetched bytes.
    """

    def __init__(self, url: str, reason: str, *, status: int | None = None) -> None:
        """``url`` is redacted here, so callers may pass the raw value; ``status`` is the HTTP status."""
        self.url = redact_url(url)
        self.reason = reason
        self.status = status
        super().__init__(f"cannot fetch image {self.url}: {reason}")


def redact_url(url: str) -> str:
    """A URL fit for logs and error messages: no user:password, no signature/token query values."""
    if url[:5].lower() == "data:":
        header = url[5:].split(",", 1)[0]
        return f"data:{header},... ({len(url)} chars)"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret(name) for name, _ in pairs):
            redacted = [(name, "***" if _is_secret(name) else value) for name, value in pairs]
            query = urlencode(redacted, safe="/:*", quote_via=quote)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith(("x-amz-", "x-goog-")) or any(word in lowered for word in _SECRET_WORDS)


class ImageFetcher:
    """Fetches task images from Label Studio, shared disks, cloud storage (via presign) or the web.

    Thread-safe: one instance is shared by the download thread pool (httpx's pool and the token
    refresh are both safe to use concurrently; each fetch's deadline belongs to its thread).
    """

    def __init__(
        self,
        *,
        label_studio_url: str | None,
        api_key: str | None,
        document_root: Path | None = None,
        media_root: Path | None = None,
        timeout: float = 15.0,
        total_timeout: float = 30.0,
        max_bytes: int = 50 * 1024 * 1024,
        allow: Iterable[str] = (),
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``document_root``/``media_root`` mirror Label Studio's LOCAL_FILES_DOCUMENT_ROOT and MEDIA_ROOT.

        ``timeout`` bounds each connect and each read; ``total_timeout`` the whole fetch (connect, every
        read, every redirect hop). ``allow`` lists the hosts, IP addresses or CIDR networks (``*``: all)
        that may be fetched although not public; Label Studio's own origin always may. ``transport``
        replaces the guarded network (tests of other layers only: it skips the address policy).
        """
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if timeout <= 0 or total_timeout <= 0:
            raise ValueError(f"timeouts must be positive, got {timeout} and {total_timeout}")
        base = label_studio_url.strip().rstrip("/") if label_studio_url else ""
        # A malformed URL (e.g. a /setup hostname without scheme) fails the fetches that need it,
        # with this reason, instead of failing construction and with it every other image.
        self._ls_problem: str | None = None
        try:
            origins = [_host_port(base)] if base else []  # Label Studio's own address is always allowed
        except (ValueError, httpx.InvalidURL):
            self._ls_problem, base, origins = f"the Label Studio URL {redact_url(base)!r} is malformed", "", []
        if base and urlsplit(base).scheme.lower() not in ("http", "https"):
            self._ls_problem = f"the Label Studio URL {redact_url(base)!r} does not start with http:// or https://"
            base, origins = "", []
        self._ls_base = base or None
        self._ls_path = urlsplit(self._ls_base).path.rstrip("/") if self._ls_base else ""
        key = api_key.strip() if api_key else ""
        self._auth = (
            LabelStudioAuth(self._ls_base, key, timeout=timeout, transport=transport) if self._ls_base and key else None
        )
        self._document_root = document_root
        self._media_root = media_root
        self._timeout = timeout
        self._total_timeout = total_timeout
        self._max_bytes = max_bytes
        self._client = httpx.Client(
            transport=transport or GuardedTransport(AddressPolicy.parse(allow, origins=origins)),
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,  # redirects are followed by hand, deciding auth per hop
            headers={"User-Agent": USER_AGENT},
            # Stateless: cookies ignore ports, so a Label Studio session cookie would otherwise
            # ride along to any other service on the same host (and be shared between threads).
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        )

    # -- public API ------------------------------------------------------------------------------

    @property
    def total_timeout(self) -> float:
        """Seconds one fetch may take in all; callers waiting on a fetch need not wait longer."""
        return self._total_timeout

    def fetch(self, value: str, *, task_id: int | None = None) -> bytes:
        """The bytes behind a task's image value; ``task_id`` is needed for cloud URIs only."""
        if not isinstance(value, str) or not value.strip():
            raise ImageFetchError(repr(value), "empty image reference in task data")
        try:
            with fetch_deadline(self._total_timeout):
                return self._fetch(value.strip(), task_id)
        except (ValueError, httpx.InvalidURL) as exc:  # from URL parsing: one bad task, not a crashed batch
            raise ImageFetchError(value, f"malformed URL ({exc})") from None

    def _fetch(self, value: str, task_id: int | None) -> bytes:
        lowered = value[:16].lower()
        if lowered.startswith("data:"):
            return self._from_data_uri(value)
        if lowered.startswith(CLOUD_PREFIXES):
            return self._from_cloud(value, task_id)
        if value.startswith(("upload/", "/upload/")):  # raw upload keys seen in exports
            value = "/data/" + value.lstrip("/")
        if value.startswith("/") and not value.startswith("//"):
            return self._from_label_studio(value, display=value)
        scheme = urlsplit(value).scheme.lower()
        if scheme in ("http", "https"):
            relative = self._relative_to_label_studio(value)
            if relative is not None and self._is_label_studio_media(relative):
                return self._from_label_studio(relative, display=value)
            return self._download(value, display=value)
        raise ImageFetchError(
            value,
            f"unsupported image reference (scheme {scheme or 'missing'!r}); expected http(s)://, "
            "/data/upload/..., /data/local-files/?d=..., s3://, gs://, azure-blob:// or data:",
        )

    def close(self) -> None:
        """Release pooled connections (HTTP and token refresh)."""
        if self._auth is not None:
            self._auth.close()
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- Label Studio paths ----------------------------------------------------------------------

    def _relative_to_label_studio(self, url: str) -> str | None:
        """Path+query of ``url`` relative to Label Studio's base URL, or None when it is elsewhere."""
        if self._ls_base is None or not same_origin(url, self._ls_base):
            return None
        parts = urlsplit(url)
        if not parts.path.startswith(self._ls_path + "/"):
            return None
        relative = parts.path[len(self._ls_path) :]
        return relative + (f"?{parts.query}" if parts.query else "")

    @staticmethod
    def _is_label_studio_media(relative: str) -> bool:
        path = urlsplit(relative).path
        return path.startswith(_UPLOAD_PREFIX) or path in _LOCAL_FILES_PATHS or path in _STORAGE_DATA_PATHS

    def _sends_token(self, url: str) -> bool:
        """True when ``url`` is one of Label Studio's file routes: the only requests that carry the token.

        Decided on the path httpx will send (dot segments removed); a path with a percent-encoded
        ``..`` left in it gets no token.
        """
        if self._auth is None or not self._auth.applies_to(url):
            return False
        path = httpx.URL(url).path
        if not path.startswith(self._ls_path + "/") or ".." in path.split("/"):
            return False
        route = path[len(self._ls_path) :]
        return (
            route.startswith(_UPLOAD_PREFIX)
            or route in _LOCAL_FILES_PATHS
            or route in _STORAGE_DATA_PATHS
            or _PRESIGN_PATH.fullmatch(route) is not None
        )

    def _from_label_studio(self, relative: str, *, display: str) -> bytes:
        """Uploads and Local Files: read from the shared disk when configured, else via Label Studio."""
        parts = urlsplit(relative)
        path = parts.path
        if path.startswith(_UPLOAD_PREFIX):
            key = _upload_key(unquote(path[len("/data/") :]), display)  # "upload/<project>/<file>"
            local = self._existing_media_file(key, display)
            if local is not None:
                return self._read_local(local, display)
            return self._download_upload(relative, key, display)
        if path in _LOCAL_FILES_PATHS:
            relative_path = _last_query_value(parts.query, "d")
            if not relative_path:
                raise ImageFetchError(display, "Local Files URL has no ?d=<path> parameter")
            if self._document_root is not None:
                local = _join_under(self._document_root, relative_path, display, "local files document root")
                return self._read_local(local, display)
            return self._download(self._label_studio_url(relative, display), display=display)
        if path in _STORAGE_DATA_PATHS:
            key = _last_query_value(parts.query, "filepath")
            # Only uploads are read from disk; anything else (avatars) is Label Studio's to decide.
            is_upload = key is not None and key.startswith(_UPLOAD_DIR)
            local = self._existing_media_file(_upload_key(key, display), display) if key and is_upload else None
            if local is not None:
                return self._read_local(local, display)
        return self._download(self._label_studio_url(relative, display), display=display)

    def _download_upload(self, relative: str, key: str, display: str) -> bytes:
        """GET an upload; if Label Studio keeps media in cloud storage, /data/upload 404s: use the proxy."""
        try:
            return self._download(self._label_studio_url(relative, display), display=display)
        except ImageFetchError as first:
            if first.status != 404:
                raise
            proxy = "/storage-data/uploaded/?" + urlencode({"filepath": key})
            try:
                return self._download(self._label_studio_url(proxy, display), display=display)
            except ImageFetchError:
                raise first from None

    def _from_cloud(self, uri: str, task_id: int | None) -> bytes:
        """Ask Label Studio to presign a cloud URI for this task, then follow its redirect.

        Label Studio 1.2x serves ``GET /tasks/<id>/presign/?fileuri=<urlsafe base64 of the URI>``
        (also mounted as ``/tasks/<id>/resolve/``): 303 to a presigned URL, or 200 with the bytes
        when the storage has presigning turned off and proxies instead.
        """
        if task_id is None:
            raise ImageFetchError(
                uri, "cloud storage URIs are presigned by Label Studio per task, but no task id was given"
            )
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            raise ImageFetchError(uri, f"task id must be an integer, got {task_id!r}")
        fileuri = base64.urlsafe_b64encode(uri.encode("utf-8")).decode("ascii")
        relative = f"/tasks/{task_id}/presign/?" + urlencode({"fileuri": fileuri})
        return self._download(self._label_studio_url(relative, uri), display=uri)

    def _label_studio_url(self, relative: str, display: str) -> str:
        """Absolute Label Studio URL for ``relative``, or a clear error when we cannot authenticate."""
        if self._ls_problem is not None:
            raise ImageFetchError(display, f"this image is served by Label Studio, but {self._ls_problem}")
        if self._ls_base is None:
            raise ImageFetchError(
                display,
                "this image is served by Label Studio, but no Label Studio URL is configured "
                "(set DINOLABEL_LABEL_STUDIO_URL, or connect the model from Label Studio so /setup sends it)",
            )
        if self._auth is None:
            raise ImageFetchError(
                display,
                "this image is served by Label Studio, but no Label Studio API key is configured "
                "(set DINOLABEL_LABEL_STUDIO_API_KEY to a personal access token or legacy token)",
            )
        return self._ls_base + relative

    # -- local disk ------------------------------------------------------------------------------

    def _existing_media_file(self, key: str, display: str) -> Path | None:
        """``media_root/<key>`` for an upload key, when configured and present; None means "ask Label Studio"."""
        if self._media_root is None:
            return None
        upload = Path(self._media_root) / _UPLOAD_DIR
        candidate = _join_under(upload, key[len(_UPLOAD_DIR) :], display, "media root's upload folder")
        return candidate if candidate.is_file() else None

    def _read_local(self, path: Path, display: str) -> bytes:
        """Read a file from disk with the same size limit as downloads.

        ``path`` is already resolved: a symlink found there now was swapped in since, and is refused
        (``O_NOFOLLOW``); ``O_NONBLOCK`` keeps a FIFO from blocking the open.
        """
        try:
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
            with os.fdopen(os.open(path, flags), "rb") as handle:
                info = os.fstat(handle.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise ImageFetchError(display, f"{path} is not a regular file")
                if info.st_size > self._max_bytes:
                    raise ImageFetchError(display, _too_large(f"file is {info.st_size:,} bytes", self._max_bytes))
                data = handle.read(self._max_bytes + 1)
        except FileNotFoundError:
            raise ImageFetchError(display, f"file missing: {path}") from None
        except PermissionError:
            raise ImageFetchError(display, f"permission denied reading {path}") from None
        except OSError as exc:
            raise ImageFetchError(display, f"cannot read {path}: {exc.strerror or exc}") from exc
        if len(data) > self._max_bytes:
            raise ImageFetchError(display, _too_large("file grew while reading", self._max_bytes))
        return data

    # -- HTTP ------------------------------------------------------------------------------------

    def _download(self, url: str, *, display: str) -> bytes:
        """GET ``url``, following redirects by hand, deciding the token per hop (file routes only)."""
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            with_token = self._sends_token(current)
            left = time_left()
            if left is not None and left <= 0:
                raise ImageFetchError(display, self._total_reason(current, display))
            timeout = self._timeout if left is None else min(self._timeout, left)
            try:
                with self._client.stream(
                    "GET", current, auth=self._auth if with_token else None, timeout=timeout
                ) as response:
                    if response.is_redirect:
                        current = str(response.url.join(response.headers["location"]))
                        continue
                    if response.status_code != 200:
                        raise ImageFetchError(
                            display,
                            self._status_reason(response.status_code, current, display, with_token),
                            status=response.status_code,
                        )
                    return self._read_body(response, current, display)
            except httpx.TimeoutException as exc:
                raise ImageFetchError(display, self._timeout_reason(exc, current, display)) from exc
            except (httpx.ProtocolError, httpx.DecodingError) as exc:
                # Their messages can quote what the server sent (a Redis or SSH banner): name the kind only.
                reason = f"the answer{_where(current, display)} is not valid HTTP ({type(exc).__name__})"
                raise ImageFetchError(display, reason) from exc
            except httpx.HTTPError as exc:
                reason = f"request failed{_where(current, display)}: {type(exc).__name__}: {exc}"
                raise ImageFetchError(display, reason) from exc
            except AddressRefused as exc:
                raise ImageFetchError(display, exc.reason + _where(current, display)) from None
            except LabelStudioAuthError as exc:
                raise ImageFetchError(display, str(exc)) from exc
        raise ImageFetchError(display, f"more than {MAX_REDIRECTS} redirects{_where(current, display)}")

    def _read_body(self, response: httpx.Response, current: str, display: str) -> bytes:
        """Stream the body, refusing early on Content-Length, stopping past ``max_bytes`` or the deadline."""
        declared = response.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self._max_bytes:
            raise ImageFetchError(display, _too_large(f"Content-Length is {int(declared):,} bytes", self._max_bytes))
        content_type = response.headers.get("content-type", "").lower()
        if content_type.startswith("text/html"):
            raise ImageFetchError(
                display,
                f"got an HTML page instead of an image{_where(current, display)} "
                "(a login or error page? check the URL and the API key)",
            )
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > self._max_bytes:
                raise ImageFetchError(
                    display, _too_large("download passed the limit, stopped reading", self._max_bytes)
                )
            left = time_left()
            if left is not None and left <= 0:
                raise ImageFetchError(display, self._total_reason(current, display))
        return bytes(body)

    def _status_reason(self, status: int, current: str, display: str, with_token: bool) -> str:
        """The status and, for Label Studio, what it likely means; the server's own words are not quoted."""
        reason = f"HTTP {status} {httpx.codes.get_reason_phrase(status)}".rstrip() + _where(current, display)
        if with_token and status == 401:
            reason += (
                " (Label Studio rejected the API key; legacy tokens only work where the organisation "
                "enables them, personal access tokens always do)"
            )
        elif with_token and status == 403:
            reason += " (the API key's user has no access to this project or file)"
        elif with_token and status == 404 and "/presign/" in urlsplit(current).path:
            reason += " (Label Studio found no storage in the task's project that can resolve this URI)"
        return reason

    def _timeout_reason(self, exc: httpx.TimeoutException, current: str, display: str) -> str:
        left = time_left()
        if left is not None and left <= 0:
            return self._total_reason(current, display)
        phase = {
            httpx.ConnectTimeout: "connecting",
            httpx.ReadTimeout: "waiting for data",
            httpx.WriteTimeout: "sending the request",
            httpx.PoolTimeout: "waiting for a free connection",
        }.get(type(exc), "talking to the server")
        return f"timed out after {self._timeout:g} s {phase}{_where(current, display)}"

    def _total_reason(self, current: str, display: str) -> str:
        return (
            f"took longer than {self._total_timeout:g} s in total{_where(current, display)} "
            "(connecting, redirects and download; DINOLABEL_IMAGE_TOTAL_TIMEOUT)"
        )

    # -- data URIs -------------------------------------------------------------------------------

    def _from_data_uri(self, value: str) -> bytes:
        """Decode ``data:[<type>][;base64],<payload>`` (RFC 2397) with the usual size limit."""
        header, comma, payload = value[5:].partition(",")
        if not comma:
            raise ImageFetchError(value, "malformed data URI: no ',' before the payload")
        if header.lower().endswith(";base64"):
            compact = "".join(unquote(payload).split())
            if len(compact) * 3 // 4 > self._max_bytes:
                raise ImageFetchError(value, _too_large("data URI payload is too long", self._max_bytes))
            altchars = b"-_" if ("-" in compact or "_" in compact) else None
            try:
                data = base64.b64decode(compact + "=" * (-len(compact) % 4), altchars=altchars, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ImageFetchError(value, f"invalid base64 in data URI ({exc})") from None
        else:
            data = unquote_to_bytes(payload)
        if len(data) > self._max_bytes:
            raise ImageFetchError(value, _too_large(f"data URI holds {len(data):,} bytes", self._max_bytes))
        if not data:
            raise ImageFetchError(value, "data URI is empty")
        return data


def _last_query_value(query: str, name: str) -> str | None:
    """Like Django's ``request.GET.get(name)``: percent-decoded, last occurrence wins."""
    values = parse_qs(query, keep_blank_values=True).get(name)
    return values[-1] if values else None


def _upload_key(key: str, display: str) -> str:
    """An upload key (``upload/<project>/<file>``, already percent-decoded) that stays inside ``upload/``.

    ``/data/upload/../export.json`` (or ``%2e%2e``) would otherwise name any file under MEDIA_ROOT, or
    any route on Label Studio once httpx removes the dot segments.
    """
    if "\x00" in key:
        raise ImageFetchError(display, "path contains a NUL byte")
    normalised = posixpath.normpath(key)
    if not normalised.startswith(_UPLOAD_DIR):
        raise ImageFetchError(display, f"path {key!r} is outside the media root's upload folder")
    return normalised


def _join_under(root: Path, relative: str, display: str, label: str) -> Path:
    """The real path of ``root/relative``, refusing anything that ends up outside ``root``.

    Normalised like Label Studio's Local Files view (``normpath`` then ``lstrip('/')``), so a leading
    ``/`` means "from the root" and ``..`` is refused; then symlinks are resolved on both sides, so a
    link inside the root that points out of it is refused too. The caller reads the resolved path.
    """
    if "\x00" in relative:
        raise ImageFetchError(display, "path contains a NUL byte")
    normalised = posixpath.normpath(relative).lstrip("/")
    base = Path(os.path.realpath(root))
    candidate = Path(os.path.realpath(base / normalised))
    if not candidate.is_relative_to(base):
        raise ImageFetchError(display, f"path {relative!r} is outside the {label} {base}")
    return candidate


def _host_port(url: str) -> tuple[str, int]:
    """The host (as sent on the wire) and effective port of ``url``: what a connection is opened to."""
    parsed = httpx.URL(url)
    return parsed.raw_host.decode("ascii"), parsed.port or {"http": 80, "https": 443}.get(parsed.scheme, 0)


def _where(current: str, display: str) -> str:
    """Name the URL that failed when it is not the one the caller asked for (redirects, presign)."""
    return "" if current == display else f" from {redact_url(current)}"


def _too_large(what: str, limit: int) -> str:
    return f"too large: {what}; the limit is {limit:,} bytes (DINOLABEL_IMAGE_MAX_BYTES)"


def fetcher_for(settings: Settings, access: LabelStudioAccess) -> ImageFetcher:
    """An image fetcher for one Label Studio and key under the configured rules (address policy, the key
    only to Label Studio's file routes, size and time limits): the workers and the API build theirs here."""
    return ImageFetcher(
        label_studio_url=access.url,
        api_key=access.api_key,
        document_root=settings.local_files_document_root,
        media_root=settings.media_root,
        timeout=settings.image_timeout,
        total_timeout=settings.image_total_timeout,
        max_bytes=settings.image_max_bytes,
        allow=settings.fetch_allow,
    )
