"""Random-weight Grounding DINO checkpoints built on disk, for offline tests and the speed benchmark.

The Hub cannot be reached from the tests, so nothing here downloads anything: every checkpoint is built
from a config with ``save_pretrained`` and is meant to be loaded back by path through the production code
(``AutoProcessor.from_pretrained(path)`` and ``AutoModelForZeroShotObjectDetection.from_pretrained(path)``).

Two kinds:

* :func:`build_tiny_grounding_dino`: a few hundred thousand parameters, builds in well under a second and
  runs a forward pass in milliseconds on CPU. Its scores are spread out (not all ~1.0) so thresholds mean
  something, and it is seeded and deterministic.
* :func:`build_real_size_grounding_dino`: the real ``IDEA-Research/grounding-dino-tiny`` architecture
  (~172M parameters, ~660 MB) with random weights, for timing only.

Both use a BERT word-piece vocabulary that keeps the bert-base-uncased ids that Grounding DINO hard-codes
([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, "."=1012, "?"=1029) and holds :data:`TEST_WORDS`
at ids 104 and up. The real words of bert-base-uncased are not available offline, so ids of ordinary words
differ from the real vocabulary; only the special ids match.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertTokenizerFast,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    SwinConfig,
)

# --- vocabulary -------------------------------------------------------------------------------------------

PAD_ID = 0
UNK_ID = 100
CLS_ID = 101
SEP_ID = 102
MASK_ID = 103
DOT_ID = 1012
QUESTION_ID = 1029
BERT_BASE_VOCAB_SIZE = 30522

# The ids Grounding DINO (and BERT) depend on; every other id is free for our own tokens.
_FIXED_IDS: dict[int, str] = {
    PAD_ID: "[PAD]",
    UNK_ID: "[UNK]",
    CLS_ID: "[CLS]",
    SEP_ID: "[SEP]",
    MASK_ID: "[MASK]",
    DOT_ID: ".",
    QUESTION_ID: "?",
}
# TEST_WORDS are placed at consecutive ids from here (the range 104..1011 has room for 908 of them).
_FIRST_WORD_ID = 104

_WORDS = (
    "cat",
    "dog",
    "traffic",
    "light",
    "person",
    "car",
    "truck",
    "vehicle",
    "bird",
    "horse",
    "sheep",
    "cow",
    "bottle",
    "chair",
    "table",
    "plant",
    "tree",
    "apple",
    "banana",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "a",
    "the",
    "of",
    "and",
    "##s",
)
_LETTERS_AND_DIGITS = tuple(string.ascii_lowercase + string.digits)
# WordPiece splits an unknown word into a first piece and "##" continuation pieces; a word is [UNK] as soon
# as one piece is missing. Having every letter and digit both as a first piece and as a "##" piece means any
# lowercase alphanumeric word tokenizes without [UNK] (letter by letter if need be).
_CONTINUATIONS = tuple(f"##{c}" for c in _LETTERS_AND_DIGITS if c != "s")  # "##s" is in _WORDS
# The BERT pre-tokenizer makes every punctuation character a token of its own.
_PUNCTUATION = (",", "-", "'", "/", "(", ")", ":", "_", "&")

TEST_WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORDS + _LETTERS_AND_DIGITS + _CONTINUATIONS + _PUNCTUATION))
"""Vocabulary entries (whole words, "##s", single letters/digits with their "##" forms, punctuation)
that every checkpoint built here holds, at the same ids in the tiny and the real-size vocabulary."""


def _bert_style_vocab(size: int) -> dict[str, int]:
    """A word-piece vocabulary of ``size`` entries with bert-base-uncased's special ids and TEST_WORDS."""
    if size <= QUESTION_ID:
        raise ValueError(f"vocabulary must hold id {QUESTION_ID} ('?'), got size {size}")
    tokens: dict[int, str] = dict(_FIXED_IDS)
    next_id = _FIRST_WORD_ID
    for word in TEST_WORDS:
        while next_id in tokens:
            next_id += 1
        tokens[next_id] = word
        next_id += 1
    if next_id > size:
        raise ValueError(f"TEST_WORDS do not fit in a vocabulary of {size} entries")
    unused = 0
    vocab: dict[str, int] = {}
    for token_id in range(size):
        token = tokens.get(token_id)
        if token is None:
            token = f"[unused{unused}]"
            unused += 1
        vocab[token] = token_id
    if len(vocab) != size:  # a duplicate token would silently drop an id
        raise AssertionError("vocabulary has duplicate tokens")
    return vocab


