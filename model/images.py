"""Turn untrusted image bytes into the RGB picture a browser would show.

Boxes that the detector returns are stored by Label Studio as percentages of the image *as displayed*,
so everything here aims at one thing: the width, height and pixels we hand to the model must be those
of the image after EXIF orientation and after flattening transparency the way a browser does (on
white). No HTTP and no Label Studio knowledge lives here; ``backend.image_source`` fetches the bytes.

The bytes are untrusted and failure reasons travel far (logs, job records returned by the API), so a
reason says what was expected and what was found *by kind* ("a JSON document, 312 bytes"), never
quoting the bytes themselves: otherwise any file or internal URL could be read back through them.
"""

from __future__ import annotations

import io
import logging
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DISPLAY_SIZE", "DecodeThen", "ImageDecodeError", "Size", "content_kind", "decode_image", "display_size"]

Size = tuple[int, int]
"""Width, height in pixels."""

DISPLAY_SIZE = "dinolabel.display_size"
"""``Image.info`` key of a draft-decoded image: the (width, height) the browser shows, full size."""

logger = logging.getLogger(__name__)

# Modes whose samples are wider than 8 bits and need scaling rather than Pillow's clipping convert().
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# Modes that carry an alpha channel (premultiplied ones included): flattened on white.
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE = (255, 255, 255, 255)
# Formats people hand us instead of an image, told apart by their first bytes.
_OTHER_FORMATS = (
    (b"%PDF-", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "gzip-compressed data"),
)
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis")
_BYTES_REPR = re.compile(r"b'(?:[^'\\]|\\.)*'" + r'|b"(?:[^"\\]|\\.)*"')  # a bytes literal's repr


class ImageDecodeError(ValueError):
    """The bytes are not an image we can (or may) decode; the message says which and why."""


def decode_image(data: bytes, *, max_pixels: int, decode_size: Callable[[Size], Size] | None = None) -> Image.Image:
    """Decode ``data`` into a fully loaded RGB image, oriented and flattened as a browser shows it.

    The size check runs on the header before any pixel data is decoded, and does not depend on
    Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` (which other code may have set to ``None``).
    Every decoder failure is re-raised as :class:`ImageDecodeError` so callers handle one type.

    ``decode_size`` (draft decoding, off by default): given the displayed size, the smallest size the
    model's preprocessing needs (its resize target). A JPEG at least twice that size is then decoded
    at 1/2, 1/4 or 1/8 scale by the JPEG decoder itself (``Image.draft``), never below the target:
    for a 12 MP photo and an 800 px model input, a quarter of the pixels to decode, copy and resize.
    The pixels differ slightly from resizing the full image (README, "Draft decoding"). The returned
    image is then smaller than displayed; :func:`display_size` gives the full size.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if not data:
        raise ImageDecodeError("cannot decode image: no data (0 bytes)")

    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"cannot decode image: not a recognised image format: found {content_kind(data)}, {len(data):,} bytes"
        ) from None
    except Image.DecompressionBombError as exc:
        # Pillow's own global guard fired first (it is stricter than ours here); same outcome.
        raise ImageDecodeError(f"refusing to decode image: {exc}") from None
    except Exception as exc:  # a corrupt header can raise almost anything from a plugin
        raise ImageDecodeError(f"cannot decode image: unreadable header ({_describe(exc)})") from exc

    with image:
        width, height = image.size
        fmt = image.format or "unknown format"
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"cannot decode {fmt} image: invalid size {width}x{height}")
        if width * height > max_pixels:
            raise ImageDecodeError(
                f"refusing to decode {fmt} image of {width}x{height} = {width * height:,} pixels: "
                f"more than the limit of {max_pixels:,} pixels (possible decompression bomb)"
            )
        try:
            full_size = _draft(image, decode_size) if decode_size is not None else None
            image.load()
            oriented = _apply_exif_orientation(image)
            rgb = _to_rgb(oriented)
            rgb.load()
        except ImageDecodeError:
            raise
        except Exception as exc:
            raise ImageDecodeError(
                f"cannot decode {fmt} image of {width}x{height} ({len(data)} bytes): {_describe(exc)}"
            ) from exc
        if full_size is not None:
            rgb.info[DISPLAY_SIZE] = full_size
    return rgb


@dataclass(frozen=True)
class DecodeThen:
    """Decode untrusted bytes (:func:`decode_image`), then hand the picture to ``preprocess``: one step.

    A pipeline runs this as its preprocessing, on its threads or in its worker processes: in a process
    the bytes cross to the child, not the decoded pixels (a 12 MP photo is 36 MB decoded), and decoding
    is CPU work that belongs beside the resize, away from the thread feeding the device. Picklable
    when ``preprocess`` and ``decode_size`` are (instances of module-level classes, their methods).
    """

    preprocess: Callable[[Image.Image], Any]
    max_pixels: int
    decode_size: Callable[[Size], Size] | None = None

    def __call__(self, data: bytes) -> Any:
        return self.preprocess(decode_image(data, max_pixels=self.max_pixels, decode_size=self.decode_size))


def display_size(image: Image.Image) -> Size:
    """The size the browser shows: the full size of a draft-decoded image, else the image's own size."""
    return image.info.get(DISPLAY_SIZE, image.size)


