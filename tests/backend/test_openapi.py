"""The whole HTTP API fuzzed from its own OpenAPI schema: no 5xx, no answer that the schema does not allow.

``dinolabel serve`` runs as a child process (embedded Redis and worker, tiny model, real sockets) and
schemathesis sends it requests generated from ``/openapi.json``: the documented examples, valid
requests and invalid ones, for every operation, with basic auth off and on. Each answer must be
below 500, have a documented status, content type and body shape. The number of examples per
operation is fixed (and the generation derandomised), so the run takes the same time each time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.strategies import SearchStrategy
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from backend.config import Settings
from backend.project_vectors import embedder_version_of, open_store
from indexer import StoredVector
from tests.images import png
from tests.labelstudio import free_port
from tests.processes import Service, wait_for
from tests.tiny_checkpoints import TINY_DINOV2_ARGS, build_tiny_dinov2

pytestmark = pytest.mark.slow

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
AUTH = ("fuzz-user", "fuzz-pässword")


def serve(checkpoint: Path, dinov2: Path, directory: Path, **env: str) -> tuple[Service, str]:
    """Start ``dinolabel serve`` on a free loopback port, as deployed (its worker serving both models);
    returns it and its URL."""
    docs = directory / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "img.png").write_bytes(png(64, 48, 1))  # what the documented examples ask for
    plant_index(directory / "data", dinov2)
    port = free_port()
    service = Service(
        ["serve"],
        {
            "DINOLABEL_DETECTOR_CHECKPOINT": str(checkpoint),
            "DINOLABEL_WORKER_MODELS": "detector,embedder",  # search by image is embedded, not refused
            "DINOLABEL_EMBEDDER_MODEL": str(dinov2),
            "DINOLABEL_DEVICE": "cpu",
            "DINOLABEL_DATA_DIR": str(directory / "data"),
            "DINOLABEL_HOST": "127.0.0.1",
            "DINOLABEL_PORT": str(port),
            "DINOLABEL_LOCAL_FILES_DOCUMENT_ROOT": str(docs),
            "DINOLABEL_LABEL_STUDIO_URL": "http://127.0.0.1:9",  # nothing listens: planning fails at once
            "DINOLABEL_LABEL_STUDIO_RETRIES": "0",
            "DINOLABEL_PREDICT_DEADLINE": "10",
            "DINOLABEL_WEBHOOK_SECRET": "fuzz-secret",
            **env,
        },
        directory / "serve.log",
    ).start()
    return service, f"http://127.0.0.1:{port}"


def plant_index(data_dir: Path, dinov2: Path) -> None:
    """Projects 0 and 1 hold a few vectors (two tasks with equal bytes), so that the search and duplicates
    routes run their whole path for the ids the fuzzer sends most (its other ids get the documented 404)."""
    settings = Settings(data_dir=data_dir, embedder_model=str(dinov2))
    version = embedder_version_of(settings)
    vectors = np.random.default_rng(0).standard_normal((6, TINY_DINOV2_ARGS["embed_dim"])).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for project in (0, 1):
        with open_store(settings, project, writer=True) as store:
            store.upsert(
                StoredVector(task, version, vectors[task], f"sha-{task // 2}", f"px-{task}", task * 977, 64, 48)
                for task in range(6)
            )


def _status(url: str, auth: tuple[str, str] | None) -> str | None:
    try:
        return httpx.get(f"{url}/health", auth=auth, timeout=2).json().get("status")
    except (httpx.HTTPError, ValueError):
        return None


@pytest.fixture(scope="module")
def apis(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Two services, started side by side: basic auth off, and on (``AUTH``)."""
    dinov2 = build_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny", img_size=224)
    open_service, open_url = serve(tiny_checkpoint, dinov2, tmp_path_factory.mktemp("open"))
    secured, secured_url = serve(
        tiny_checkpoint,
        dinov2,
        tmp_path_factory.mktemp("secured"),
        DINOLABEL_BASIC_AUTH_USER=AUTH[0],
        DINOLABEL_BASIC_AUTH_PASS=AUTH[1],
    )
    try:
        for service, url, auth in ((open_service, open_url, None), (secured, secured_url, AUTH)):
            wait_for(lambda: _status(url, auth) == "UP", 120, f"the API and its worker\n{service.log_tail()}")  # noqa: B023
        yield open_url, secured_url
    finally:
        open_service.stop()
        secured.stop()


def fuzz(
    url: str, examples: int, auth: tuple[str, str] | None = None, schema_auth: tuple[str, str] | None = None
) -> Counter[tuple[str, int]]:
    """Run every operation's documented examples, then ``examples`` valid and invalid generated requests.

    Returns the number of answers per operation and status. A failing check raises at its first failure
    (no shrinking: the failure report shows the request as sent, with a curl command to replay it).
    """
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", auth=schema_auth or auth)
    sent: Counter[tuple[str, int]] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        strategies = [
            *schema.get_strategies_from_examples(operation),
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        ]
        if operation.body or any(operation.iter_parameters()):  # something to get wrong
            strategies.append(operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
        for strategy in strategies:
            _send(strategy, url, auth, examples, sent, operation.label)
    return sent


def _send(
    strategy: SearchStrategy[schemathesis.Case],
    url: str,
    auth: tuple[str, str] | None,
    examples: int,
    sent: Counter[tuple[str, int]],
    label: str,
) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=url, auth=auth, timeout=60)
        sent[(label, response.status_code)] += 1
        case.validate_response(response, checks=CHECKS)

    run()


def report(title: str, sent: Counter[tuple[str, int]]) -> set[str]:
    """Print how many requests ran (per operation and status); returns the operations exercised."""
    table = ", ".join(f"{label} {status}: {count}" for (label, status), count in sorted(sent.items()))
    print(f"schemathesis, {title}: {sum(sent.values())} requests ({table})")
    return {label for label, _ in sent}


def operations(url: str) -> int:
    """The operations the app's own schema lists (every one must be exercised)."""
    return sum(len(methods) for methods in httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"].values())


def test_no_request_makes_the_api_fail_or_leave_its_schema(apis: tuple[str, str]) -> None:
    count = operations(apis[0])
    assert count >= 15  # Label Studio's 4; the jobs' 4 (preannotate, index, follow, cancel); search's 3; /metrics;
    # priority's 3 (prioritize, follow, the last ranking)
    sent = fuzz(apis[0], examples=15)
    assert len(report("basic auth off", sent)) == count, "every operation was exercised"
    assert sum(sent.values()) > count * 15
    assert sent[("POST /predict", 200)] and sent[("POST /predict", 422)], "requests served and refused"
    assert sent[("POST /webhook", 200)] and sent[("POST /setup", 200)]


def test_with_basic_auth_on_too(apis: tuple[str, str]) -> None:
    count = operations(apis[0])
    sent = fuzz(apis[1], examples=5, auth=AUTH)
    assert len(report("basic auth on", sent)) == count and sum(sent.values()) > count * 5
    assert sent[("POST /predict", 200)]
    assert not any(status == 401 for label, status in sent if label != "POST /webhook"), "the webhook's own secret"
    unauthorised = fuzz(apis[1], examples=2, schema_auth=AUTH)  # no credentials: the documented 401s
    assert len(report("basic auth on, no credentials", unauthorised)) == count
    assert {status for label, status in unauthorised if label != "POST /webhook"} == {401}
