"""The decode path over every kind of upload users send, plus fuzzing: only typed errors ever escape."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from app.errors import InvalidImageError, InvalidRequestError, PayloadTooLargeError, ServiceError, UnsupportedMediaError
from app.pipeline.imaging import VisionGeometry, model_size, prepare_image, sniff_format

from .helpers import diagram_png

GEOMETRY = VisionGeometry(factor=32, min_pixels=64 * 64, max_pixels=32 * 32 * 256)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def transparent_png() -> bytes:
    image = Image.new("RGBA", (200, 100), (0, 0, 0, 0))
    ImageDraw.Draw(image).rectangle((80, 30, 120, 70), fill=(0, 0, 0, 255))
    return encode(image, "PNG")


def exif_rotated_jpeg() -> bytes:
    image = Image.new("RGB", (200, 100), "white")
    ImageDraw.Draw(image).rectangle((0, 0, 30, 30), fill="red")  # marker in the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return encode(image, "JPEG", exif=exif, quality=95)


def sixteen_bit_png() -> bytes:
    image = Image.fromarray(np.full((80, 100), 32768, dtype=np.uint16))
    assert image.mode == "I;16"
    return encode(image, "PNG")


def palette_gif_with_transparency() -> bytes:
    image = Image.new("P", (120, 90), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    ImageDraw.Draw(image).rectangle((40, 30, 80, 60), fill=1)
    return encode(image, "GIF", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (100, 100), color) for color in ("green", "red", "blue")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def multipage_tiff() -> bytes:
    pages = [Image.new("RGB", (100, 100), "green"), Image.new("RGB", (100, 100), "red")]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def two_page_pdf() -> bytes:
    pages = [Image.new("RGB", (300, 200), "red"), Image.new("RGB", (300, 200), "blue")]
    return encode(pages[0], "PDF", save_all=True, append_images=pages[1:], resolution=72)


def bomb_png() -> bytes:
    # 12000 x 12000 one-bit pixels: a few kB on disk, 144 megapixels decoded.
    return encode(Image.new("1", (12000, 12000), 1), "PNG")


def corner(prepared) -> tuple[int, int, int]:
    return prepared.image.getpixel((2, 2))


def center(prepared) -> tuple[int, int, int]:
    width, height = prepared.image.size
    return prepared.image.getpixel((width // 2, height // 2))


GOOD_CASES = {
    "png": (diagram_png(), "PNG", lambda p: corner(p) == (255, 255, 255)),
    "transparent png on white": (transparent_png(), "PNG",
                                 lambda p: corner(p) == (255, 255, 255) and max(center(p)) < 30),
    "exif-rotated jpeg upright": (exif_rotated_jpeg(), "JPEG",
                                  lambda p: p.received_size == (100, 200)
                                  and p.image.getpixel((p.image.width - 5, 5))[0] > 200
                                  and p.image.getpixel((5, 5)) [1] > 200),
    "16-bit png": (sixteen_bit_png(), "PNG", lambda p: 120 <= corner(p)[0] <= 135 and p.image.mode == "RGB"),
    "cmyk jpeg": (encode(Image.new("CMYK", (100, 100), (0, 0, 0, 0)), "JPEG"), "JPEG",
                  lambda p: min(corner(p)) > 240),
    "grayscale jpeg": (diagram_png(mode="L", fmt="JPEG"), "JPEG", lambda p: p.image.mode == "RGB"),
    "palette gif with transparency": (palette_gif_with_transparency(), "GIF",
                                      lambda p: corner(p) == (255, 255, 255) and center(p)[0] > 200),
    "animated gif first frame": (animated_gif(), "GIF", lambda p: center(p)[1] > 100 and center(p)[0] < 50),
    "multi-page tiff first page": (multipage_tiff(), "TIFF", lambda p: center(p)[1] > 100 and center(p)[0] < 50),
    "webp": (diagram_png(fmt="WEBP"), "WEBP", lambda p: True),
    "bmp": (diagram_png(fmt="BMP"), "BMP", lambda p: True),
    "la png": (diagram_png(mode="LA"), "PNG", lambda p: corner(p) == (255, 255, 255)),
    "pdf page 1": (two_page_pdf(), "PDF", lambda p: center(p)[0] > 200 and center(p)[2] < 50),
}


@pytest.mark.parametrize("name", list(GOOD_CASES))
def test_accepted_uploads_become_upright_rgb(name):
    data, fmt, looks_right = GOOD_CASES[name]
    prepared = prepare_image(data, GEOMETRY)
    assert prepared.source_format == fmt
    assert prepared.image.mode == "RGB"
    assert prepared.image.size == prepared.model_size
    assert looks_right(prepared), (name, prepared.received_size, corner(prepared), center(prepared))


def test_pdf_second_page():
    prepared = prepare_image(two_page_pdf(), GEOMETRY, page=2)
    assert center(prepared)[2] > 200 and center(prepared)[0] < 50


BAD_CASES = {
    "empty": (b"", InvalidImageError, "empty"),
    "random bytes": (bytes(range(256)) * 4, UnsupportedMediaError, "PNG, JPEG, WEBP, GIF, BMP, TIFF, PDF"),
    "text": (b"hello, this is not an image", UnsupportedMediaError, "accepted formats"),
    "truncated png": (diagram_png(400, 300)[:300], InvalidImageError, "cannot decode"),
    "truncated jpeg": (diagram_png(400, 300, fmt="JPEG")[:500], InvalidImageError, "cannot decode"),
    "ico": (encode(Image.new("RGB", (32, 32)), "ICO"), UnsupportedMediaError, "accepted formats"),
    "psd-like": (b"8BPS" + b"\x00" * 100, UnsupportedMediaError, "accepted formats"),
    "broken pdf": (b"%PDF-1.4\n garbage garbage", InvalidImageError, "PDF"),
    "bomb": (bomb_png(), PayloadTooLargeError, "pixels"),
    "extreme aspect": (encode(Image.new("L", (8000, 10), 255), "PNG"), InvalidImageError, "aspect ratio"),
}


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_uploads_raise_typed_errors(name):
    data, error, words = BAD_CASES[name]
    with pytest.raises(error) as caught:
        prepare_image(data, GEOMETRY)
    assert words in caught.value.message


def test_pdf_page_out_of_range_names_the_page_count():
    with pytest.raises(InvalidRequestError, match="has 2 page"):
        prepare_image(two_page_pdf(), GEOMETRY, page=3)


def test_page_on_a_raster_is_refused():
    with pytest.raises(InvalidRequestError, match="PDF and TIFF uploads only"):
        prepare_image(diagram_png(), GEOMETRY, page=2)


def test_large_image_is_downscaled_within_the_budget_keeping_aspect():
    prepared = prepare_image(diagram_png(4000, 3000), GEOMETRY)
    width, height = prepared.model_size
    assert width * height <= GEOMETRY.max_pixels
    assert width % 32 == 0 and height % 32 == 0
    assert abs(width / height - 4 / 3) < 0.1
    assert prepared.received_size == (4000, 3000)


def test_tiny_image_is_upscaled_to_the_minimum():
    width, height = model_size(20, 10, GEOMETRY)
    assert width * height >= GEOMETRY.min_pixels and width % 32 == 0 and height % 32 == 0


def test_format_comes_from_the_bytes_not_the_name():
    assert sniff_format(diagram_png(fmt="JPEG")) == "JPEG"
    assert sniff_format(b"GIF89a" + b"\x00" * 20) == "GIF"
    assert sniff_format(b"\x00\x00\x01\x00") is None  # ICO


SEEDS = [diagram_png(64, 48), diagram_png(64, 48, fmt="JPEG"), diagram_png(64, 48, fmt="GIF"),
         diagram_png(64, 48, fmt="TIFF"), diagram_png(64, 48, fmt="WEBP"), diagram_png(64, 48, fmt="BMP"),
         encode(Image.new("RGB", (64, 48), "white"), "PDF")]


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    mutable = bytearray(data)
    for position, value in edits:
        mutable[position % len(mutable)] = value
    return bytes(mutable[:cut] if cut else mutable)


def only_typed_errors(data: bytes) -> None:
    try:
        prepared = prepare_image(data, GEOMETRY, max_decoded_pixels=4_000_000)
    except ServiceError:
        return
    assert prepared.image.mode == "RGB" and prepared.image.size == prepared.model_size


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data):
    only_typed_errors(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       st.one_of(st.none(), st.integers(1, 4000)))
def test_fuzz_mutated_images(seed, edits, cut):
    only_typed_errors(mutate(seed, edits, cut))