def _tokenizer(vocab_size: int, max_text_len: int) -> BertTokenizerFast:
    return BertTokenizerFast(
        vocab=_bert_style_vocab(vocab_size),
        do_lower_case=True,
        model_max_length=max_text_len,
    )


def _processor(vocab_size: int, max_text_len: int, *, shortest_edge: int, longest_edge: int) -> GroundingDinoProcessor:
    # Same settings as the preprocessor_config.json of IDEA-Research/grounding-dino-tiny, apart from the
    # sizes: resize keeping the aspect ratio so that the short side is `shortest_edge` unless that would
    # make the long side exceed `longest_edge`, rescale, ImageNet normalisation, pad (with a pixel mask).
    image_processor = GroundingDinoImageProcessor(
        do_resize=True,
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge},
        resample=2,  # bilinear
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_pad=True,
    )
    return GroundingDinoProcessor(image_processor=image_processor, tokenizer=_tokenizer(vocab_size, max_text_len))


def _build(config: GroundingDinoConfig, seed: int) -> GroundingDinoForObjectDetection:
    """Construct the model with the global torch RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(config)
    return model.eval()


def _save(model: GroundingDinoForObjectDetection, processor: GroundingDinoProcessor, path: Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# --- tiny checkpoint --------------------------------------------------------------------------------------

TINY_VOCAB_SIZE = QUESTION_ID + 1  # ids 0..1029: the highest id the model hard-codes is "?"
TINY_NUM_QUERIES = 50
# The real processor's 800/1333, divided by ten.
TINY_SHORTEST_EDGE = 80
TINY_LONGEST_EDGE = 133
# Gain of the decoder's final LayerNorm. The class logits are dot products of its output with the text
# features, so they scale linearly with it; at the default gain of 1 their std is ~6 (scores pinned at 0
# and 1), at 0.2 it is ~1.2 and scores spread over roughly 0.05..0.95.
TINY_SCORE_GAIN = 0.2


def tiny_grounding_dino_config(*, max_text_len: int = 256) -> GroundingDinoConfig:
    """The config of :func:`build_tiny_grounding_dino`'s model."""
    backbone = SwinConfig(
        image_size=224,
        patch_size=4,
        embed_dim=24,
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 2, 4],
        window_size=7,
        # Grounding DINO takes the last three Swin stages, plus one extra stride-2 conv level.
        out_features=["stage2", "stage3", "stage4"],
        out_indices=[2, 3, 4],
    )
    text = BertConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max(max_text_len, 32),
    )
    return GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,
        num_queries=TINY_NUM_QUERIES,
        max_text_len=max_text_len,
        num_feature_levels=4,
        encoder_layers=1,
        encoder_ffn_dim=64,
        encoder_attention_heads=2,
        encoder_n_points=2,
        decoder_layers=2,  # 1 breaks the tying of the per-layer bbox heads
        decoder_ffn_dim=64,
        decoder_attention_heads=2,
        decoder_n_points=2,
    )


def build_tiny_grounding_dino(path: Path, *, seed: int = 0, max_text_len: int = 256, score_spread: bool = True) -> Path:
    """Write a tiny random Grounding DINO checkpoint folder (weights, config, processor) to ``path``.

    Loadable offline with ``AutoProcessor.from_pretrained(path)`` and
    ``AutoModelForZeroShotObjectDetection.from_pretrained(path)``. The same ``seed`` gives the same weights.
    With ``score_spread`` the decoder's final LayerNorm gain is scaled down so that sigmoid(logits) spread
    over roughly 0.05..0.95 across queries and tokens instead of sitting at 0 or 1.
    Returns ``path``.
    """
    model = _build(tiny_grounding_dino_config(max_text_len=max_text_len), seed)
    if score_spread:
        with torch.no_grad():
            model.model.decoder.layer_norm.weight.mul_(TINY_SCORE_GAIN)
    processor = _processor(
        TINY_VOCAB_SIZE,
        max_text_len,
        shortest_edge=TINY_SHORTEST_EDGE,
        longest_edge=TINY_LONGEST_EDGE,
    )
    return _save(model, processor, path)


