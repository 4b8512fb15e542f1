"""Image hashes: bytes, decoded pixels and the DCT perceptual hash."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from indexer.hashes import _dct_matrix, hamming, image_hashes, phash, pixel_hash, sha256_hex
from tests.images import scene


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_dct_basis_is_orthonormal() -> None:
    basis = _dct_matrix(32)
    assert np.allclose(basis @ basis.T, np.eye(32), atol=1e-12)


def test_lossless_re_encodings_share_pixels_but_not_bytes() -> None:
    image = scene(320, 240, seed=1)
    png_fast = _encode(image, "PNG", compress_level=1)
    png_small = _encode(image, "PNG", compress_level=9, optimize=True)
    bmp = _encode(image, "BMP")
    hashes = [image_hashes(data, _decode(data)) for data in (png_fast, png_small, bmp)]
    assert len({h.sha256 for h in hashes}) == 3
    assert len({h.pixel_hash for h in hashes}) == 1
    assert {(h.width, h.height) for h in hashes} == {(320, 240)}
    # A lossy copy changes the pixels, and a transposed picture of the same pixels is another picture.
    jpeg = _encode(image, "JPEG", quality=95)
    assert pixel_hash(_decode(jpeg)) != hashes[0].pixel_hash
    assert pixel_hash(image.transpose(Image.Transpose.TRANSPOSE)) != pixel_hash(image)
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_phash_keeps_recompressed_resized_and_recoloured_copies_close() -> None:
    image = scene(480, 360, seed=2)
    base = phash(image)
    copies = {
        "jpeg q30": _decode(_encode(image, "JPEG", quality=30)),
        "half size": image.resize((240, 180), Image.Resampling.BILINEAR),
        "double size": image.resize((960, 720), Image.Resampling.BICUBIC),
        "brighter": ImageEnhance.Brightness(image).enhance(1.3),
        "grey": ImageOps.grayscale(image).convert("RGB"),
    }
    distances = {name: hamming(base, phash(copy)) for name, copy in copies.items()}
    assert max(distances.values()) <= 8, distances
    # ...and other pictures, or a mirrored one, far away.
    others = [hamming(base, phash(scene(480, 360, seed=s))) for s in range(3, 13)]
    assert min(others) >= 16, others
    assert hamming(base, phash(ImageOps.mirror(image))) >= 16


def test_phash_is_64_bits_and_hamming_works_on_arrays() -> None:
    values = [phash(scene(200, 150, seed=s)) for s in range(6)]
    assert all(0 <= v < 2**64 for v in values)
    array = np.array(values, dtype=np.uint64)
    pairwise = hamming(array[:, None], array[None, :])
    expected = np.array([[(a ^ b).bit_count() for b in values] for a in values])
    assert np.array_equal(pairwise, expected)
    # A flat picture has no structure: only the DC bit (the first, brightness > 0) is set, whatever the size.
    assert phash(Image.new("RGB", (64, 64), (90, 90, 90))) == 1 << 63
    assert phash(Image.new("RGB", (333, 97), (90, 90, 90))) == 1 << 63
