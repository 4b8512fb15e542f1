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

import numpy as np
import torch
from PIL import Image

from model.devices import autocast, resolve_device
from model.images import Size, display_size
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
        self.preprocessor = GroundingDinoPreprocess(processor.image_processor)

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
            preprocess=self.preprocessor,  # not a method of the detector: it is pickled for processes
            forward=lambda pixels: self.forward(pixels, chunks),
            postprocess=lambda outputs, sizes: self.postprocess(outputs, sizes, chunks, params, groups),
        )

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, Size]:
        """One image's pixel tensor, (1, 3, H, W) on the CPU, and displayed size (:class:`GroundingDinoPreprocess`)."""
        return self.preprocessor(image)

    def input_size(self, size: Size) -> Size:
        """The model input's (width, height) for an image displayed at ``size`` (:class:`GroundingDinoPreprocess`)."""
        return self.preprocessor.input_size(size)

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
                # One image's mask seen n times: a batch's own (n, H, W) ones cost tens of MB a pass.
                pixel_mask=torch.ones((1, *pixel_values.shape[2:]), dtype=torch.long, device=self.device).expand(
                    n, *pixel_values.shape[2:]
                ),
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                token_type_ids=torch.zeros_like(input_ids),
            )
        # Past the prompt the logits are -inf: only its tokens go on to postprocessing (and to the CPU).
        return outputs.logits[..., : len(chunk.input_ids)].float(), outputs.pred_boxes.float()


class GroundingDinoPreprocess:
    """The processor's resize and normalise for one image, apart from the model: cheap to pickle.

    A pipeline runs it on threads or sends it to its preprocessing processes, so it holds the image
    processor only (pickling the detector would pickle the weights).
    """

    def __init__(self, image_processor: Any, *, fast: bool = True) -> None:
        """``fast=False`` calls the processor as is even when its steps could be called one by one."""
        self.image_processor = image_processor
        self.tensor_path = fast and _has_tensor_path(image_processor)
        self.mean_std = _fused_mean_std(image_processor) if self.tensor_path else None

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, Size]:
        """The processor's pixel tensor for one image alone, (1, 3, H, W) on the CPU, and its displayed size.

        Bit for bit the tensor that ``processor.image_processor(images=[image], do_pad=False)`` returns
        (tested), at a third to a fifth of its cost on large images: the processor copies the picture
        into channels-first order before resizing it, and torch resizes a uint8 picture several times
        faster in its natural channels-last order, with the same result. So the picture goes to the
        processor's own ``resize`` as a channels-last view, and is put in channels-first order by the
        copy that converts it to float for the processor's rescale and normalise. A processor without
        those steps (a Pillow one)
        is called as is. No padding: one image needs none, and its pixel mask (all ones) is made in
        ``_forward``.

        The size is the displayed one (``model.images.display_size``), so that boxes of a
        draft-decoded image come back in the pixels of the full image.
        """
        if not self.tensor_path:
            pixels = self.image_processor(images=[image], return_tensors="pt", do_pad=False)["pixel_values"]
            return pixels, display_size(image)
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        hwc = torch.from_numpy(np.array(rgb))  # as the processor converts it (a writable copy)
        chw = hwc.permute(2, 0, 1).unsqueeze(0)  # channels-last view: no copy
        proc = self.image_processor
        resized = proc.resize(chw, size=proc.size, resample=proc.resample)  # still channels-last
        if self.mean_std is None:
            pixels = proc.rescale_and_normalize(
                resized.contiguous(),
                proc.do_rescale,
                proc.rescale_factor,
                proc.do_normalize,
                proc.image_mean,
                proc.image_std,
            )
            return pixels, display_size(image)
        # The processor's fused rescale-and-normalise, ``(x - mean') / std'``, in one float tensor that
        # the channels-last picture is copied into: reordering while converting costs a pass over the
        # pixels less than making the uint8 picture contiguous first (3-4 of ~7 ms at 800x1066).
        mean, std = self.mean_std
        pixels = torch.empty(resized.shape, dtype=torch.float32)
        pixels.copy_(resized)
        pixels.sub_(mean).div_(std)
        return pixels, display_size(image)

    def input_size(self, size: Size) -> Size:
        """The model input's (width, height) for an image displayed at ``size``: the processor's resize.

        Draft decoding asks for it (``model.images.decode_image``'s ``decode_size``).
        """
        proc = self.image_processor
        if not _resizes_by_edges(proc):
            return size
        height, width = _resized_hw((size[1], size[0]), proc.size.shortest_edge, proc.size.longest_edge)
        return width, height


def _resizes_by_edges(processor: Any) -> bool:
    """The processor resizes to a shortest and longest edge (Grounding DINO's 800/1333)."""
    size = getattr(processor, "size", None)
    return bool(getattr(processor, "do_resize", False) and getattr(size, "shortest_edge", None)) and bool(
        getattr(size, "longest_edge", None)
    )


def _fused_mean_std(processor: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The mean and deviation that rescaling and normalising in one step subtract and divide by.

    Computed as the processor's torchvision backend fuses them (``mean / rescale_factor``, in
    float32), so that the tensor is the processor's bit for bit (tested); None when the processor
    does not both rescale and normalise (it is then called for those steps).
    """
    if not (getattr(processor, "do_rescale", False) and getattr(processor, "do_normalize", False)):
        return None
    scale = 1.0 / processor.rescale_factor
    mean = torch.tensor(processor.image_mean) * scale
    std = torch.tensor(processor.image_std) * scale
    return mean.view(-1, 1, 1), std.view(-1, 1, 1)


def _has_tensor_path(processor: Any) -> bool:
    """A torchvision-backed processor that resizes by edges: its steps can be called one by one."""
    from transformers.image_processing_backends import TorchvisionBackend

    return isinstance(processor, TorchvisionBackend) and _resizes_by_edges(processor)


def _resized_hw(hw: Any, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """The processor's own size rule (transformers' ``get_size_with_aspect_ratio``)."""
    from transformers.image_transforms import get_size_with_aspect_ratio

    return get_size_with_aspect_ratio(tuple(hw), shortest_edge, longest_edge)


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
