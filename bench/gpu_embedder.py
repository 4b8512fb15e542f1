"""DINOv2 ViT-S/14 on a GPU: images/s by batch and precision, and the reduced-precision drift.

Why: the indexer embeds every task image; whether fp16/bf16 may be used depends on how far their
vectors move from fp32's (cosine), and how many CPU cores a GPU worker needs depends on how fast the
forward is next to the CPU preprocessing. Measured on the machine it runs on:

1. pure forward (pre-made 224 px tensors already on the device, CUDA-synchronised, warm-up uncounted),
   end to end (PIL images -> timm preprocessing on this thread -> forward -> normalised vectors), and
   end to end through ``DinoV2Embedder.embed`` (``model/pipeline.py``: preprocessing on one thread per
   core, overlapped with the forward; ``pipeline_*`` columns), at batch 1, 32 and 128, in fp32, bf16
   and fp16;
2. cosine between each image's fp16/bf16 vector and its fp32 vector (min, mean), on the same images;
3. CPU preprocessing alone, per image (what a pipeline must hide behind the GPU).

The weights are random (the Hub is unreachable here) with LayerScale gammas at 1.0, so the blocks act
and vectors spread as with real weights (MODEL-NOTES.md); speed does not depend on the weights. It
imports only ``model`` and ``tests.tiny_checkpoints`` (torch, timm, PIL, numpy). From the repository
root: ``python3 bench/gpu_embedder.py --out "$OUT/gpu_embedder.json"`` (about a minute on an H200).
``--device cpu --batches 1,8 --images 16`` checks the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import timm
import torch
from PIL import Image, ImageDraw

from model.embedder import create_embedder
from tests.tiny_checkpoints import build_dinov2_checkpoint


def images(count: int, seed: int = 0) -> list[Image.Image]:
    """Varied synthetic photos-to-be: gradients, shapes and noise at several sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (1024, 768), (1920, 1080), (480, 640), (4000, 3000)]
    out = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1.0, size=(1, 1, 3))
        noise = rng.normal(0, 25, size=(h // 8, w // 8, 3))
        noise = np.kron(noise, np.ones((8, 8, 1)))[:h, :w]
        pixels = np.clip(np.broadcast_to(base, (h, w, 3)) + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = int(rng.integers(0, w - 50)), int(rng.integers(0, h - 50))
            r = int(rng.integers(20, max(21, min(w, h) // 4)))
            draw.ellipse((x, y, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        out.append(image)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one uncounted warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench/out"), "gpu_embedder.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    precisions = [p for p in args.precisions.split(",") if not (p == "fp16" and device.type == "cpu")]
    report: dict[str, Any] = {
        "machine": {
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "cpu_cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "model": "vit_small_patch14_dinov2 (random weights, LayerScale 1.0), 224 px",
        "cells": [],
        "drift": {},
    }
    pictures = images(args.images)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = build_dinov2_checkpoint(Path(folder) / "dinov2-small", layer_scale=1.0)
        vectors: dict[str, np.ndarray] = {}
        for precision in precisions:
            embedder = create_embedder(str(checkpoint), device=args.device, precision=precision, batch_size=32)
            vectors[precision] = embedder.embed(pictures)
            if precision == precisions[0]:
                one = timed(lambda e=embedder: e.preprocess(pictures[:16]), device, 3) / 16
                report["cpu_preprocess_ms_per_image"] = round(one * 1000, 2)
            for batch in batches:
                chunk = (pictures * (batch // len(pictures) + 1))[:batch]
                tensor = embedder.preprocess(chunk).to(device)
                forward = timed(lambda e=embedder, t=tensor: e.forward(t), device, args.repeats)
                end_to_end = timed(lambda e=embedder, c=chunk: e.forward(e.preprocess(c)), device, args.repeats)
                embedder.batch_size = batch  # the pipeline's largest batch
                pipelined = timed(lambda e=embedder, c=chunk: e.embed(c), device, args.repeats)
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
                cell = {
                    "precision": precision,
                    "batch": batch,
                    "forward_images_per_s": round(batch / forward, 1),
                    "end_to_end_images_per_s": round(batch / end_to_end, 1),
                    "efficiency": round(forward / end_to_end, 3),
                    "pipeline_images_per_s": round(batch / pipelined, 1),
                    "pipeline_efficiency": round(forward / pipelined, 3),
                    "peak_mib": round(peak, 1) if peak is not None else None,
                }
                report["cells"].append(cell)
                print(json.dumps(cell), flush=True)
            del embedder
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
        reference = vectors.get("fp32")
        for precision, found in vectors.items():
            if precision == "fp32" or reference is None:
                continue
            cosine = (found * reference).sum(axis=1)
            report["drift"][precision] = {"min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean())}
        if reference is not None:
            pairwise = reference @ reference.T
            off = pairwise[~np.eye(len(reference), dtype=bool)]
            report["spread_fp32_pairwise_cosine"] = {"mean": float(off.mean()), "max": float(off.max())}
    print(json.dumps({k: v for k, v in report.items() if k != "cells"}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
