"""Box selection, label mapping, NMS and caps on hand-made logits (random weights cannot show them)."""

from __future__ import annotations

import math

import pytest
import torch

from model.postprocess import Candidates, DetectionParams, phrase_scores, select_candidates, suppress

INF = math.inf


def logit(p: float) -> float:
    """The logit whose sigmoid is ``p``."""
    return math.log(p / (1 - p))


def make_logits(rows: list[list[float]], text_len: int = 12) -> torch.Tensor:
    """Probabilities per token -> logits, padded with -inf past the text like the model does."""
    out = torch.full((len(rows), text_len), -INF)
    for q, row in enumerate(rows):
        for t, p in enumerate(row):
            out[q, t] = logit(p) if p > 0 else -INF
    return out


# Prompt "[CLS] cat . traffic light . [SEP]": cat=1, traffic=3, light=4
SPANS = [(1, 2), (3, 5)]


def test_phrase_score_is_best_token_of_the_span_and_ignores_padding() -> None:
    logits = make_logits([[0.9, 0.2, 0.99, 0.1, 0.6, 0.95, 0.97]])
    scores = phrase_scores(logits, SPANS)
    # cat -> token 1 only (0.2); traffic light -> max(0.1, 0.6). Separators (0.99, 0.95) never count.
    assert scores[0].tolist() == pytest.approx([0.2, 0.6], abs=1e-6)


def test_each_box_is_named_by_its_best_phrase_not_by_merged_text() -> None:
    logits = make_logits(
        [
            [0.1, 0.80, 0.1, 0.30, 0.20, 0.1],  # cat
            [0.1, 0.30, 0.1, 0.10, 0.70, 0.1],  # traffic light via its second token
            [0.1, 0.20, 0.1, 0.20, 0.20, 0.1],  # nothing
        ]
    )
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.1, 0.3], [0.5, 0.5, 1.0, 1.0]])
    found = select_candidates(logits, boxes, SPANS, [7, 9], DetectionParams(box_threshold=0.35))
    assert found.phrases.tolist() == [7, 9]  # caller's phrase ids, mapped through the spans
    assert found.scores.tolist() == pytest.approx([0.8, 0.7], abs=1e-6)
    assert found.boxes.flatten().tolist() == pytest.approx([0.4, 0.4, 0.6, 0.6, 0.2, 0.1, 0.3, 0.4], abs=1e-6)


def test_box_threshold_and_text_threshold_both_apply() -> None:
    logits = make_logits([[0.0, 0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.45, 0.0], [0.0, 0.3, 0.0, 0.0, 0.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1]] * 3)
    loose = select_candidates(logits, boxes, SPANS, [0, 1], DetectionParams(box_threshold=0.35, text_threshold=0.25))
    assert loose.scores.tolist() == pytest.approx([0.5, 0.45], abs=1e-6)
    strict_text = DetectionParams(box_threshold=0.35, text_threshold=0.48)
    assert select_candidates(logits, boxes, SPANS, [0, 1], strict_text).phrases.tolist() == [0]
    assert select_candidates(logits, boxes, SPANS, [0, 1], DetectionParams(box_threshold=0.6)).scores.numel() == 0


def test_boxes_are_clipped_to_the_image() -> None:
    logits = make_logits([[0.0, 0.9]])
    found = select_candidates(logits, torch.tensor([[0.05, 0.95, 0.3, 0.3]]), SPANS, [0, 1], DetectionParams())
    assert found.boxes[0].tolist() == pytest.approx([0.0, 0.8, 0.2, 1.0], abs=1e-6)


def candidates(rows: list[tuple[list[float], float, int]]) -> Candidates:
    return Candidates(
        boxes=torch.tensor([r[0] for r in rows]),
        scores=torch.tensor([r[1] for r in rows]),
        phrases=torch.tensor([r[2] for r in rows]),
    )


def test_nms_is_per_label_and_aliases_share_a_label() -> None:
    same_place = [0.1, 0.1, 0.5, 0.5]
    found = candidates(
        [
            (same_place, 0.9, 0),  # car
            ([0.11, 0.1, 0.5, 0.5], 0.8, 1),  # truck, alias of the same label: suppressed
            ([0.1, 0.12, 0.5, 0.5], 0.7, 2),  # dog, another label: kept although it overlaps
            ([0.6, 0.6, 0.9, 0.9], 0.6, 1),  # truck elsewhere: kept
        ]
    )
    kept = suppress(found, groups=[0, 0, 1], params=DetectionParams(nms_iou=0.5))
    assert kept.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert kept.phrases.tolist() == [0, 2, 1]
    separate = suppress(found, groups=[0, 1, 2], params=DetectionParams(nms_iou=0.5))
    assert separate.scores.numel() == 4


def test_max_boxes_keeps_the_best_scores() -> None:
    rows = [([0.1 * i, 0.0, 0.1 * i + 0.05, 0.05], s, 0) for i, s in enumerate([0.4, 0.9, 0.6, 0.8])]
    kept = suppress(candidates(rows), groups=[0], params=DetectionParams(max_boxes=2))
    assert kept.scores.tolist() == pytest.approx([0.9, 0.8])


def test_params_are_validated() -> None:
    with pytest.raises(ValueError, match="box_threshold"):
        DetectionParams(box_threshold=1.5)
    with pytest.raises(ValueError, match="max_boxes"):
        DetectionParams(max_boxes=0)
