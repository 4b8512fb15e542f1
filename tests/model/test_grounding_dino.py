"""The detector wrapper on tiny random checkpoints, loaded by path through the production code."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import GroundingDinoImageProcessor, GroundingDinoProcessor

from model import DetectionParams, GroundingDinoDetector, PromptError, create_detector, model_version
from model.images import decode_image, display_size
from tests.images import jpeg, scene
from tests.tiny_checkpoints import build_tiny_grounding_dino

PHRASES = ["cat", "dog", "traffic light"]
LOW = DetectionParams(box_threshold=0.3, text_threshold=0.25)
# Stored width, height and EXIF orientation of JPEGs: landscape, portrait, turned, tiny, very long.
SIZES = [(640, 480, None), (480, 640, 6), (300, 200, 3), (17, 9, None), (1200, 90, 8), (64, 48, None)]


def image(width: int, height: int, seed: int) -> Image.Image:
    """A small image with some structure, different per seed."""
    img = Image.new("RGB", (width, height), ((seed * 70) % 255, (seed * 130) % 255, (seed * 40) % 255))
    for i in range(0, width, 7):
        img.paste((255 - i % 255, i % 255, 128), (i, 0, min(i + 3, width), height // 2))
    return img


def same(a: list, b: list, tol: float = 1e-4) -> bool:
    """Two images' detections agree: same phrases in the same order, boxes and scores within tol."""
    return len(a) == len(b) and all(
        x.phrase == y.phrase
        and abs(x.score - y.score) <= tol
        and max(abs(x.x0 - y.x0), abs(x.y0 - y.y0), abs(x.x1 - y.x1), abs(x.y1 - y.y1)) <= tol * 100
        for x, y in zip(a, b, strict=True)
    )


def test_prompt_tokens_and_spans_come_from_the_tokenizer(tiny_detector: GroundingDinoDetector) -> None:
    (chunk,) = tiny_detector.prompts(PHRASES)
    assert chunk.text == "cat . dog . traffic light ."
    tokenizer = tiny_detector.processor.tokenizer
    assert chunk.input_ids[0] == 101 and chunk.input_ids[-1] == 102
    for phrase, (start, end) in zip(PHRASES, chunk.spans, strict=True):
        assert list(chunk.input_ids[start:end]) == tokenizer(phrase, add_special_tokens=False)["input_ids"]
        assert chunk.input_ids[end] == 1012  # each phrase is closed by "."


def test_detections_are_in_pixels_sorted_and_pass_the_threshold(tiny_detector: GroundingDinoDetector) -> None:
    img = image(90, 60, 1)
    (found,) = tiny_detector.detect([img], PHRASES, LOW)
    assert found, "the tiny model finds boxes at a low threshold"
    scores = [d.score for d in found]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0.3
    assert all(0 <= d.x0 <= d.x1 <= 90 and 0 <= d.y0 <= d.y1 <= 60 for d in found)
    assert {d.phrase for d in found} <= {0, 1, 2}
    stricter = tiny_detector.detect([img], PHRASES, DetectionParams(box_threshold=0.6))[0]
    assert len(stricter) < len(found) and all(d.score > 0.6 for d in stricter)


def test_batching_never_changes_an_images_result(tiny_detector: GroundingDinoDetector) -> None:
    # 64x48 and 128x96 share a processed size (batched together); 40x80 and 90x60 do not.
    images = [image(64, 48, 1), image(128, 96, 2), image(40, 80, 3), image(90, 60, 4), image(64, 48, 5)]
    alone = [tiny_detector.detect([img], PHRASES, LOW)[0] for img in images]
    batched = tiny_detector.detect(images, PHRASES, LOW, batch_size=4)
    assert all(same(a, b) for a, b in zip(alone, batched, strict=True))
    assert not same(alone[0], alone[4]), "different images give different boxes"


def test_labels_past_the_text_length_run_as_extra_prompts(tmp_path: Path) -> None:
    detector = create_detector(str(build_tiny_grounding_dino(tmp_path / "short", max_text_len=12)), device="cpu")
    phrases = ["cat", "dog", "traffic light", "person", "car", "truck", "bird", "horse", "red apple"]
    chunks = detector.prompts(phrases)
    assert len(chunks) > 1 and all(len(c.input_ids) <= 12 for c in chunks)
    assert [p for c in chunks for p in c.phrase_ids] == list(range(len(phrases)))
    img = image(80, 64, 7)
    params = DetectionParams(box_threshold=0.3, max_boxes=10_000)  # no cap: compare every box
    (merged,) = detector.detect([img], phrases, params)
    for chunk in chunks:
        own = [phrases[i] for i in chunk.phrase_ids]
        (alone,) = detector.detect([img], own, params)
        from_chunk = [d for d in merged if d.phrase in chunk.phrase_ids]
        remapped = [type(d)(d.x0, d.y0, d.x1, d.y1, d.score, chunk.phrase_ids[d.phrase]) for d in alone]
        assert same(from_chunk, remapped), f"labels {own} get the boxes of their own prompt"
    assert len({d.phrase for d in merged} - set(chunks[0].phrase_ids)) > 0, "later prompts contribute boxes"


