"""Does the CPU side keep a GPU busy? A fake device at a GPU's rate, the real CPU work around it.

Why this script exists: on a GPU the model takes tens of milliseconds an image and the work around it
(fetching, decoding, EXIF, the processor's resize and normalise, post-processing) decides the
throughput; no GPU is needed to measure that. The fake device is a stand-in for Grounding DINO inside
the real ``GroundingDinoDetector``: it takes the preprocessed batch and blocks for a fixed time per
image (``time.sleep``, which releases the GIL, as a CUDA wait does), chosen to match a GPU's rate (30
and 100 images/s by default), and returns outputs of the real shapes with some boxes above the
threshold, so post-processing does real work. Everything else is the service's code: tasks go through
``backend.predictor.Predictor`` (``model.pipeline``), images are fetched by ``ImageFetcher`` from a
loopback HTTP server (another process) or from local files (Label Studio's Local Files storage), and
decoded by ``model.images``. Today's path, measured in the same run on the same tasks, is the predictor
as it was before the pipeline (commit edc78da): downloads and decoding on threads ahead, then per chunk
of four batches ``detect`` on one thread (preprocess all, then forward, then post-process).

Efficiency = end-to-end images/s / the fake device's rate (1.0: the device never waited). A run with
a device that takes no time gives the CPU side's own ceiling, and the per-stage CPU cost (one image at
a time, one stage at a time) says which stage sets it: a GPU worker needs about ``rate x CPU seconds per
image`` cores.

Run from the repository root (about 3-5 minutes on 2 cores)::

    .venv/bin/python bench/pipeline_efficiency.py [--rates 30,100] [--batch 8] [--sets small,medium,large,mixed]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import torch
from PIL import Image
from transformers import AutoProcessor

from backend.image_source import ImageFetcher
from backend.labeling import LabelTarget, parse_label_config
from backend.predictor import Predictor
from bench.common import (
    OtherLoad,
    busy,
    ensure_random_checkpoint,
    machine_info,
    positive_ints,
    process_cpu_seconds,
    synthetic_jpeg,
    write_report,
)
from model import DetectionParams, GroundingDinoDetector
from model.images import decode_image
from model.pipeline import PipelineStats
from tests.labelstudio import free_port

REPO = Path(__file__).resolve().parents[1]
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="cat"/><Label value="dog"/><Label value="traffic light"/></RectangleLabels></View>'
)
PARAMS = DetectionParams()  # the service's defaults
MAX_PIXELS = 100_000_000
DOWNLOAD_THREADS = 8  # DINOLABEL_IMAGE_DOWNLOAD_THREADS' default
CHUNK_BATCHES = 4  # today's predictor: batches of images it took at a time

# Image sets: (stored width, stored height, EXIF orientation or None) cycled over the tasks. 6 and 8 are
# stored portrait and shown landscape (phones); 3 is upside down.
SETS: dict[str, tuple[tuple[int, int, int | None], ...]] = {
    "small": ((640, 480, None), (480, 640, 6), (800, 600, 3), (640, 480, None)),
    "medium": ((1600, 1200, None), (1536, 2048, 8), (2048, 1536, 3), (1920, 1440, None)),
    "large": ((4000, 3000, None), (3000, 4000, 6), (4000, 3000, 3), (4032, 3024, None)),
    "mixed": (
        (640, 480, None),
        (1600, 1200, 6),
        (800, 600, None),
        (4000, 3000, None),
        (1024, 768, 3),
        (2048, 1536, None),
        (640, 480, 8),
        (3000, 4000, 6),
    ),
}
IMAGES_PER_SET = {"small": 64, "medium": 32, "large": 16, "mixed": 32}


# --- the fake device --------------------------------------------------------------------------------------


class FakeGroundingDino(torch.nn.Module):
    """Grounding DINO's call signature and output shapes; costs ``seconds_per_image`` per image.

    Outputs are fixed random logits with 30 of the 900 queries well above the default threshold (tens
    of boxes an image after NMS, as with a real model on a busy photo) and ``-inf`` past the prompt,
    as the real model gives.
    """

    def __init__(self, seconds_per_image: float, *, queries: int = 900, text_len: int = 256) -> None:
        super().__init__()
        self.seconds_per_image = seconds_per_image
        self.config = SimpleNamespace(max_text_len=text_len)
        generator = torch.Generator().manual_seed(0)
        logits = torch.randn(queries, text_len, generator=generator) - 4.0
        logits[torch.randperm(queries, generator=generator)[:30]] += 7.0
        centres = torch.rand(queries, 2, generator=generator) * 0.6 + 0.2
        sides = torch.rand(queries, 2, generator=generator) * 0.3 + 0.05
        self.logits = logits
        self.boxes = torch.cat([centres, sides], dim=1)
        self.images = 0

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        n = pixel_values.shape[0]
        if self.seconds_per_image > 0:
            time.sleep(n * self.seconds_per_image)
        self.images += n
        logits = self.logits.clone()
        logits[:, input_ids.shape[1] :] = float("-inf")
        return SimpleNamespace(
            logits=logits.unsqueeze(0).expand(n, -1, -1), pred_boxes=self.boxes.unsqueeze(0).expand(n, -1, -1)
        )


# --- inputs -----------------------------------------------------------------------------------------------


def write_images(root: Path) -> dict[str, list[str]]:
    """Each set's JPEGs under ``root/<set>/``; returns the relative paths, in task order."""
    names: dict[str, list[str]] = {}
    for set_name, specs in SETS.items():
        (root / set_name).mkdir(parents=True, exist_ok=True)
        names[set_name] = []
        for seed, (width, height, orientation) in enumerate(specs):
            name = f"{set_name}/{width}x{height}-o{orientation or 1}-{seed}.jpg"
            (root / name).write_bytes(synthetic_jpeg(width, height, orientation, seed))
            names[set_name].append(name)
    return names


