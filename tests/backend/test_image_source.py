"""ImageFetcher and LabelStudioAuth against real loopback servers (see conftest.py)."""

from __future__ import annotations

import base64
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from backend.image_source import ImageFetcher, ImageFetchError, redact_url
from backend.ls_auth import LabelStudioAuth, token_kind
from tests.backend.conftest import LEGACY_TOKEN, FakeBucket, FakeLabelStudio, make_jwt, png_bytes

UPLOAD = "/data/upload/1/e6fd6ea1-up_afc436_1_72x52.png"
LOOPBACK = ["127.0.0.1"]  # every fake server listens there: other than Label Studio, allowed explicitly


def fetcher_for(ls: FakeLabelStudio, token: str | None = LEGACY_TOKEN, **kwargs: object) -> ImageFetcher:
    return ImageFetcher(label_studio_url=ls.url, api_key=token, **kwargs)  # type: ignore[arg-type]


# -- uploads -------------------------------------------------------------------------------------


def test_upload_is_fetched_from_label_studio_with_the_legacy_token(fake_ls: FakeLabelStudio) -> None:
    image = png_bytes(72, 52)
    fake_ls.uploads[UPLOAD] = image
    with fetcher_for(fake_ls) as fetcher:
        assert fetcher.fetch(UPLOAD, task_id=2) == image
    [request] = fake_ls.seen("/data/upload/")
    assert request.path == UPLOAD
    assert request.authorization == f"Token {LEGACY_TOKEN}"
    assert fake_ls.refresh_count == 0


def test_upload_with_a_wrong_token_names_url_and_status_but_not_the_token(fake_ls: FakeLabelStudio) -> None:
    fake_ls.uploads[UPLOAD] = png_bytes(4, 4)
    with fetcher_for(fake_ls, token="wrong-token-value") as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch(UPLOAD)
    message = str(info.value)
    assert info.value.status == 401
    assert "HTTP 401" in message
    assert UPLOAD in message
    assert "wrong-token-value" not in message


