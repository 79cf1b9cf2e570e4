import io

import numpy as np
from PIL import Image

from pipeline.ingest.images import inspect_image, luminance


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def gradient(size: int = 32) -> np.ndarray:
    return np.tile(np.linspace(0, 255, size, dtype=np.uint8), (size, 1))


def test_valid_png_is_described():
    data = encode(Image.fromarray(gradient()), "PNG")
    row = inspect_image(data, "data/raw/a/x.png", "a", max_pixels=10_000)
    assert row.decodable and row.error == ""
    assert (row.width, row.height, row.mode, row.format, row.bytes) == (32, 32, "L", "PNG", len(data))
    assert len(row.phash) == 16 and len(row.sha256) == 64


def test_empty_file():
    row = inspect_image(b"", "p", "a", max_pixels=10)
    assert not row.decodable and row.reason == "empty"


def test_html_is_not_an_image():
    row = inspect_image(b"<!doctype html><html><body>404</body></html>", "p", "a", max_pixels=10)
    assert not row.decodable and row.reason == "not_an_image"


def test_truncated_jpeg():
    data = encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG"
    )
    row = inspect_image(data[: len(data) // 2], "p", "a", max_pixels=100_000)
    assert not row.decodable and row.reason == "truncated"
    assert (row.width, row.height) == (64, 64)


def test_oversize_is_not_decoded():
    data = encode(Image.new("L", (400, 300)), "PNG")
    row = inspect_image(data, "p", "a", max_pixels=100_000)
    assert not row.decodable and row.reason == "oversize"
    assert (row.width, row.height) == (400, 300) and row.phash == ""


def test_sixteen_bit_png_keeps_its_contrast():
    wide = gradient().astype(np.uint16) * 257
    image = Image.fromarray(wide)
    assert image.mode.startswith("I")
    gray = np.asarray(luminance(image))
    assert gray.min() == 0 and gray.max() == 255
    row = inspect_image(encode(image, "PNG"), "p", "a", max_pixels=10_000)
    assert row.decodable and row.mode.startswith("I")


def test_same_picture_in_two_formats_has_same_phash():
    picture = Image.fromarray(gradient(64))
    png = inspect_image(encode(picture, "PNG"), "p", "a", max_pixels=10_000)
    bmp = inspect_image(encode(picture, "BMP"), "p", "a", max_pixels=10_000)
    assert png.sha256 != bmp.sha256 and png.phash == bmp.phash


def test_jpeg_cut_inside_its_header_is_truncated_not_garbage():
    data = encode(Image.fromarray(gradient(16)), "JPEG")
    row = inspect_image(data[:200], "p", "a", max_pixels=10_000)
    assert row.reason == "truncated"


def test_png_cut_short_is_truncated():
    data = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)), "PNG")
    assert inspect_image(data[:-200], "p", "a", max_pixels=10_000).reason == "truncated"
