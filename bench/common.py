"""Helpers the benchmark scripts share: the cached checkpoint, machine facts, load meter, arguments.

Why this module exists: the scripts' result files are compared with each other (same machine, same
checkpoint, "was the machine quiet?"), so the code that records those facts must be one copy, not three
that drift apart. It imports only the standard library at module level: ``predict_overhead.py`` re-runs
itself as a stub worker and should not pay for torch or numpy there.

The scripts import it as ``bench.common`` (a namespace package: the repository root is on ``sys.path``
when a script runs, and ``bench/`` is deliberately not part of the installed package).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RANDOM_CHECKPOINT_NAME = "grounding-dino-tiny-random-seed0"
"""Folder name of the random real-size checkpoint in the cache; one entry shared by every script."""

RANDOM_DINOV2_NAME = "vit-small-patch14-dinov2-random-layerscale1-seed0"
"""Folder name of the random ViT-S/14 DINOv2 (LayerScale gammas 1.0) in the cache."""

BUSY_CORES = 0.2
"""Above this many cores used by other processes during a phase, its line says to rerun it."""


# --- inputs -----------------------------------------------------------------------------------------------


def ensure_random_checkpoint(cache: Path) -> Path:
    """The cached random-weight real-size checkpoint, built on first use (~650 MB, ~10 s).

    A forward pass costs the same with random weights as with the real ones, and nothing has to be
    downloaded. Built into a temporary sibling and renamed into place, so an interrupted build never
    leaves a half-written folder that a later run would take for a checkpoint.
    """
    target = cache / RANDOM_CHECKPOINT_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from tests.tiny_checkpoints import build_real_size_grounding_dino

    cache.mkdir(parents=True, exist_ok=True)
    print(f"building the random real-size checkpoint under {target} (once, ~650 MB) ...", flush=True)
    started = time.perf_counter()
    partial = Path(tempfile.mkdtemp(prefix=f".{RANDOM_CHECKPOINT_NAME}-", dir=cache))
    try:
        build_real_size_grounding_dino(partial, seed=0)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"built in {time.perf_counter() - started:.1f} s", flush=True)
    return target


def ensure_random_dinov2(cache: Path) -> Path:
    """A random-weight ViT-S/14 DINOv2 in timm's hub layout, built once into ``cache`` (~90 MB, ~2 s).

    It costs exactly what the real ``vit_small_patch14_dinov2.lvd142m`` costs per image. Its LayerScale
    gammas are 1.0 (timm's init, 1e-5, makes a random model map every image to ~the same vector), so its
    embeddings spread out, but similarity numbers from it say nothing about the real weights.
    """
    target = cache / RANDOM_DINOV2_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from tests.tiny_checkpoints import build_dinov2_checkpoint

    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{RANDOM_DINOV2_NAME}-", dir=cache))
    try:
        build_dinov2_checkpoint(partial, seed=0, layer_scale=1.0)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


# --- machine ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """``platform.processor()`` is empty on most Linux systems; /proc/cpuinfo has the name."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What every result file records to tell whether two of them are comparable.

    Each script adds what only it knows (torch version, device, GPU). The load average is kept with the
    numbers because other processes on a 2-core machine change them a lot.
    """
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }


# --- load from other processes ----------------------------------------------------------------------------


def tree_cpu_seconds(root: int | None = None) -> float:
    """CPU seconds of this process (or ``root``) and all its descendants (the services a benchmark starts).

    For benchmarks whose API, Redis and workers are child processes: their CPU is ours, not a
    neighbour's; with ``root``, what one service and its children used.
    """
    parents: dict[int, int] = {}
    seconds: dict[int, float] = {}
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        seconds[pid] = sum(int(v) for v in fields[11:15]) / ticks  # utime stime cutime cstime
    ours = {os.getpid() if root is None else root}
    while found := {pid for pid, parent in parents.items() if parent in ours} - ours:
        ours |= found
    return sum(seconds.get(pid, 0.0) for pid in ours)


def process_cpu_seconds() -> float:
    """CPU seconds of this process alone: for a benchmark that runs everything in-process."""
    own = os.times()
    return own.user + own.system


class OtherLoad:
    """Cores kept busy by processes other than ours during a phase (machine busy time minus ours).

    On a small shared machine a neighbour's job can double a forward pass or a latency; a line is
    trustworthy only when this is close to 0. ``own_cpu_seconds`` says what counts as ours: this process
    and its descendants (default), or this process alone.
    """

    def __init__(self, own_cpu_seconds: Callable[[], float] = tree_cpu_seconds) -> None:
        self._own_cpu_seconds = own_cpu_seconds
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
        return time.perf_counter(), busy, self._own_cpu_seconds()

    def cores(self) -> float | None:
        """Average number of cores used by other processes since construction."""
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        others = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return round(max(0.0, others) / (end[0] - self._start[0]), 2)


def busy(cores: float | None) -> str:
    """The load note ending each line; a neighbour's PyTorch on a small machine can slow ours 20x."""
    note = " (machine not quiet: rerun)" if cores is not None and cores > BUSY_CORES else ""
    return f"other processes {cores} cores{note}"


# --- command line -----------------------------------------------------------------------------------------


def positive_ints(text: str) -> list[int]:
    """An argparse ``type`` for lists like ``1,4,16``: sorted, without repeats, each at least 1."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Write a run's JSON next to the others and say where, with the run's wall time."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} (whole run {report['wall_s']:.0f} s)", flush=True)


def synthetic_jpeg(width: int, height: int, orientation: int | None, seed: int) -> bytes:
    """A JPEG with gradients, ellipses and noise: realistic work for the decoder and the resize.

    ``orientation`` is written as the EXIF Orientation tag (6 and 8: stored portrait, shown landscape,
    as phones do). numpy and Pillow are imported here so this module stays importable anywhere.
    """
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    small = (max(1, width // 8), max(1, height // 8))
    ys, xs = np.mgrid[0 : small[1], 0 : small[0]].astype(np.float32)
    ramp = (xs / small[0] + ys / small[1]) / 2
    start, end = rng.integers(0, 256, size=(2, 3))
    base = Image.fromarray((start * (1 - ramp[..., None]) + end * ramp[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(base)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, small[0])), int(rng.integers(0, small[1]))
        x1, y1 = x0 + int(rng.integers(4, small[0] // 2 + 5)), y0 + int(rng.integers(4, small[1] // 2 + 5))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    image = np.asarray(base.resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)
    noisy = np.clip(image + rng.integers(-8, 9, size=image.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(noisy).save(out, "JPEG", quality=90, exif=exif)
    return out.getvalue()
