"""The detector's uncertainty about one image, on hand-made predictions: close calls, label conflicts,
nothing found."""

from __future__ import annotations

import pytest

from indexer.uncertainty import NO_BOX, detection_uncertainty

THRESHOLD = 0.35
CAT = (10.0, 10.0, 30.0, 30.0)


def test_a_box_just_above_the_threshold_is_a_close_call_and_a_sure_box_is_not() -> None:
    assert detection_uncertainty([1.0], ["cat"], [CAT], THRESHOLD) == 0.0
    assert detection_uncertainty([THRESHOLD], ["cat"], [CAT], THRESHOLD) == 1.0
    assert detection_uncertainty([0.675], ["cat"], [CAT], THRESHOLD) == pytest.approx(0.5)
    # The image counts its least sure box, wherever it is.
    far = (60.0, 60.0, 90.0, 90.0)
    assert detection_uncertainty([0.99, 0.40], ["cat", "cat"], [CAT, far], THRESHOLD) == pytest.approx(1 - 0.05 / 0.65)


def test_boxes_of_different_labels_over_one_object_conflict() -> None:
    almost_same = (11.0, 10.0, 31.0, 30.0)  # IoU 0.9 with CAT
    # Two sure boxes, cat and dog, on the same spot, nearly equally likely: the detector could not tell.
    assert detection_uncertainty([0.90, 0.88], ["cat", "dog"], [CAT, almost_same], THRESHOLD) == pytest.approx(0.98)
    # The same label twice is no conflict (only the close-call term: the 0.88 box).
    assert detection_uncertainty([0.90, 0.88], ["cat", "cat"], [CAT, almost_same], THRESHOLD) == pytest.approx(
        1 - 0.53 / 0.65
    )
    # Different labels side by side (no overlap) are no conflict either.
    beside = (40.0, 10.0, 60.0, 30.0)
    assert detection_uncertainty([0.90, 0.88], ["cat", "dog"], [CAT, beside], THRESHOLD) == pytest.approx(
        1 - 0.53 / 0.65
    )
    # A clearer winner conflicts less: 1 - |0.95 - 0.80|.
    assert detection_uncertainty([0.95, 0.80], ["cat", "dog"], [CAT, almost_same], THRESHOLD) == pytest.approx(0.85)
    # Overlapping less (IoU 1/3 < 0.5): no conflict.
    shifted = (20.0, 10.0, 40.0, 30.0)
    assert detection_uncertainty([1.0, 1.0], ["cat", "dog"], [CAT, shifted], THRESHOLD) == 0.0


def test_nothing_found_is_half_sure() -> None:
    assert detection_uncertainty([], [], [], THRESHOLD) == NO_BOX == 0.5


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="one each per box"):
        detection_uncertainty([0.5, 0.6], ["cat"], [CAT, CAT], THRESHOLD)
    with pytest.raises(ValueError, match="box_threshold"):
        detection_uncertainty([0.5], ["cat"], [CAT], 1.0)
