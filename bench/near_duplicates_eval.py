"""How well each duplicate pass finds edited copies of an image, and what it wrongly pairs.

Why this script exists: a duplicate threshold means nothing until it is tied to what it catches (a
JPEG at quality 30? a 90% crop? a flip?) and what it confuses. So: base images (scikit-image's bundled
photos and generated scenes, or a folder of your own with ``--images``), and for each base the copies
below; every image gets the four signatures the product keeps (file sha256, decoded-pixel hash, 64-bit
DCT pHash, DINOv2 embedding), and every pair is scored.

* **recall** of a pass for an augmentation at a threshold: the share of (base, its copy) pairs the pass
  calls duplicates.
* **precision** for an augmentation: of the pairs (copy, any other image) the pass calls duplicates, the
  share that really come from the same base (copies of one base among themselves count as true).
  ``all`` is the precision over every pair of the set.

Copies: same bytes, lossless PNG re-save, JPEG quality 30/60/90, resize 0.5x/2x, crop 80/90% (random
offset), horizontal flip, rotation 3/5 degrees, colour change (saturation x1.6, brightness x0.85),
overlaid text. All pairs are compared directly (a few thousand images): this is the ground truth the
product's grouping is measured against, not how the product searches.

Without ``--model`` the embedder is a random-weight ViT-S/14 with LayerScale gammas at 1.0 (built into
``bench/out/cache``): its embedding numbers show the plumbing works, not what DINOv2 achieves. Pass
``--model`` a folder with real weights (``hf download timm/vit_small_patch14_dinov2.lvd142m --local-dir
DIR``) for real numbers.

Run from the repository root (needs the ``bench`` extra: scikit-image)::

    .venv/bin/python bench/near_duplicates_eval.py [--images DIR] [--generated 40] [--model DIR]
        [--precision fp32] [--out bench/out/near_duplicates_eval.json]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

from bench.common import ensure_random_dinov2, machine_info, write_report
from indexer.hashes import image_hashes
from model import create_embedder
from model.images import decode_image
from tests.images import scene

# scikit-image's bundled pictures; `cat` is the same photo as `chelsea`, so only one is used.
SKIMAGE_SAMPLES = (
    *("astronaut", "binary_blobs", "brick", "camera", "cell", "checkerboard", "chelsea", "clock", "coffee"),
    *("coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo"),
    *("microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text"),
)
PHASH_DISTANCES = (0, 2, 4, 6, 8, 10, 12)
COSINE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
MAX_PIXELS = 100_000_000


def _png(image: Image.Image, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **{"compress_level": 1, **options})  # fast: big 2x copies are slow to deflate
    return out.getvalue()


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _crop(image: Image.Image, keep: float, rng: np.random.Generator) -> Image.Image:
    width, height = image.size
    w, h = max(1, round(width * keep)), max(1, round(height * keep))
    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    return image.crop((x, y, x + w, y + h))


def _text(image: Image.Image) -> Image.Image:
    copy = image.copy()
    draw = ImageDraw.Draw(copy)
    size = max(12, image.height // 12)
    font = ImageFont.load_default(size=size)
    draw.text((image.width // 20, image.height - 2 * size), "(c) dinolabel 2026", fill=(255, 255, 255), font=font)
    draw.text((image.width // 20, image.height // 10), "SAMPLE", fill=(255, 40, 40), font=font)
    return copy


def _resize(image: Image.Image, factor: float) -> Image.Image:
    return image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.BICUBIC)


# Each augmentation: base image, base bytes, rng -> the copy's file bytes.
AUGMENTATIONS: dict[str, Callable[[Image.Image, bytes, np.random.Generator], bytes]] = {
    "same bytes": lambda im, data, rng: data,
    "png re-save": lambda im, data, rng: _png(im, compress_level=0),
    "jpeg q90": lambda im, data, rng: _jpeg(im, 90),
    "jpeg q60": lambda im, data, rng: _jpeg(im, 60),
    "jpeg q30": lambda im, data, rng: _jpeg(im, 30),
    "resize 0.5x": lambda im, data, rng: _png(_resize(im, 0.5)),
    "resize 2x": lambda im, data, rng: _png(_resize(im, 2.0)),
    "crop 90%": lambda im, data, rng: _png(_crop(im, 0.9, rng)),
    "crop 80%": lambda im, data, rng: _png(_crop(im, 0.8, rng)),
    "flip": lambda im, data, rng: _png(ImageOps.mirror(im)),
    "rotate 3deg": lambda im, data, rng: _png(im.rotate(3, Image.BICUBIC)),
    "rotate 5deg": lambda im, data, rng: _png(im.rotate(-5, Image.BICUBIC)),
    "colour": lambda im, data, rng: _png(ImageEnhance.Brightness(ImageEnhance.Color(im).enhance(1.6)).enhance(0.85)),
    "text overlay": lambda im, data, rng: _png(_text(im)),
}


def base_images(folder: Path | None, generated: int) -> list[tuple[str, Image.Image]]:
    """(name, RGB image) pairs: a user's folder, or scikit-image's samples plus generated scenes."""
    images: list[tuple[str, Image.Image]] = []
    if folder is not None:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                try:
                    images.append((path.name, decode_image(path.read_bytes(), max_pixels=MAX_PIXELS)))
                except ValueError as exc:
                    print(f"skipping {path.name}: {exc}")
    else:
        import skimage.data

        for name in SKIMAGE_SAMPLES:
            array = getattr(skimage.data, name)()
            if array.dtype == bool:
                array = array.astype(np.uint8) * 255
            image = Image.fromarray(array)
            images.append((f"skimage:{name}", image.convert("RGBA").convert("RGB") if array.ndim == 3 else image))
    for seed in range(generated):
        images.append((f"scene:{seed}", scene(480 + 40 * (seed % 5), 360 + 30 * (seed % 3), seed)))
    return [(name, image.convert("RGB")) for name, image in images]


def build_set(bases: list[tuple[str, Image.Image]], seed: int) -> tuple[list[bytes], np.ndarray, list[str]]:
    """Every base and its copies as file bytes, with each file's base index and augmentation name."""
    rng = np.random.default_rng(seed)
    files, source, kind = [], [], []
    for number, (_, image) in enumerate(bases):
        data = _png(image)
        files.append(data)
        source.append(number)
        kind.append("base")
        for name, augment in AUGMENTATIONS.items():
            files.append(augment(image, data, rng))
            source.append(number)
            kind.append(name)
    return files, np.array(source), kind


