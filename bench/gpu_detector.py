"""Grounding DINO tiny on a GPU: pure forward, end-to-end, precision drift and memory, in one run.

Why this script exists: every other number we have is a CPU number, where the model is the whole cost.
On a GPU the model takes tens of milliseconds an image and the CPU work around it (EXIF, resize,
normalise, the copy to the device, post-processing) decides the throughput. This script measures, on
the machine it runs on:

1. the pure forward: images/s at each batch size and precision, pre-made pixel tensors already on the
   device, CUDA-synchronised, warm-up uncounted;
2. end to end, decoded PIL images -> processor -> model -> detections, through
   ``GroundingDinoDetector.detect`` (every step on one thread, one after the other) and through
   ``model.pipeline`` (what the service runs: preprocessing on one thread per core, batches stacked
   in pinned memory while the device runs, postprocessing on its own thread); and the pipeline from
   the JPEG bytes (decoding and EXIF included, beside the resize), exactly and with draft decoding
   (``DINOLABEL_IMAGE_DRAFT_DECODE``: JPEGs twice the model input or more decoded at 1/2-1/8 scale),
   and from the bytes with decoding and preprocessing in worker processes (``pipeline_jpeg_procs``,
   ``DINOLABEL_IMAGE_PREPROCESS_PROCESSES``: the thread feeding the GPU shares its process with no
   pixel work).
   Preprocessing is ``GroundingDinoDetector.preprocess`` (the processor's resize and normalise on a
   channels-last view). Efficiency = end-to-end images/s / pure-forward images/s at the same batch
   size and precision; then draft decoding against the exact decode, boxes matched as in 3;
3. fp16/bf16 against fp32 on the same images: per image, matched boxes' IoU, score difference, boxes
   found and lost; and the raw outputs (sigmoid of the logits, ``pred_boxes``);
4. GPU memory: peak allocated at each batch size, and per image above the weights;
5. the machine: GPU, torch/transformers/torchvision, CUDA, CPU cores, the image processor class.

It imports only ``model``, ``bench.common`` (standard library at module level) and
``tests.tiny_checkpoints`` (torch + transformers), so it runs where only torch, transformers,
torchvision, Pillow and numpy are installed: no Redis, FastAPI or Hub. The random-weight real-size
checkpoint is built from a config on the first run (~650 MB under ``--cache``). Random weights make
every score ~1.0; the decoder's final LayerNorm gain is scaled by ``SCORE_GAIN`` after loading so
scores spread over ~0.1..0.98 and a threshold of ``BOX_THRESHOLD`` keeps tens of boxes an image, as a
real model does: the drift of kept boxes then means something. The speed of a forward pass does not
depend on the weights.

On a GPU machine, from the repository root (about 3-5 minutes, bounded by ``--budget-s``)::

    python3 bench/gpu_detector.py --out "$OUT/gpu_detector.json"

``--smoke`` runs a tiny version on the CPU (the tests' tiny model, small images, fp32/bf16), in well
under two minutes: it checks the script, it measures nothing worth reporting.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Offline by default: a hub id must already be on disk (the random checkpoint is built locally).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run as a plain script: the repository root (model, bench, tests) is not on sys.path otherwise.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torchvision
import transformers
from PIL import Image

from bench.common import ensure_random_checkpoint, machine_info, positive_ints, synthetic_jpeg, write_report
from model import Detection, DetectionParams, GroundingDinoDetector, create_detector
from model.devices import resolve_device, usable_cores
from model.images import DecodeThen, decode_image, display_size
from model.pipeline import Pipeline, PipelineStats, Stages

REPO = Path(__file__).resolve().parents[1]

PHRASES = ("cat", "dog", "traffic light")
SCORE_GAIN = 0.1
"""Gain applied to the decoder's final LayerNorm of the random real-size model: at 1.0 its scores sit
at 0 or 1; at 0.1 they spread over ~0.1..0.98 (median ~0.59, measured on CPU)."""
BOX_THRESHOLD = 0.8
"""With ``SCORE_GAIN`` about one query in ten passes, tens of boxes an image after NMS."""
PARAMS = DetectionParams(box_threshold=BOX_THRESHOLD, text_threshold=0.25)
MATCH_IOU = 0.5
"""Two boxes of one phrase in two precisions are the same box when their IoU reaches this."""
END_TO_END = ("detect", "pipeline", "pipeline_jpeg", "pipeline_jpeg_draft", "pipeline_jpeg_procs")
LOAD_THREADS = 8
"""The service's default ``DINOLABEL_IMAGE_DOWNLOAD_THREADS``; preprocessing takes one thread per core."""
MAX_PIXELS = 100_000_000

