"""Per-image latency of the service's ``POST /predict`` against the plain transformers loop.

Why this script exists: the backend adds work around the model (HTTP, Label Studio task parsing, the Redis
queue to the worker and back, image fetching and decoding, per-phrase scoring, NMS) and removes some
(same-size batching). Users compare us
with the few lines of transformers they would otherwise write, so that loop is the baseline, run in the
same process on the same images, checkpoint, device and precision, and the ratio says whether the
service is worth it (> 1: we are faster).

Run from the repository root::

    .venv/bin/python bench/predict_latency.py --batches 1,4,16 --precision fp32

Without ``--checkpoint`` it times a random-weight checkpoint of the real grounding-dino-tiny
architecture (built once, ~650 MB, cached under ``bench/out/cache``): the cost of a forward pass does
not depend on the weights, and nothing has to be downloaded. Scores of random weights are meaningless,
so the box counts printed are only a sanity check. The package never imports this file.

On a small shared machine a neighbour's process slows PyTorch's threads far more than its own share of
the CPU; every phase therefore records how many cores other processes used meanwhile ("other
processes ... cores"): trust a line only when that is close to 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Offline by default: the benchmark must never stall on Hub retries (a hub id must already be on disk);
# an explicit HF_HUB_OFFLINE=0 in the environment still wins, for benchmarking a hub id not yet cached.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run as a plain script: the repository root (for backend, model and tests) is not on sys.path otherwise.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import transformers
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw, ImageFilter
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

from backend.config import Settings
from backend.main import create_app
from bench.common import (
    OtherLoad,
    ensure_random_checkpoint,
    machine_info,
    positive_ints,
    process_cpu_seconds,
    write_report,
)
from model.devices import resolve_device

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.predict_latency")

IMAGE_SIZE = (640, 480)  # width, height: a common camera/COCO size; all equal so same-size batching applies
LABELS = ("cat", "dog", "traffic light")
# What the baseline user types; the service builds the same text from LABELS (same tokens, same cost).
PROMPT = "cat . dog . traffic light ."
BOX_THRESHOLD = 0.35  # the service's defaults (Settings.box_threshold / text_threshold)
TEXT_THRESHOLD = 0.25
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image">'
    + "".join(f'<Label value="{label}"/>' for label in LABELS)
    + "</RectangleLabels></View>"
)
READY_TIMEOUT_S = 600.0  # model load on a slow disk; the random checkpoint loads in about a second
SHUTDOWN_TIMEOUT_S = 30.0
RANDOM_MODEL_LABEL = "grounding-dino-tiny(random weights, real size)"
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --- inputs -----------------------------------------------------------------------------------------------


def make_images(count: int, root: Path, *, seed: int = 0) -> list[str]:
    """Write ``count`` structured 640x480 PNGs into ``root``; return their file names.

    Gradients, filled shapes and mild noise rather than flat or pure-noise images, so that PNG decoding
    and the processor's resize see realistic content. Seeded, so every run times the same pixels.
    """
    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIZE
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    names: list[str] = []
    for index in range(count):
        angle = rng.uniform(0, 2 * np.pi)
        ramp = xs / width * np.cos(angle) + ys / height * np.sin(angle)
        ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
        start, end = rng.integers(0, 256, size=(2, 3))
        pixels = start * (1 - ramp[..., None]) + end * ramp[..., None]
        image = Image.fromarray(pixels.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(6, 15))):
            x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            x1 = min(width - 1, x0 + int(rng.integers(30, 260)))
            y1 = min(height - 1, y0 + int(rng.integers(30, 200)))
            fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
            outline = tuple(int(v) for v in rng.integers(0, 256, size=3))
            if rng.random() < 0.5:
                draw.rectangle((x0, y0, x1, y1), fill=fill, outline=outline, width=3)
            else:
                draw.ellipse((x0, y0, x1, y1), fill=fill, outline=outline, width=3)
        image = image.filter(ImageFilter.GaussianBlur(radius=1.0))
        noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 6, size=(height, width, 3)).astype(np.int16)
        name = f"img_{index:03d}.png"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / name)
        names.append(name)
    return names


# --- baseline: the loop a user would write ----------------------------------------------------------------


@dataclass
class BaselineResult:
    """Per-image seconds of the plain transformers loop (warm-up excluded)."""

    load_s: float
    warmup_s: float
    seconds: list[float]
    boxes: list[int]

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.seconds)

    @property
    def median_s(self) -> float:
        """Less swayed than the mean by an image that a neighbouring process slowed down."""
        return statistics.median(self.seconds)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """What a user adds for mixed precision: plain ``torch.autocast``, nothing of ours."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


