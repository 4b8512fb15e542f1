"""The tiny Grounding DINO checkpoint that the other tests build: it loads offline and behaves usefully."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

from tests.tiny_checkpoints import (
    CLS_ID,
    DOT_ID,
    PAD_ID,
    QUESTION_ID,
    SEP_ID,
    TEST_WORDS,
    TINY_LONGEST_EDGE,
    TINY_NUM_QUERIES,
    TINY_SHORTEST_EDGE,
    UNK_ID,
    build_tiny_grounding_dino,
)

PROMPT = "cat . dog . traffic light ."


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_grounding_dino(tmp_path_factory.mktemp("tiny") / "gdino")


@pytest.fixture(scope="module")
def processor(tiny_path: Path):
    return AutoProcessor.from_pretrained(tiny_path)


@pytest.fixture(scope="module")
def model(tiny_path: Path):
    return AutoModelForZeroShotObjectDetection.from_pretrained(tiny_path).eval()


def _image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _forward(processor, model, image: Image.Image, text: str = PROMPT):
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    return inputs, outputs


def test_checkpoint_folder_holds_model_config_and_processor(tiny_path: Path) -> None:
    names = {p.name for p in tiny_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert names & {"processor_config.json", "preprocessor_config.json"}


def test_prompt_tokenizes_to_bert_base_uncased_special_ids(processor) -> None:
    tokenizer = processor.tokenizer
    ids = tokenizer(PROMPT)["input_ids"]
    cat, dog, traffic, light = (tokenizer.convert_tokens_to_ids(w) for w in ("cat", "dog", "traffic", "light"))
    assert ids == [CLS_ID, cat, DOT_ID, dog, DOT_ID, traffic, light, DOT_ID, SEP_ID]
    assert (CLS_ID, SEP_ID, DOT_ID) == (101, 102, 1012)
    assert tokenizer.convert_tokens_to_ids("?") == QUESTION_ID == 1029
    assert tokenizer.convert_tokens_to_ids("[PAD]") == PAD_ID == 0
    assert tokenizer.convert_tokens_to_ids("[UNK]") == UNK_ID == 100
    assert tokenizer.convert_tokens_to_ids("[MASK]") == 103
    assert tokenizer.model_max_length == 256
    # Lower-casing tokenizer: capitals give the same ids.
    assert tokenizer("Cat . DOG . Traffic Light .")["input_ids"] == ids


def test_test_words_are_single_known_tokens(processor) -> None:
    tokenizer = processor.tokenizer
    ids = [tokenizer.convert_tokens_to_ids(word) for word in TEST_WORDS]
    assert UNK_ID not in ids
    assert len(set(ids)) == len(TEST_WORDS)
    assert not set(ids) & {PAD_ID, UNK_ID, CLS_ID, SEP_ID, 103, DOT_ID, QUESTION_ID}
    for word in TEST_WORDS:
        if not word.startswith("##"):
            assert tokenizer.tokenize(word) == [word]
    assert tokenizer.tokenize("cats") == ["cat", "##s"]


def test_simple_text_never_becomes_unk(processor) -> None:
    ids = processor.tokenizer("Zebras, a traffic-light? 42 giraffes. x_1 (hot) & dog's")["input_ids"]
    assert UNK_ID not in ids


def test_image_processor_resizes_like_grounding_dino_tiny_but_smaller(processor) -> None:
    image_processor = processor.image_processor
    assert image_processor.size.shortest_edge == TINY_SHORTEST_EDGE
    assert image_processor.size.longest_edge == TINY_LONGEST_EDGE
    # 64x48 (4:3): the short side goes to the shortest edge, the aspect ratio is kept.
    pixel_values = processor(images=_image(64, 48), text=PROMPT, return_tensors="pt")["pixel_values"]
    assert tuple(pixel_values.shape) == (1, 3, TINY_SHORTEST_EDGE, TINY_SHORTEST_EDGE * 64 // 48)
    # A very wide image is limited by the longest edge instead.
    pixel_values = processor(images=_image(400, 40), text=PROMPT, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape[-1] == TINY_LONGEST_EDGE
    assert pixel_values.shape[-2] < TINY_SHORTEST_EDGE


def test_forward_shapes_boxes_and_score_spread(processor, model) -> None:
    inputs, outputs = _forward(processor, model, _image())
    num_tokens = inputs["input_ids"].shape[1]
    assert tuple(outputs.logits.shape) == (1, TINY_NUM_QUERIES, 256)
    assert tuple(outputs.pred_boxes.shape) == (1, TINY_NUM_QUERIES, 4)
    assert torch.isfinite(outputs.pred_boxes).all()
    assert outputs.pred_boxes.min() >= 0.0
    assert outputs.pred_boxes.max() <= 1.0
    # Past the text, the logits are -inf.
    assert torch.isneginf(outputs.logits[0, :, num_tokens:]).all()

    scores = outputs.logits[0, :, :num_tokens].sigmoid()
    assert torch.isfinite(scores).all()
    assert not (scores > 0.9).all()
    assert (scores > 0.9).float().mean() < 0.25
    assert (scores < 0.1).float().mean() < 0.25
    assert scores.max() > 0.6
    assert scores.min() < 0.4
    # Different text tokens get different scores for the same query.
    assert (scores.std(dim=1) > 0.02).all()
    # Queries disagree on the best token.
    assert len(set(scores.argmax(dim=1).tolist())) > 1


def test_same_seed_gives_identical_outputs_and_other_seed_differs(tmp_path: Path) -> None:
    image = _image(seed=3)
    results = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        path = build_tiny_grounding_dino(tmp_path / name, seed=seed)
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(path).eval()
        inputs, outputs = _forward(processor, model, image)
        num_tokens = inputs["input_ids"].shape[1]
        results.append((outputs.logits[0, :, :num_tokens], outputs.pred_boxes[0]))
    (logits_a, boxes_a), (logits_b, boxes_b), (logits_c, _) = results
    assert torch.equal(logits_a, logits_b)
    assert torch.equal(boxes_a, boxes_b)
    assert not torch.allclose(logits_a, logits_c)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_building_does_not_disturb_the_callers_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_grounding_dino(tmp_path / "x")
    assert torch.equal(torch.rand(3), expected)


def test_max_text_len_is_configurable(tmp_path: Path) -> None:
    path = build_tiny_grounding_dino(tmp_path / "short", max_text_len=32)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(path).eval()
    assert processor.tokenizer.model_max_length == 32
    assert model.config.max_text_len == 32
    _, outputs = _forward(processor, model, _image())
    assert tuple(outputs.logits.shape) == (1, TINY_NUM_QUERIES, 32)


def test_without_score_spread_scores_saturate(tmp_path: Path) -> None:
    path = build_tiny_grounding_dino(tmp_path / "raw", score_spread=False)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(path).eval()
    inputs, outputs = _forward(processor, model, _image())
    scores = outputs.logits[0, :, : inputs["input_ids"].shape[1]].sigmoid()
    assert ((scores > 0.99) | (scores < 0.01)).float().mean() > 0.3