# (stored width, stored height, EXIF orientation or None): every image *as displayed* is 4:3 landscape,
# so the processor gives all of them one size (800x1066) and they batch together, as the pure forward
# does; the large ones and the EXIF rotations are where the CPU side costs.
IMAGE_SPECS: tuple[tuple[int, int, int | None], ...] = (
    (640, 480, None),
    (640, 480, 3),
    (480, 640, 8),
    (1024, 768, None),
    (1024, 768, 3),
    (1600, 1200, None),
    (2048, 1536, None),
    (1536, 2048, 6),
    (3264, 2448, None),
    (4000, 3000, None),
    (3000, 4000, 6),
    (4000, 3000, 3),
)
SMOKE_IMAGE_SPECS = ((640, 480, None), (480, 640, 6), (1024, 768, 3), (2048, 1536, None))


@dataclass(frozen=True)
class Plan:
    """What one run measures; ``--smoke`` swaps in a small one."""

    batches: list[int]
    precisions: list[str]
    images: int  # per end-to-end measurement, a multiple of every batch size
    drift_images: int
    forward_min_s: float  # each pure-forward cell runs at least this long ...
    forward_min_iters: int  # ... and at least this many forward passes
    specs: tuple[tuple[int, int, int | None], ...]


# --- inputs -----------------------------------------------------------------------------------------------


def make_inputs(specs: Sequence[tuple[int, int, int | None]]) -> tuple[list[bytes], list[Image.Image]]:
    """The JPEGs and the pictures a browser shows for them (EXIF applied), decoded once."""
    jpegs = [synthetic_jpeg(w, h, o, seed) for seed, (w, h, o) in enumerate(specs)]
    return jpegs, [decode_image(data, max_pixels=MAX_PIXELS) for data in jpegs]


def cycle(items: Sequence[Any], count: int) -> list[Any]:
    return [items[i % len(items)] for i in range(count)]


# --- measurement helpers ----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """CUDA runs asynchronously; without a sync the clock would stop before the GPU is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Budget:
    """The run's time limit: a cell that would start past it is recorded as skipped, not run."""

    def __init__(self, seconds: float) -> None:
        self.started = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)


