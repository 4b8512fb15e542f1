"""The DINOv2 embedder on tiny random timm checkpoints built offline and loaded by path."""

from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from model import DinoV2Embedder, create_embedder, embedder_version
from model.images import DecodeThen, ImageDecodeError, decode_image, display_size
from model.pipeline import Failed, Pipeline, Stages
from tests.images import jpeg, png, scene
from tests.tiny_checkpoints import TINY_DINOV2_ARGS, build_tiny_dinov2

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _images() -> list[Image.Image]:
    """Varied images: striped PNGs of different sizes and aspect ratios, noise, a flat grey one."""
    images = [
        Image.open(io.BytesIO(png(w, h, seed))).convert("RGB")
        for seed, (w, h) in enumerate([(320, 240), (240, 320), (500, 100), (224, 224), (97, 61)])
    ]
    rng = np.random.default_rng(0)
    images.append(Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)))
    images.append(Image.new("RGB", (128, 128), (128, 128, 128)))
    images.append(Image.new("L", (200, 150), 40))  # grey mode: converted to RGB
    return images


def _reference_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """DINOv2's eval preprocessing written out by hand with PIL and numpy: short side to ``size``
    (bicubic), centre crop, scale to 0..1, ImageNet normalisation."""
    image = image.convert("RGB")
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = round((new_w - size) / 2.0)
    top = round((new_h - size) / 2.0)
    cropped = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    normalised = (cropped - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(normalised.transpose(2, 0, 1).copy())


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


@pytest.fixture(scope="module")
def checkpoint_224(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny-224", img_size=224)


@pytest.fixture(scope="module")
def checkpoint_518(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny-518")


@pytest.fixture(scope="module")
def embedder(checkpoint_224: Path) -> DinoV2Embedder:
    return create_embedder(str(checkpoint_224), device="cpu")


def test_preprocessing_is_the_models_own_at_224(embedder: DinoV2Embedder) -> None:
    images = _images()
    batch = embedder.preprocess(images)
    assert batch.shape == (len(images), 3, 224, 224)
    assert batch.dtype == torch.float32
    expected = torch.stack([_reference_pixels(image, 224) for image in images])
    assert torch.allclose(batch, expected, atol=1e-5)


def test_embeddings_equal_a_plain_timm_forward_in_fp32(checkpoint_224: Path, embedder: DinoV2Embedder) -> None:
    # The reference: the architecture built by hand, the saved weights loaded with load_state_dict, the
    # hand-written preprocessing, model(x) (CLS token with num_classes=0), then L2 normalisation.
    from safetensors.torch import load_file

    reference = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224, init_values=1.0, **TINY_DINOV2_ARGS
    ).eval()
    reference.load_state_dict(load_file(checkpoint_224 / "model.safetensors"))
    images = _images()
    with torch.inference_mode():
        expected = reference(torch.stack([_reference_pixels(image, 224) for image in images])).numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)

    vectors = embedder.embed(images)

    assert vectors.shape == (len(images), 48)
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert _cosines(vectors, expected).min() >= 0.9999
    # Not vacuous: different images get clearly different vectors.
    similarity = vectors @ vectors.T
    off_diagonal = similarity[~np.eye(len(images), dtype=bool)]
    assert off_diagonal.max() < 0.99


def test_batches_match_one_image_at_a_time(checkpoint_224: Path) -> None:
    images = _images()
    batched = create_embedder(str(checkpoint_224), device="cpu", batch_size=3).embed(images)
    one_at_a_time = create_embedder(str(checkpoint_224), device="cpu", batch_size=1)
    single = np.concatenate([one_at_a_time.embed([image]) for image in images])
    assert _cosines(batched, single).min() >= 0.99999


def _sequential(embedder: DinoV2Embedder, images: list[Image.Image]) -> np.ndarray:
    """What ``embed`` did before the pipeline: preprocess then forward, batch after batch, on this thread."""
    size = embedder.batch_size
    return np.concatenate(
        [embedder.forward(embedder.preprocess(images[i : i + size])) for i in range(0, len(images), size)]
    )


def test_the_pipeline_gives_the_sequential_vectors_in_input_order(checkpoint_224: Path) -> None:
    # 24 images of eight sizes and modes, several threads preprocessing, batches of 5 formed as images
    # finish (so some batches are partial and finish out of order).
    images = _images() * 3
    embedder = create_embedder(str(checkpoint_224), device="cpu", batch_size=5, preprocess_threads=3)
    expected = _sequential(embedder, images)

    vectors = embedder.embed(images)

    assert vectors.shape == (len(images), 48)
    assert vectors.dtype == np.float32
    assert np.allclose(vectors, expected, atol=1e-5)
    assert _cosines(vectors, expected).min() >= 0.9999
    # Order is the input's: a shuffled input gives the same rows shuffled alike.
    order = np.random.default_rng(1).permutation(len(images))
    shuffled = embedder.embed([images[i] for i in order])
    assert np.allclose(shuffled, expected[order], atol=1e-5)
    # Not vacuous: neighbouring inputs are different images with clearly different vectors.
    assert _cosines(vectors[:-1], vectors[1:]).max() < 0.99


def test_a_broken_image_fails_alone_on_the_embedders_pipeline(embedder: DinoV2Embedder) -> None:
    good = [png(320, 240, 0), png(97, 61, 1), png(500, 100, 2), png(224, 224, 3)]
    truncated = png(400, 300, 4)[:300]
    items = [good[0], b"not an image", good[1], truncated, good[2], good[3]]

    results = dict(
        embedder.pipeline.run(
            items,
            lambda data: decode_image(data, max_pixels=10_000_000),
            embedder.stages(),
            batch_size=2,
            item_errors=(ImageDecodeError,),
        )
    )

    assert sorted(results) == list(range(len(items)))
    assert isinstance(results[1], Failed) and isinstance(results[3], Failed)
    expected = embedder.embed([decode_image(data, max_pixels=10_000_000) for data in good])
    found = np.stack([results[i] for i in (0, 2, 4, 5)])
    assert np.allclose(found, expected, atol=1e-5)


def test_in_preprocessing_processes_the_embedder_gets_the_same_tensors_and_vectors(embedder: DinoV2Embedder) -> None:
    # Bytes cross to the children, which decode (EXIF included) and preprocess; a broken file fails alone.
    files = [png(320, 240, 0), jpeg(240, 320, 1, orientation=6), b"not an image", png(500, 100, 2)]
    files += [jpeg(400, 300, 3, orientation=3), png(400, 300, 4)[:300], png(97, 61, 5)]
    step = DecodeThen(embedder.preprocessor, max_pixels=10_000_000)
    good = [0, 1, 3, 4, 6]
    pipeline = Pipeline(embedder.device, load_threads=3, preprocess_processes=2)
    try:
        as_is = Stages(step, lambda pixels: pixels, lambda pixels, metas: list(pixels))
        tensors = dict(pipeline.run(files, lambda d: d, as_is, batch_size=1, item_errors=(ImageDecodeError,)))
        stages = dataclasses.replace(embedder.stages(), preprocess=step)
        vectors = dict(pipeline.run(files, lambda d: d, stages, batch_size=3, item_errors=(ImageDecodeError,)))
    finally:
        pipeline.close()
    for index in good:
        assert torch.equal(tensors[index], step(files[index])[0][0]), f"image {index}"
    for results in (tensors, vectors):
        assert results[2] == Failed("cannot decode image: not a recognised image format: found text, 12 bytes")
        assert isinstance(results[5], Failed) and "truncated" in results[5].reason
    expected = embedder.embed([decode_image(files[i], max_pixels=10_000_000) for i in good])
    assert np.allclose(np.stack([vectors[i] for i in good]), expected, atol=1e-5)
    assert _cosines(expected[:-1], expected[1:]).max() < 0.99, "different images, different vectors"


def test_embed_raises_for_a_broken_image_and_keeps_working(embedder: DinoV2Embedder) -> None:
    # Pillow decodes lazily: a truncated file opens, and fails while it is being resized.
    broken = Image.open(io.BytesIO(png(400, 300, 4)[:300]))
    images = _images()
    with pytest.raises(OSError):
        embedder.embed([images[0], broken, images[1]])
    assert np.allclose(embedder.embed(images), _sequential(embedder, images), atol=1e-5)


def test_bf16_stays_close_to_fp32(checkpoint_224: Path, embedder: DinoV2Embedder) -> None:
    images = _images()
    fp32 = embedder.embed(images)
    bf16 = create_embedder(str(checkpoint_224), device="cpu", precision="bf16").embed(images)
    assert bf16.dtype == np.float32
    assert np.allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    # Measured on this tiny model: min cosine ~0.999 (README states the real-size figure).
    assert _cosines(bf16, fp32).min() >= 0.99


def test_a_518_px_checkpoint_runs_at_224_by_default(checkpoint_518: Path) -> None:
    embedder = create_embedder(str(checkpoint_518), device="cpu")
    assert embedder.image_size == 224
    assert embedder.data_config["input_size"] == (3, 224, 224)
    assert embedder.preprocess(_images()[:2]).shape == (2, 3, 224, 224)
    vectors = embedder.embed(_images())
    assert vectors.shape == (8, 48)
    assert np.isfinite(vectors).all()
    # At 518 the same weights run unresampled and give other (but valid) vectors.
    large = create_embedder(str(checkpoint_518), device="cpu", image_size=518)
    assert large.preprocess(_images()[:1]).shape == (1, 3, 518, 518)
    assert large.embed(_images()[:1]).shape == (1, 48)


def test_empty_input_gives_an_empty_matrix(embedder: DinoV2Embedder) -> None:
    assert embedder.embed([]).shape == (0, 48)


def test_version_is_the_identity_of_model_weights_size_and_precision(
    checkpoint_224: Path, embedder: DinoV2Embedder, tmp_path: Path
) -> None:
    path = str(checkpoint_224)
    version = embedder_version(path, precision="fp32")
    assert embedder.version == version
    assert version.startswith("tiny-224-224px-fp32-")
    assert embedder_version(path, precision="bf16") != version
    assert embedder_version(path, image_size=448, precision="fp32") != version
    # A copy of the folder is the same weights: same digest, under its own folder name.
    copy = shutil.copytree(checkpoint_224, tmp_path / "tiny-224")
    assert embedder_version(str(copy), precision="fp32") == version
    # Other weights in the same folder: another version.
    other = build_tiny_dinov2(tmp_path / "other", seed=1, img_size=224)
    shutil.copy(other / "model.safetensors", copy / "model.safetensors")
    assert embedder_version(str(copy), precision="fp32") != version
    # Hub names are identified by name; aliases resolve to the same name.
    assert embedder_version("small", precision="fp32") == embedder_version(
        "vit_small_patch14_dinov2.lvd142m", precision="fp32"
    )
    assert embedder_version("base", precision="fp32").startswith("vit_base_patch14_dinov2.lvd142m-224px-fp32-")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "resnet50"}, "neither a local folder nor a timm DINOv2 name"),
        ({"model": "/no/such/folder"}, "neither a local folder nor a timm DINOv2 name"),
        ({"precision": "fp16"}, "fp16 is for GPUs"),
        ({"precision": "int8"}, "precision must be one of"),
        ({"image_size": 0}, "image_size must be an integer"),
        ({"image_size": 230}, "multiple of the patch size 14"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
    ],
)
def test_bad_arguments_are_refused_by_name(checkpoint_224: Path, kwargs: dict, message: str) -> None:
    arguments = {"model": str(checkpoint_224), "device": "cpu", **kwargs}
    with pytest.raises(ValueError, match=message):
        create_embedder(**arguments)


