"""Similar-image search and duplicates over a project's store, through the real app and a fake Label Studio.

The store is filled directly (as the index jobs' writer does) with synthetic vectors where a test is
about search, and with real image hashes where it is about duplicates; then the app starts on the
session's Redis. Label Studio is the fake of tests/backend/conftest.py: what crossed its socket is
asserted (one listing for the k results, the key only where it belongs).
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr

from backend.config import Settings
from backend.index_cache import IndexCache, NotIndexed
from backend.main import create_app
from backend.project_vectors import embedder_version_of, open_store
from indexer import StoredVector, VectorIndex, find_duplicates, image_hashes
from tests.backend.conftest import LEGACY_TOKEN, FakeLabelStudio, serving
from tests.images import encode_png, scene
from tests.labelstudio import free_port
from tests.processes import DINOLABEL

PROJECT = 12
DIM = 64
QUERY = 100
PLANTED = {101: 0.99, 102: 0.95, 103: 0.9, 104: 0.8, 105: 0.7}  # task -> cosine to the query task
OTHERS = range(200, 400)


def _settings(tmp_path: Path, redis_url: str, ls_url: str | None, **extra: object) -> Settings:
    values: dict = {"data_dir": tmp_path / "data", "redis_url": redis_url, "label_studio_retries": 0, **extra}
    if ls_url:
        values.update(label_studio_url=ls_url, label_studio_api_key=SecretStr(LEGACY_TOKEN))
    return Settings(**values)


def _record(task: int, vector: np.ndarray, version: str, *, sha: str | None = None, size=(64, 48)) -> StoredVector:
    return StoredVector(
        task, version, vector, sha or f"sha-{task}", f"px-{task}", task * 0x9E3779B97F4A7C15 % 2**64, *size
    )


def planted_vectors(seed: int = 0) -> dict[int, np.ndarray]:
    """The query task, its planted neighbours at known cosines, and unrelated tasks."""
    rng = np.random.default_rng(seed)
    query = rng.standard_normal(DIM)
    query /= np.linalg.norm(query)
    vectors = {QUERY: query}
    for task, cosine in PLANTED.items():
        other = rng.standard_normal(DIM)
        other -= other @ query * query
        other /= np.linalg.norm(other)
        vectors[task] = cosine * query + np.sqrt(1 - cosine**2) * other
    for task in OTHERS:
        v = rng.standard_normal(DIM)
        vectors[task] = v / np.linalg.norm(v)
    return {task: v.astype(np.float32) for task, v in vectors.items()}


def fill(settings: Settings, vectors: dict[int, np.ndarray]) -> str:
    version = embedder_version_of(settings)
    with open_store(settings, PROJECT, writer=True) as store:
        store.upsert([_record(task, v, version) for task, v in vectors.items()])
    return version


@pytest.fixture
def search_ls(fake_ls: FakeLabelStudio) -> FakeLabelStudio:
    for task in [QUERY, *PLANTED, *OTHERS]:
        fake_ls.tasks[task] = {"image": f"/data/upload/{PROJECT}/{task}.png"}
    fake_ls.labeled = {102, 104}
    return fake_ls


@pytest.fixture
def app(tmp_path: Path, redis_url: str, search_ls: FakeLabelStudio) -> Iterator[tuple[TestClient, Settings]]:
    settings = _settings(tmp_path, redis_url, search_ls.url)
    fill(settings, planted_vectors())
    with TestClient(create_app(settings)) as client:
        yield client, settings


def test_similar_returns_the_planted_neighbours_in_order_without_the_query(
    app: tuple[TestClient, Settings], search_ls: FakeLabelStudio
) -> None:
    client, _ = app
    before = len(search_ls.seen("/api/tasks"))
    response = client.get(f"/v1/projects/{PROJECT}/similar", params={"task_id": QUERY, "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [hit["task_id"] for hit in body["results"]] == list(PLANTED)
    assert [hit["score"] for hit in body["results"]] == pytest.approx(list(PLANTED.values()), abs=1e-5)
    assert [hit["labeled"] for hit in body["results"]] == [False, True, False, True, False]
    assert body["results"][0]["image"] == f"{search_ls.url}/data/upload/{PROJECT}/101.png"
    assert (body["label_studio"], body["warning"], body["task_id"], body["k"]) == ("ok", None, QUERY, 5)
    # One listing for the k ids, with the operator's key, asking only for what is shown.
    (listing,) = search_ls.seen("/api/tasks")[before:]
    assert listing.authorization == f"Token {LEGACY_TOKEN}"
    assert json.loads(listing.query["query"][0])["selectedItems"] == {"all": False, "included": list(PLANTED)}
    assert listing.query["include"] == ["id,data,is_labeled"]


def test_the_index_follows_the_store_deleted_tasks_never_come_back(
    app: tuple[TestClient, Settings], search_ls: FakeLabelStudio
) -> None:
    client, settings = app
    search_ls.tasks[150] = {"image": f"/data/upload/{PROJECT}/150.png"}
    url = f"/v1/projects/{PROJECT}/similar"
    first = client.get(url, params={"task_id": QUERY, "k": 3}).json()
    assert [h["task_id"] for h in first["results"]] == [101, 102, 103]
    version = embedder_version_of(settings)
    vectors = planted_vectors()
    closest = vectors[QUERY] + 0.01 * vectors[105]
    with open_store(settings, PROJECT, writer=True) as store:  # the store's one writer, while the API runs
        store.delete([101, 103])
        store.upsert([_record(150, closest / np.linalg.norm(closest), version)])
    body = client.get(url, params={"task_id": QUERY, "k": 3}).json()
    assert [h["task_id"] for h in body["results"]] == [150, 102, 104]
    assert client.get(url, params={"task_id": 101}).status_code == 404  # deleted: not a query either
    del search_ls.tasks[104]  # deleted in Label Studio, its TASKS_DELETED not processed yet: left out
    assert [h["task_id"] for h in client.get(url, params={"task_id": QUERY, "k": 3}).json()["results"]] == [150, 102]


def test_unknown_projects_and_tasks_are_404s_with_a_reason(app: tuple[TestClient, Settings]) -> None:
    client, _ = app
    response = client.get("/v1/projects/77/similar", params={"task_id": QUERY})
    assert response.status_code == 404
    assert response.json()["detail"] == "project 77 has not been indexed: run `dinolabel index --project 77`"
    response = client.get(f"/v1/projects/{PROJECT}/similar", params={"task_id": 999})
    assert response.status_code == 404
    assert "task 999 is not in project 12's index" in response.json()["detail"]
    assert client.get("/v1/projects/77/duplicates").status_code == 404


def test_k_and_threshold_bounds_are_422s(app: tuple[TestClient, Settings]) -> None:
    client, settings = app
    similar = f"/v1/projects/{PROJECT}/similar"
    response = client.get(similar, params={"task_id": QUERY, "k": settings.search_max_k + 1})
    assert response.status_code == 422
    assert response.json()["detail"] == (
        f"k: {settings.search_max_k + 1} results asked; at most {settings.search_max_k} per search "
        "(DINOLABEL_SEARCH_MAX_K)"
    )
    assert client.get(similar, params={"task_id": QUERY, "k": 0}).status_code == 422
    assert client.get(similar, params={"task_id": -1}).status_code == 422
    for threshold in (0.2, 1.01, "nan"):
        response = client.get(f"/v1/projects/{PROJECT}/duplicates", params={"threshold": threshold})
        assert response.status_code == 422, threshold
        assert response.json()["detail"][0]["loc"] == ["query", "threshold"]
    response = client.get(f"/v1/projects/{PROJECT}/duplicates", params={"phash_distance": 13})
    assert response.status_code == 422


def test_without_label_studio_the_results_come_with_ids_and_scores_and_say_so(tmp_path: Path, redis_url: str) -> None:
    settings = _settings(tmp_path, redis_url, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    fill(settings, planted_vectors())
    with TestClient(create_app(settings)) as client:
        body = client.get(f"/v1/projects/{PROJECT}/similar", params={"task_id": QUERY, "k": 2}).json()
    assert [(h["task_id"], h["image"], h["labeled"]) for h in body["results"]] == [(101, None, None), (102, None, None)]
    assert body["label_studio"] == "unreachable"
    assert (
        body["warning"].startswith("Label Studio at http://127.0.0.1:")
        and "task ids and scores only" in body["warning"]
    )


def test_the_api_key_guards_v1_routes_and_leaves_label_studio_routes_alone(tmp_path: Path, redis_url: str) -> None:
    settings = _settings(tmp_path, redis_url, None, api_key=SecretStr("s3cret-key"))
    fill(settings, planted_vectors())
    url = f"/v1/projects/{PROJECT}/similar?task_id={QUERY}&k=1"
    with TestClient(create_app(settings)) as client:
        missing = client.get(url)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == 'Bearer realm="dinolabel"'
        assert "Authorization: Bearer" in missing.json()["detail"]
        assert client.get(url, headers={"Authorization": "Bearer wrong-key"}).status_code == 401
        assert client.get(url, headers={"Authorization": "Bearer s3cret-key-and-more"}).status_code == 401
        assert client.get(url, headers={"Authorization": "Basic czNjcmV0LWtleQ=="}).status_code == 401
        ok = client.get(url, headers={"Authorization": "Bearer s3cret-key"})
        assert ok.status_code == 200 and ok.json()["results"][0]["task_id"] == 101
        assert ok.json()["label_studio"] == "unknown"  # no address: said, not guessed
        assert client.get("/v1/jobs/abc").status_code == 401  # every /v1 route
        assert client.get("/health").status_code == 200  # Label Studio's routes keep their rules (open here)


def test_with_basic_auth_too_either_credential_opens_v1_and_only_basic_opens_predict(
    tmp_path: Path, redis_url: str
) -> None:
    settings = _settings(
        tmp_path,
        redis_url,
        None,
        api_key=SecretStr("s3cret-key"),
        basic_auth_user="ls",
        basic_auth_pass=SecretStr("pw"),
    )
    fill(settings, planted_vectors())
    url = f"/v1/projects/{PROJECT}/similar?task_id={QUERY}&k=1"
    with TestClient(create_app(settings)) as client:
        assert client.get(url, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert client.get(url, auth=("ls", "pw")).status_code == 200
        refused = client.get(url)
        assert refused.status_code == 401
        assert refused.headers.get_list("www-authenticate") == ['Bearer realm="dinolabel"', 'Basic realm="dinolabel"']
        assert client.get("/health", headers={"Authorization": "Bearer s3cret-key"}).status_code == 401
        assert client.get("/health", auth=("ls", "pw")).status_code == 200


# --- duplicates ------------------------------------------------------------------------------------------


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def duplicate_files() -> dict[int, bytes]:
    """1/2 same bytes; 3 a JPEG copy of 1 (perceptual); 5/6 different pictures with planted close vectors;
    10..13 unrelated."""
    photo = {seed: scene(320, 240, seed=seed) for seed in range(40, 60)}
    return {
        1: encode_png(photo[40]),
        2: encode_png(photo[40]),
        3: _jpeg(photo[40], 50),
        5: encode_png(photo[41]),
        6: encode_png(photo[42]),
        **{task: encode_png(photo[33 + task]) for task in range(10, 14)},
    }


@pytest.fixture
def duplicates_app(
    tmp_path: Path, redis_url: str, fake_ls: FakeLabelStudio
) -> Iterator[tuple[TestClient, Settings, dict[int, bytes]]]:
    files = duplicate_files()
    for task, data in files.items():
        fake_ls.tasks[task] = {"image": f"/data/upload/{PROJECT}/{task}.png"}
        fake_ls.uploads[f"/data/upload/{PROJECT}/{task}.png"] = data
    fake_ls.labeled = {2}
    settings = _settings(tmp_path, redis_url, fake_ls.url)
    version = embedder_version_of(settings)
    rng = np.random.default_rng(3)
    vectors = {task: rng.standard_normal(DIM).astype(np.float32) for task in files}
    vectors[6] = vectors[5] + 0.1 * rng.standard_normal(DIM).astype(np.float32)
    with open_store(settings, PROJECT, writer=True) as store:
        records = []
        for task, data in files.items():
            hashes = image_hashes(data, Image.open(io.BytesIO(data)).convert("RGB"))
            vector = vectors[task] / np.linalg.norm(vectors[task])
            records.append(
                StoredVector(
                    task, version, vector, hashes.sha256, hashes.pixel_hash, hashes.phash, hashes.width, hashes.height
                )
            )
        store.upsert(records)
    with TestClient(create_app(settings)) as client:
        yield client, settings, files


def _groups(stages: list[dict]) -> list[tuple[str, list[dict]]]:
    return [(stage["stage"], stage["groups"]) for stage in stages]


def test_duplicates_json_and_csv_are_the_librarys_report_on_the_same_store(
    duplicates_app: tuple[TestClient, Settings, dict[int, bytes]],
) -> None:
    client, settings, _ = duplicates_app
    response = client.get(f"/v1/projects/{PROJECT}/duplicates", params={"threshold": 0.9})
    assert response.status_code == 200, response.text
    body = response.json()
    version = embedder_version_of(settings)
    with open_store(settings, PROJECT) as store:
        index = VectorIndex.from_store(store, version, device="cpu")
        expected = find_duplicates(
            store.hash_table(),
            labeled=[2],
            index=index,
            vector_blocks=store.iter_vectors(version),
            embedding_threshold=0.9,
        )
    assert _groups(body["stages"]) == _groups(expected.to_dict()["stages"])
    assert body["duplicate_ids"] == expected.duplicate_ids == [1, 3, 6]
    assert body["stages"][0]["groups"][0]["keeper"] == 2  # labeled in Label Studio: kept over the lower id
    assert body["label_studio"] == "ok"

    response = client.get(f"/v1/projects/{PROJECT}/duplicates", params={"threshold": 0.9, "format": "csv"})
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [(r["stage"], int(r["task_id"]), r["is_keeper"]) for r in rows] == [
        (r["stage"], r["task_id"], str(r["is_keeper"])) for r in expected.rows()
    ]


def test_the_html_report_shows_thumbnails_fetched_by_the_server_in_chromium(
    duplicates_app: tuple[TestClient, Settings, dict[int, bytes]], fake_ls: FakeLabelStudio, tmp_path: Path
) -> None:
    from tests.browser import BrowserNotInstalled, Chromium, chromium_binary

    try:
        chromium_binary()
    except BrowserNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    client, _, files = duplicates_app
    response = client.get(f"/v1/projects/{PROJECT}/duplicates", params={"format": "html", "threshold": 0.9})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"].startswith("default-src 'none'; img-src data:")
    uploads = fake_ls.seen("/data/upload/")
    assert sorted(int(Path(seen.path).stem) for seen in uploads) == [1, 2, 3, 5, 6]  # the grouped images only
    assert all(seen.authorization == f"Token {LEGACY_TOKEN}" for seen in uploads)
    page = tmp_path / "report.html"
    page.write_text(response.text)
    with Chromium(tmp_path, width=1200, height=1400) as browser:
        browser.open(page.as_uri())
        images = browser.evaluate(
            "Array.from(document.images).map(i => ({task: Number(i.dataset.task), complete: i.complete,"
            " width: i.naturalWidth, height: i.naturalHeight, shown: i.getBoundingClientRect().width}))"
        )
        keepers = browser.evaluate(
            "Array.from(document.querySelectorAll('figure.keeper [data-task]')).map(e => Number(e.dataset.task))"
        )
        box = browser.evaluate(
            "(() => { const r = document.querySelector('img[data-task=\"2\"]').getBoundingClientRect();"
            " return [r.x, r.y]; })()"
        )
        shot = Image.open(io.BytesIO(browser.screenshot())).convert("RGB")
    assert sorted(image["task"] for image in images) == [1, 2, 2, 3, 5, 6]  # 2 keeps two groups
    for image in images:
        assert image["complete"] and (image["width"], image["height"]) == (160, 120) and image["shown"] > 100, image
    assert keepers == [2, 2, 5]  # labeled 2 over 1 (bytes) and over its JPEG copy 3 (perceptual); 5 over 6
    # The keeper's picture is painted where its tile is: 160x120 inside a 3 px border, centred in 160x160.
    x, y = round(box[0]) + 3, round(box[1]) + 3 + 20
    painted = np.asarray(shot, dtype=np.float32)[y : y + 120, x : x + 160]
    expected = np.asarray(Image.open(io.BytesIO(files[2])).convert("RGB").resize((160, 120)), dtype=np.float32)
    assert np.abs(painted - expected).mean() < 10, "the keeper's thumbnail is not painted on the page"


# --- the cache ---------------------------------------------------------------------------------------------


def test_a_restarted_api_loads_the_saved_index_instead_of_rebuilding(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path, redis_url, None)
    fill(settings, planted_vectors())
    first = IndexCache(settings)
    _, index = first.get(PROJECT)
    first.close()
    assert (first.folder(PROJECT) / "index.json").is_file()
    with open_store(settings, PROJECT, writer=True) as store:  # written while "the API was down"
        store.delete([101])

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("the saved index should have been loaded")

    monkeypatch.setattr(VectorIndex, "from_store", no_rebuild)
    second = IndexCache(settings)
    _, loaded = second.get(PROJECT)  # loaded, then caught up with the store
    assert len(loaded) == len(index) - 1
    _scores, ids = loaded.search(planted_vectors()[QUERY], 2)
    assert ids[0].tolist() == [QUERY, 102]
    second.close()


def test_the_cache_holds_at_most_n_projects_and_m_bytes_and_reloads_what_it_let_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=tmp_path / "data", index_cache_projects=2)
    version = embedder_version_of(settings)
    vectors = planted_vectors()
    for project in (21, 22, 23):  # task ids tell the projects apart: 21xxx, 22xxx, 23xxx
        with open_store(settings, project, writer=True) as store:
            store.upsert([_record(project * 1000 + task, v, version) for task, v in vectors.items()])
    one = len(vectors) * (DIM * 4 + 8)  # vectors x (dimension x 4 + an 8-byte id)

    cache = IndexCache(settings)
    cache.get(21), cache.get(22), cache.get(21)
    assert cache.held() == [(22, one), (21, one)], "least recently used first"
    cache.get(23)
    assert [project for project, _ in cache.held()] == [21, 23], "22, the least recently used, let go"
    with pytest.raises(NotIndexed):
        cache.get(77)
    assert [project for project, _ in cache.held()] == [21, 23], "a project with nothing to search takes no place"

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("an evicted index is loaded from its saved file, not rebuilt")

    monkeypatch.setattr(VectorIndex, "from_store", no_rebuild)
    with open_store(settings, 22, writer=True) as store:  # written while 22 was not held
        store.delete([22101])
    _, index = cache.get(22)  # loaded again and caught up with the store
    assert [project for project, _ in cache.held()] == [23, 22]
    _scores, ids = index.search(vectors[QUERY], 2)
    assert ids[0].tolist() == [22000 + QUERY, 22102]
    cache.close()

    by_bytes = IndexCache(settings.model_copy(update={"index_cache_projects": 10, "index_cache_bytes": one * 3 // 2}))
    by_bytes.get(21), by_bytes.get(23)
    assert by_bytes.held() == [(23, one)], "two indexes would pass the byte budget"
    tiny = IndexCache(settings.model_copy(update={"index_cache_bytes": one // 2}))
    _, index = tiny.get(21)  # alone over the budget: still searched (and held while it is the latest)
    assert tiny.get(21)[1] is index and tiny.held() == [(21, one)]


# --- the command line ----------------------------------------------------------------------------------------


def test_the_cli_prints_similar_tasks_and_writes_the_duplicate_report(
    tmp_path: Path, redis_url: str, search_ls: FakeLabelStudio
) -> None:
    settings = _settings(tmp_path, redis_url, search_ls.url, api_key=SecretStr("cli-key"))
    fill(settings, planted_vectors())
    env = {**os.environ, "DINOLABEL_API_KEY": "cli-key"}
    with serving(create_app(settings)) as url:
        similar = subprocess.run(
            [DINOLABEL, "similar", "--project", str(PROJECT), "--task", str(QUERY), "-k", "3", "--api", url],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        report = tmp_path / "dups.csv"
        duplicates = subprocess.run(
            [DINOLABEL, "duplicates", "--project", str(PROJECT), "--format", "csv", "--out", str(report), "--api", url],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        refused = subprocess.run(
            [DINOLABEL, "similar", "--project", str(PROJECT), "--task", str(QUERY), "--api", url, "--api-key", "bad"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
    assert similar.returncode == 0, similar.stderr
    assert similar.stdout.splitlines() == [
        f"101\t0.9900\tunlabeled\t{search_ls.url}/data/upload/{PROJECT}/101.png",
        f"102\t0.9500\tlabeled\t{search_ls.url}/data/upload/{PROJECT}/102.png",
        f"103\t0.9000\tunlabeled\t{search_ls.url}/data/upload/{PROJECT}/103.png",
    ]
    assert duplicates.returncode == 0, duplicates.stderr
    assert report.read_text().splitlines()[0] == ",".join(
        ("stage", "group", "task_id", "keeper", "is_keeper", "similarity_to_keeper", "group_min_similarity")
    )
    assert refused.returncode == 3
    assert refused.stderr.startswith(f"dinolabel similar: GET /v1/projects/{PROJECT}/similar: HTTP 401: an API key")


# --- search by image: what the API refuses before any worker is asked ------------------------------------------


def test_search_uploads_and_urls_are_checked_before_a_worker_is_asked(
    tmp_path: Path, redis_url: str, search_ls: FakeLabelStudio
) -> None:
    settings = _settings(
        tmp_path, redis_url, search_ls.url, image_max_bytes=20_000, image_max_pixels=100_000, predict_deadline=1
    )
    fill(settings, planted_vectors())
    url = f"/v1/projects/{PROJECT}/search"
    photo = _jpeg(scene(200, 150, seed=1), 80)
    noise = encode_png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)))
    with TestClient(create_app(settings)) as client:

        def refused(status: int, **request: object) -> str:
            response = client.post(url, **request)
            assert response.status_code == status, response.text
            return response.json()["detail"]

        assert "send the query image as multipart/form-data" in refused(
            415, content=photo, headers={"Content-Type": "image/jpeg"}
        )
        assert refused(413, files={"image": ("big.png", noise)}) == (
            "image: larger than 20,000 bytes (DINOLABEL_IMAGE_MAX_BYTES)"
        )
        assert refused(415, files={"image": ("a.pdf", b"%PDF-1.7 not an image")}).startswith("image: ")
        assert refused(422, files={"image": ("wide.png", encode_png(Image.new("L", (1000, 101))))}) == (
            "image: 1000x101 pixels; at most 100,000 (DINOLABEL_IMAGE_MAX_PIXELS)"
        )
        assert (
            refused(422, files={"other": ("a.jpg", photo)})
            == "image: send the query image as a file part named 'image'"
        )
        assert refused(422, json={"url": "http://elsewhere.example/cat.jpg"}).startswith(
            "url: only images on Label Studio's own origin"
        )
        assert refused(422, json={"url": "data:image/png;base64,AAAA"}).startswith("url: only images")
        assert refused(422, json={"url": "/x.jpg", "extra": 1})[0]["loc"] == ["body", "extra"]
        assert refused(422, content=b'{"url": NaN}', headers={"Content-Type": "application/json"})
        assert refused(422, files={"image": ("a.jpg", photo)}, params={"k": settings.search_max_k + 1}).startswith(
            "k: "
        )
        # A valid query that no worker takes: the API says so once its deadline passes, and leaves nothing queued.
        detail = refused(503, files={"image": ("a.jpg", photo)})
        assert detail.startswith("no worker serving the embedder answered within 1 s (DINOLABEL_PREDICT_DEADLINE)")
        assert client.app.state.service.queues.embed.count == 0
    assert search_ls.seen("/data/") == []  # nothing was fetched by the API


def test_search_by_url_needs_a_known_label_studio(tmp_path: Path, redis_url: str) -> None:
    settings = _settings(tmp_path, redis_url, None)
    fill(settings, planted_vectors())
    with TestClient(create_app(settings)) as client:
        response = client.post(f"/v1/projects/{PROJECT}/search", json={"url": "/data/upload/12/1.png"})
        assert response.status_code == 409
        assert response.json()["detail"].startswith("no Label Studio address for project 12")
        response = client.post("/v1/projects/77/search", json={"url": "/data/upload/12/1.png"})
        assert response.status_code == 404