def signatures(files: list[bytes], embed: Callable[[list[Image.Image]], np.ndarray]) -> dict[str, Any]:
    hashes, vectors, batch = [], [], []
    for number, data in enumerate(files, start=1):
        if number % 100 == 0:
            print(f"  {number}/{len(files)} images", flush=True)
        image = decode_image(data, max_pixels=MAX_PIXELS)
        hashes.append(image_hashes(data, image))
        batch.append(image)
        if len(batch) == 32:
            vectors.append(embed(batch))
            batch = []
    if batch:
        vectors.append(embed(batch))
    return {
        "sha256": np.array([h.sha256 for h in hashes]),
        "pixels": np.array([h.pixel_hash for h in hashes]),
        "phash": np.array([h.phash for h in hashes], dtype=np.uint64),
        "vectors": np.concatenate(vectors),
    }


def scores(source: np.ndarray, kind: list[str], detected: np.ndarray) -> dict[str, dict[str, float]]:
    """Recall and precision per augmentation for one boolean pair matrix (diagonal ignored)."""
    same = source[:, None] == source[None, :]
    off_diagonal = ~np.eye(len(source), dtype=bool)
    kinds = np.array(kind)
    out: dict[str, dict[str, float]] = {}
    base_of = {int(s): int(np.flatnonzero((source == s) & (kinds == "base"))[0]) for s in np.unique(source)}
    for name in AUGMENTATIONS:
        rows = np.flatnonzero(kinds == name)
        recall = float(np.mean([detected[r, base_of[int(source[r])]] for r in rows]))
        hits = detected[rows] & off_diagonal[rows]
        true = (hits & same[rows]).sum()
        precision = round(float(true / hits.sum()), 3) if hits.sum() else None
        out[name] = {"recall": round(recall, 3), "precision": precision}
    upper = np.triu(detected, k=1)
    out["all"] = {
        "recall": None,
        "precision": round(float((upper & same).sum() / upper.sum()), 3) if upper.sum() else None,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="a folder of your own base images (default: scikit-image's)")
    parser.add_argument("--generated", type=int, default=40, help="generated scenes added to the bases (40)")
    parser.add_argument("--model", help="embedder: timm DINOv2 name or folder (default: random ViT-S/14)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path("bench/out/cache"))
    parser.add_argument("--out", type=Path, default=Path("bench/out/near_duplicates_eval.json"))
    args = parser.parse_args()
    started = time.perf_counter()

    model = args.model or str(ensure_random_dinov2(args.cache))
    embedder = create_embedder(model, image_size=args.image_size, device=args.device, precision=args.precision)
    bases = base_images(args.images, args.generated)
    files, source, kind = build_set(bases, args.seed)
    print(f"{len(bases)} base images, {len(files)} images in all; embedder {embedder.version}", flush=True)
    t0 = time.perf_counter()
    sig = signatures(files, embedder.embed)
    signature_s = time.perf_counter() - t0

    results: dict[str, Any] = {
        "bytes": {"1": scores(source, kind, sig["sha256"][:, None] == sig["sha256"][None, :])},
        "pixels": {"1": scores(source, kind, sig["pixels"][:, None] == sig["pixels"][None, :])},
    }
    distance = np.bitwise_count(sig["phash"][:, None] ^ sig["phash"][None, :])
    results["perceptual"] = {str(t): scores(source, kind, distance <= t) for t in PHASH_DISTANCES}
    cosine = sig["vectors"] @ sig["vectors"].T
    results["embedding"] = {str(t): scores(source, kind, cosine >= t) for t in COSINE_THRESHOLDS}

    random_weights = args.model is None
    report = {
        "machine": machine_info(),
        "embedder": embedder.version,
        "random_weights": random_weights,
        "bases": [name for name, _ in bases],
        "images": len(files),
        "signature_seconds": round(signature_s, 1),
        "results": results,
        "wall_s": time.perf_counter() - started,
    }
    _print_table(results, random_weights)
    write_report(args.out, report)


def _print_table(results: dict[str, Any], random_weights: bool) -> None:
    columns = [
        ("bytes", "1"),
        ("pixels", "1"),
        ("perceptual", "4"),
        ("perceptual", "6"),
        ("perceptual", "10"),
        ("embedding", "0.8"),
        ("embedding", "0.9"),
        ("embedding", "0.95"),
    ]
    header = ["copy"] + [f"{s} {'<=' if s == 'perceptual' else '>='}{t}" for s, t in columns]
    print("recall (precision) per pass and threshold" + (" - embedding: RANDOM weights" if random_weights else ""))
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in [*AUGMENTATIONS, "all"]:
        cells = []
        for stage, threshold in columns:
            cell = results[stage][threshold][name]
            recall = "-" if cell["recall"] is None else f"{cell['recall']:.2f}"
            precision = "-" if cell["precision"] is None else f"{cell['precision']:.2f}"
            cells.append(f"{recall} ({precision})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