# --- real-size checkpoint ---------------------------------------------------------------------------------


def grounding_dino_tiny_real_size_config() -> GroundingDinoConfig:
    """The architecture of ``IDEA-Research/grounding-dino-tiny`` (172.3M parameters).

    Swin-T backbone (as in transformers' ``convert_grounding_dino_to_hf.py`` for "tiny": embed_dim 96,
    depths 2-2-6-2, heads 3-6-12-24, window 7, image 224, stages 2-4 out), bert-base-uncased text encoder,
    and the published detector settings, which are ``GroundingDinoConfig``'s defaults: d_model 256,
    6 encoder and 6 decoder layers, 8 heads, FFN 2048, 900 queries, 256 text tokens, 4 feature levels,
    4 sampling points, two-stage, shared bbox heads.
    """
    backbone = SwinConfig(
        image_size=224,
        patch_size=4,
        num_channels=3,
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4.0,
        out_features=["stage2", "stage3", "stage4"],
        out_indices=[2, 3, 4],
    )
    text = BertConfig(
        vocab_size=BERT_BASE_VOCAB_SIZE,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        max_position_embeddings=512,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=PAD_ID,
    )
    return GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=256,
        num_queries=900,
        max_text_len=256,
        num_feature_levels=4,
        encoder_layers=6,
        encoder_ffn_dim=2048,
        encoder_attention_heads=8,
        encoder_n_points=4,
        decoder_layers=6,
        decoder_ffn_dim=2048,
        decoder_attention_heads=8,
        decoder_n_points=4,
        activation_function="relu",
        two_stage=True,
        decoder_bbox_embed_share=True,
        two_stage_bbox_embed_share=False,
        embedding_init_target=True,
        query_dim=4,
        position_embedding_type="sine",
        positional_embedding_temperature=20,
        layer_norm_eps=1e-5,
    )


def build_real_size_grounding_dino(path: Path, *, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of the real grounding-dino-tiny architecture to ``path`` (~660 MB).

    For speed measurements only: the weights are random and the 30522-entry vocabulary keeps only the
    special ids of bert-base-uncased (plus TEST_WORDS). The processor has the real settings (shortest edge
    800, longest edge 1333, ImageNet mean/std). Takes some seconds. Returns ``path``.
    """
    model = _build(grounding_dino_tiny_real_size_config(), seed)
    processor = _processor(BERT_BASE_VOCAB_SIZE, 256, shortest_edge=800, longest_edge=1333)
    return _save(model, processor, path)


# --- DINOv2 (timm) ----------------------------------------------------------------------------------------

# The tiny DINOv2: the ViT-S/14 DINOv2 architecture (patch 14, CLS token, LayerScale) at 48 dims and two
# blocks, ~86k parameters plus its position table. Saved at 518 px like the real checkpoints, so loading it
# at 224 px resamples the position embeddings exactly as the real weights are resampled.
TINY_DINOV2_ARGS: dict[str, object] = {"depth": 2, "embed_dim": 48, "num_heads": 2}


def build_dinov2_checkpoint(
    path: Path,
    *,
    architecture: str = "vit_small_patch14_dinov2",
    seed: int = 0,
    layer_scale: float = 1.0,
    img_size: int = 518,
    **arch_args: object,
) -> Path:
    """A random-weight timm DINOv2 in timm's hub layout (``config.json`` + ``model.safetensors``).

    ``layer_scale`` is the initial LayerScale gamma. timm's default (1e-5) makes every block almost the
    identity, so a random model maps every image to ~the same vector (MODEL-NOTES.md); at 1.0 the blocks
    act and embeddings of different images spread out, which tests and the evaluation need.
    """
    import timm
    from timm.models import save_for_hf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(
            architecture, pretrained=False, num_classes=0, img_size=img_size, init_values=layer_scale, **arch_args
        )
    path = Path(path)
    save_for_hf(model.eval(), str(path), safe_serialization=True)
    return path


def build_tiny_dinov2(path: Path, *, seed: int = 0, img_size: int = 518) -> Path:
    """The tiny DINOv2 (:data:`TINY_DINOV2_ARGS`), LayerScale 1.0; builds in milliseconds."""
    return build_dinov2_checkpoint(path, seed=seed, img_size=img_size, **TINY_DINOV2_ARGS)
