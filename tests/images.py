"""Small synthetic test images with some structure, different per seed."""

from __future__ import annotations

import io

from PIL import Image


def png(width: int, height: int, seed: int) -> bytes:
    """A PNG with stripes whose colours depend on ``seed``."""
    img = Image.new("RGB", (width, height), ((seed * 70) % 255, (seed * 130) % 255, 90))
    for i in range(0, width, 6):
        img.paste((255 - i % 255, i % 255, 20 * seed % 255), (i, 0, min(i + 2, width), height // 2))
    return encode_png(img)


def encode_png(image: Image.Image) -> bytes:
    """``image`` as PNG bytes (lossless: decoded, the same pixels)."""
    out = io.BytesIO()
    image.save(out, "PNG")
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


def scene(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB picture: a smooth two-colour gradient under blurred random shapes.

    Different seeds give clearly different pictures (far apart in perceptual hash), and the picture
    survives resizing and recompression the way a photo does, unlike high-frequency stripes.
    """
    import numpy as np
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1))
    img = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((int(x0), int(y0), int(x1) + 4, int(y1) + 4), fill=colour)
    return img.filter(ImageFilter.GaussianBlur(radius=max(width, height) / 200))