def test_upload_is_read_from_media_root_without_asking_label_studio(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    image = png_bytes(64, 48)
    target = tmp_path / "upload" / "1" / "e6fd6ea1-up_afc436_1_72x52.png"
    target.parent.mkdir(parents=True)
    target.write_bytes(image)
    with fetcher_for(fake_ls, media_root=tmp_path) as fetcher:
        assert fetcher.fetch(UPLOAD) == image
    assert fake_ls.requests == []


def test_upload_missing_from_media_root_falls_back_to_http(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    image = png_bytes(8, 8)
    fake_ls.uploads[UPLOAD] = image
    with fetcher_for(fake_ls, media_root=tmp_path) as fetcher:
        assert fetcher.fetch(UPLOAD) == image
    assert [r.path for r in fake_ls.requests] == [UPLOAD]


def test_upload_key_with_dot_dot_is_refused(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    with (
        fetcher_for(fake_ls, media_root=tmp_path / "media") as fetcher,
        pytest.raises(ImageFetchError) as info,
    ):
        fetcher.fetch("/data/upload/../../etc/passwd")
    assert "outside the media root" in str(info.value)
    assert fake_ls.requests == []


@pytest.mark.parametrize(
    "value",
    ["/data/upload/../export.json", "/data/upload/%2e%2e/export.json", "/data/upload/1/..%2f..%2fexport.json",
     "/storage-data/uploaded/?filepath=upload/../export.json"],
)  # fmt: skip
def test_upload_keys_stay_inside_the_upload_folder(fake_ls: FakeLabelStudio, tmp_path: Path, value: str) -> None:
    (tmp_path / "upload").mkdir()
    (tmp_path / "export.json").write_bytes(b'{"secret": "export"}')  # under MEDIA_ROOT, not an upload
    with fetcher_for(fake_ls, media_root=tmp_path) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch(value)
    assert "outside the media root's upload folder" in str(info.value)
    assert "secret" not in str(info.value)
    assert fake_ls.requests == []


def test_upload_symlink_out_of_the_upload_folder_is_refused(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    (tmp_path / "upload" / "1").mkdir(parents=True)
    (tmp_path / "export.json").write_bytes(b"{}")
    (tmp_path / "upload" / "1" / "cat.png").symlink_to(tmp_path / "export.json")
    with fetcher_for(fake_ls, media_root=tmp_path) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch("/data/upload/1/cat.png")
    assert "outside the media root's upload folder" in str(info.value)
    assert fake_ls.requests == []


def test_upload_that_404s_is_retried_through_the_storage_proxy(fake_ls: FakeLabelStudio) -> None:
    image = png_bytes(5, 5)
    fake_ls.storage_data["upload/1/e6fd6ea1-up_afc436_1_72x52.png"] = image
    with fetcher_for(fake_ls) as fetcher:
        assert fetcher.fetch(UPLOAD) == image
    assert [r.path for r in fake_ls.requests] == [UPLOAD, "/storage-data/uploaded/"]


def test_upload_without_label_studio_url_is_a_clear_error() -> None:
    with (
        ImageFetcher(label_studio_url=None, api_key=LEGACY_TOKEN) as fetcher,
        pytest.raises(ImageFetchError, match="no Label Studio URL is configured"),
    ):
        fetcher.fetch(UPLOAD)


def test_upload_without_api_key_is_a_clear_error(fake_ls: FakeLabelStudio) -> None:
    with fetcher_for(fake_ls, token=None) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch(UPLOAD)
    assert "no Label Studio API key is configured" in str(info.value)
    assert fake_ls.requests == []


def test_label_studio_url_without_scheme_fails_the_fetch_not_the_constructor() -> None:
    with (
        ImageFetcher(label_studio_url="labelstudio:8080", api_key=LEGACY_TOKEN) as fetcher,
        pytest.raises(ImageFetchError, match="does not start with http"),
    ):
        fetcher.fetch(UPLOAD)


# -- local files ---------------------------------------------------------------------------------


def test_local_files_are_read_from_document_root(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    image = png_bytes(72, 40)
    (tmp_path / "project1").mkdir()
    (tmp_path / "project1" / "my cat.png").write_bytes(image)
    with fetcher_for(fake_ls, document_root=tmp_path) as fetcher:
        assert fetcher.fetch("/data/local-files/?d=project1/my%20cat.png") == image
        # The same file as Label Studio stores it for Local Files storages: absolute on its host.
        assert fetcher.fetch(f"{fake_ls.url}/data/local-files/?d=project1/my%20cat.png") == image
        # Label Studio treats ?d= as relative to the root even with a leading slash.
        assert fetcher.fetch("/data/local-files/?d=/project1/my%20cat.png") == image
    assert fake_ls.requests == []


@pytest.mark.parametrize("d", ["../secret.txt", "project1/../../secret.txt", "a/../../../etc/passwd"])
def test_local_files_path_traversal_is_refused(fake_ls: FakeLabelStudio, tmp_path: Path, d: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.txt").write_bytes(b"secret")
    with fetcher_for(fake_ls, document_root=root) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch(f"/data/local-files/?d={d}")
    assert "outside the local files document root" in str(info.value)
    assert fake_ls.requests == []


def test_symlink_out_of_the_document_root_is_refused(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "project1").mkdir(parents=True)
    secret = tmp_path / "passwd"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    (root / "project1" / "cat.png").symlink_to(secret)
    (root / "escape").symlink_to(tmp_path, target_is_directory=True)
    image = png_bytes(4, 4)
    (root / "project1" / "real.png").write_bytes(image)
    (root / "alias.png").symlink_to(root / "project1" / "real.png")  # inside the root: fine
    with fetcher_for(fake_ls, document_root=root) as fetcher:
        for d in ("project1/cat.png", "escape/passwd"):
            with pytest.raises(ImageFetchError) as info:
                fetcher.fetch(f"/data/local-files/?d={d}")
            assert "outside the local files document root" in str(info.value)
            assert "root:x" not in str(info.value)
        assert fetcher.fetch("/data/local-files/?d=alias.png") == image
    assert fake_ls.requests == []


def test_local_file_missing_under_document_root(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    with fetcher_for(fake_ls, document_root=tmp_path) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch("/data/local-files/?d=nope/missing.png")
    assert "file missing" in str(info.value)
    assert str(tmp_path / "nope" / "missing.png") in str(info.value)


def test_local_files_without_d_parameter(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    with fetcher_for(fake_ls, document_root=tmp_path) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch("/data/local-files/?x=1")
    assert "no ?d=<path> parameter" in str(info.value)


def test_local_files_without_document_root_go_through_label_studio(fake_ls: FakeLabelStudio) -> None:
    image = png_bytes(80, 46)
    fake_ls.local_files["project1-afc436/local 1.png"] = image
    with fetcher_for(fake_ls) as fetcher:
        assert fetcher.fetch("/data/local-files/?d=project1-afc436/local%201.png") == image
        assert fetcher.fetch(f"{fake_ls.url}/data/local-files/?d=project1-afc436/local%201.png") == image
    requests = fake_ls.seen("/data/local-files")
    assert len(requests) == 2
    assert all(r.query["d"] == ["project1-afc436/local 1.png"] for r in requests)
    assert all(r.authorization == f"Token {LEGACY_TOKEN}" for r in requests)


def test_oversized_local_file_is_refused(fake_ls: FakeLabelStudio, tmp_path: Path) -> None:
    (tmp_path / "big.png").write_bytes(b"x" * 2048)
    with (
        fetcher_for(fake_ls, document_root=tmp_path, max_bytes=1024) as fetcher,
        pytest.raises(ImageFetchError, match=r"too large: file is 2,048 bytes; the limit is 1,024"),
    ):
        fetcher.fetch("/data/local-files/?d=big.png")


# -- plain URLs ----------------------------------------------------------------------------------


def test_foreign_url_gets_no_authorization_header(fake_ls: FakeLabelStudio, fake_bucket: FakeBucket) -> None:
    image = png_bytes(3, 3)
    fake_bucket.objects["/public/cat.png"] = image
    with fetcher_for(fake_ls, allow=LOOPBACK) as fetcher:
        # Same host (127.0.0.1) as Label Studio, other port: another origin, so no token.
        assert fetcher.fetch(f"{fake_bucket.url}/public/cat.png") == image
    [request] = fake_bucket.seen("/public/")
    assert "authorization" not in request.headers


@pytest.mark.parametrize("token", ["legacy", "personal"])
def test_label_studio_api_urls_get_no_token(fake_ls: FakeLabelStudio, token: str) -> None:
    key = LEGACY_TOKEN if token == "legacy" else fake_ls.personal_token
    fake_ls.uploads[UPLOAD] = b"upload"
    with fetcher_for(fake_ls, token=key) as fetcher:
        assert fetcher.fetch(UPLOAD) == b"upload"  # file routes get it
        for value in (f"{fake_ls.url}/api/current-user/token", "/api/current-user/token",
                      f"{fake_ls.url}/api/projects/1/thumbnail.png"):  # fmt: skip
            with pytest.raises(ImageFetchError) as info:
                fetcher.fetch(value)
            assert info.value.status == 401
            assert "rejected the API key" not in str(info.value), "no key was sent"
    api = fake_ls.seen("/api/current-user/") + fake_ls.seen("/api/projects/")
    assert len(api) == 3 and all(r.authorization is None for r in api)
    assert fake_ls.seen(UPLOAD)[0].authorization is not None


def test_redirect_to_a_label_studio_api_url_gets_no_token(fake_ls: FakeLabelStudio, fake_bucket: FakeBucket) -> None:
    fake_bucket.redirects["/cat.png"] = f"{fake_ls.url}/api/current-user/token"
    fake_ls.cloud["s3://bucket/cat.png"] = "/cat.png"  # presign (gets the token) -> bucket -> Label Studio API
    with fetcher_for(fake_ls, allow=LOOPBACK) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch("s3://bucket/cat.png", task_id=4)
    assert "HTTP 401" in str(info.value)
    [presign] = fake_ls.seen("/tasks/")
    assert presign.authorization == f"Token {LEGACY_TOKEN}"
    [leak] = fake_ls.seen("/api/current-user/token")
    assert leak.authorization is None


@pytest.mark.parametrize(
    "value", ["/data/upload/../../api/current-user/token", "/data/upload/%2e%2e/%2e%2e/api/current-user/token"]
)
def test_upload_paths_cannot_climb_to_other_label_studio_routes(fake_ls: FakeLabelStudio, value: str) -> None:
    with fetcher_for(fake_ls) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch(value)
    assert "outside the media root's upload folder" in str(info.value)
    assert fake_ls.requests == []


def test_html_instead_of_image_is_reported(fake_ls: FakeLabelStudio) -> None:
    with (
        fetcher_for(fake_ls) as fetcher,
        pytest.raises(ImageFetchError, match="HTML page instead of an image"),
    ):
        fetcher.fetch(f"{fake_ls.url}/login-page")


def test_redirect_loop_is_cut_off(fake_ls: FakeLabelStudio) -> None:
    with fetcher_for(fake_ls) as fetcher, pytest.raises(ImageFetchError, match="more than 5 redirects"):
        fetcher.fetch(f"{fake_ls.url}/redirect-loop")
    assert len(fake_ls.seen("/redirect-loop")) == 6


def test_connection_refused_names_the_url() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/image.png"
    with (
        ImageFetcher(label_studio_url=None, api_key=None, allow=LOOPBACK) as fetcher,
        pytest.raises(ImageFetchError) as info,
    ):
        fetcher.fetch(url)
    assert url in str(info.value)
    assert "ConnectError" in str(info.value)


@pytest.mark.parametrize("value", ["ftp://example.com/a.png", "images/cat.png", "//cdn.example.com/a.png"])
def test_unsupported_references(value: str) -> None:
    with (
        ImageFetcher(label_studio_url=None, api_key=None) as fetcher,
        pytest.raises(ImageFetchError, match="unsupported image reference"),
    ):
        fetcher.fetch(value)


def test_malformed_urls_fail_the_fetch_not_the_caller() -> None:
    with ImageFetcher(label_studio_url="http://[::1", api_key=LEGACY_TOKEN) as fetcher:
        with pytest.raises(ImageFetchError, match=r"malformed URL \(Invalid IPv6 URL\)"):
            fetcher.fetch("http://[::1/cat.png")
        with pytest.raises(ImageFetchError, match=r"the Label Studio URL .* is malformed"):
            fetcher.fetch(UPLOAD)


# -- limits --------------------------------------------------------------------------------------


def test_slow_server_times_out(fake_ls: FakeLabelStudio) -> None:
    with fetcher_for(fake_ls, timeout=0.3) as fetcher:
        started = time.monotonic()
        with pytest.raises(ImageFetchError) as info:
            fetcher.fetch(f"{fake_ls.url}/slow")
        elapsed = time.monotonic() - started
    assert "timed out after 0.3 s waiting for data" in str(info.value)
    assert elapsed < 3


def test_trickling_server_is_cut_off_at_the_total_deadline(fake_bucket: FakeBucket) -> None:
    # One byte a second never trips the 5 s per-read time-out; only the total deadline ends it.
    url = f"{fake_bucket.url}/trickle"
    with (
        ImageFetcher(label_studio_url=None, api_key=None, timeout=5, total_timeout=2, allow=LOOPBACK) as fetcher,
        pytest.raises(ImageFetchError) as info,
    ):
        fetcher.fetch(url)
    assert str(info.value) == (
        f"cannot fetch image {url}: took longer than 2 s in total "
        "(connecting, redirects and download; DINOLABEL_IMAGE_TOTAL_TIMEOUT)"
    )
    assert len(fake_bucket.seen("/trickle")) == 1


def test_a_read_waits_no_longer_than_the_time_left(fake_ls: FakeLabelStudio) -> None:
    # /slow answers after 10 s: the per-read time-out (5 s) is shortened to what is left of 1 s.
    with fetcher_for(fake_ls, timeout=5, total_timeout=1) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch(f"{fake_ls.url}/slow")
    assert "took longer than 1 s in total" in str(info.value)


def test_the_deadline_covers_every_redirect_hop(fake_ls: FakeLabelStudio, fake_bucket: FakeBucket) -> None:
    fake_bucket.redirects["/a.png"] = f"{fake_ls.url}/slow"
    with (
        fetcher_for(fake_ls, timeout=5, total_timeout=1, allow=LOOPBACK) as fetcher,
        pytest.raises(ImageFetchError) as info,
    ):
        fetcher.fetch(f"{fake_bucket.url}/a.png")
    assert f"took longer than 1 s in total from {fake_ls.url}/slow" in str(info.value)


def test_declared_content_length_over_limit_is_refused_before_reading(fake_ls: FakeLabelStudio) -> None:
    with fetcher_for(fake_ls, max_bytes=100_000) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch(f"{fake_ls.url}/huge")
    assert f"Content-Length is {8 * 1024 * 1024:,} bytes" in str(info.value)
    assert "the limit is 100,000 bytes" in str(info.value)


def test_undeclared_body_is_cut_at_the_limit(fake_ls: FakeLabelStudio) -> None:
    with fetcher_for(fake_ls, max_bytes=100_000) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch(f"{fake_ls.url}/huge-unsized")
    assert "download passed the limit, stopped reading" in str(info.value)


# -- addresses: loopback, private, link-local -----------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/x.png", "link-local"),
        ("http://10.20.30.40/x.png", "private"),
        ("http://192.168.1.1/x.png", "private"),
        ("http://[fd00::1]/x.png", "private"),
        ("http://100.64.0.1/x.png", "shared (carrier-grade NAT)"),
        ("http://0.0.0.0:{port}/public/cat.png", "unspecified"),
        ("http://224.0.0.1/x.png", "multicast"),
        ("http://240.0.0.1/x.png", "reserved"),
        ("http://127.0.0.1:{port}/public/cat.png", "loopback"),
        ("http://[::ffff:127.0.0.1]:{port}/public/cat.png", "loopback"),  # IPv4-mapped
        ("http://[2002:7f00:1::]:{port}/public/cat.png", "loopback"),  # 6to4 around 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused(fake_bucket: FakeBucket, url: str, kind: str) -> None:
    fake_bucket.objects["/public/cat.png"] = png_bytes(2, 2)
    url = url.format(port=fake_bucket.url.rsplit(":", 1)[1])
    with ImageFetcher(label_studio_url=None, api_key=None) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch(url)
    message = str(info.value)
    assert f"is a {kind} address" in message or f"is an {kind} address" in message
    assert "unless DINOLABEL_FETCH_ALLOW names the host or network" in message
    assert fake_bucket.requests == []


def test_a_name_is_checked_on_the_address_it_resolves_to(fake_bucket: FakeBucket) -> None:
    fake_bucket.objects["/public/cat.png"] = png_bytes(2, 2)
    url = f"http://localhost:{fake_bucket.url.rsplit(':', 1)[1]}/public/cat.png"
    with ImageFetcher(label_studio_url=None, api_key=None) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch(url)
    message = str(info.value)
    assert "refused to connect: localhost resolves to a loopback address" in message
    assert "127.0.0.1" not in message and "::1" not in message, "the resolved address is not named"
    assert fake_bucket.requests == []


def test_every_redirect_hop_is_checked(fake_ls: FakeLabelStudio, fake_bucket: FakeBucket) -> None:
    fake_bucket.objects["/bucket/cat.png"] = png_bytes(2, 2)
    fake_ls.cloud["s3://bucket/cat.png"] = "/bucket/cat.png"  # Label Studio (allowed) redirects to loopback
    with fetcher_for(fake_ls) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch("s3://bucket/cat.png", task_id=5)
    assert "127.0.0.1 is a loopback address" in str(info.value)
    assert f"from {fake_bucket.url}/bucket/cat.png?X-Amz-Signature=***" in str(info.value)
    assert len(fake_ls.seen("/tasks/5/presign/")) == 1
    assert fake_bucket.requests == []


@pytest.mark.parametrize("allow", [["127.0.0.1"], ["127.0.0.0/8", "::1"], ["LOCALHOST"], ["*"]])
def test_the_allow_list_admits_hosts_and_networks(fake_bucket: FakeBucket, allow: list[str]) -> None:
    image = png_bytes(3, 2)
    fake_bucket.objects["/public/cat.png"] = image
    host = "localhost" if allow == ["LOCALHOST"] else "127.0.0.1"
    with ImageFetcher(label_studio_url=None, api_key=None, allow=allow) as fetcher:
        assert fetcher.fetch(f"http://{host}:{fake_bucket.url.rsplit(':', 1)[1]}/public/cat.png") == image
    assert len(fake_bucket.seen("/public/")) == 1


def test_label_studio_origin_is_allowed_not_its_host(fake_ls: FakeLabelStudio, fake_bucket: FakeBucket) -> None:
    fake_ls.uploads[UPLOAD] = b"upload"
    fake_bucket.objects["/public/cat.png"] = b"bucket"
    with fetcher_for(fake_ls) as fetcher:
        assert fetcher.fetch(f"{fake_ls.url}{UPLOAD}") == b"upload"
        with pytest.raises(ImageFetchError, match="loopback address"):
            fetcher.fetch(f"{fake_bucket.url}/public/cat.png")
    assert fake_bucket.requests == []


def test_a_bad_allow_list_entry_is_refused() -> None:
    with pytest.raises(ValueError, match="'http://minio:9000' is not a host name"):
        ImageFetcher(label_studio_url=None, api_key=None, allow=["minio", "http://minio:9000"])


def test_failure_reasons_never_quote_what_the_server_sent(fake_bucket: FakeBucket, fake_ls: FakeLabelStudio) -> None:
    fake_bucket.forbidden.add("/denied.png")  # answers an XML error body
    with fetcher_for(fake_ls, allow=LOOPBACK) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch(f"{fake_bucket.url}/denied.png")
    assert str(info.value).endswith("HTTP 403 Forbidden")
    assert "SignatureDoesNotMatch" not in str(info.value)


def test_a_non_http_answer_is_named_by_kind(tmp_path: Path) -> None:
    banner = b"-ERR unknown command 'GET', with args beginning with: secret-value\r\n"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(banner)

        with ThreadPoolExecutor(1) as pool:
            pool.submit(answer)
            with (
                ImageFetcher(label_studio_url=None, api_key=None, allow=LOOPBACK) as fetcher,
                pytest.raises(ImageFetchError) as info,
            ):
                fetcher.fetch(f"http://127.0.0.1:{port}/x.png")
    assert "is not valid HTTP (RemoteProtocolError)" in str(info.value)
    assert "secret-value" not in str(info.value) and "ERR" not in str(info.value)


# -- cloud storage via presign -------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri", ["s3://bucket/images/cat 1.png", "gs://bucket/cat.png", "azure-blob://container/cat.png"]
)
def test_cloud_uri_is_presigned_and_the_bucket_never_sees_the_token(
    fake_ls: FakeLabelStudio, fake_bucket: FakeBucket, uri: str
) -> None:
    image = png_bytes(6, 6)
    fake_bucket.objects["/bucket/cat.png"] = image
    fake_ls.cloud[uri] = "/bucket/cat.png"
    with fetcher_for(fake_ls, allow=LOOPBACK) as fetcher:
        assert fetcher.fetch(uri, task_id=7) == image
    [presign] = fake_ls.seen("/tasks/")
    assert presign.path == "/tasks/7/presign/"
    assert base64.urlsafe_b64decode(presign.query["fileuri"][0]).decode() == uri
    assert presign.authorization == f"Token {LEGACY_TOKEN}"
    assert fake_ls.presign_calls == [(7, uri)]
    [download] = fake_bucket.requests
    assert download.query["X-Amz-Signature"] == ["topsecret-sig"]
    assert "authorization" not in download.headers
    assert "cookie" not in download.headers


def test_cloud_uri_proxied_by_label_studio(fake_ls: FakeLabelStudio, fake_bucket: FakeBucket) -> None:
    fake_ls.proxied["s3://bucket/private.png"] = b"proxied-bytes"
    with fetcher_for(fake_ls) as fetcher:
        assert fetcher.fetch("s3://bucket/private.png", task_id=3) == b"proxied-bytes"
    assert fake_bucket.requests == []


def test_cloud_uri_needs_a_task_id(fake_ls: FakeLabelStudio) -> None:
    with fetcher_for(fake_ls) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch("s3://bucket/cat.png")
    assert "s3://bucket/cat.png" in str(info.value)
    assert "no task id" in str(info.value)
    assert fake_ls.requests == []


def test_cloud_uri_unknown_to_label_studio(fake_ls: FakeLabelStudio) -> None:
    with fetcher_for(fake_ls) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch("gs://other/dog.png", task_id=9)
    assert info.value.status == 404
    assert "found no storage in the task's project" in str(info.value)


def test_failing_presigned_url_is_reported_without_its_signature(
    fake_ls: FakeLabelStudio, fake_bucket: FakeBucket
) -> None:
    fake_ls.cloud["s3://bucket/expired.png"] = "/bucket/expired.png"
    fake_bucket.forbidden.add("/bucket/expired.png")
    with fetcher_for(fake_ls, allow=LOOPBACK) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch("s3://bucket/expired.png", task_id=1)
    message = str(info.value)
    assert message.startswith("cannot fetch image s3://bucket/expired.png: HTTP 403")
    assert f"{fake_bucket.url}/bucket/expired.png?X-Amz-Signature=***" in message
    assert "topsecret-sig" not in message


# -- personal access tokens (JWT refresh) --------------------------------------------------------


def test_token_kinds_are_told_apart_by_shape() -> None:
    assert token_kind(LEGACY_TOKEN) == "legacy"
    assert token_kind(make_jwt({"token_type": "refresh", "exp": 1})) == "personal"
    assert token_kind(make_jwt({"exp": 1})) == "personal"
    assert token_kind(make_jwt({"token_type": "access", "exp": 1})) == "access"
    assert token_kind("a.b.c") == "legacy"  # three segments, but the payload is not JSON
    assert token_kind("abc.e30") == "legacy"  # JSON payload, but only two segments


def test_personal_token_is_exchanged_once_while_the_access_token_is_fresh(fake_ls: FakeLabelStudio) -> None:
    fake_ls.uploads[UPLOAD] = b"one"
    with fetcher_for(fake_ls, token=fake_ls.personal_token) as fetcher:
        assert fetcher.fetch(UPLOAD) == b"one"
        assert fetcher.fetch(UPLOAD) == b"one"
    assert fake_ls.refresh_count == 1
    [refresh] = fake_ls.seen("/api/token/refresh/")
    assert refresh.method == "POST"
    downloads = fake_ls.seen("/data/upload/")
    assert [r.authorization for r in downloads] == [f"Bearer {fake_ls.issued[0]}"] * 2


def test_access_token_close_to_expiry_is_refreshed_ahead(fake_ls: FakeLabelStudio) -> None:
    fake_ls.access_ttl = 20  # inside the 30 s margin: every use needs a fresh one
    fake_ls.uploads[UPLOAD] = b"img"
    with fetcher_for(fake_ls, token=fake_ls.personal_token) as fetcher:
        fetcher.fetch(UPLOAD)
        fetcher.fetch(UPLOAD)
    assert fake_ls.refresh_count == 2
    downloads = fake_ls.seen("/data/upload/")
    assert [r.authorization for r in downloads] == [f"Bearer {t}" for t in fake_ls.issued]
    # Refreshed ahead of time, so no request was ever answered 401 and retried.
    assert [r.path for r in fake_ls.requests].count(UPLOAD) == 2


def test_rejected_access_token_is_refreshed_once_on_401(fake_ls: FakeLabelStudio) -> None:
    fake_ls.uploads[UPLOAD] = b"img"
    with fetcher_for(fake_ls, token=fake_ls.personal_token) as fetcher:
        fetcher.fetch(UPLOAD)
        fake_ls.revoke_access_tokens()
        assert fetcher.fetch(UPLOAD) == b"img"
    assert fake_ls.refresh_count == 2
    first, second = fake_ls.issued
    assert [(r.method, r.path, r.authorization) for r in fake_ls.requests] == [
        ("POST", "/api/token/refresh/", None),
        ("GET", UPLOAD, f"Bearer {first}"),
        ("GET", UPLOAD, f"Bearer {first}"),  # answered 401
        ("POST", "/api/token/refresh/", None),
        ("GET", UPLOAD, f"Bearer {second}"),
    ]


def test_invalid_personal_token_is_a_clear_error(fake_ls: FakeLabelStudio) -> None:
    bogus = make_jwt({"token_type": "refresh", "exp": int(time.time()) + 3600, "jti": "revoked"})
    with fetcher_for(fake_ls, token=bogus) as fetcher, pytest.raises(ImageFetchError) as info:
        fetcher.fetch(UPLOAD)
    message = str(info.value)
    assert "refused to refresh the access token" in message
    assert "HTTP 401" in message
    assert "invalid, expired or revoked" in message
    assert bogus not in message
    assert fake_ls.seen("/data/upload/") == []


def test_concurrent_downloads_share_one_refresh(fake_ls: FakeLabelStudio) -> None:
    for i in range(16):
        fake_ls.uploads[f"/data/upload/1/{i}.png"] = f"image-{i}".encode()
    with fetcher_for(fake_ls, token=fake_ls.personal_token) as fetcher, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: fetcher.fetch(f"/data/upload/1/{i}.png"), range(16)))
    assert results == [f"image-{i}".encode() for i in range(16)]
    assert fake_ls.refresh_count == 1


def test_auth_leaves_other_origins_alone(fake_ls: FakeLabelStudio, fake_bucket: FakeBucket) -> None:
    auth = LabelStudioAuth(fake_ls.url + "/", LEGACY_TOKEN)
    assert auth.kind == "legacy"
    assert auth.applies_to(f"{fake_ls.url}/data/upload/1/a.png")
    assert not auth.applies_to(f"{fake_bucket.url}/data/upload/1/a.png")
    assert not auth.applies_to(fake_ls.url.replace("http://", "https://") + "/x")


# -- data URIs and redaction ---------------------------------------------------------------------


def test_data_uri_is_decoded() -> None:
    image = png_bytes(2, 2)
    uri = "data:image/png;base64," + base64.b64encode(image).decode()
    with ImageFetcher(label_studio_url=None, api_key=None) as fetcher:
        assert fetcher.fetch(uri) == image
        with pytest.raises(ImageFetchError, match="invalid base64 in data URI"):
            fetcher.fetch("data:image/png;base64,@@@not-base64@@@")
    with (
        ImageFetcher(label_studio_url=None, api_key=None, max_bytes=10) as small,
        pytest.raises(ImageFetchError, match="too large"),
    ):
        small.fetch(uri)


def test_redact_url_hides_credentials_but_keeps_paths() -> None:
    assert (
        redact_url("https://user:pw@s3.example.com/b/k.png?X-Amz-Signature=abc&versionId=3")
        == "https://s3.example.com/b/k.png?X-Amz-Signature=***&versionId=3"
    )
    assert redact_url("http://ls:8080/data/local-files/?d=a/b.png") == "http://ls:8080/data/local-files/?d=a/b.png"
    assert redact_url("https://acct.blob.core.windows.net/c/x.png?sv=1&sig=zzz") == (
        "https://acct.blob.core.windows.net/c/x.png?sv=1&sig=***"
    )
