"""Hashes of one image: its bytes, its decoded pixels and a 64-bit perceptual hash.

Three strengths of "the same image", from strict to loose, none needing learned weights:

* ``sha256`` of the file bytes: the same file uploaded twice.
* ``pixel_hash``: SHA-256 of the decoded RGB pixels and size: the same picture re-saved losslessly
  (PNG recompressed, metadata stripped, another container).
* ``phash``: the DCT perceptual hash. Downscale to 32x32 grey, take the 2-D DCT, keep the 8x8 lowest
  frequencies and set one bit per coefficient above their median (the DC term excluded from the median).
  JPEG recompression, resizing and colour changes move few bits; crops and flips move many.

Everything here is a pure function over bytes, PIL images or numpy arrays.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

__all__ = ["ImageHashes", "hamming", "image_hashes", "phash", "pixel_hash", "sha256_hex"]

PHASH_BITS = 64
_DCT_SIZE = 32  # the image is reduced to 32x32 before the transform
_LOW = 8  # the 8x8 lowest frequencies give the 64 bits


@dataclass(frozen=True)
class ImageHashes:
    """What the store keeps about an image besides its vector."""

    sha256: str
    pixel_hash: str
    phash: int
    width: int
    height: int


def image_hashes(data: bytes, image: Image.Image, *, digest: str | None = None) -> ImageHashes:
    """All three hashes of ``data`` and its decoded ``image`` (as ``model.images.decode_image`` returns);
    ``digest``: the bytes' sha256 where the caller took it already."""
    return ImageHashes(
        sha256=digest or sha256_hex(data),
        pixel_hash=pixel_hash(image),
        phash=phash(image),
        width=image.width,
        height=image.height,
    )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pixel_hash(image: Image.Image) -> str:
    """SHA-256 over the size and the 8-bit RGB pixels: equal exactly when the decoded pictures are."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def phash(image: Image.Image) -> int:
    """The 64-bit DCT perceptual hash as an unsigned integer (bit 63 = lowest frequency, row-major)."""
    grey = image.convert("L").resize((_DCT_SIZE, _DCT_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    basis = _dct_matrix(_DCT_SIZE)
    coefficients = basis @ pixels @ basis.T
    # Rounded so that float noise (~1e-13 on a flat picture) never decides a bit.
    low = np.round(coefficients[:_LOW, :_LOW].ravel(), 6)
    median = np.median(low[1:])  # the DC term is the mean brightness, not structure
    bits = low > median
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray | int:
    """Bits that differ between 64-bit hashes (element-wise for uint64 arrays)."""
    if isinstance(a, int) and isinstance(b, int):
        return (a ^ b).bit_count()
    return np.bitwise_count(np.asarray(a, dtype=np.uint64) ^ np.asarray(b, dtype=np.uint64)).astype(np.int64)


@cache
def _dct_matrix(size: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: ``basis @ x`` transforms the columns of ``x``."""
    k = np.arange(size)[:, None]
    n = np.arange(size)[None, :]
    basis = np.cos(np.pi * (2 * n + 1) * k / (2 * size)) * np.sqrt(2.0 / size)
    basis[0] /= np.sqrt(2.0)
    basis.setflags(write=False)
    return basis
