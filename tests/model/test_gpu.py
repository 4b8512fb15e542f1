"""The detector on a CUDA GPU: same boxes batched or alone, through the pipeline, and as on the CPU.

CUDA-only (marked ``gpu``; CI deselects them). They need only torch, transformers, torchvision,
Pillow and pytest, so that a GPU machine without Redis or Label Studio runs them with the root
conftest switched off:

    HF_HUB_OFFLINE=1 python3 -m pytest --noconftest -m gpu tests/model/test_gpu.py

Hence their own fixtures below. On CUDA, fp32 convolutions use TF32 by default and kernels may
differ between batch sizes, so results agree within a tolerance rather than to ~1e-6 as on the CPU:
a detection present on one side only is accepted when its score lies within that tolerance of the
threshold (it may cross it), never otherwise. Mixing image sizes into one padded batch, the failure
these tests guard against, moves boxes by whole pixels and scores by far more.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from model import Detection, DetectionParams, GroundingDinoDetector, create_detector
from model.pipeline import Pipeline
from tests.tiny_checkpoints import build_tiny_grounding_dino

pytestmark = pytest.mark.gpu

PHRASES = ["cat", "dog", "traffic light"]
LOW = DetectionParams(box_threshold=0.3, text_threshold=0.25)
SCORE_TOL = 5e-3
BOX_TOL = 5e-3  # as a fraction of the image's longer side


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_grounding_dino(tmp_path_factory.mktemp("gpu") / "tiny")


@pytest.fixture(scope="module")
def cuda_detector(checkpoint: Path) -> GroundingDinoDetector:
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (deselect them with -m 'not gpu')", pytrace=False)
    return create_detector(str(checkpoint), device="cuda")


def image(width: int, height: int, seed: int) -> Image.Image:
    """A small image with some structure, different per seed."""
    img = Image.new("RGB", (width, height), ((seed * 70) % 255, (seed * 130) % 255, (seed * 40) % 255))
    for i in range(0, width, 7):
        img.paste((255 - i % 255, i % 255, 128), (i, 0, min(i + 3, width), height // 2))
    return img


def disagreements(a: list[Detection], b: list[Detection], size: tuple[int, int], threshold: float) -> list[str]:
    """What differs between two runs' detections of one image, beyond the tolerances (empty: they agree)."""
    box_tol = BOX_TOL * max(size)
    unmatched = list(b)
    problems: list[str] = []
    for x in a:
        twin = next(
            (
                y
                for y in unmatched
                if y.phrase == x.phrase
                and abs(y.score - x.score) <= SCORE_TOL
                and max(abs(x.x0 - y.x0), abs(x.y0 - y.y0), abs(x.x1 - y.x1), abs(x.y1 - y.y1)) <= box_tol
            ),
            None,
        )
        if twin is not None:
            unmatched.remove(twin)
        elif x.score > threshold + SCORE_TOL:
            problems.append(f"only in the first: {x}")
    problems += [f"only in the second: {y}" for y in unmatched if y.score > threshold + SCORE_TOL]
    return problems


def test_batching_on_cuda_never_changes_an_images_result(cuda_detector: GroundingDinoDetector) -> None:
    # 64x48 and 128x96 share a processed size (batched together); 40x80 and 90x60 do not.
    images = [image(64, 48, 1), image(128, 96, 2), image(40, 80, 3), image(90, 60, 4), image(64, 48, 5)]
    alone = [cuda_detector.detect([img], PHRASES, LOW)[0] for img in images]
    batched = cuda_detector.detect(images, PHRASES, LOW, batch_size=4)
    assert sum(len(found) for found in alone) >= 5, "the tiny model finds boxes at a low threshold"
    for img, a, b in zip(images, alone, batched, strict=True):
        assert disagreements(a, b, img.size, LOW.box_threshold) == []
    assert disagreements(alone[0], alone[4], images[0].size, LOW.box_threshold), "different images differ"


def test_cuda_finds_the_boxes_the_cpu_finds(
    checkpoint: Path, cuda_detector: GroundingDinoDetector, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This checks the device path (copies, coordinates), not TF32's rounding, which the drift figures of
    # bench/gpu_detector.py report: full fp32 on both sides.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cpu_detector = create_detector(str(checkpoint), device="cpu")
    images = [image(64, 48, 1), image(40, 80, 3), image(90, 60, 4)]
    on_cpu = cpu_detector.detect(images, PHRASES, LOW, batch_size=4)
    on_cuda = cuda_detector.detect(images, PHRASES, LOW, batch_size=4)
    assert sum(len(found) for found in on_cpu) >= 3
    for img, a, b in zip(images, on_cpu, on_cuda, strict=True):
        assert disagreements(a, b, img.size, LOW.box_threshold) == []


def test_the_pipeline_on_cuda_finds_what_detect_finds(cuda_detector: GroundingDinoDetector) -> None:
    # Pinned memory, non-blocking copies in and out, postprocessing on another thread: a copy read
    # before it landed would give other boxes than detect's plain path.
    sizes = [(64, 48), (128, 96), (40, 80), (90, 60), (64, 48), (128, 96), (64, 48), (96, 72)]
    images = [image(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    old = cuda_detector.detect(images, PHRASES, LOW, batch_size=4)
    pipeline = Pipeline(cuda_detector.device, load_threads=4, preprocess_threads=2)
    try:
        new = dict(pipeline.run(images, lambda img: img, cuda_detector.stages(PHRASES, LOW), batch_size=4))
    finally:
        pipeline.close()
    assert sum(len(found) for found in old) >= len(images)
    for index, img in enumerate(images):
        assert disagreements(old[index], new[index], img.size, LOW.box_threshold) == []
