"""The ``dinolabel`` command line.

- ``serve``: the HTTP API (Label Studio protocol, job API) on port 9090; without
  ``DINOLABEL_REDIS_URL`` it also starts an embedded Redis and one worker in the same process.
- ``worker``: a GPU worker (one per GPU) taking jobs from ``DINOLABEL_REDIS_URL``.
- ``preannotate``: pre-annotate a whole project through the API, with a progress bar.
- ``index``: embed a whole project's images for search through the API, with a progress bar.
- ``store-writer``: the one writer of the projects' vector stores, alone (``serve`` runs it by default).
- ``register-webhook``: make Label Studio send ``TASKS_CREATED``, ``TASKS_DELETED`` and the annotation
  events to us, with our shared secret.
- ``prioritize``: rank a project's unlabeled tasks into Label Studio through the API, with progress.
- ``unprioritize``: remove our ranking from a project (backend/ls_priority.py: the tab, the fields).
- ``similar``: the tasks most similar to one task, through the API.
- ``duplicates``: a project's duplicate report (JSON, CSV or an HTML gallery), through the API.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from backend.config import Settings

# They log every request's full URL at INFO: image URLs may carry user:password@ or signed queries.
QUIET_LOGGERS = ("httpx", "httpcore")


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _settings() -> Settings:
    """The settings, or one line on stderr and exit status 2 when the environment is wrong.

    Pydantic's own message quotes the input values, which include keys and passwords: never print it.
    """
    from pydantic import ValidationError

    from backend.config import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False, include_input=False):
            field = "_".join(str(part) for part in error["loc"]).upper()
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"DINOLABEL_{field}: {message}" if field else message)
        print(f"dinolabel: configuration error: {'; '.join(problems)}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from backend.main import create_app

    settings = _settings()
    settings.host = args.host or settings.host
    settings.port = args.port or settings.port
    _logging(settings.log_level)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


def _store_writer(args: argparse.Namespace) -> int:
    from backend.queues import connect
    from backend.store_writer import run_store_writer

    settings = _settings()
    _logging(settings.log_level)
    if not settings.redis_url:
        print("dinolabel store-writer needs DINOLABEL_REDIS_URL (the Redis that `dinolabel serve` uses)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        run_store_writer(settings, connect(settings.redis_url), burst=args.burst)
    except KeyboardInterrupt:
        return 130
    return 0


def _worker(args: argparse.Namespace) -> int:
    from backend.queues import connect
    from backend.worker import run_worker

    settings = _settings()
    _logging(settings.log_level)
    if not settings.redis_url:
        print("dinolabel worker needs DINOLABEL_REDIS_URL (the Redis that `dinolabel serve` uses)", file=sys.stderr)
        return 2
    try:
        run_worker(settings, connect(settings.redis_url), burst=args.burst)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        print(f"dinolabel worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


EXIT_API = 3
"""Exit status of ``preannotate`` when the API cannot be reached, stops answering or refuses the request."""


class ApiError(Exception):
    """The API refused a request or answered something unreadable; the message is one line."""


class ApiGone(ApiError):
    """The API did not answer at all (refused connection, reset, time-out)."""


def _api(args: argparse.Namespace, *, timeout: float = 30.0) -> httpx.Client:
    """A client of the dinolabel API: basic auth from ``--user``/``--password``, or the API key as a Bearer
    token (``--api-key``, else ``DINOLABEL_API_KEY``)."""
    auth = (args.user, args.password) if args.user else None
    key = args.api_key
    if key is None and auth is None:
        configured = _settings().api_key
        key = configured.get_secret_value() if configured is not None else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=args.api.rstrip("/"), auth=auth, headers=headers, timeout=timeout)


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    """One API call; failures become ``ApiGone``/``ApiError`` with a one-line reason, never a body dump."""
    try:
        response = client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise ApiGone(type(exc).__name__) from exc
    if response.status_code >= 400:
        raise ApiError(f"{method} {path}: HTTP {response.status_code}: {_reason(response)}")
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ApiError(f"{method} {path}: the answer is not the API's JSON ({_kind(response)}); is --api right?")
    return body


def _reason(response: httpx.Response) -> str:
    """The API's own ``detail`` when it sent one; otherwise what came back, by kind only (an HTML page of a
    proxy is not printed)."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):  # a 422: the refused fields
        detail = "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail if isinstance(d, dict)
        )
    if isinstance(detail, str) and detail:
        return detail if len(detail) <= 300 else detail[:300] + "..."
    return f"no reason given ({_kind(response)})"


