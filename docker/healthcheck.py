#!/usr/bin/env python
"""Container health check for the dinolabel image: ``dinolabel-healthcheck [auto|api|worker]``.

- ``api``: GET /health on this container's port. 200 (``UP``, or ``DEGRADED`` while no worker is
  ready) is healthy; 503 (Redis unreachable) or no answer is not.
- ``worker``: this container's worker is in Redis with ``state: ready`` (its heartbeat key, named
  ``<hostname>.<hex>``, expires seconds after the process dies). ``loading`` counts as not healthy yet:
  give the check a ``start_period`` longer than the first model download.
- ``auto`` (the image's HEALTHCHECK): picks ``api`` or ``worker`` from PID 1's command line; any other
  command (``preannotate``, ``register-webhook``) is reported healthy.

Exit 0 healthy, 1 not (what Docker expects). Standard library plus redis, both in the image.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import urllib.error
import urllib.request


def role_of_pid1() -> str:
    """The dinolabel subcommand PID 1 runs (``serve``, ``worker``...), or "" if none."""
    try:
        with open("/proc/1/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return ""
    for i, arg in enumerate(argv):
        if os.path.basename(arg).startswith("dinolabel") and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def check_api() -> int:
    port = os.environ.get("DINOLABEL_PORT") or "9090"
    request = urllib.request.Request(f"http://127.0.0.1:{port}/health")
    user = os.environ.get("DINOLABEL_BASIC_AUTH_USER") or os.environ.get("BASIC_AUTH_USER")
    if user:  # /health is behind basic auth when it is on
        password = os.environ.get("DINOLABEL_BASIC_AUTH_PASS") or os.environ.get("BASIC_AUTH_PASS") or ""
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=4) as response:
            body = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        print(f"api: /health answered {exc.code}: {exc.read()[:300]!r}")
        return 1
    except (OSError, ValueError) as exc:
        print(f"api: /health did not answer: {exc}")
        return 1
    ready = body.get("workers", {}).get("ready")
    print(f"api: {body.get('status')} ({body.get('reason') or f'workers ready: {ready}'})")
    return 0


def check_worker() -> int:
    url = os.environ.get("DINOLABEL_REDIS_URL")
    if not url:
        print("worker: DINOLABEL_REDIS_URL is not set")
        return 1
    import redis

    from backend.queues import KEY_PREFIX

    prefix = f"{KEY_PREFIX}worker:{socket.gethostname()}."
    try:
        client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
        states = [json.loads(v) for k in client.scan_iter(match=prefix + "*") if (v := client.get(k)) is not None]
    except redis.RedisError as exc:
        print(f"worker: Redis unreachable: {exc}")
        return 1
    if any(s.get("state") == "ready" for s in states):
        print(f"worker: ready on {states[0].get('device')}")
        return 0
    print(f"worker: not ready: {[s.get('state') for s in states] or 'no heartbeat'}")
    return 1


def main(argv: list[str]) -> int:
    role = argv[1] if len(argv) > 1 else "auto"
    if role == "auto":
        role = {"serve": "api", "worker": "worker"}.get(role_of_pid1(), "none")
    if role == "api":
        return check_api()
    if role == "worker":
        return check_worker()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
