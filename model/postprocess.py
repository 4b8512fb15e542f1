"""From Grounding DINO's raw outputs to named boxes: pure functions over tensors.

The model gives every query a box and a logit per text token. We score each phrase by its best
token (so a box matches the phrase, not a fragment of merged text), keep a box when its best phrase
passes ``box_threshold`` and ``text_threshold``, suppress overlaps within each label, and cap the
count. Kept separate from the model wrapper so it can be tested on hand-made logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms


@dataclass(frozen=True)
class DetectionParams:
    """What decides which boxes are returned; part of the model version."""

    box_threshold: float = 0.35
    text_threshold: float = 0.25
    nms_iou: float = 0.5
    max_boxes: int = 100

    def __post_init__(self) -> None:
        for name in ("box_threshold", "text_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must lie in (0, 1], got {self.nms_iou}")
        if self.max_boxes < 1:
            raise ValueError(f"max_boxes must be at least 1, got {self.max_boxes}")


@dataclass(frozen=True)
class Candidates:
    """Boxes that passed the thresholds, before NMS: xyxy in [0, 1] of the image, score, phrase."""

    boxes: torch.Tensor  # (n, 4) float
    scores: torch.Tensor  # (n,) float
    phrases: torch.Tensor  # (n,) long, index into the caller's phrase list

    @staticmethod
    def cat(parts: Sequence[Candidates]) -> Candidates:
        """Join the candidates of several prompts run on the same image."""
        return Candidates(
            boxes=torch.cat([p.boxes for p in parts]) if parts else torch.zeros((0, 4)),
            scores=torch.cat([p.scores for p in parts]) if parts else torch.zeros(0),
            phrases=torch.cat([p.phrases for p in parts]) if parts else torch.zeros(0, dtype=torch.long),
        )


def phrase_scores(logits: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Per query and phrase, the best sigmoid score among the phrase's tokens: (queries, phrases).

    ``logits`` is (queries, text_len); positions past the text hold ``-inf`` (sigmoid gives 0).
    """
    probs = logits.float().sigmoid()
    return torch.stack([probs[:, start:end].max(dim=1).values for start, end in spans], dim=1)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Centre/size boxes to corner boxes, clipped to the image ([0, 1])."""
    cx, cy, w, h = boxes.float().unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    return xyxy.clamp(0.0, 1.0)


def select_candidates(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    spans: Sequence[tuple[int, int]],
    phrase_ids: Sequence[int],
    params: DetectionParams,
) -> Candidates:
    """Name each query by its best-scoring phrase; keep those that pass both thresholds.

    ``logits`` (queries, text_len) and ``pred_boxes`` (queries, 4, normalised cx, cy, w, h) are one
    image's outputs for one prompt; ``phrase_ids[i]`` is the caller's index of the phrase at
    ``spans[i]``.
    """
    scores = phrase_scores(logits, spans)
    best, column = scores.max(dim=1)
    keep = (best > params.box_threshold) & (best > params.text_threshold)
    ids = torch.as_tensor(list(phrase_ids), dtype=torch.long, device=column.device)
    return Candidates(
        boxes=cxcywh_to_xyxy(pred_boxes[keep]).cpu(),
        scores=best[keep].cpu(),
        phrases=ids[column[keep]].cpu(),
    )


def suppress(candidates: Candidates, groups: Sequence[int], params: DetectionParams) -> Candidates:
    """Non-maximum suppression within each group (a label), then the ``max_boxes`` best by score.

    ``groups[p]`` is the group of phrase ``p``: phrases that are aliases of one label share a group,
    so a car box and a truck box on the same object leave one "vehicle" box.
    """
    if candidates.scores.numel() == 0:
        return candidates
    group_of = torch.as_tensor(list(groups), dtype=torch.long)[candidates.phrases]
    keep = batched_nms(candidates.boxes, candidates.scores, group_of, params.nms_iou)
    keep = keep[: params.max_boxes]  # batched_nms returns indices sorted by decreasing score
    return Candidates(boxes=candidates.boxes[keep], scores=candidates.scores[keep], phrases=candidates.phrases[keep])
