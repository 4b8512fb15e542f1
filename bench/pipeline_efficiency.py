"""Does the CPU side keep a GPU busy? A fake device at a GPU's rate, the real CPU work around it.

Why this script exists: on a GPU the model takes tens of milliseconds an image and the work around it
(fetching, decoding, EXIF, the processor's resize and normalise, post-processing) decides the
throughput; no GPU is needed to measure that. The fake device is a stand-in for Grounding DINO inside
the real ``GroundingDinoDetector``: for each batch it first runs small torch modules in a Python loop
(the GIL held between ops, as a thread launching a model's CUDA kernels does) for ``--launch-share`` of
the batch's time, calibrated alone, then blocks for the rest (``time.sleep``, GIL released, as a CUDA
wait), so that alone it runs at a GPU's rate (30 and 100 images/s by default); it returns outputs of the
real shapes with some boxes above the threshold, so post-processing does real work. When other threads
keep the GIL, the launch takes longer and the device's rate drops, as the H200 showed (the forward
30-40% slower beside the preprocessing threads). Everything else is the service's code: tasks go
through ``backend.predictor.Predictor`` (``model.pipeline``), images are fetched by ``ImageFetcher``
from a loopback HTTP server (another process) or from local files (Label Studio's Local Files storage),
and decoded by ``model.images``. The pipeline's preprocessing threads use one torch thread per core
each, as on a GPU.

Four paths, measured in the same run on the same tasks: *today* (the pipeline with the processor called
as it was before, ``processor(images=[image])``), *exact* (``GroundingDinoDetector.preprocess``:
the processor's resize and normalise on a channels-last view, the same tensor bit for bit), *procs*
(exact, with decoding and preprocessing in ``--processes`` worker processes:
``DINOLABEL_IMAGE_PREPROCESS_PROCESSES``) and *draft* (exact, plus draft JPEG decoding:
``DINOLABEL_IMAGE_DRAFT_DECODE=true``). CPU seconds per image count the preprocessing processes too.

Efficiency = end-to-end images/s / the fake device's rate (1.0: the device never waited). A run with
a device that takes no time gives the CPU side's own ceiling, and the per-stage CPU cost (one image at
a time, one stage at a time) says which stage sets it: a GPU worker needs about ``rate x CPU seconds per
image`` cores.

Run from the repository root (about 5-10 minutes on 2 cores)::

    .venv/bin/python bench/pipeline_efficiency.py [--rates 30,100] [--batch 8] [--sets small,medium,large,mixed]
        [--paths today,exact,procs,draft] [--processes 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import torch
from transformers import AutoProcessor

from backend.config import Settings
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
    tree_cpu_seconds,
    write_report,
)
from model import DetectionParams, GroundingDinoDetector
from model.devices import usable_cores
from model.grounding_dino import GroundingDinoPreprocess
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
NICENESS = Settings.model_fields["image_thread_niceness"].default
"""The workers' default (``DINOLABEL_IMAGE_THREAD_NICENESS``)."""
LAUNCH_SHARE = 0.2
"""Share of a batch's device time the fake device spends launching (GIL held between ops). On the H200
the batch-1 forward was launch-bound at 65-82 ms, 13-25% of a batch of 16 (bench/results/h200-2026-11-27)."""

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

    Of each batch's time, ``launch_share`` is a fixed amount of launching work (small torch modules in a
    Python loop, calibrated alone by :meth:`calibrate`), which takes longer when other threads keep the
    GIL; the rest is a GIL-free wait. Outputs are fixed random logits with 30 of the 900 queries well
    above the default threshold (tens of boxes an image after NMS, as with a real model on a busy photo)
    and ``-inf`` past the prompt, as the real model gives.
    """

    def __init__(self, seconds_per_image: float, *, queries: int = 900, text_len: int = 256) -> None:
        super().__init__()
        self.seconds_per_image = seconds_per_image
        self.launch_share = 0.0
        self.launches_per_s = 0.0
        self.config = SimpleNamespace(max_text_len=text_len)
        generator = torch.Generator().manual_seed(0)
        logits = torch.randn(queries, text_len, generator=generator) - 4.0
        logits[torch.randperm(queries, generator=generator)[:30]] += 7.0
        centres = torch.rand(queries, 2, generator=generator) * 0.6 + 0.2
        sides = torch.rand(queries, 2, generator=generator) * 0.3 + 0.05
        self.logits = logits
        self.boxes = torch.cat([centres, sides], dim=1)
        self.launcher = torch.nn.Sequential(*(torch.nn.Linear(16, 16) for _ in range(10)))
        self.images = 0
        self.launch_s = 0.0  # time spent launching, summed over batches

    def calibrate(self, seconds: float = 1.0) -> None:
        """Launcher passes per second on this thread with nothing else running."""
        self._launch(20)
        started, passes = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            self._launch(20)
            passes += 20
        self.launches_per_s = passes / (time.perf_counter() - started)

    def _launch(self, passes: int) -> None:
        probe = torch.zeros(1, 16)
        with torch.inference_mode():
            for _ in range(passes):
                self.launcher(probe)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        n = pixel_values.shape[0]
        if self.seconds_per_image > 0:
            total = n * self.seconds_per_image
            started = time.perf_counter()
            self._launch(round(total * self.launch_share * self.launches_per_s))
            self.launch_s += time.perf_counter() - started
            time.sleep(total * (1.0 - self.launch_share))
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
    fake: FakeGroundingDino
    predictors: dict[str, Predictor]  # per path
    target: LabelTarget
    batch: int


PATHS = ("today", "exact", "procs", "draft")


def predict(
    setup: Setup, path: str, tasks: Sequence[dict[str, Any]], fetcher: ImageFetcher, stats: PipelineStats
) -> int:
    outcome = setup.predictors[path].predict(tasks, setup.target, PARAMS, "bench", fetcher, stats=stats)
    if outcome.failures:
        raise RuntimeError(f"tasks failed (timing is void): {outcome.failures[:2]}")
    return len(outcome.predictions)


def timed(setup: Setup, path: str, tasks: list[dict[str, Any]], fetcher: ImageFetcher) -> dict[str, Any]:
    """One path over the tasks after a warm-up of one batch; images/s, CPU seconds and other load."""
    predict(setup, path, tasks[: setup.batch], fetcher, PipelineStats())
    stats = PipelineStats()
    pipeline = setup.predictors[path].pipeline

    def ours() -> float:  # this process and its preprocessing processes (not the image server)
        return process_cpu_seconds() + sum(tree_cpu_seconds(pid) for pid in pipeline.preprocess_pids())

    meter = OtherLoad(ours)
    cpu = ours()
    setup.fake.images, setup.fake.launch_s = 0, 0.0
    started = time.perf_counter()
    done = predict(setup, path, tasks, fetcher, stats)
    seconds = time.perf_counter() - started
    cpu = ours() - cpu
    if done != len(tasks):
        raise RuntimeError(f"{path}: {done} results for {len(tasks)} tasks")
    row: dict[str, Any] = {
        "images_per_s": round(len(tasks) / seconds, 2),
        "cpu_s_per_image": round(cpu / len(tasks), 4),
        "other_processes_cores": meter.cores(),
        "mean_batch": round(stats.items / max(stats.batches, 1), 2),
        "stats": stats.as_dict(),
    }
    if setup.fake.seconds_per_image > 0:
        nominal = setup.fake.images * setup.fake.seconds_per_image * setup.fake.launch_share
        row["launch_slowdown"] = round(setup.fake.launch_s / nominal, 2) if nominal else None
    return row


# --- per-stage cost ---------------------------------------------------------------------------------------


def stage_costs(setup: Setup, path: str, tasks: list[dict[str, Any]], fetcher: ImageFetcher) -> dict[str, float]:
    """CPU milliseconds per image of each stage of ``path``, one image at a time, one stage at a time.

    ``time.process_time`` (all threads of this process, nanosecond resolution; ``os.times`` ticks in 10 ms).
    """
    predictor = setup.predictors[path]
    stages = predictor.detector.stages(setup.target.phrases, PARAMS, groups=setup.target.phrase_label)
    totals = dict.fromkeys(("fetch", "decode", "preprocess", "postprocess"), 0.0)
    for warm_up, task in [(True, tasks[0]), *((False, task) for task in tasks)]:
        began = time.process_time()
        data = fetcher.fetch(task["data"][setup.target.value_key])
        fetched = time.process_time()
        image = decode_image(data, max_pixels=MAX_PIXELS, decode_size=predictor.decode_size)
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


def make_setup(
    checkpoint: Path, batch: int, launch_share: float, paths: Sequence[str], processes: int, niceness: int
) -> Setup:
    processor = AutoProcessor.from_pretrained(checkpoint)  # the real processor settings (800/1333)
    fake = FakeGroundingDino(0.0)
    fake.launch_share = launch_share
    fake.calibrate()
    today = GroundingDinoDetector(fake, processor, device=torch.device("cpu"))
    # Today's preprocessing: the whole processor on the PIL image (it copies to channels-first first).
    today.preprocessor = GroundingDinoPreprocess(processor.image_processor, fast=False)
    new = GroundingDinoDetector(fake, processor, device=torch.device("cpu"))
    predictors = {
        path: Predictor(
            today if path == "today" else new,
            batch_size=batch,
            max_pixels=MAX_PIXELS,
            download_threads=DOWNLOAD_THREADS,
            preprocess_processes=processes if path == "procs" else 0,
            draft_decode=path == "draft",
            niceness=niceness,
        )
        for path in paths
    }
    for predictor in predictors.values():
        # As on a GPU (model.pipeline's rule there): the cores shared among the images preprocessed at once.
        pipeline = predictor.pipeline
        pipeline.torch_threads = max(
            1, (os.cpu_count() or 1) // min(pipeline.load_threads, pipeline.preprocess_threads)
        )
    return Setup(fake, predictors, parse_label_config(LABEL_CONFIG), batch)


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
    parser.add_argument("--paths", default=",".join(PATHS), help=f"paths to time, from {', '.join(PATHS)}")
    parser.add_argument(
        "--launch-share", type=float, default=LAUNCH_SHARE, help="share of the device's time launching (GIL held)"
    )
    parser.add_argument(
        "--processes", type=int, default=usable_cores(), help="preprocessing processes of the procs path (cores)"
    )
    parser.add_argument(
        "--niceness", type=int, default=NICENESS, help="added to the nice value of the image threads and processes"
    )
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "out" / "cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "pipeline_efficiency.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run_started = time.perf_counter()
    sets = args.sets.split(",")
    sources = args.sources.split(",")
    paths = args.paths.split(",")
    setup = make_setup(
        ensure_random_checkpoint(args.cache), args.batch, args.launch_share, paths, args.processes, args.niceness
    )
    info = {**machine_info(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    print(
        f"pipeline_efficiency cpu={info['cpu_model']!r} cores={info['cpu_cores_usable']} batch={args.batch} "
        f"fake device rates={args.rates} img/s (+ a device that takes no time: the CPU side's ceiling), "
        f"launching {args.launch_share:.0%} of its time ({setup.fake.launches_per_s:.0f} passes/s alone)",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    costs: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
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
                    for path in paths:
                        cost = stage_costs(setup, path, tasks[: len(SETS[set_name])], fetcher)
                        costs.setdefault(source, {}).setdefault(set_name, {})[path] = cost
                        print(
                            f"{source:5} {set_name:6} {path:5} CPU ms/image, one at a time: "
                            + ", ".join(f"{k} {v}" for k, v in cost.items()),
                            flush=True,
                        )
                    for rate in [*args.rates, 0]:
                        setup.fake.seconds_per_image = 1.0 / rate if rate else 0.0
                        row: dict[str, Any] = {"source": source, "set": set_name, "images": count, "device_rate": rate}
                        for path in paths:
                            row[path] = timed(setup, path, tasks, fetcher)
                            if rate:
                                row[path]["efficiency"] = round(row[path]["images_per_s"] / rate, 3)
                        rows.append(row)
                        print(format_row(row, paths), flush=True)
        finally:
            fetcher.close()
            server.stop()
            for predictor in setup.predictors.values():
                predictor.pipeline.close()
    report = {
        "benchmark": "pipeline_efficiency",
        "batch": args.batch,
        "rates": args.rates,
        "launch_share": args.launch_share,
        "preprocess_processes": args.processes,
        "niceness": args.niceness,
        "launch_passes_per_s_alone": round(setup.fake.launches_per_s),
        "paths": paths,
        "sets": {name: [list(spec) for spec in SETS[name]] for name in sets},
        "machine": info,
        "stage_cpu_ms_per_image": costs,
        "results": rows,
        "wall_s": round(time.perf_counter() - run_started, 1),
    }
    write_report(args.out, report)
    return 0


def format_row(row: dict[str, Any], paths: Sequence[str]) -> str:
    device = f"device {row['device_rate']:>3} img/s" if row["device_rate"] else "device   free   "
    cells = []
    for path in paths:
        cell = row[path]
        eff = f" eff {cell['efficiency']:.2f}" if "efficiency" in cell else ""
        launch = f" launch x{cell['launch_slowdown']}" if cell.get("launch_slowdown") else ""
        cpu_ms = cell["cpu_s_per_image"] * 1000
        detail = f"{cpu_ms:.0f} CPU ms/img batch~{cell['mean_batch']}{launch}"
        cells.append(f"{path} {cell['images_per_s']:6.1f} img/s{eff} ({detail})")
    others = max(row[path]["other_processes_cores"] or 0.0 for path in paths)
    return f"{row['source']:5} {row['set']:6} {device} | " + " | ".join(cells) + f" | {busy(others)}"


if __name__ == "__main__":
    sys.exit(main())
