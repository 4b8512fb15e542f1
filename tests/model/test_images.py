"""decode_image: every image is built in memory with Pillow, so expected pixels are known exactly."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from model.images import DISPLAY_SIZE, ImageDecodeError, decode_image, display_size
from tests.images import scene

BIG = 100_000_000
RED, WHITE, BLACK = (255, 0, 0), (255, 255, 255), (0, 0, 0)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    """JPEG is lossy: compare colours with a tolerance."""
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def test_exif_orientation_is_applied_like_a_browser() -> None:
    # Stored 40x20 with a red 10x10 marker in the stored top-left corner. Orientation 6 means
    # "rotate 90 degrees clockwise to display": shown 20x40, marker in the top-right corner.
    stored = Image.new("RGB", (40, 20), WHITE)
    stored.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.size == (40, 20)  # the file really is stored landscape

    image = decode_image(data, max_pixels=BIG)

    assert image.mode == "RGB"
    assert image.size == (20, 40)
    assert close_to(image.getpixel((15, 4)), RED)  # top-right
    assert close_to(image.getpixel((4, 4)), WHITE)  # top-left
    assert close_to(image.getpixel((15, 35)), WHITE)  # bottom-right


def test_jpeg_without_exif_keeps_its_size() -> None:
    image = decode_image(encode(Image.new("RGB", (40, 20), RED), "JPEG"), max_pixels=BIG)
    assert image.size == (40, 20)
    assert close_to(image.getpixel((20, 10)), RED)


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "CMYK"
    image = decode_image(data, max_pixels=BIG)
    assert image.mode == "RGB"
    assert close_to(image.getpixel((8, 8)), RED)


def test_rgba_png_is_composited_on_white() -> None:
    source = Image.new("RGBA", (3, 1))
    source.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red: the background shows
    source.putpixel((1, 0), (0, 0, 255, 128))  # half transparent blue
    source.putpixel((2, 0), (0, 255, 0, 255))  # opaque green
    image = decode_image(encode(source, "PNG"), max_pixels=BIG)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == WHITE
    assert close_to(image.getpixel((1, 0)), (127, 127, 255), tolerance=1)
    assert image.getpixel((2, 0)) == (0, 255, 0)


def test_gray_alpha_png_is_composited_on_white() -> None:
    source = Image.new("LA", (2, 1))
    source.putpixel((0, 0), (0, 0))  # transparent black
    source.putpixel((1, 0), (0, 255))  # opaque black
    image = decode_image(encode(source, "PNG"), max_pixels=BIG)
    assert [image.getpixel((x, 0)) for x in range(2)] == [WHITE, BLACK]


def test_palette_png_with_transparency() -> None:
    source = Image.new("P", (2, 1))
    source.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    source.putpixel((0, 0), 0)  # index 0 is the transparent one
    source.putpixel((1, 0), 1)  # blue
    data = encode(source, "PNG", transparency=0)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "P"
        assert raw.info["transparency"] == 0
    image = decode_image(data, max_pixels=BIG)
    assert [image.getpixel((x, 0)) for x in range(2)] == [WHITE, (0, 0, 255)]


def test_palette_png_without_transparency_keeps_colours() -> None:
    source = Image.new("P", (1, 1))
    source.putpalette([10, 200, 30] + [0] * (256 * 3 - 3))
    image = decode_image(encode(source, "PNG"), max_pixels=BIG)
    assert image.getpixel((0, 0)) == (10, 200, 30)


def test_16_bit_png_is_scaled_not_clipped() -> None:
    source = Image.new("I;16", (3, 1))
    for x, value in enumerate([65535, 32768, 0]):
        source.putpixel((x, 0), value)
    data = encode(source, "PNG")
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "I;16"
    image = decode_image(data, max_pixels=BIG)
    assert [image.getpixel((x, 0)) for x in range(3)] == [(255,) * 3, (128,) * 3, BLACK]


def test_16_bit_big_endian_tiff_is_scaled() -> None:
    source = Image.frombytes("I;16B", (3, 1), struct.pack(">3H", 65535, 32768, 257))
    data = encode(source, "TIFF")
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "I;16B"
    image = decode_image(data, max_pixels=BIG)
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [255, 128, 1]


def test_32_bit_integer_image_in_16_bit_range_is_scaled() -> None:
    source = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert source.mode == "I"
    image = decode_image(encode(source, "TIFF"), max_pixels=BIG)
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_32_bit_integer_image_with_negative_values_is_stretched() -> None:
    source = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))
    image = decode_image(encode(source, "TIFF"), max_pixels=BIG)
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_image_in_unit_range_is_scaled() -> None:
    source = Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32))
    assert source.mode == "F"
    image = decode_image(encode(source, "TIFF"), max_pixels=BIG)
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 64, 255]


def test_float_image_outside_unit_range_is_stretched() -> None:
    source = Image.fromarray(np.array([[10.0, 20.0, 30.0]], dtype=np.float32))
    image = decode_image(encode(source, "TIFF"), max_pixels=BIG)
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_one_bit_image() -> None:
    source = Image.new("1", (2, 1), 0)
    source.putpixel((1, 0), 1)
    image = decode_image(encode(source, "PNG"), max_pixels=BIG)
    assert [image.getpixel((x, 0)) for x in range(2)] == [BLACK, WHITE]


def test_grayscale_image() -> None:
    image = decode_image(encode(Image.new("L", (5, 3), 77), "PNG"), max_pixels=BIG)
    assert image.mode == "RGB"
    assert image.size == (5, 3)
    assert image.getpixel((2, 1)) == (77, 77, 77)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(fmt: str) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = encode(noise, fmt)
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], max_pixels=BIG)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n", "text"),
        (b"<html><title>Admin console</title></html>", "an HTML or XML document"),
        (b'{"AccessKeyId": "ASIAXXXX", "SecretAccessKey": "abc"}', "a JSON document"),
        (b"\x00\x01secret\x02binary", "unknown binary data"),
        (b"%PDF-1.7 secret", "a PDF document"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "an SVG image (unsupported)"),
        ("élan ".encode() * 1000, "text"),  # a character cut at the end of the sample is still text
    ],
)
def test_non_image_bytes_are_described_by_kind_never_quoted(data: bytes, kind: str) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_pixels=BIG)
    assert str(info.value) == f"cannot decode image: not a recognised image format: found {kind}, {len(data):,} bytes"


def test_decoder_messages_lose_the_bytes_they_quote() -> None:
    # A PNG whose pixel data is cut short and followed by file content where the next chunk should be:
    # Pillow names that "chunk" by quoting its four bytes.
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    png = encode(noise, "PNG")
    start = png.index(b"IDAT") - 4
    idat = png[start + 8 : start + 8 + struct.unpack(">I", png[start : start + 4])[0] // 2]
    chunk = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    data = png[:start] + chunk + struct.pack(">I", 16) + b"x:0:root:/bin/bash\n"
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_pixels=BIG)
    assert str(info.value).endswith("SyntaxError: broken PNG file (chunk <bytes>)")
    assert "x:0:" not in str(info.value)


def test_empty_bytes() -> None:
    with pytest.raises(ImageDecodeError, match="no data"):
        decode_image(b"", max_pixels=BIG)


def png_claiming_size(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR (with a correct CRC) claims another size."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_bomb_is_refused_from_the_header_without_the_global_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # someone switched Pillow's guard off
    started = time.monotonic()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(png_claiming_size(30000, 30000), max_pixels=BIG)
    assert time.monotonic() - started < 1.0
    message = str(info.value)
    assert "30000x30000" in message
    assert "100,000,000" in message
    assert Image.MAX_IMAGE_PIXELS is None  # the global was not touched


def test_bomb_is_refused_with_pillow_default_limit_too() -> None:
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(png_claiming_size(30000, 30000), max_pixels=BIG)


def test_pixel_limit_is_inclusive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    data = encode(Image.new("RGB", (100, 100), RED), "PNG")
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageDecodeError, match="100x100 = 10,000 pixels"):
        decode_image(data, max_pixels=9_999)


def test_result_is_loaded_and_independent_of_the_input_buffer() -> None:
    data = bytearray(encode(Image.new("RGB", (4, 4), (1, 2, 3)), "PNG"))
    image = decode_image(bytes(data), max_pixels=BIG)
    data[:] = b"\0" * len(data)
    assert image.getpixel((3, 3)) == (1, 2, 3)
    assert image.copy().tobytes() == bytes([1, 2, 3]) * 16


# --- draft decoding: large JPEGs decoded at a reduced scale that still covers the model's input ----------


def quarter(size: tuple[int, int]) -> tuple[int, int]:
    """A model input a quarter of the displayed size (what a detector's ``input_size`` answers)."""
    return size[0] // 4, size[1] // 4


def photo_jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    """A smooth photo-like JPEG (``tests.images.scene``), with an EXIF Orientation tag if given."""
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    return encode(scene(width, height, 1), "JPEG", quality=92, exif=exif.tobytes())


@pytest.mark.parametrize(("orientation", "shown"), [(None, (400, 240)), (6, (240, 400)), (3, (400, 240))])
def test_draft_decoding_covers_the_input_and_keeps_the_displayed_size(
    orientation: int | None, shown: tuple[int, int]
) -> None:
    data = photo_jpeg(400, 240, orientation)
    exact = decode_image(data, max_pixels=BIG)
    draft = decode_image(data, max_pixels=BIG, decode_size=quarter)
    assert exact.size == shown and display_size(exact) == shown and DISPLAY_SIZE not in exact.info
    assert draft.size == (shown[0] // 4, shown[1] // 4) and draft.mode == "RGB"  # the DCT's 1/4 scale
    assert display_size(draft) == shown
    # The same picture, oriented the same way: compare with the exact decode shrunk to the same size.
    reference = np.asarray(exact.resize(draft.size, Image.Resampling.BOX), dtype=np.int16)
    assert np.abs(np.asarray(draft, dtype=np.int16) - reference).mean() < 3


def test_draft_decoding_never_goes_below_the_input_nor_touches_other_formats() -> None:
    # Less than twice the input: decoded whole. A PNG: no draft in its decoder, decoded whole.
    assert decode_image(photo_jpeg(400, 240), max_pixels=BIG, decode_size=lambda s: (201, 100)).size == (400, 240)
    assert decode_image(photo_jpeg(400, 240), max_pixels=BIG, decode_size=lambda s: (150, 90)).size == (200, 120)
    png = decode_image(encode(scene(400, 240, 2), "PNG"), max_pixels=BIG, decode_size=quarter)
    assert png.size == (400, 240) and DISPLAY_SIZE not in png.info


def test_draft_decoding_keeps_the_pixel_limit_and_failures() -> None:
    data = photo_jpeg(400, 240)
    with pytest.raises(ImageDecodeError, match="more than the limit"):
        decode_image(data, max_pixels=400 * 240 - 1, decode_size=quarter)  # the full size counts
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], max_pixels=BIG, decode_size=quarter)