class ImageServer:
    """``python -m http.server`` on loopback, in its own process (its CPU is not the worker's)."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory", str(root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/", timeout=1.0)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the loopback image server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


# --- the two paths ----------------------------------------------------------------------------------------


@dataclass
class Setup:
    detector: GroundingDinoDetector
    fake: FakeGroundingDino
    predictor: Predictor
    downloads: ThreadPoolExecutor  # today's path: the predictor's download pool
    target: LabelTarget
    batch: int


def todays_predict(setup: Setup, tasks: Sequence[dict[str, Any]], fetcher: ImageFetcher) -> int:
    """The predictor before ``model.pipeline``: returns the number of images that got a result."""
    target = setup.target

    def load(task: dict[str, Any]) -> Image.Image:
        return decode_image(fetcher.fetch(task["data"][target.value_key]), max_pixels=MAX_PIXELS)

    pending = [setup.downloads.submit(load, task) for task in tasks]
    step = setup.batch * CHUNK_BATCHES
    done = 0
    for start in range(0, len(tasks), step):
        images = [future.result() for future in pending[start : start + step]]
        found = setup.detector.detect(
            images, target.phrases, PARAMS, groups=target.phrase_label, batch_size=setup.batch
        )
        done += len(found)
    return done


def pipelined_predict(
    setup: Setup, tasks: Sequence[dict[str, Any]], fetcher: ImageFetcher, stats: PipelineStats | None = None
) -> int:
    outcome = setup.predictor.predict(tasks, setup.target, PARAMS, "bench", fetcher, stats=stats)
    if outcome.failures:
        raise RuntimeError(f"tasks failed (timing is void): {outcome.failures[:2]}")
    return len(outcome.predictions)


PATHS: dict[str, Callable[[Setup, Sequence[dict[str, Any]], ImageFetcher], int]] = {
    "today": todays_predict,
    "pipeline": pipelined_predict,
}


def timed(setup: Setup, path: str, tasks: list[dict[str, Any]], fetcher: ImageFetcher) -> dict[str, Any]:
    """One path over the tasks after a warm-up of one batch; images/s, CPU seconds and other load."""
    PATHS[path](setup, tasks[: setup.batch], fetcher)
    stats = PipelineStats()
    meter = OtherLoad(process_cpu_seconds)
    cpu = time.process_time()
    started = time.perf_counter()
    if path == "pipeline":
        done = pipelined_predict(setup, tasks, fetcher, stats)
    else:
        done = todays_predict(setup, tasks, fetcher)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    if done != len(tasks):
        raise RuntimeError(f"{path}: {done} results for {len(tasks)} tasks")
    row: dict[str, Any] = {
        "images_per_s": round(len(tasks) / seconds, 2),
        "cpu_s_per_image": round(cpu / len(tasks), 4),
        "other_processes_cores": meter.cores(),
    }
    if path == "pipeline":
        row["mean_batch"] = round(stats.items / max(stats.batches, 1), 2)
        row["stats"] = stats.as_dict()
    return row


# --- per-stage cost ---------------------------------------------------------------------------------------


def stage_costs(setup: Setup, tasks: list[dict[str, Any]], fetcher: ImageFetcher) -> dict[str, float]:
    """CPU milliseconds per image of each stage, run one image at a time, one stage at a time.

    ``time.process_time`` (all threads of this process, nanosecond resolution; ``os.times`` ticks in 10 ms).
    """
    stages = setup.detector.stages(setup.target.phrases, PARAMS, groups=setup.target.phrase_label)
    totals = dict.fromkeys(("fetch", "decode", "preprocess", "postprocess"), 0.0)
    for warm_up, task in [(True, tasks[0]), *((False, task) for task in tasks)]:
        began = time.process_time()
        data = fetcher.fetch(task["data"][setup.target.value_key])
        fetched = time.process_time()
        image = decode_image(data, max_pixels=MAX_PIXELS)
        decoded = time.process_time()
        pixels, size = stages.preprocess(image)
        preprocessed = time.process_time()
        outputs = stages.forward(pixels)
        forwarded = time.process_time()
        stages.postprocess(outputs, [size])
        ended = time.process_time()
        if warm_up:  # first calls pay for lazy initialisation (torchvision ops, processor caches)
            continue
        for name, seconds in (
            ("fetch", fetched - began),
            ("decode", decoded - fetched),
            ("preprocess", preprocessed - decoded),
            ("postprocess", ended - forwarded),
        ):
            totals[name] += seconds
    costs = {name: round(seconds / len(tasks) * 1000, 1) for name, seconds in totals.items()}
    costs["total"] = round(sum(costs.values()), 1)
    return costs


# --- run --------------------------------------------------------------------------------------------------


def make_setup(checkpoint: Path, batch: int) -> Setup:
    processor = AutoProcessor.from_pretrained(checkpoint)  # the real processor settings (800/1333)
    fake = FakeGroundingDino(0.0)
    detector = GroundingDinoDetector(fake, processor, device=torch.device("cpu"))
    predictor = Predictor(detector, batch_size=batch, max_pixels=MAX_PIXELS, download_threads=DOWNLOAD_THREADS)
    downloads = ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS, thread_name_prefix="today-download")
    return Setup(detector, fake, predictor, downloads, parse_label_config(LABEL_CONFIG), batch)


def tasks_for(names: list[str], count: int, source: str, server: ImageServer) -> list[dict[str, Any]]:
    urls = [
        f"{server.url}/{name}" if source == "http" else f"/data/local-files/?d={name}"
        for name in (names[i % len(names)] for i in range(count))
    ]
    return [{"id": i, "data": {"image": url}} for i, url in enumerate(urls)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=positive_ints, default=[30, 100], help="fake device images/s")
    parser.add_argument("--batch", type=int, default=8, help="batch size (the GPU default)")
    parser.add_argument("--sets", default=",".join(SETS), help=f"image sets, from {', '.join(SETS)}")
    parser.add_argument("--sources", default="local,http", help="local (Local Files) and/or http (loopback)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the images per set")
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "out" / "cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "pipeline_efficiency.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run_started = time.perf_counter()
    sets = args.sets.split(",")
    sources = args.sources.split(",")
    setup = make_setup(ensure_random_checkpoint(args.cache), args.batch)
    info = {**machine_info(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    print(
        f"pipeline_efficiency cpu={info['cpu_model']!r} cores={info['cpu_cores_usable']} batch={args.batch} "
        f"fake device rates={args.rates} img/s (+ a device that takes no time: the CPU side's ceiling)",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    costs: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="dinolabel-pipeline-bench-") as tmp:
        root = Path(tmp)
        names = write_images(root)
        server = ImageServer(root)
        # The loopback image server is not public: allowed explicitly, as DINOLABEL_FETCH_ALLOW would.
        fetcher = ImageFetcher(label_studio_url=None, api_key=None, document_root=root, allow=["127.0.0.1"])
        try:
            for source in sources:
                for set_name in sets:
                    count = max(args.batch, int(IMAGES_PER_SET[set_name] * args.scale))
                    tasks = tasks_for(names[set_name], count, source, server)
                    setup.fake.seconds_per_image = 0.0
                    cost = stage_costs(setup, tasks[: len(SETS[set_name])], fetcher)
                    costs.setdefault(source, {})[set_name] = cost
                    print(
                        f"{source:5} {set_name:6} CPU ms/image, one at a time: "
                        + ", ".join(f"{k} {v}" for k, v in cost.items()),
                        flush=True,
                    )
                    for rate in [*args.rates, 0]:
                        setup.fake.seconds_per_image = 1.0 / rate if rate else 0.0
                        row: dict[str, Any] = {"source": source, "set": set_name, "images": count, "device_rate": rate}
                        for path in PATHS:
                            row[path] = timed(setup, path, tasks, fetcher)
                            if rate:
                                row[path]["efficiency"] = round(row[path]["images_per_s"] / rate, 3)
                        rows.append(row)
                        print(format_row(row), flush=True)
        finally:
            fetcher.close()
            server.stop()
            setup.downloads.shutdown()
            setup.predictor.pipeline.close()
    report = {
        "benchmark": "pipeline_efficiency",
        "batch": args.batch,
        "rates": args.rates,
        "sets": {name: [list(spec) for spec in SETS[name]] for name in sets},
        "machine": info,
        "stage_cpu_ms_per_image": costs,
        "results": rows,
        "wall_s": round(time.perf_counter() - run_started, 1),
    }
    write_report(args.out, report)
    return 0


def format_row(row: dict[str, Any]) -> str:
    device = f"device {row['device_rate']:>3} img/s" if row["device_rate"] else "device   free   "
    cells = []
    for path in PATHS:
        cell = row[path]
        eff = f" eff {cell['efficiency']:.2f}" if "efficiency" in cell else ""
        extra = f" batch~{cell['mean_batch']}" if "mean_batch" in cell else ""
        cpu_ms = cell["cpu_s_per_image"] * 1000
        cells.append(f"{path} {cell['images_per_s']:6.1f} img/s{eff} ({cpu_ms:.0f} CPU ms/img{extra})")
    others = max(row[path]["other_processes_cores"] or 0.0 for path in PATHS)
    return f"{row['source']:5} {row['set']:6} {device} | " + " | ".join(cells) + f" | {busy(others)}"


if __name__ == "__main__":
    sys.exit(main())
