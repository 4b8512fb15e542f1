"""What writing a ranking into a real Label Studio costs (backend/ls_priority.py): calls and seconds.

A Label Studio 1.23 on SQLite (tests/labelstudio.py) gets a project of ``--tasks`` JSON tasks; each
size in ``--sizes`` is ranked (random order, 4 reasons) with ``write_priority``, then ranked again in
another order (what a re-ranking after new annotations costs: the old ranks are marked, rewritten
and the unranked ones swept), then removed with ``remove_priority``. The tasks are imported once, for
the largest size; smaller sizes rank a prefix of them (the rest of the project stays unranked).

Run from the repository root::

    .venv/bin/python bench/ls_priority_write.py --sizes 10000 100000 [--base-dir /tmp/ls-bench]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.ls_client import LabelStudioClient  # noqa: E402
from backend.ls_priority import PriorityFields, remove_priority, write_priority  # noqa: E402
from bench.common import machine_info, positive_ints, write_report  # noqa: E402
from tests.labelstudio import LabelStudioAPI, LabelStudioServer  # noqa: E402

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/></RectangleLabels></View>'
)
REASONS = ("diverse", "uncertain", "like these", "duplicate")


def ranking(task_ids: list[int], seed: int) -> dict[int, tuple[int, str]]:
    order = random.Random(seed).sample(task_ids, len(task_ids))
    return {task: (rank, REASONS[min(rank * len(REASONS) // len(order), 3)]) for rank, task in enumerate(order)}


def all_task_ids(client: LabelStudioClient, project: int) -> list[int]:
    ids: list[int] = []
    while True:
        page, _ = client.task_page(project, after=ids[-1] if ids else 0)
        if not page:
            return ids
        ids.extend(task["id"] for task in page)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=positive_ints, nargs="+", default=[[10_000]])
    parser.add_argument("--base-dir", type=Path, help="Label Studio's folder (kept: a second run skips migrations)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "ls_priority_write.json")
    args = parser.parse_args()
    sizes = sorted({size for group in args.sizes for size in group})
    base = args.base_dir or Path(tempfile.mkdtemp(prefix="ls-priority-bench-"))
    started = time.monotonic()
    report: dict[str, Any] = {"machine": machine_info(), "label_studio": "1.23.2, SQLite", "runs": []}
    server = LabelStudioServer(base / "label-studio", token="0123456789abcdef0123456789abcdef01234567",
                               password="bench-priority")  # fmt: skip
    server.start()
    try:
        with (
            LabelStudioAPI(server.url, server.token, timeout=1800) as api,
            LabelStudioClient(server.url, server.token, write_timeout=1800) as client,
        ):
            project = api.create_project(f"priority bench {max(sizes)}", CONFIG)["id"]
            t0 = time.monotonic()
            for start in range(0, max(sizes), 10_000):
                stop = min(start + 10_000, max(sizes))
                rows = [{"data": {"image": f"/data/local-files/?d=img{i}.png"}} for i in range(start, stop)]
                api.request("POST", f"/api/projects/{project}/import", json=rows)
            report["import_s"] = round(time.monotonic() - t0, 1)
            ids = all_task_ids(client, project)
            for size in sizes:
                run: dict[str, Any] = {"tasks": size, "project_tasks": len(ids)}
                for name, seed in (("write", 1), ("rewrite", 2)):
                    written = write_priority(client, project, ranking(ids[:size], seed), PriorityFields())
                    assert written.ranked == size, written
                    run[name] = {"calls": written.calls, "seconds": round(written.seconds, 1)}
                t0 = time.monotonic()
                run["remove"] = {"calls": remove_priority(client, project), "seconds": round(time.monotonic() - t0, 1)}
                report["runs"].append(run)
                print(
                    f"label-studio 1.23.2 sqlite, project of {len(ids)} tasks, {size} ranked: "
                    f"write {run['write']['calls']} calls {run['write']['seconds']} s, "
                    f"rewrite {run['rewrite']['calls']} calls {run['rewrite']['seconds']} s, "
                    f"remove {run['remove']['calls']} calls {run['remove']['seconds']} s",
                    flush=True,
                )
    finally:
        server.stop()
    report["wall_s"] = time.monotonic() - started
    write_report(args.out, report)
    print(json.dumps(report["runs"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