def _kind(response: httpx.Response) -> str:
    content_type = response.headers.get("content-type", "no content type").split(";")[0]
    return f"{content_type}, {len(response.content)} bytes"


def _shown(client: httpx.Client) -> str:
    """The API's address without any user:password in it."""
    return str(client.base_url.copy_with(username=None, password=None)).rstrip("/")


def _preannotate(args: argparse.Namespace) -> int:
    body = {"task_ids": args.task_ids} if args.task_ids else None
    return _run_job(args, "preannotate", body, "predicts")


def _index(args: argparse.Namespace) -> int:
    body: dict[str, Any] | None = {"task_ids": args.task_ids} if args.task_ids else None
    if args.sync:
        body = {"sync": True}
    return _run_job(args, "index", body, "embeds")


def _run_job(args: argparse.Namespace, command: str, body: dict[str, Any] | None, verb: str) -> int:
    """Start a job of ``command`` (its route's last part) and follow it to its end."""
    with _api(args) as client:
        job: dict[str, Any] | None = None
        try:
            job = _call(client, "POST", f"/v1/projects/{args.project}/{command}", json=body)
            return _follow(client, args, job)
        except ApiGone as exc:
            if job is None:
                print(
                    f"dinolabel {command}: cannot reach the API at {_shown(client)} ({exc}); "
                    "is `dinolabel serve` running there?",
                    file=sys.stderr,
                )
            else:
                print(
                    f"dinolabel {command}: the API at {_shown(client)} stopped answering ({exc}); job {job['id']} "
                    f"goes on in the workers: follow it with `GET /v1/jobs/{job['id']}` when the API is back, or "
                    f"rerun `dinolabel {command} --project {args.project}` (it only {verb} what is missing)",
                    file=sys.stderr,
                )
        except ApiError as exc:
            print(f"dinolabel {command}: {exc}", file=sys.stderr)
        return EXIT_API


def _follow(client: httpx.Client, args: argparse.Namespace, job: dict[str, Any]) -> int:
    """Show the job's progress until it ends; then its counts and first failures."""
    from tqdm import tqdm

    print(f"job {job['id']} for project {args.project}, model version {job['model_version']}", file=sys.stderr)
    bar = tqdm(total=0, unit="task", desc=f"project {args.project}", disable=args.quiet)
    try:
        while True:
            job = _call(client, "GET", f"/v1/jobs/{job['id']}", params={"failures": 0})
            bar.total = job["total"]
            bar.n = job["done"] + job["skipped"] + job["failed"]
            bar.set_postfix(done=job["done"], skipped=job["skipped"], failed=job["failed"], status=job["status"])
            bar.refresh()
            if job["status"] in ("done", "cancelled", "failed"):
                break
            time.sleep(args.interval)
    except KeyboardInterrupt:
        bar.clear()
        answer = input(f"\nCancel job {job['id']} (tasks not started yet are dropped)? [y/N] ").strip().lower()
        if answer in ("y", "yes"):
            job = _call(client, "DELETE", f"/v1/jobs/{job['id']}")
            print(f"job {job['id']} cancelled", file=sys.stderr)
        else:
            print(f"job {job['id']} keeps running; follow it with GET /v1/jobs/{job['id']}", file=sys.stderr)
        return 130
    finally:
        bar.close()
    job = _call(client, "GET", f"/v1/jobs/{job['id']}", params={"failures": 20})
    made, held = ("embedded", "already indexed") if job.get("kind") == "index" else ("predicted", "already predicted")
    print(
        f"{job['status']}: {job['done']} {made}, {job['skipped']} skipped ({held}), "
        f"{job['failed']} failed of {job['total']} tasks"
    )
    for failure in job["failures"]:
        print(f"  task {failure['task_id']}: {failure['reason']}")
    return 0 if job["status"] == "done" and job["failed"] == 0 else 1


