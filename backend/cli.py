"""The ``dinolabel`` command line.

- ``serve``: the HTTP API (Label Studio protocol, job API) on port 9090; without
  ``DINOLABEL_REDIS_URL`` it also starts an embedded Redis and one worker in the same process.
- ``worker``: a GPU worker (one per GPU) taking jobs from ``DINOLABEL_REDIS_URL``.
- ``preannotate``: pre-annotate a whole project through the API, with a progress bar.
- ``register-webhook``: make Label Studio send ``TASKS_CREATED`` to us, with our shared secret.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
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


def _api(args: argparse.Namespace) -> httpx.Client:
    auth = (args.user, args.password) if args.user else None
    return httpx.Client(base_url=args.api.rstrip("/"), auth=auth, timeout=30.0)


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    response = client.request(method, path, **kwargs)
    if response.status_code >= 400:
        raise SystemExit(f"{method} {path}: HTTP {response.status_code}: {response.text}")
    return response.json()


def _preannotate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    body = {"task_ids": args.task_ids} if args.task_ids else None
    with _api(args) as client:
        job = _call(client, "POST", f"/v1/projects/{args.project}/preannotate", json=body)
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
    print(
        f"{job['status']}: {job['done']} predicted, {job['skipped']} skipped (already predicted), "
        f"{job['failed']} failed of {job['total']} tasks"
    )
    for failure in job["failures"]:
        print(f"  task {failure['task_id']}: {failure['reason']}")
    return 0 if job["status"] == "done" and job["failed"] == 0 else 1


def _register_webhook(args: argparse.Namespace) -> int:
    from pydantic import SecretStr

    from backend.ls_client import LabelStudioClient, LabelStudioError
    from backend.ls_credentials import label_studio_access

    settings = _settings()
    if settings.webhook_secret is None:
        print(
            "register-webhook needs DINOLABEL_WEBHOOK_SECRET (the same as the backend's): /webhook refuses "
            "TASKS_CREATED without it",
            file=sys.stderr,
        )
        return 2
    # The options stand in for the operator's settings (both come from the operator, so they may pair).
    operator: dict[str, Any] = {}
    if args.label_studio_url:
        operator["label_studio_url"] = args.label_studio_url
    if args.api_key:
        operator["label_studio_api_key"] = SecretStr(args.api_key)
    access = label_studio_access(settings.model_copy(update=operator))
    if not access.url or not access.api_key:
        print("needs --label-studio-url and --api-key (or DINOLABEL_LABEL_STUDIO_URL/_API_KEY)", file=sys.stderr)
        return 2
    secret = settings.webhook_secret.get_secret_value()
    target = args.backend_url.rstrip("/") + "/webhook"
    try:
        with LabelStudioClient(access.url, access.api_key) as client:
            if any(h.get("url") == target and "TASKS_CREATED" in (h.get("actions") or []) for h in
                   client.webhooks(args.project)):  # fmt: skip
                print(f"project {args.project} already sends TASKS_CREATED to {target}")
                return 0
            headers = {"X-Dinolabel-Secret": secret}
            hook = client.create_webhook(args.project, target, headers=headers, actions=["TASKS_CREATED"])
    except LabelStudioError as exc:
        print(f"register-webhook: {exc}", file=sys.stderr)
        return 1
    print(f"webhook {hook.get('id')}: project {args.project} sends TASKS_CREATED to {target}")
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

    pre = commands.add_parser("preannotate", help="pre-annotate a Label Studio project, with a progress bar")
    pre.add_argument("--project", type=int, required=True, help="Label Studio project id")
    pre.add_argument("--task-ids", type=int, nargs="+", help="only these tasks")
    pre.add_argument("--api", default="http://127.0.0.1:9090", help="the dinolabel API (default %(default)s)")
    pre.add_argument("--user", help="basic auth user of the API")
    pre.add_argument("--password", help="basic auth password of the API")
    pre.add_argument("--interval", type=float, default=1.0, help="seconds between progress polls")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")
    pre.set_defaults(run=_preannotate)

    hook = commands.add_parser("register-webhook", help="make Label Studio send TASKS_CREATED to this backend")
    hook.add_argument("--project", type=int, required=True, help="Label Studio project id")
    hook.add_argument("--backend-url", required=True, help="this backend as Label Studio reaches it")
    hook.add_argument("--label-studio-url", help="default DINOLABEL_LABEL_STUDIO_URL")
    hook.add_argument("--api-key", help="default DINOLABEL_LABEL_STUDIO_API_KEY")
    hook.set_defaults(run=_register_webhook)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