def test_a_folder_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"has no config\.json"):
        create_embedder(str(tmp_path), device="cpu")


def test_a_hub_name_offline_fails_with_the_model_named() -> None:
    # conftest sets HF_HUB_OFFLINE=1 and nothing is cached: the hub path is taken, and fails clearly.
    with pytest.raises(RuntimeError, match="cannot load DINOv2 model 'small'"):
        create_embedder("small", device="cpu")


def test_the_embedder_imports_without_faiss_redis_or_transformers() -> None:
    # GPU workers may have none of these; blocking them makes any import of them fail loudly.
    code = (
        "import sys\n"
        "for name in ('faiss', 'redis', 'rq', 'transformers', 'fastapi', 'backend', 'indexer'):\n"
        "    sys.modules[name] = None\n"
        "from model.embedder import create_embedder\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_on_a_gpu_embeddings_match_the_cpu_in_fp32(
    checkpoint_224: Path, embedder: DinoV2Embedder, precision: str
) -> None:
    images = _images()
    on_gpu = create_embedder(str(checkpoint_224), device="cuda", precision=precision)
    assert on_gpu.device.type == "cuda"
    vectors = on_gpu.embed(images)
    assert vectors.dtype == np.float32
    assert _cosines(vectors, embedder.embed(images)).min() >= (0.9999 if precision == "fp32" else 0.99)


def test_draft_decoding_feeds_the_embedder_what_its_resize_needs(embedder: DinoV2Embedder) -> None:
    # The resize before the 224 px crop: short side to 224. A 1600x1200 photo is decoded at 1/4
    # (400x300, still above 299x224); its vectors stay those of the exact decode.
    assert embedder.input_size((1600, 1200)) == (299, 224) and embedder.input_size((100, 400)) == (224, 896)
    buffer = io.BytesIO()
    scene(1600, 1200, 5).save(buffer, "JPEG", quality=92)
    exact = decode_image(buffer.getvalue(), max_pixels=10**8)
    draft = decode_image(buffer.getvalue(), max_pixels=10**8, decode_size=embedder.input_size)
    assert draft.size == (400, 300) and display_size(draft) == exact.size == (1600, 1200)
    pixels = embedder.preprocess([exact, draft])
    assert 0 < (pixels[0] - pixels[1]).abs().mean() < 0.02
    vectors = embedder.embed([exact, draft, scene(1600, 1200, 6)])
    same, other = _cosines(vectors[[0, 0]], vectors[[1, 2]])
    assert same > 0.999 and other < same - 0.01, "closer to its exact decode than another picture is"