def _displayed_size(image: Image.Image) -> Size:
    """The opened image's size once EXIF orientation is applied (from the header; nothing decoded)."""
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # unreadable EXIF is ignored, as by _apply_exif_orientation
        return image.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _draft(image: Image.Image, decode_size: Callable[[Size], Size]) -> Size | None:
    """Have the JPEG decoder scale down by 2, 4 or 8 while the result still covers ``decode_size``.

    Returns the displayed full size when it did (the image is then smaller), None when it did not (not
    a JPEG, or less than twice the size needed).
    """
    if image.format != "JPEG":
        return None
    displayed = _displayed_size(image)
    need_width, need_height = decode_size(displayed)
    if displayed != image.size:  # EXIF turns the picture: the decoder works on the stored orientation
        need_width, need_height = need_height, need_width
    if image.width < 2 * need_width or image.height < 2 * need_height:
        return None
    stored = image.size
    image.draft(image.mode, (need_width, need_height))
    return displayed if image.size != stored else None


def content_kind(data: bytes) -> str:
    """What ``data`` is, in words and by kind only ("an HTML or XML document", "unknown binary data")."""
    head = data[:4096]
    for magic, kind in _OTHER_FORMATS:
        if head.startswith(magic):
            return kind
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "a HEIF/AVIF image (unsupported)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the sample
            return "unknown binary data"
        text = head[: exc.start].decode("utf-8")
    if any(ch < " " and ch not in "\t\r\n\f" for ch in text):
        return "unknown binary data"
    start = text.lstrip("\ufeff \t\r\n").lower()
    if start.startswith("<"):
        if "<svg" in start:
            return "an SVG image (unsupported)"
        return "an HTML or XML document"
    if start.startswith(("{", "[")):
        return "a JSON document"
    return "text"


def _describe(exc: BaseException) -> str:
    """A reason a person can act on; Pillow's wording for truncation is terse.

    Some decoder messages quote bytes of the file (``broken PNG file (chunk b'...')``): those are
    replaced, like everything else that comes from the data.
    """
    text = _BYTES_REPR.sub("<bytes>", str(exc)) or type(exc).__name__
    if "truncated" in text or isinstance(exc, EOFError | struct.error):
        return f"image data is truncated or corrupt ({text})"
    return f"{type(exc).__name__}: {text}"


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip per the EXIF Orientation tag, as browsers do since ``image-orientation: from-image``.

    Broken EXIF blocks are common in the wild and browsers ignore them, so do we.
    """
    try:
        transposed = ImageOps.exif_transpose(image)
    except (ValueError, TypeError, KeyError, SyntaxError, struct.error, OSError) as exc:
        logger.debug("ignoring unreadable EXIF orientation: %s", exc)
        transposed = None
    # Always a new object: the caller closes the opened image when it is done.
    return transposed if transposed is not None else image.copy()


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping high bit depths or blackening alpha."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        return _gray_to_rgb(_scale_to_uint8(np.asarray(image), full_scale=65535.0))
    if mode == "I":
        return _gray_to_rgb(_scale_int32(np.asarray(image)))
    if mode == "F":
        return _gray_to_rgb(_scale_float(np.asarray(image)))
    if mode in _ALPHA_MODES or "transparency" in image.info:
        # Palette/L/RGB images with a tRNS key become RGBA here, so the key colour turns white.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    # 1, L, P, CMYK, YCbCr, LAB, HSV: Pillow converts these directly.
    return image.convert("RGB")


def _scale_to_uint8(values: np.ndarray, *, full_scale: float) -> np.ndarray:
    """Map ``0..full_scale`` linearly onto ``0..255`` with rounding (65535 -> 255, 32768 -> 128)."""
    scaled = np.rint(values.astype(np.float64) * (255.0 / full_scale))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _scale_int32(values: np.ndarray) -> np.ndarray:
    """32-bit integer images: almost always 16-bit data that Pillow widened, else stretch the range."""
    if values.size == 0:
        return values.astype(np.uint8)
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high <= 65535:
        return _scale_to_uint8(values, full_scale=65535.0)
    return _stretch(values.astype(np.float64), low, high)


def _scale_float(values: np.ndarray) -> np.ndarray:
    """Float images: ``0..1`` is the usual convention; anything else is stretched to its own range."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = float(finite.min()), float(finite.max())
    clean = np.nan_to_num(values.astype(np.float64), nan=low, posinf=high, neginf=low)
    if low >= 0.0 and high <= 1.0:
        return _scale_to_uint8(clean, full_scale=1.0)
    return _stretch(clean, low, high)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear min-max stretch; a constant image maps to black rather than dividing by zero."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return _scale_to_uint8(values - low, full_scale=high - low)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """Wrap an 8-bit single-channel array as an RGB image."""
    return Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).convert("RGB")