def test_a_phrase_longer_than_the_text_encoder_is_refused(tmp_path: Path) -> None:
    detector = create_detector(str(build_tiny_grounding_dino(tmp_path / "short", max_text_len=8)), device="cpu")
    with pytest.raises(PromptError, match="tokens"):
        detector.prompts(["a big red cat and a small blue dog"])


def test_model_version_changes_with_checkpoint_and_thresholds(tiny_checkpoint: Path, tmp_path: Path) -> None:
    base = model_version(str(tiny_checkpoint), revision=None, params=DetectionParams(), precision="fp32")
    assert base.startswith(f"{tiny_checkpoint.name}-")
    assert base == model_version(str(tiny_checkpoint), revision=None, params=DetectionParams(), precision="fp32")
    other = build_tiny_grounding_dino(tmp_path / tiny_checkpoint.name, seed=1)
    changed = {
        model_version(str(other), revision=None, params=DetectionParams(), precision="fp32"),
        model_version(str(tiny_checkpoint), revision=None, params=DetectionParams(box_threshold=0.4), precision="fp32"),
        model_version(str(tiny_checkpoint), revision=None, params=DetectionParams(), precision="bf16"),
        model_version("IDEA-Research/grounding-dino-tiny", revision=None, params=DetectionParams(), precision="fp32"),
    }
    assert base not in changed and len(changed) == 4


def test_unknown_local_checkpoint_fails_fast_and_clearly(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        create_detector(str(tmp_path / "missing"), device="cpu")


# --- preprocessing: the processor's tensor, faster; draft-decoded images ----------------------------------


def test_preprocess_is_the_processors_tensor_bit_for_bit(tiny_detector: GroundingDinoDetector) -> None:
    # The tiny processor (80/133) and the real one (800/1333): up- and downscaling, both aspect-ratio rules.
    real_size = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333}),
        tokenizer=tiny_detector.processor.tokenizer,
    )
    real = GroundingDinoDetector(tiny_detector.model, real_size, device=tiny_detector.device)
    pictures = [decode_image(jpeg(w, h, seed, orientation=o), max_pixels=10**8) for seed, (w, h, o) in enumerate(SIZES)]
    for detector in (tiny_detector, real):
        for picture in pictures:
            expected = detector.processor.image_processor(images=[picture], return_tensors="pt", do_pad=False)
            pixels, size = detector.preprocess(picture)
            assert torch.equal(pixels, expected["pixel_values"]), f"{picture.size}"
            assert pixels.is_contiguous() and size == picture.size
            assert detector.input_size(picture.size) == (pixels.shape[3], pixels.shape[2])


def test_a_draft_decoded_image_gives_boxes_in_the_full_images_pixels(tiny_detector: GroundingDinoDetector) -> None:
    # A photo shown at 640x480 (stored 480x640, EXIF 6), model input 106x80: decoded at 1/4, 160x120.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    scene(480, 640, 4).save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    data = buffer.getvalue()
    exact = decode_image(data, max_pixels=10**8)
    draft = decode_image(data, max_pixels=10**8, decode_size=tiny_detector.input_size)
    assert exact.size == (640, 480) and draft.size == (160, 120) and display_size(draft) == (640, 480)
    exact_pixels, exact_size = tiny_detector.preprocess(exact)
    draft_pixels, draft_size = tiny_detector.preprocess(draft)
    assert draft_size == exact_size == (640, 480) and draft_pixels.shape == exact_pixels.shape
    # Not the same pixels (so draft decoding is a setting, off by default), but the same picture: on
    # this photo-like scene 0.003 of a normalised unit on average (~0.2 grey levels), 0.07 at most.
    assert 0 < (draft_pixels - exact_pixels).abs().mean() < 0.01
    (found,) = tiny_detector.detect([draft], PHRASES, LOW)
    assert found and all(0 <= d.x0 <= d.x1 <= 640 and 0 <= d.y0 <= d.y1 <= 480 for d in found)
    assert max(d.x1 for d in found) > 160 or max(d.y1 for d in found) > 120, "boxes scaled to the full image"
