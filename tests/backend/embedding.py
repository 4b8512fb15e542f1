"""A project indexed with a tiny DINOv2's own embeddings of its images, and a worker process serving that
embedder: what the tests of search by image and of "more like these" need (a query embedded by the worker
must land on the vectors stored here, so both come from the same checkpoint)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from backend.config import Settings
from backend.project_vectors import embedder_version_of, open_store
from indexer import StoredVector, image_hashes
from model import create_embedder
from model.images import decode_image
from tests.processes import Service


def store_embeddings(settings: Settings, project: int, docs: Path, tasks: Iterable[int]) -> None:
    """Store, as an index job would, the vectors of ``docs/img{task}.png`` for each task, made by the
    embedder the settings name (``embedder_model``)."""
    embedder = create_embedder(str(settings.embedder_model), image_size=224, device="cpu")
    assert embedder.version == embedder_version_of(settings)
    records = []
    for task in tasks:
        data = (docs / f"img{task}.png").read_bytes()
        image = decode_image(data, max_pixels=10**8)
        found = image_hashes(data, image)
        vector = embedder.embed([image])[0]
        records.append(StoredVector(task, embedder.version, vector, found.sha256, found.pixel_hash, found.phash,
                                    found.width, found.height))  # fmt: skip
    with open_store(settings, project, writer=True) as store:
        store.upsert(records)


def start_embed_worker(settings: Settings, log: Path) -> Service:
    """A ``dinolabel worker`` process serving the settings' embedder only, on their Redis, Local Files root
    and Label Studio."""
    env = {
        "DINOLABEL_REDIS_URL": settings.redis_url or "",
        "DINOLABEL_WORKER_MODELS": "embedder",
        "DINOLABEL_EMBEDDER_MODEL": str(settings.embedder_model),
        "DINOLABEL_DEVICE": "cpu",
        "DINOLABEL_LOCAL_FILES_DOCUMENT_ROOT": str(settings.local_files_document_root),
        "DINOLABEL_LABEL_STUDIO_URL": settings.label_studio_url or "",
    }
    if settings.label_studio_api_key is not None:
        env["DINOLABEL_LABEL_STUDIO_API_KEY"] = settings.label_studio_api_key.get_secret_value()
    return Service(["worker"], env, log).start()
