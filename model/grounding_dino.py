"""Grounding DINO through ``transformers``: load once, detect phrases in batches of images.

Batching rule: images are only stacked when their *processed* size is equal. Padding images of
different sizes into one batch changes every box compared with running each image alone
(transformers issues 32206 and 34346; measured here: none of ~46 boxes matched), whereas equal-size
batches match the single-image run to ~1e-6. Label Studio projects are usually made of images of a
few sizes, so grouping keeps most of the batching win without changing any result.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from model.devices import autocast, resolve_device
from model.pipeline import Stages
from model.postprocess import Candidates, DetectionParams, select_candidates, suppress
from model.prompt import PromptChunk, build_prompts

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "IDEA-Research/grounding-dino-tiny"


@dataclass(frozen=True)
class Detection:
    """One box on one image: corners in pixels of the image as given, score, phrase index."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    phrase: int


class GroundingDinoDetector:
    """A loaded Grounding DINO model and its processor, kept for the life of the process."""

    def __init__(self, model: Any, processor: Any, *, device: torch.device, precision: str = "fp32") -> None:
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = device
        self.precision = precision
        self.max_text_len = int(getattr(model.config, "max_text_len", 256))

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str = DEFAULT_CHECKPOINT,
        *,
        revision: str | None = None,
        device: str = "auto",
        precision: str = "fp32",
    ) -> GroundingDinoDetector:
        """Load a hub id or a local folder (the same code path either way)."""
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        started = time.perf_counter()
        processor = AutoProcessor.from_pretrained(checkpoint, revision=revision)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(checkpoint, revision=revision)
        detector = cls(model, processor, device=resolve_device(device), precision=precision)
        log.info(
            "loaded %s on %s (%s) in %.1f s",
            checkpoint,
            detector.device,
            precision,
            time.perf_counter() - started,
        )
        return detector

    def prompts(self, phrases: Sequence[str]) -> list[PromptChunk]:
        """The prompts that cover ``phrases`` (more than one when they exceed the text length)."""
        return build_prompts(phrases, self.processor.tokenizer, self.max_text_len)

    def detect(
        self,
        images: Sequence[Image.Image],
        phrases: Sequence[str],
        params: DetectionParams,
        *,
        groups: Sequence[int] | None = None,
        batch_size: int = 4,
    ) -> list[list[Detection]]:
        """Detect ``phrases`` (normalised) in each image; one list of detections per image, in order.

        ``groups[p]`` puts phrase ``p`` into an NMS group (aliases of one label); by default each
        phrase is its own group. Detections of an image are sorted by decreasing score. Every step
        runs on this thread, one after the other; :meth:`stages` gives the same steps to
        ``model.pipeline``, which overlaps them.
        """
        stages = self.stages(phrases, params, groups=groups)
        prepared = [stages.preprocess(image) for image in images]
        found: list[list[Detection]] = [[] for _ in images]
        for batch in _same_size_batches([pixels for pixels, _ in prepared], batch_size):
            stacked = torch.cat([prepared[i][0] for i in batch])
            outputs = stages.forward(stacked.to(self.device))
            results = stages.postprocess(outputs, [prepared[i][1] for i in batch])
            for index, detections in zip(batch, results, strict=True):
                found[index] = detections
        return found

    def stages(
        self, phrases: Sequence[str], params: DetectionParams, *, groups: Sequence[int] | None = None
    ) -> Stages[Image.Image, tuple[int, int], list[Detection]]:
        """Preprocess, forward and postprocess for ``phrases``, as ``model.pipeline`` runs them.

        Preprocessing (the processor's resize and normalise) touches no model state and may run on
        many threads; forward must be called from one thread at a time.
        """
        groups = list(range(len(phrases))) if groups is None else list(groups)
        if len(groups) != len(phrases):
            raise ValueError(f"groups has {len(groups)} entries for {len(phrases)} phrases")
        chunks = self.prompts(phrases)
        return Stages(
            preprocess=self.preprocess,
            forward=lambda pixels: self.forward(pixels, chunks),
            postprocess=lambda outputs, sizes: self.postprocess(outputs, sizes, chunks, params, groups),
        )

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """The processor's pixel tensor for one image alone, (1, 3, H, W) on the CPU, and its size.

        ``do_pad=False``: one image needs no padding, and its pixel mask (all ones) is made in
        ``_forward``; the pixels are the same, the processor's work a fifth to a third less on small images.
        """
        pixels = self.processor.image_processor(images=[image], return_tensors="pt", do_pad=False)["pixel_values"]
        return pixels, image.size

    def forward(
        self, pixel_values: torch.Tensor, chunks: Sequence[PromptChunk]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A same-size batch (on the device) against every prompt: per prompt, logits and boxes."""
        return [self._forward(pixel_values, chunk) for chunk in chunks]

    def postprocess(
        self,
        outputs: Sequence[tuple[torch.Tensor, torch.Tensor]],
        sizes: Sequence[tuple[int, int]],
        chunks: Sequence[PromptChunk],
        params: DetectionParams,
        groups: Sequence[int],
    ) -> list[list[Detection]]:
        """Each image's boxes from a batch's outputs: thresholds per prompt, then NMS per label group."""
        found: list[list[Detection]] = []
        for row, size in enumerate(sizes):
            parts = [
                select_candidates(logits[row], boxes[row], chunk.spans, chunk.phrase_ids, params)
                for (logits, boxes), chunk in zip(outputs, chunks, strict=True)
            ]
            found.append(_to_detections(suppress(Candidates.cat(parts), groups, params), size))
        return found

    def _forward(self, pixel_values: torch.Tensor, chunk: PromptChunk) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass of a same-size batch against one prompt."""
        n = pixel_values.shape[0]
        input_ids = torch.tensor([chunk.input_ids] * n, device=self.device)
        with torch.inference_mode(), autocast(self.device, self.precision):
            outputs = self.model(
                pixel_values=pixel_values,
                pixel_mask=torch.ones((n, *pixel_values.shape[2:]), dtype=torch.long, device=self.device),
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                token_type_ids=torch.zeros_like(input_ids),
            )
        # Past the prompt the logits are -inf: only its tokens go on to postprocessing (and to the CPU).
        return outputs.logits[..., : len(chunk.input_ids)].float(), outputs.pred_boxes.float()


def _same_size_batches(pixels: Sequence[torch.Tensor], batch_size: int) -> Iterator[list[int]]:
    """Indices of images grouped by processed size, in batches of at most ``batch_size``."""
    by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, tensor in enumerate(pixels):
        by_size[tuple(tensor.shape[1:])].append(index)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size]


def _to_detections(candidates: Candidates, size: tuple[int, int]) -> list[Detection]:
    """Scale normalised corners to the image's pixels (``size`` is width, height)."""
    width, height = size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = (candidates.boxes * scale).tolist()
    return [
        Detection(x0=b[0], y0=b[1], x1=b[2], y1=b[3], score=float(s), phrase=int(p))
        for b, s, p in zip(boxes, candidates.scores.tolist(), candidates.phrases.tolist(), strict=True)
    ]