def _sync(device: torch.device) -> None:
    """CUDA runs asynchronously; without a sync the clock would stop before the GPU is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _baseline_image(model: Any, processor: Any, path: Path, device: torch.device, precision: str) -> int:
    """One image through the documented transformers recipe; returns the number of boxes kept."""
    image = Image.open(path).convert("RGB")
    inputs = processor(images=image, text=PROMPT, return_tensors="pt").to(device)
    with torch.inference_mode(), _autocast(device, precision):
        outputs = model(**inputs)
    results = processor.post_process_grounded_object_detection(
        outputs,
        inputs.input_ids,
        threshold=BOX_THRESHOLD,
        text_threshold=TEXT_THRESHOLD,
        target_sizes=[image.size[::-1]],
    )
    _sync(device)
    return len(results[0]["boxes"])


def run_baseline(checkpoint: str, paths: Sequence[Path], device: torch.device, precision: str) -> BaselineResult:
    """One image at a time, as in the transformers docs: read, process, forward, post-process.

    Reading and decoding the PNG is inside the timing because the service does it too.
    """
    started = time.perf_counter()
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(checkpoint).to(device).eval()
    load_s = time.perf_counter() - started

    started = time.perf_counter()
    _baseline_image(model, processor, paths[0], device, precision)
    warmup_s = time.perf_counter() - started
    seconds: list[float] = []
    boxes: list[int] = []
    for path in paths:
        started = time.perf_counter()
        boxes.append(_baseline_image(model, processor, path, device, precision))
        seconds.append(time.perf_counter() - started)
    del model, processor
    _free(device)
    return BaselineResult(load_s=load_s, warmup_s=warmup_s, seconds=seconds, boxes=boxes)


# --- ours: the real app, in-process -----------------------------------------------------------------------


@dataclass
class OursResult:
    """One timed ``POST /predict`` of ``batch`` tasks on a freshly started app."""

    batch: int
    load_s: float | None
    warmup_s: float
    wall_s: float
    boxes: int
    warnings: list[str] = field(default_factory=list)
    closed: bool = True
    ready_s: float = 0.0  # app start until /health says a worker is ready
    shutdown_s: float = 0.0


class _OneLineFormatter(logging.Formatter):
    """Tracebacks logged by the app stay out of the console (the message says what happened)."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        return self.formatMessage(record)


class _QuietThreads(logging.Filter):
    """Drops console records from threads left behind by an app that did not shut down.

    They retry a Redis that is gone every few seconds for the rest of the run; the collector still
    counts them for the JSON report.
    """

    def __init__(self) -> None:
        super().__init__()
        self.muted: set[int | None] = set()

    def mute(self, idents: set[int | None]) -> None:
        self.muted |= idents

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread not in self.muted