def _prioritize(args: argparse.Namespace) -> int:
    """Start a prioritize run through the API and follow it to its end."""
    request: dict[str, Any] = {}
    if args.like_tasks:
        request["json"] = {"like_task_ids": args.like_tasks}
    elif args.like_label:
        request["json"] = {"like_label": args.like_label}
    elif args.like_image:
        try:
            request["files"] = [("image", (path.name, path.read_bytes())) for path in args.like_image]
        except OSError as exc:
            print(f"dinolabel prioritize: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
            return 2
    # Uploads wait for a worker to embed them (DINOLABEL_PREDICT_DEADLINE, 45 s by default).
    with _api(args, timeout=180.0 if args.like_image else 30.0) as client:
        try:
            job = _call(client, "POST", f"/v1/projects/{args.project}/prioritize", **request)
            print(f"prioritize job {job['id']} for project {args.project}", file=sys.stderr)
            shown = None
            while job["status"] not in ("done", "failed"):
                if job["status"] != shown and not args.quiet:
                    print(f"  {job['status']}", file=sys.stderr)
                    shown = job["status"]
                time.sleep(args.interval)
                job = _call(client, "GET", f"/v1/priority-jobs/{job['id']}")
        except ApiGone as exc:
            print(f"dinolabel prioritize: cannot reach the API at {_shown(client)} ({exc})", file=sys.stderr)
            return EXIT_API
        except ApiError as exc:
            print(f"dinolabel prioritize: {exc}", file=sys.stderr)
            return EXIT_API
    if job["status"] == "failed":
        print(f"failed: {job['error']}", file=sys.stderr)
        return 1
    print(
        f"done: {job['ranked']} tasks ranked ({job['duplicates']} duplicates last), {job['labeled']} labeled, "
        f'{job["write_calls"]} Label Studio write calls; tab {job["tab_id"]} "dinolabel priority"'
    )
    if job.get("like"):
        print(f"more like these: {job['like']}")
    if job.get("predicted"):
        print(
            f"uncertainty: {job['predicted']} ranked tasks hold a prediction of {job['detector']} (weight "
            f"{job['uncertainty_weight']}); it moved {job['moved_by_uncertainty']} of them ahead"
        )
    return 0


def _task_ids(text: str) -> list[int]:
    """``--like-tasks 1,2,3``."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"task ids separated by commas, not {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"task ids separated by commas, not {text!r}")
    return ids


def _label_studio_options(command: argparse.ArgumentParser) -> None:
    """The options ``_label_studio_access`` reads, for the commands that call Label Studio directly."""
    command.add_argument("--label-studio-url", help="default DINOLABEL_LABEL_STUDIO_URL")
    command.add_argument("--api-key", help="default DINOLABEL_LABEL_STUDIO_API_KEY")


def _label_studio_access(args: argparse.Namespace, settings: Settings) -> tuple[str, str] | None:
    """Label Studio's URL and key from ``--label-studio-url``/``--api-key`` or the settings; None (and a
    line on stderr) without both. The options stand in for the operator's settings: both come from the
    operator, so they may pair."""
    from pydantic import SecretStr

    from backend.ls_credentials import label_studio_access

    operator: dict[str, Any] = {}
    if args.label_studio_url:
        operator["label_studio_url"] = args.label_studio_url
    if args.api_key:
        operator["label_studio_api_key"] = SecretStr(args.api_key)
    access = label_studio_access(settings.model_copy(update=operator))
    if not access.url or not access.api_key:
        print("needs --label-studio-url and --api-key (or DINOLABEL_LABEL_STUDIO_URL/_API_KEY)", file=sys.stderr)
        return None
    return access.url, access.api_key


def _register_webhook(args: argparse.Namespace) -> int:
    from backend.ls_client import LabelStudioClient, LabelStudioError
    from backend.routes.ls import SECRET_HEADER, WEBHOOK_ACTIONS

    settings = _settings()
    if settings.webhook_secret is None:
        print(
            "register-webhook needs DINOLABEL_WEBHOOK_SECRET (the same as the backend's): /webhook refuses "
            "TASKS_CREATED and TASKS_DELETED without it",
            file=sys.stderr,
        )
        return 2
    access = _label_studio_access(args, settings)
    if access is None:
        return 2
    secret = settings.webhook_secret.get_secret_value()
    headers = {SECRET_HEADER: secret}
    target = args.backend_url.rstrip("/") + "/webhook"
    try:
        with LabelStudioClient(*access) as client:
            # Only active hooks that carry our secret count: without it /webhook refuses these events.
            sent = {
                action
                for hook in client.webhooks(args.project)
                if hook.get("url") == target
                and hook.get("is_active", True)
                and (hook.get("headers") or {}).get(SECRET_HEADER) == secret
                for action in hook.get("actions") or []
            }
            missing = [action for action in WEBHOOK_ACTIONS if action not in sent]
            if not missing:
                print(f"project {args.project} already sends {_listed(WEBHOOK_ACTIONS)} to {target}")
                return 0
            hook = client.create_webhook(args.project, target, headers=headers, actions=missing)
    except LabelStudioError as exc:
        print(f"register-webhook: {exc}", file=sys.stderr)
        return 1
    print(f"webhook {hook.get('id')}: project {args.project} sends {_listed(missing)} to {target}")
    return 0


def _listed(actions: Sequence[str]) -> str:
    """``A``, ``A and B``, ``A, B and C``."""
    return " and ".join([", ".join(actions[:-1]), actions[-1]]) if len(actions) > 1 else "".join(actions)


def _similar(args: argparse.Namespace) -> int:
    with _api(args) as client:
        try:
            found = _call(
                client, "GET", f"/v1/projects/{args.project}/similar", params={"task_id": args.task, "k": args.k}
            )
        except ApiGone as exc:
            print(f"dinolabel similar: cannot reach the API at {_shown(client)} ({exc})", file=sys.stderr)
            return EXIT_API
        except ApiError as exc:
            print(f"dinolabel similar: {exc}", file=sys.stderr)
            return EXIT_API
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if found.get("warning"):
        print(f"note: {found['warning']}", file=sys.stderr)
    for hit in found["results"]:
        labeled = {True: "labeled", False: "unlabeled", None: "-"}[hit["labeled"]]
        print(f"{hit['task_id']}\t{hit['score']:.4f}\t{labeled}\t{hit['image'] or '-'}")
    return 0


def _duplicates(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"format": args.format}
    if args.threshold is not None:
        params["threshold"] = args.threshold
    with _api(args, timeout=args.timeout) as client:
        path = f"/v1/projects/{args.project}/duplicates"
        try:
            response = client.get(path, params=params)
        except httpx.TransportError as exc:
            print(
                f"dinolabel duplicates: cannot reach the API at {_shown(client)} ({type(exc).__name__})",
                file=sys.stderr,
            )
            return EXIT_API
        if response.status_code >= 400:
            print(
                f"dinolabel duplicates: GET {path}: HTTP {response.status_code}: {_reason(response)}", file=sys.stderr
            )
            return EXIT_API
    if args.out:
        with open(args.out, "wb") as out:
            out.write(response.content)
    else:
        sys.stdout.buffer.write(response.content)
    if args.format == "json":
        report = response.json()
        count = len(report.get("duplicate_ids", []))
        print(f"project {args.project}: {count} images could be removed", file=sys.stderr)
        if report.get("warning"):
            print(f"note: {report['warning']}", file=sys.stderr)
    return 0


def _connection_options(command: argparse.ArgumentParser) -> None:
    """How a command reaches the API: its address and credentials (basic auth, or the API key)."""
    command.add_argument("--api", default="http://127.0.0.1:9090", help="the dinolabel API (default %(default)s)")
    command.add_argument("--user", help="basic auth user of the API")
    command.add_argument("--password", help="basic auth password of the API")
    command.add_argument("--api-key", help="the API key (default DINOLABEL_API_KEY), sent as a Bearer token")


def _api_options(command: argparse.ArgumentParser) -> None:
    """The options of the commands that start a job through the API and follow it."""
    _connection_options(command)
    command.add_argument("--interval", type=float, default=1.0, help="seconds between progress polls")
    command.add_argument("--quiet", action="store_true", help="no progress bar")


def _unprioritize(args: argparse.Namespace) -> int:
    from backend.ls_client import LabelStudioClient, LabelStudioError
    from backend.ls_priority import TAB_TITLE, PriorityFields, remove_priority

    settings = _settings()
    access = _label_studio_access(args, settings)
    if access is None:
        return 2
    fields = PriorityFields(settings.priority_rank_field, settings.priority_reason_field)
    try:
        with LabelStudioClient(*access) as client:
            calls = remove_priority(client, args.project, fields)
    except LabelStudioError as exc:
        print(f"unprioritize: {exc}", file=sys.stderr)
        return 1
    print(
        f"project {args.project}: tab {TAB_TITLE!r} deleted, {fields.rank!r} and {fields.reason!r} emptied "
        f"({calls} write calls)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinolabel", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the API (port 9090 by default)")
    serve.add_argument("--host", help="bind address (DINOLABEL_HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (DINOLABEL_PORT, default 9090)")
    serve.set_defaults(run=_serve)

    worker = commands.add_parser("worker", help="run a model worker (one per GPU)")
    worker.add_argument("--burst", action="store_true", help="quit when the queues are empty")
    worker.set_defaults(run=_worker)

    writer = commands.add_parser(
        "store-writer",
        help="run the store writer alone (with DINOLABEL_STORE_WRITER=false on every `serve`)",
        description="The one process that writes the projects' vector stores under DINOLABEL_DATA_DIR.",
    )
    writer.add_argument("--burst", action="store_true", help="quit when its queues are empty")
    writer.set_defaults(run=_store_writer)

    pre = commands.add_parser(
        "preannotate",
        help="pre-annotate a Label Studio project, with a progress bar",
        description="Exit status: 0 all predicted, 1 some tasks failed, 3 the API was unreachable, stopped "
        "answering or refused the request, 130 interrupted.",
    )
    pre.add_argument("--project", type=int, required=True, help="Label Studio project id")
    pre.add_argument("--task-ids", type=int, nargs="+", help="only these tasks")
    _api_options(pre)
    pre.set_defaults(run=_preannotate)

    idx = commands.add_parser(
        "index",
        help="index a Label Studio project's images for search, with a progress bar",
        description="Exit status: 0 all embedded, 1 some tasks failed, 3 the API was unreachable, stopped "
        "answering or refused the request, 130 interrupted.",
    )
    idx.add_argument("--project", type=int, required=True, help="Label Studio project id")
    scope = idx.add_mutually_exclusive_group()
    scope.add_argument("--task-ids", type=int, nargs="+", help="only these tasks")
    scope.add_argument("--sync", action="store_true", help="re-check every image; drop vectors of deleted tasks")
    _api_options(idx)
    idx.set_defaults(run=_index)

    hook = commands.add_parser(
        "register-webhook",
        help="make Label Studio send TASKS_CREATED, TASKS_DELETED and the annotation events to this backend",
    )
    hook.add_argument("--project", type=int, required=True, help="Label Studio project id")
    hook.add_argument("--backend-url", required=True, help="this backend as Label Studio reaches it")
    _label_studio_options(hook)
    hook.set_defaults(run=_register_webhook)

    prio = commands.add_parser(
        "prioritize",
        help='rank a project\'s unlabeled tasks into Label Studio (tab "dinolabel priority")',
        description="Needs the project indexed (`dinolabel index`). Exit status: 0 ranked, 1 the run failed, 3 "
        "the API was unreachable or refused the request.",
    )
    prio.add_argument("--project", type=int, required=True, help="Label Studio project id")
    like = prio.add_mutually_exclusive_group()
    like.add_argument("--like-tasks", type=_task_ids, help="example task ids, e.g. 1,2,3: more like these first")
    like.add_argument("--like-label", help="a label: the boxes annotated with it are the examples")
    like.add_argument(
        "--like-image",
        type=Path,
        action="append",
        help="an example image file (repeat for more, at most 16): more like these first",
    )
    _api_options(prio)
    prio.set_defaults(run=_prioritize)

    unprioritize = commands.add_parser(
        "unprioritize", help="remove dinolabel's ranking from a Label Studio project (its tab, its task fields)"
    )
    unprioritize.add_argument("--project", type=int, required=True, help="Label Studio project id")
    _label_studio_options(unprioritize)
    unprioritize.set_defaults(run=_unprioritize)

    similar = commands.add_parser(
        "similar",
        help="the tasks whose images are most similar to a task's",
        description="Prints task id, score, labeled state and image URL per line, most similar first. Exit status: "
        "0 answered, 3 the API was unreachable or refused the request.",
    )
    similar.add_argument("--project", type=int, required=True, help="Label Studio project id")
    similar.add_argument("--task", type=int, required=True, help="the query task id")
    similar.add_argument("-k", type=int, default=20, help="results (default %(default)s)")
    similar.add_argument("--json", action="store_true", help="print the API's JSON answer")
    _connection_options(similar)
    similar.set_defaults(run=_similar)

    dup = commands.add_parser(
        "duplicates",
        help="a project's duplicate images: exact, near-exact (perceptual hash), near (embedding)",
        description="Exit status: 0 written, 3 the API was unreachable or refused the request.",
    )
    dup.add_argument("--project", type=int, required=True, help="Label Studio project id")
    dup.add_argument("--threshold", type=float, help="embedding cosine for near duplicates (API default 0.9)")
    dup.add_argument("--format", choices=("json", "csv", "html"), default="json", help="default %(default)s")
    dup.add_argument("--out", help="write the report to this file (default: standard output)")
    dup.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the report")
    _connection_options(dup)
    dup.set_defaults(run=_duplicates)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