def guarded(budget: Budget, need_s: float, cell: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one cell; a failure (say an fp16 overflow in one kernel) is recorded and the run goes on."""
    if budget.left() < need_s:
        return {"skipped": f"time budget: {budget.left():.0f} s left, cell needs ~{need_s:.0f} s"}
    try:
        return cell()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}


# --- 1. pure forward and 4. memory ------------------------------------------------------------------------


def pure_forward(detector: GroundingDinoDetector, pixels: torch.Tensor, plan: Plan) -> dict[str, Any]:
    """images/s of the model alone on a batch already on the device; peak memory of one pass."""
    device = detector.device
    (chunk,) = detector.prompts(PHRASES)
    on_device = pixels.to(device)
    batch = on_device.shape[0]
    detector._forward(on_device, chunk)  # warm-up: kernels chosen, caches filled
    sync(device)
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # weights + input
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    iters = 0
    started = time.perf_counter()
    while iters == 0 or time.perf_counter() - started < plan.forward_min_s:
        for _ in range(plan.forward_min_iters):  # queued back to back, as a busy device would run them
            detector._forward(on_device, chunk)
        iters += plan.forward_min_iters
        sync(device)  # to read the clock honestly
    seconds = time.perf_counter() - started
    row: dict[str, Any] = {
        "iters": iters,
        "seconds": round(seconds, 4),
        "images_per_s": round(iters * batch / seconds, 2),
        "ms_per_batch": round(seconds / iters * 1000, 2),
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row["weights_and_input_mib"] = round(resident / 2**20, 1)
        row["peak_allocated_mib"] = round(peak / 2**20, 1)
        row["activation_mib_per_image"] = round((peak - resident) / batch / 2**20, 1)
    del on_device
    free(device)
    return row


# --- 2. end to end ----------------------------------------------------------------------------------------


def end_to_end_detect(detector: GroundingDinoDetector, images: list[Image.Image], batch: int) -> dict[str, Any]:
    """Today's path: ``detect`` on decoded images (processor, forward, post-processing), one call."""
    detector.detect(images[:batch], PHRASES, PARAMS, batch_size=batch)  # warm-up
    sync(detector.device)
    started = time.perf_counter()
    found = detector.detect(images, PHRASES, PARAMS, batch_size=batch)
    sync(detector.device)
    seconds = time.perf_counter() - started
    return {
        "images": len(images),
        "seconds": round(seconds, 4),
        "images_per_s": round(len(images) / seconds, 2),
        "boxes_per_image": round(statistics.fmean(len(f) for f in found), 1),
    }


def end_to_end_pipeline(
    detector: GroundingDinoDetector,
    pipeline: Pipeline,
    inputs: list[Any],
    batch: int,
    *,
    decode: bool,
    draft: bool = False,
) -> dict[str, Any]:
    """The service's path: ``model.pipeline`` over decoded images, or over JPEG bytes (``decode``), these
    with draft decoding (``draft``, ``DINOLABEL_IMAGE_DRAFT_DECODE=true``) or not. The bytes are decoded
    as the service does it, in the preprocessing step (on threads, or in the pipeline's processes)."""
    stages = detector.stages(PHRASES, PARAMS)
    decode_size = detector.preprocessor.input_size if draft else None
    if decode:
        step = DecodeThen(stages.preprocess, max_pixels=MAX_PIXELS, decode_size=decode_size)
        stages = Stages(step, stages.forward, stages.postprocess)

    def load(item: Any) -> Any:
        return item

    def run(items: list[Any], stats: PipelineStats | None = None) -> list[Any]:
        return [result for _, result in pipeline.run(items, load, stages, batch_size=batch, stats=stats)]

    run(inputs[:batch])  # warm-up
    sync(detector.device)
    stats = PipelineStats()
    started = time.perf_counter()
    found = run(inputs, stats)
    sync(detector.device)
    seconds = time.perf_counter() - started
    return {
        "images": len(inputs),
        "seconds": round(seconds, 4),
        "images_per_s": round(len(inputs) / seconds, 2),
        "boxes_per_image": round(statistics.fmean(len(f) for f in found), 1),
        "mean_batch": round(stats.items / max(stats.batches, 1), 2),
        "stats": stats.as_dict(),
    }


# --- 3. precision drift -----------------------------------------------------------------------------------


def iou(a: Detection, b: Detection) -> float:
    ix = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    iy = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = ix * iy
    union = (a.x1 - a.x0) * (a.y1 - a.y0) + (b.x1 - b.x0) * (b.y1 - b.y0) - inter
    return inter / union if union > 0 else 0.0


def match(reference: list[Detection], other: list[Detection]) -> list[tuple[Detection, Detection, float]]:
    """Greedy one-to-one matching by phrase, best reference box first, at IoU >= ``MATCH_IOU``."""
    free_others = list(other)
    pairs: list[tuple[Detection, Detection, float]] = []
    for ref in reference:  # sorted by decreasing score already
        candidates = [(iou(ref, o), i) for i, o in enumerate(free_others) if o.phrase == ref.phrase]
        if not candidates:
            continue
        best, index = max(candidates)
        if best >= MATCH_IOU:
            pairs.append((ref, free_others.pop(index), best))
    return pairs


def image_drift(reference: list[Detection], other: list[Detection]) -> dict[str, Any]:
    pairs = match(reference, other)
    ious = [p[2] for p in pairs]
    diffs = [abs(p[0].score - p[1].score) for p in pairs]
    return {
        "boxes_fp32": len(reference),
        "boxes": len(other),
        "matched": len(pairs),
        "lost": len(reference) - len(pairs),
        "found": len(other) - len(pairs),
        "mean_iou": round(statistics.fmean(ious), 4) if ious else None,
        "min_iou": round(min(ious), 4) if ious else None,
        "mean_score_diff": round(statistics.fmean(diffs), 5) if diffs else None,
        "max_score_diff": round(max(diffs), 5) if diffs else None,
    }


def draft_drift(detector: GroundingDinoDetector, files: list[bytes]) -> dict[str, Any]:
    """Draft decoding against the exact decode of the same JPEGs, in the detector's precision.

    Only the JPEGs that draft decoding shrinks (at least twice the model input) are compared: the
    others are decoded exactly either way. Per image, boxes matched by phrase (the reference here is
    the exact path, reported under the ``*_fp32`` keys of ``image_drift``) and the model inputs' mean
    and largest difference (normalised units; one grey level is ~0.017).
    """
    per_image = []
    for data in files:
        draft = decode_image(data, max_pixels=MAX_PIXELS, decode_size=detector.input_size)
        if draft.size == display_size(draft):
            continue
        exact = decode_image(data, max_pixels=MAX_PIXELS)
        exact_pixels, draft_pixels = detector.preprocess(exact)[0], detector.preprocess(draft)[0]
        found = detector.detect([exact, draft], PHRASES, PARAMS, batch_size=1)
        row = image_drift(found[0], found[1])
        row["image"] = f"{exact.size[0]}x{exact.size[1]} decoded at {draft.size[0]}x{draft.size[1]}"
        row["input_mean_abs_diff"] = round(float((draft_pixels - exact_pixels).abs().mean()), 5)
        row["input_max_abs_diff"] = round(float((draft_pixels - exact_pixels).abs().max()), 4)
        per_image.append(row)
    ious = [r["mean_iou"] for r in per_image if r["mean_iou"] is not None]
    return {
        "precision": detector.precision,
        "images": len(per_image),
        "per_image": per_image,
        "mean_iou": round(statistics.fmean(ious), 4) if ious else None,
        "min_iou": min((r["min_iou"] for r in per_image if r["min_iou"] is not None), default=None),
        "max_score_diff": max(
            (r["max_score_diff"] for r in per_image if r["max_score_diff"] is not None), default=None
        ),
        "boxes_exact": sum(r["boxes_fp32"] for r in per_image),
        "boxes_lost": sum(r["lost"] for r in per_image),
        "boxes_found": sum(r["found"] for r in per_image),
    }


def raw_outputs(detector: GroundingDinoDetector, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores over the prompt's tokens and ``pred_boxes``, on the CPU, for one batch."""
    (chunk,) = detector.prompts(PHRASES)
    logits, boxes = detector._forward(pixels.to(detector.device), chunk)
    tokens = len(chunk.input_ids)  # past the text, logits are -inf
    return logits[:, :, :tokens].sigmoid().cpu(), boxes.cpu()


def drift(detector: GroundingDinoDetector, images: list[Image.Image], pixels: torch.Tensor) -> dict[str, Any]:
    """Every precision against fp32 on the same images, same batch composition."""
    outputs: dict[str, dict[str, Any]] = {}
    original = detector.precision
    try:
        for precision in ("fp32", "bf16", "fp16"):
            if precision == "fp16" and detector.device.type == "cpu":
                continue
            detector.precision = precision
            try:
                outputs[precision] = {
                    "detections": detector.detect(images, PHRASES, PARAMS, batch_size=len(images)),
                    "raw": raw_outputs(detector, pixels),
                }
            except Exception as exc:
                outputs[precision] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        detector.precision = original
    reference = outputs["fp32"]
    report: dict[str, Any] = {"images": len(images), "fp32_boxes_per_image": [len(d) for d in reference["detections"]]}
    for precision, result in outputs.items():
        if precision == "fp32":
            continue
        if "error" in result:
            report[precision] = result
            continue
        per_image = [
            image_drift(ref, other) for ref, other in zip(reference["detections"], result["detections"], strict=True)
        ]
        scores_ref, boxes_ref = reference["raw"]
        scores, boxes = result["raw"]
        ious = [r["mean_iou"] for r in per_image if r["mean_iou"] is not None]
        report[precision] = {
            "per_image": per_image,
            "mean_iou": round(statistics.fmean(ious), 4) if ious else None,
            "min_iou": min((r["min_iou"] for r in per_image if r["min_iou"] is not None), default=None),
            "max_score_diff": max(
                (r["max_score_diff"] for r in per_image if r["max_score_diff"] is not None), default=None
            ),
            "boxes_lost": sum(r["lost"] for r in per_image),
            "boxes_found": sum(r["found"] for r in per_image),
            "boxes_fp32": sum(r["boxes_fp32"] for r in per_image),
            "raw_score_max_abs_diff": round(float((scores - scores_ref).abs().max()), 5),
            "raw_score_mean_abs_diff": round(float((scores - scores_ref).abs().mean()), 6),
            "raw_box_max_abs_diff": round(float((boxes - boxes_ref).abs().max()), 5),
            "raw_box_mean_abs_diff": round(float((boxes - boxes_ref).abs().mean()), 6),
        }
    return report


# --- machine, model, report -------------------------------------------------------------------------------


def facts(device: torch.device, detector: GroundingDinoDetector) -> dict[str, Any]:
    info = {
        **machine_info(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torchvision": torchvision.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "image_processor": type(detector.processor.image_processor).__name__,
        "parameters_m": round(sum(p.numel() for p in detector.model.parameters()) / 1e6, 1),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        )
    return info


def load(args: argparse.Namespace, device: torch.device, tmp: Path) -> tuple[GroundingDinoDetector, str]:
    """The real-size random model with spread scores, or (``--smoke``) the tests' tiny model."""
    if args.smoke:
        from tests.tiny_checkpoints import build_tiny_grounding_dino

        path = build_tiny_grounding_dino(tmp / "tiny")  # its scores are spread already
        return create_detector(str(path), device=str(device)), "tiny test model (random weights)"
    path = args.checkpoint or str(ensure_random_checkpoint(args.cache))
    detector = create_detector(str(path), device=str(device))
    if args.checkpoint:
        return detector, str(args.checkpoint)
    with torch.no_grad():
        detector.model.model.decoder.layer_norm.weight.mul_(SCORE_GAIN)
    return detector, f"grounding-dino-tiny (random weights, real size, score gain {SCORE_GAIN})"


def print_table(report: dict[str, Any]) -> None:
    info = report["machine"]
    print(
        f"\ngpu_detector device={info['device']} hw={info.get('gpu', info['cpu_model'])!r} "
        f"model={report['model']} torch={info['torch']} transformers={info['transformers']} "
        f"processor={info['image_processor']} cpu_cores={info['cpu_cores_usable']}"
    )
    print(
        f"{'precision':>9} {'batch':>5} | {'forward img/s':>13} {'MiB/img':>8} | "
        + " | ".join(f"{name + ' img/s':>20} {'eff':>5}" for name in END_TO_END)
    )
    for row in report["results"]:
        fwd = row["forward"]
        cells = []
        for name in END_TO_END:
            rate = row[name].get("images_per_s")
            eff = row.get(f"{name}_efficiency")
            cells.append(f"{rate or _why(row[name]):>20} {eff if eff is not None else '-':>5}")
        print(
            f"{row['precision']:>9} {row['batch']:>5} | {fwd.get('images_per_s') or _why(fwd):>13} "
            f"{fwd.get('activation_mib_per_image', '-'):>8} | " + " | ".join(cells)
        )
    for precision in ("bf16", "fp16"):
        d = report["drift"].get(precision)
        if isinstance(d, dict) and "mean_iou" in d:
            print(
                f"drift {precision} vs fp32 ({report['drift']['images']} images): mean IoU {d['mean_iou']}, "
                f"min IoU {d['min_iou']}, max score diff {d['max_score_diff']}, boxes lost {d['boxes_lost']} "
                f"found {d['boxes_found']} of {d['boxes_fp32']}; raw score max diff {d['raw_score_max_abs_diff']}, "
                f"raw box max diff {d['raw_box_max_abs_diff']}"
            )
        elif d is not None:
            print(f"drift {precision}: {_why(d)}")
    d = report.get("draft_drift", {})
    if "mean_iou" in d:
        print(
            f"draft decoding vs exact ({d['images']} images, {d['precision']}): mean IoU {d['mean_iou']}, min IoU "
            f"{d['min_iou']}, max score diff {d['max_score_diff']}, boxes lost {d['boxes_lost']} found "
            f"{d['boxes_found']} of {d['boxes_exact']}"
        )


def _why(cell: dict[str, Any]) -> str:
    return "skipped" if "skipped" in cell else "error" if "error" in cell else "-"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script, in < 2 min")
    parser.add_argument("--batches", type=positive_ints, help="default 1,8,16 (smoke: 1,2)")
    parser.add_argument("--precisions", help="comma-separated; default fp32,bf16,fp16 (smoke: fp32,bf16)")
    parser.add_argument("--images", type=int, help="images per end-to-end cell (default 48; smoke 4)")
    parser.add_argument("--device", help="default cuda (smoke: cpu)")
    parser.add_argument("--checkpoint", help="a local folder instead of the random real-size checkpoint")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dinolabel-bench-cache")
    parser.add_argument(
        "--draft-drift-only", action="store_true", help="only draft decoding against exact (runs on a CPU too)"
    )
    parser.add_argument(
        "--processes", type=int, help="preprocessing processes of pipeline_jpeg_procs (default: cores, at most 8)"
    )
    parser.add_argument("--budget-s", type=float, default=390.0, help="cells that would start later are skipped")
    default_out = Path(os.environ["OUT"]) / "gpu_detector.json" if os.environ.get("OUT") else None
    parser.add_argument("--out", type=Path, default=default_out or REPO / "bench" / "out" / "gpu_detector.json")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    batches = args.batches or ([1, 2] if args.smoke else [1, 8, 16])
    precisions = (args.precisions or ("fp32,bf16" if args.smoke else "fp32,bf16,fp16")).split(",")
    images = args.images or (4 if args.smoke else 48)
    lcm = int(np.lcm.reduce(batches))
    return Plan(
        batches=batches,
        precisions=precisions,
        images=-(-images // lcm) * lcm,  # whole batches only: a partial last batch would flatter nothing
        drift_images=4 if args.smoke else 8,
        forward_min_s=0.0 if args.smoke else 1.5,
        forward_min_iters=1 if args.smoke else 5,
        specs=SMOKE_IMAGE_SPECS if args.smoke else IMAGE_SPECS,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    plan = make_plan(args)
    device = resolve_device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cpu" and not args.smoke:
        print("note: no CUDA device; this measures the CPU (use --smoke for a quick check)", flush=True)
    with tempfile.TemporaryDirectory(prefix="dinolabel-gpu-bench-") as tmp:
        detector, model_label = load(args, device, Path(tmp))
    print(f"loaded {model_label} on {device} after {time.perf_counter() - budget.started:.0f} s", flush=True)
    files, pictures = make_inputs(plan.specs)
    print(f"{len(pictures)} test images decoded after {time.perf_counter() - budget.started:.0f} s", flush=True)
    if args.draft_drift_only:
        report = {
            "benchmark": "gpu_detector --draft-drift-only",
            "model": model_label,
            "params": {"box_threshold": PARAMS.box_threshold, "text_threshold": PARAMS.text_threshold},
            "machine": facts(device, detector),
            "draft_drift": draft_drift(detector, files),
            "wall_s": round(time.perf_counter() - budget.started, 1),
        }
        print_table({**report, "results": [], "drift": {}})
        write_report(args.out, report)
        return 0
    images = cycle(pictures, plan.images)
    processed = [detector.preprocess(p)[0] for p in pictures]
    sizes = {tuple(p.shape[2:]) for p in processed}
    if len(sizes) != 1:
        raise SystemExit(f"test images give several processed sizes {sizes}: they would not batch together")

    pipeline = Pipeline(device, load_threads=LOAD_THREADS)
    processes = args.processes or min(usable_cores(), LOAD_THREADS)
    in_processes = Pipeline(device, load_threads=LOAD_THREADS, preprocess_processes=processes)
    jpegs = cycle(files, plan.images)
    rows: list[dict[str, Any]] = []
    for precision in plan.precisions:
        if precision == "fp16" and device.type == "cpu":
            continue
        detector.precision = precision
        for batch in plan.batches:
            pixels = torch.cat(cycle(processed, batch))
            row: dict[str, Any] = {"precision": precision, "batch": batch}
            row["forward"] = guarded(budget, 10, lambda pixels=pixels: pure_forward(detector, pixels, plan))
            row["detect"] = guarded(budget, 15, lambda batch=batch: end_to_end_detect(detector, images, batch))
            row["pipeline"] = guarded(
                budget, 15, lambda batch=batch: end_to_end_pipeline(detector, pipeline, images, batch, decode=False)
            )
            row["pipeline_jpeg"] = guarded(
                budget, 15, lambda batch=batch: end_to_end_pipeline(detector, pipeline, jpegs, batch, decode=True)
            )
            row["pipeline_jpeg_draft"] = guarded(
                budget,
                15,
                lambda batch=batch: end_to_end_pipeline(detector, pipeline, jpegs, batch, decode=True, draft=True),
            )
            row["pipeline_jpeg_procs"] = guarded(
                budget,
                15,
                lambda batch=batch: end_to_end_pipeline(detector, in_processes, jpegs, batch, decode=True),
            )
            fwd = row["forward"].get("images_per_s")
            for name in END_TO_END:
                rate = row[name].get("images_per_s")
                row[f"{name}_efficiency"] = round(rate / fwd, 3) if fwd and rate else None
            rows.append(row)
            print(
                f"{precision} batch {batch}: forward {row['forward'].get('images_per_s', _why(row['forward']))} img/s, "
                + ", ".join(
                    f"{name} {row[name].get('images_per_s', _why(row[name]))} img/s "
                    f"(efficiency {row[f'{name}_efficiency']})"
                    for name in END_TO_END
                )
                + f" at {time.perf_counter() - budget.started:.0f} s",
                flush=True,
            )
    pipeline.close()
    in_processes.close()
    detector.precision = "fp32"
    drift_pictures = cycle(pictures, plan.drift_images)
    drift_report = guarded(
        budget, 20, lambda: drift(detector, drift_pictures, torch.cat(cycle(processed, plan.drift_images)))
    )
    draft_report = guarded(budget, 10, lambda: draft_drift(detector, files))
    report = {
        "benchmark": "gpu_detector",
        "model": model_label,
        "smoke": args.smoke,
        "phrases": list(PHRASES),
        "params": {"box_threshold": PARAMS.box_threshold, "text_threshold": PARAMS.text_threshold},
        "processed_size": list(next(iter(sizes))),
        "image_specs": [list(s) for s in plan.specs],
        "images_per_cell": plan.images,
        "preprocess_processes": processes,
        "machine": facts(device, detector),
        "results": rows,
        "drift": drift_report,
        "draft_drift": draft_report,
        "wall_s": round(time.perf_counter() - budget.started, 1),
    }
    print_table(report)
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