class _Collector(logging.Handler):
    """Keeps warnings and errors, so a task that failed (and was answered fast and empty) is noticed."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @contextlib.contextmanager
    def watch(self) -> Iterator[list[str]]:
        """The messages logged inside the block."""
        seen: list[str] = []
        first = len(self.records)
        try:
            yield seen
        finally:
            seen.extend(f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.records[first:])


def _predict_body(names: Sequence[str], *, first_id: int = 1) -> dict[str, Any]:
    return {
        "project": f"1.{int(time.time())}",  # what Label Studio sends: "<project id>.<timestamp>"
        "label_config": LABEL_CONFIG,
        "tasks": [
            {"id": first_id + index, "data": {"image": f"/data/local-files/?d={name}"}}
            for index, name in enumerate(names)
        ],
    }


def _post_predict(client: TestClient, names: Sequence[str], *, first_id: int = 1) -> tuple[float, int]:
    """Wall seconds of one ``/predict`` and the number of boxes; refuses an answer that is not complete.

    A ``/predict`` that passes its deadline hands the tasks to a bulk job and answers ``results: []``
    at once: fast, and worthless as a timing, so it fails the run instead.
    """
    started = time.perf_counter()
    response = client.post("/predict", json=_predict_body(names, first_id=first_id))
    wall_s = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"/predict answered {response.status_code}: {response.text[:500]}")
    body = response.json()
    results = body["results"]
    if len(results) != len(names):
        raise RuntimeError(
            f"/predict returned {len(results)} results for {len(names)} tasks "
            f"(handed off to job {body.get('job_id')!r}?)"
        )
    return wall_s, sum(len(r["result"]) for r in results)


def _wait_until_ready(client: TestClient, timeout: float) -> float | None:
    """Poll ``/health`` until a worker has loaded the model; its load time, when it reports one."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.get("/health").json()
        workers = (body.get("workers") or {}).get("details") or []
        if body.get("status") == "UP":
            ready = [w for w in workers if w.get("state") == "ready"]
            return next((w.get("load_seconds") for w in ready if w.get("load_seconds") is not None), None)
        if "failed" in str(body.get("reason", "")):
            raise RuntimeError(f"the worker could not load the model: {body['reason']}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no worker ready after {timeout:.0f} s: {body}")
        time.sleep(0.2)


def app_settings(checkpoint: str, root: Path, data_dir: Path, batch: int, device: str, precision: str) -> Settings:
    """The service's settings for one batch size, with the queue knobs opened up for timing.

    The embedded Redis and worker (no ``redis_url``) keep everything in this process; a deadline of an
    hour stops a slow CPU from handing a large batch to a bulk job; the interactive limit admits the
    batch. ``Settings`` ignores unknown names, so a renamed field fails here instead of silently.
    """
    values: dict[str, Any] = {
        "detector_checkpoint": checkpoint,
        "device": device,
        "precision": precision,
        "batch_size": batch,
        "local_files_document_root": root,
        "redis_url": None,
        "embedded_worker": True,
        "data_dir": data_dir,
        "predict_deadline": 3600.0,
        "interactive_max_tasks": batch,
    }
    unknown = sorted(set(values) - set(Settings.model_fields))
    if unknown:
        raise RuntimeError(f"Settings has no field(s) {unknown}: update bench/predict_latency.py")
    return Settings(**values)


