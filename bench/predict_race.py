"""How long Label Studio's side of one ``/predict`` is open to a bulk write (``backend.marks.ANSWER_WINDOW``).

Label Studio 1.23's "Retrieve predictions" chooses the tasks that lack a prediction of the version,
serialises them, posts one ``/predict``, and stores the answer (``ml/models.py:342-366``). A bulk write
that commits between the choice and the store gives a task two predictions. Our marks close the part
of that window we see (from the request's arrival to our answer); this script measures the two parts
only Label Studio sees, against a stub backend that answers at once as ours does: an (empty) prediction
for each of the first ``--answered`` tasks (``DINOLABEL_INTERACTIVE_MAX_TASKS``, 16) and ``[]`` for the
others:

- *choose -> arrive*: from the action's request to the ``/predict`` reaching the backend (an upper
  bound for the time between Label Studio choosing the tasks and sending them);
- *answer -> stored*: from the backend's last byte to the action's answer (an upper bound for Label
  Studio storing the predictions; it stores one per answered task, nothing for ``[]``).

It starts its own Label Studio (temporary directory; the first start runs migrations, 20-45 s) and
makes one project per task count. Run from the repository root:
``.venv/bin/python bench/predict_race.py [--tasks 1,16,1000] [--answered 16] [--out bench/out/predict_race.json]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.common import machine_info, positive_ints, write_report
from tests.labelstudio import LabelStudioAPI, LabelStudioServer

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/></RectangleLabels></View>'
)
VERSION = "stub-v1"


class Stub(ThreadingHTTPServer):
    """An ML backend that answers at once and records when each ``/predict`` arrived and was answered."""

    daemon_threads = True

    def __init__(self, answered: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answered = answered
        self.calls: list[dict[str, Any]] = []


class _Handler(BaseHTTPRequestHandler):
    server: Stub

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def _answer(self, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)
        self.wfile.flush()

    def do_GET(self) -> None:
        self._answer({"status": "UP", "model_class": "stub"})

    def do_POST(self) -> None:
        arrived = time.time()
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path.rstrip("/") != "/predict":
            self._answer({"model_version": VERSION})
            return
        tasks = request.get("tasks", [])
        prediction = {"result": [], "score": 0.0, "model_version": VERSION}
        self._answer({"results": [prediction if i < self.server.answered else [] for i in range(len(tasks))]})
        self.server.calls.append({"tasks": len(tasks), "arrived": arrived, "answered": time.time()})


def measure(api: LabelStudioAPI, stub: Stub, count: int) -> dict[str, Any]:
    project = api.create_project(f"race window {count}", CONFIG)["id"]
    ids = api.import_tasks(project, [{"data": {"image": f"/data/img{i}.png"}} for i in range(count)])
    api.connect_ml_backend(project, f"http://127.0.0.1:{stub.server_address[1]}")
    before = len(stub.calls)
    started = time.time()
    api.retrieve_predictions(project, ids)
    ended = time.time()
    calls = stub.calls[before:]
    stored = len(api.get("/api/predictions", project=project))
    if len(calls) != 1 or calls[0]["tasks"] != count or stored != min(count, stub.answered):
        raise RuntimeError(f"{count} tasks: {len(calls)} /predict calls, {stored} predictions stored")
    call = calls[0]
    return {
        "tasks": count,
        "choose_to_arrive_s": round(call["arrived"] - started, 4),
        "backend_s": round(call["answered"] - call["arrived"], 4),
        "answer_to_stored_s": round(ended - call["answered"], 4),
        "action_s": round(ended - started, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tasks", type=positive_ints, default=[1, 16, 1000])
    parser.add_argument("--answered", type=int, default=16, help="tasks answered with a prediction per call")
    parser.add_argument("--out", type=Path, default=Path("bench/out/predict_race.json"))
    args = parser.parse_args()
    run_started = time.perf_counter()
    stub = Stub(args.answered)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    rows = []
    with tempfile.TemporaryDirectory(prefix="predict-race-") as base:
        server = LabelStudioServer(Path(base), startup_timeout=900)  # migrations take minutes on a busy machine
        server.start()
        try:
            with LabelStudioAPI(server.url, server.token, timeout=900) as api:
                for count in args.tasks:
                    row = measure(api, stub, count)
                    print(
                        f"{count:>6} tasks: choose->arrive {row['choose_to_arrive_s']:.3f} s, "
                        f"answer->stored {row['answer_to_stored_s']:.3f} s, action {row['action_s']:.3f} s",
                        flush=True,
                    )
                    rows.append(row)
        finally:
            server.stop()
            stub.shutdown()
    report = {"machine": machine_info(), "label_studio": "1.23.2 (SQLite)", "answered": args.answered, "rows": rows}
    write_report(args.out, {**report, "wall_s": time.perf_counter() - run_started})


if __name__ == "__main__":
    main()
