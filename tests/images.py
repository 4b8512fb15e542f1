"""Small synthetic test images with some structure, different per seed."""

from __future__ import annotations

import io

from PIL import Image


def png(width: int, height: int, seed: int) -> bytes:
    """A PNG with stripes whose colours depend on ``seed``."""
    img = Image.new("RGB", (width, height), ((seed * 70) % 255, (seed * 130) % 255, 90))
    for i in range(0, width, 6):
        img.paste((255 - i % 255, i % 255, 20 * seed % 255), (i, 0, min(i + 2, width), height // 2))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def jpeg(width: int, height: int, seed: int, *, orientation: int | None = None) -> bytes:
    """A JPEG like :func:`png`, stored ``width`` x ``height``, with an EXIF Orientation tag if given."""
    img = Image.open(io.BytesIO(png(width, height, seed)))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()