def run_ours(
    checkpoint: str,
    root: Path,
    names: Sequence[str],
    batch: int,
    device: str,
    precision: str,
    collector: _Collector,
    console: _QuietThreads,
) -> OursResult:
    """A fresh app with ``batch_size=batch``: wait for its worker, warm-up ``/predict`` of one task,
    then the timed ``/predict`` of ``batch`` tasks.

    Fresh per batch size because ``batch_size`` is a start-up setting; the warm-up (first forward pass
    of this worker) is never timed.
    """
    settings = app_settings(checkpoint, root, root / f"data-b{batch}", batch, device, precision)
    threads_before = {t.ident for t in threading.enumerate()}
    app = create_app(settings)
    client = TestClient(app)
    starting = time.perf_counter()
    client.__enter__()
    try:
        load_s = _wait_until_ready(client, READY_TIMEOUT_S)
        ready_s = time.perf_counter() - starting
        started = time.perf_counter()
        _post_predict(client, names[:1], first_id=10_000)
        warmup_s = time.perf_counter() - started
        with collector.watch() as warnings:
            wall_s, boxes = _post_predict(client, names[:batch])
    finally:
        closing = time.perf_counter()
        closed = _close(client, SHUTDOWN_TIMEOUT_S)
        shutdown_s = time.perf_counter() - closing
    if not closed:
        leaked = {t.ident for t in threading.enumerate() if t.is_alive()} - threads_before
        console.mute(leaked)
        log.warning(
            "the app did not shut down within %.0f s (an embedded worker that does not stop?); "
            "its threads are left behind and their log is muted",
            SHUTDOWN_TIMEOUT_S,
        )
    failed = [w for w in warnings if "failed" in w]
    if failed:
        raise RuntimeError(f"tasks failed during the timed /predict (timing is void): {failed[:3]}")
    del app, client
    _free(resolve_device(device))
    return OursResult(
        batch=batch,
        load_s=load_s,
        warmup_s=warmup_s,
        wall_s=wall_s,
        boxes=boxes,
        warnings=warnings,
        closed=closed,
        ready_s=ready_s,
        shutdown_s=shutdown_s,
    )


def _close(client: TestClient, timeout: float) -> bool:
    """Run the app's shutdown on a helper thread and wait at most ``timeout`` seconds for it.

    Without the bound, one hung shutdown (see ``run_ours``) would stall the whole benchmark.
    """
    closer = threading.Thread(target=client.__exit__, args=(None, None, None), name="bench-close", daemon=True)
    closer.start()
    closer.join(timeout)
    return not closer.is_alive()


def _free(device: torch.device) -> None:
    """Drop the previous model before loading the next, so two never compete for (GPU) memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- machine and report -----------------------------------------------------------------------------------


def _cpu_flags() -> list[str]:
    """The flags that decide CPU speed for this model (bf16 autocast needs avx512_bf16 or AMX)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in wanted if flag in present]
    return []


