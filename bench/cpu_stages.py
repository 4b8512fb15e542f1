"""Where a GPU worker's CPU time goes per image, stage by stage, and how much of it holds the GIL.

Why this script exists: on a GPU the thread that launches the model's kernels needs the GIL, and the
H200 run showed the forward ~30-40% slower beside the preprocessing threads. Whether moving stages to
other processes would help depends on which stages hold the GIL, and for how long; whether a faster
path is worth it depends on which stages cost the most. Both are measured here on the images of
``bench/pipeline_efficiency.py`` (synthetic JPEGs of 640x480 to 4000x3000, some EXIF-rotated).

Stages, each timed alone on one thread with torch on one intra-op thread (as a GPU worker's
preprocessing threads run on 2 cores): ``decode`` (open + load), ``exif`` (transpose, or the copy that
``model.images`` makes when there is none), ``to_array`` (the processor's ``np.array`` of the picture),
``chw`` (its channels-first copy), ``resize`` and ``normalise`` (its resize, then float and normalise),
``postprocess`` (thresholds and NMS on a fake model's outputs), and the paths end to end: today's
(``decode_image`` + the processor) and the new ones (``decode_image`` + ``GroundingDinoDetector.preprocess``,
exact; with JPEG draft decoding).

GIL share: a thread that stands for the one launching a GPU's kernels (small modules in a loop: Python
between torch ops) runs while the stage runs in a loop on another thread; the share is the part of its
time it waited for the GIL (wall time less CPU time less time waiting for a core, from
the kernel's per-thread schedstat), i.e. how much of the time the thread feeding a GPU could not run.
Each line also records the other processes' load (it changes the milliseconds, not the GIL share).
Run from the repository root (about two minutes)::

    .venv/bin/python bench/cpu_stages.py [--out bench/out/cpu_stages.json]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import AutoProcessor

from bench.common import OtherLoad, busy, ensure_random_checkpoint, machine_info, process_cpu_seconds, synthetic_jpeg
from bench.pipeline_efficiency import FakeGroundingDino
from model import DetectionParams, GroundingDinoDetector
from model.images import decode_image

REPO = Path(__file__).resolve().parents[1]
IMAGES = ((640, 480, None), (480, 640, 6), (1600, 1200, None), (2048, 1536, 3), (4000, 3000, None), (3000, 4000, 6))
MAX_PIXELS = 100_000_000
PHRASES = ["cat", "dog", "traffic light"]


def timed(work: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of ``work`` after one uncounted call."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


LAUNCHER = torch.nn.Sequential(*(torch.nn.Linear(16, 16) for _ in range(40)))
"""What a thread feeding a GPU does: Python module calls, each op releasing the GIL briefly."""


def blocked_share(seconds: float, during: Callable[[], Any] | None) -> float:
    """Share of the time a kernel-launching thread spent waiting for the GIL while ``during`` ran in a loop.

    The launcher runs small modules in a loop (Python between torch ops, as when it launches a model's
    kernels). Its wall time less its CPU time and its time waiting for a core (the kernel's schedstat:
    runnable but not running) is time it slept, and it sleeps only on the GIL. So the measure does not
    depend on a free core, unlike counting its iterations.
    """
    stop = threading.Event()
    measured: list[float] = []
    pixels = torch.zeros(1, 16)

    def spin() -> None:
        path = Path(f"/proc/self/task/{threading.get_native_id()}/schedstat")
        cpu0, queued0 = (int(v) for v in path.read_text().split()[:2])
        started = time.perf_counter()
        with torch.inference_mode():
            while not stop.is_set():
                LAUNCHER(pixels)
        wall = time.perf_counter() - started
        cpu1, queued1 = (int(v) for v in path.read_text().split()[:2])
        measured.append(max(0.0, wall - (cpu1 - cpu0) / 1e9 - (queued1 - queued0) / 1e9) / wall)

    spinner = threading.Thread(target=spin)
    spinner.start()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if during is None:
            time.sleep(0.01)
        else:
            during()
    stop.set()
    spinner.join()
    return measured[0]


def stage_functions(data: bytes, detector: GroundingDinoDetector) -> dict[str, Callable[[], Any]]:
    """Each stage as a call that repeats the same work on prepared inputs."""
    processor = detector.processor.image_processor
    opened = Image.open(io.BytesIO(data))
    opened.load()
    oriented = decode_image(data, max_pixels=MAX_PIXELS)
    array = np.array(oriented)
    hwc = torch.from_numpy(array).permute(2, 0, 1)
    chw = hwc.contiguous()
    target = detector.input_size(oriented.size)
    size_dict = type(processor.size)(height=target[1], width=target[0])
    resized = processor.resize(chw, size=size_dict, resample=processor.resample)
    stages = detector.stages(PHRASES, DetectionParams(), groups=None)
    pixels, meta = stages.preprocess(oriented)
    outputs = stages.forward(pixels)

    def exif() -> Image.Image:
        transposed = ImageOps.exif_transpose(opened)
        return transposed if transposed is not None else opened.copy()

    def decode() -> None:
        with Image.open(io.BytesIO(data)) as image:
            image.load()

    return {
        "decode": decode,
        "exif": exif,
        "to_array": lambda: np.array(oriented),
        "chw": lambda: hwc.contiguous(),
        "resize": lambda: processor.resize(chw, size=size_dict, resample=processor.resample),
        "normalise": lambda: processor.rescale_and_normalize(
            resized, True, processor.rescale_factor, True, processor.image_mean, processor.image_std
        ),
        "postprocess": lambda: stages.postprocess(outputs, [meta]),
        "today": lambda: processor(
            images=[decode_image(data, max_pixels=MAX_PIXELS)], return_tensors="pt", do_pad=False
        ),
        "exact": lambda: detector.preprocess(decode_image(data, max_pixels=MAX_PIXELS)),
        "draft": lambda: detector.preprocess(
            decode_image(data, max_pixels=MAX_PIXELS, decode_size=detector.input_size)
        ),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per stage and image (median)")
    parser.add_argument("--gil-seconds", type=float, default=0.6, help="seconds of each GIL measurement")
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "out" / "cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "cpu_stages.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run_started = time.perf_counter()
    torch.set_num_threads(1)  # a GPU worker's preprocessing threads on 2 cores: one intra-op thread each
    processor = AutoProcessor.from_pretrained(ensure_random_checkpoint(args.cache))
    detector = GroundingDinoDetector(FakeGroundingDino(0.0), processor, device=torch.device("cpu"))
    info = {**machine_info(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    print(f"cpu_stages cpu={info['cpu_model']!r} cores={info['cpu_cores_usable']} torch threads 1", flush=True)
    alone = blocked_share(args.gil_seconds, None)  # the floor: this thread's own short wake-ups
    rows = []
    for seed, (width, height, orientation) in enumerate(IMAGES):
        data = synthetic_jpeg(width, height, orientation, seed)
        meter = OtherLoad(process_cpu_seconds)
        row: dict[str, Any] = {"image": f"{width}x{height}", "orientation": orientation, "ms": {}, "gil": {}}
        for name, work in stage_functions(data, detector).items():
            row["ms"][name] = round(timed(work, args.repeats), 1)
            row["gil"][name] = round(max(0.0, blocked_share(args.gil_seconds, work) - alone), 2)
        row["other_processes_cores"] = meter.cores()
        rows.append(row)
        cells = ", ".join(f"{name} {ms} ({row['gil'][name]:.0%})" for name, ms in row["ms"].items())
        print(f"{row['image']:>9} o{orientation or 1} ms (GIL share): {cells} | {busy(row['other_processes_cores'])}")
    report = {
        "benchmark": "cpu_stages",
        "machine": info,
        "gil_blocked_share_floor": round(alone, 3),
        "results": rows,
        "wall_s": round(time.perf_counter() - run_started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from bench.common import write_report

    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