def device_info(device: torch.device) -> dict[str, Any]:
    """What this benchmark adds to ``machine_info()``: the libraries, CPU flags, threads and device."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_flags": _cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def hardware_label(info: dict[str, Any]) -> str:
    if "gpu" in info:
        return str(info["gpu"])
    return f"{info['cpu_model']} x{info['cpu_cores_usable']} cores"


def _rate(seconds_per_image: float) -> float:
    return 1.0 / seconds_per_image if seconds_per_image > 0 else float("inf")


def summarise(ours: OursResult, baseline: BaselineResult) -> dict[str, Any]:
    """Our numbers next to the baseline for the same count of images (count x its mean)."""
    ours_per_image = ours.wall_s / ours.batch
    baseline_total = ours.batch * baseline.mean_s
    return {
        "batch": ours.batch,
        "ours_wall_s": round(ours.wall_s, 4),
        "ours_ms_per_image": round(ours_per_image * 1000, 2),
        "ours_images_per_s": round(_rate(ours_per_image), 4),
        "baseline_time_s": round(baseline_total, 4),
        "baseline_ms_per_image": round(baseline.mean_s * 1000, 2),
        "baseline_images_per_s": round(_rate(baseline.mean_s), 4),
        "ratio": round(baseline_total / ours.wall_s, 3),
        "ours_boxes": ours.boxes,
        "ours_load_s": None if ours.load_s is None else round(ours.load_s, 2),
        "ours_warmup_s": round(ours.warmup_s, 2),
        "ours_warnings": ours.warnings,
        "ours_ready_s": round(ours.ready_s, 2),
        "ours_shutdown_s": round(ours.shutdown_s, 2),
        "ours_app_shut_down": ours.closed,
    }


def _summarise_records(records: Sequence[logging.LogRecord], limit: int = 50) -> list[dict[str, Any]]:
    """Distinct warnings/errors with their counts (a hung worker repeats one line hundreds of times)."""
    counts = Counter(
        (r.levelname, r.name, " ".join(w for w in r.getMessage().split() if not w.isdigit())) for r in records
    )
    return [
        {"level": level, "logger": name, "message": message, "count": count}
        for (level, name, message), count in counts.most_common(limit)
    ]


def _peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# --- command line -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=positive_ints, default=[1, 4, 16], help="comma-separated, e.g. 1,4,16")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--checkpoint", help="local folder or hub id (on disk); default: the cached random real-size one"
    )
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "out" / "cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "predict_latency.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run_started = time.perf_counter()
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)  # libraries (rq) raise their own loggers to INFO: keep the console quiet
    console.setFormatter(_OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    quiet = _QuietThreads()
    console.addFilter(quiet)
    logging.getLogger().addHandler(console)
    logging.captureWarnings(True)
    collector = _Collector()
    logging.getLogger().addHandler(collector)

    device = resolve_device(args.device)
    if args.precision == "fp16" and device.type == "cpu":
        raise SystemExit("fp16 is for GPUs; use --precision bf16 on the CPU")
    checkpoint = args.checkpoint or str(ensure_random_checkpoint(args.cache))
    model_label = args.checkpoint or RANDOM_MODEL_LABEL
    info = {**machine_info(), **device_info(device)}
    hardware = hardware_label(info)
    count = max(args.batches)

    with tempfile.TemporaryDirectory(prefix="dinolabel-bench-") as tmp:
        root = Path(tmp)
        names = make_images(count, root)
        print(f"baseline: plain transformers loop over {count} images (+1 warm-up) ...", flush=True)
        # The app, its worker thread and the baseline all run in this process: it alone counts as ours.
        meter = OtherLoad(process_cpu_seconds)
        baseline = run_baseline(checkpoint, [root / n for n in names], device, args.precision)
        baseline_other_cores = meter.cores()
        print(
            f"baseline: mean {baseline.mean_s * 1000:.1f} ms/image (median {baseline.median_s * 1000:.1f}, "
            f"min {min(baseline.seconds) * 1000:.1f}, max {max(baseline.seconds) * 1000:.1f}), "
            f"load {baseline.load_s:.1f} s, warm-up {baseline.warmup_s:.1f} s, "
            f"other processes used {baseline_other_cores} cores meanwhile",
            flush=True,
        )
        rows: list[dict[str, Any]] = []
        for batch in args.batches:
            meter = OtherLoad(process_cpu_seconds)
            ours = run_ours(checkpoint, root, names, batch, args.device, args.precision, collector, quiet)
            row = summarise(ours, baseline)
            row["other_processes_cores"] = meter.cores()
            rows.append(row)
            print(
                f"predict_latency device={device} hw={hardware!r} torch_threads={info['torch_threads']} "
                f"model={model_label} precision={args.precision} batch={batch} | "
                f"ours {row['ours_ms_per_image']:.1f} ms/img {row['ours_images_per_s']:.3f} img/s | "
                f"baseline {row['baseline_ms_per_image']:.1f} ms/img {row['baseline_images_per_s']:.3f} img/s"
                f" | ratio {row['ratio']:.2f}x | other processes {row['other_processes_cores']} cores",
                flush=True,
            )

    if device.type == "cuda":
        info["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    info["peak_rss_mib"] = _peak_rss_mib()
    info["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report = {
        "benchmark": "predict_latency",
        "model": model_label,
        "checkpoint": checkpoint,
        "precision": args.precision,
        "batches": args.batches,
        "image_size": list(IMAGE_SIZE),
        "prompt": PROMPT,
        "machine": info,
        "baseline": {
            **asdict(baseline),
            "mean_s": baseline.mean_s,
            "median_s": baseline.median_s,
            "other_processes_cores": baseline_other_cores,
        },
        "results": rows,
        "warnings": _summarise_records(collector.records),
        "wall_s": round(time.perf_counter() - run_started, 1),
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
