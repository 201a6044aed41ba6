"""Reading and decoding images: every image here is made by the test itself.

The only network is an HTTP server on 127.0.0.1, started by the `http_root` fixture.
"""

from __future__ import annotations

import io
import pickle
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transforms.images import ImageError, decode_image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def bands(width: int, height: int, colours: tuple, vertical: bool = True) -> Image.Image:
    """Three equal bands, left to right (or top to bottom), of the given colours."""
    pixels = np.zeros((height, width, 3), np.uint8)
    for index, colour in enumerate(colours):
        if vertical:
            pixels[:, index * width // 3 : (index + 1) * width // 3] = colour
        else:
            pixels[index * height // 3 : (index + 1) * height // 3, :] = colour
    return Image.fromarray(pixels)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height: a decompression bomb's shape."""
    data = bytearray(encode(Image.new("1", (8, 8)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)  # IHDR's first fields, after signature
    data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))  # IHDR's CRC, of type + data
    return bytes(data)


def close_to(pixel: np.ndarray, colour: tuple, tolerance: int = 40) -> bool:
    return bool(np.all(np.abs(pixel.astype(int) - colour) <= tolerance))


def assert_error(kind: str, call, *args, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as caught:
        call(*args, **kwargs)
    assert caught.value.kind == kind, str(caught.value)
    return caught.value


# --- ImageError --------------------------------------------------------------------------


def test_image_error_reads_as_kind_and_message_and_survives_pickling():
    error = pickle.loads(pickle.dumps(ImageError("not_found", "x.jpg does not exist")))
    assert (error.kind, error.message) == ("not_found", "x.jpg does not exist")
    assert str(error) == "not_found: x.jpg does not exist"


# --- decode_image: framing ---------------------------------------------------------------


@pytest.mark.parametrize("format", ["JPEG", "PNG"])
def test_wide_image_is_centre_cropped(format):
    image = bands(600, 200, (RED, GREEN, BLUE))  # the centre square is all green
    array = decode_image(encode(image, format), size=32)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    assert array.flags["C_CONTIGUOUS"]
    assert close_to(array[:, 1:-1].reshape(-1, 3).mean(axis=0), GREEN)
    assert close_to(array[16, 16], GREEN, tolerance=10)


def test_tall_image_is_centre_cropped():
    image = bands(100, 300, (RED, GREEN, BLUE), vertical=False)
    array = decode_image(encode(image, "PNG"), size=24)
    assert array.shape == (24, 24, 3)
    assert close_to(array[1:-1].reshape(-1, 3).mean(axis=0), GREEN)


def test_image_whose_shorter_side_is_the_size_is_only_cropped():
    """No resampling at scale 1: the centre square's pixels come through exactly."""
    pixels = np.random.default_rng(0).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    array = decode_image(encode(Image.fromarray(pixels), "PNG"), size=30)
    np.testing.assert_array_equal(array, pixels[:, 5:35])  # the square starts on a whole pixel


def test_small_image_is_scaled_up():
    array = decode_image(encode(Image.new("RGB", (20, 10), RED), "PNG"), size=64)
    assert array.shape == (64, 64, 3)
    assert close_to(array[32, 32], RED, tolerance=0)


def test_exif_orientation_is_applied():
    stored = bands(120, 80, (RED, RED, BLUE))  # red left, blue right, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: shown rotated 90 degrees clockwise
    array = decode_image(encode(stored, "JPEG", exif=exif), size=32)
    assert close_to(array[0, 16], RED) and close_to(array[-1, 16], BLUE)  # red on top


# --- decode_image: modes -----------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb():
    image = Image.new("CMYK", (64, 48), (0, 255, 255, 0))  # red in ink
    assert close_to(decode_image(encode(image, "JPEG"), size=16)[8, 8], RED)


def test_palette_png_transparency_becomes_white():
    image = Image.new("P", (40, 40), 0)
    image.putpalette([0, 0, 0, *RED])  # index 0 black but transparent, 1 red
    image.paste(1, (20, 0, 40, 40))
    array = decode_image(encode(image, "PNG", transparency=0), size=40)
    assert close_to(array[20, 2], WHITE, tolerance=0)
    assert close_to(array[20, -3], RED, tolerance=0)


def test_rgba_transparency_becomes_white():
    pixels = np.zeros((40, 40, 4), np.uint8)
    pixels[:, :20] = (*RED, 0)  # red, but fully transparent
    pixels[:, 20:] = (*BLUE, 255)
    array = decode_image(encode(Image.fromarray(pixels), "PNG"), size=40)
    assert close_to(array[20, 2], WHITE, tolerance=0)
    assert close_to(array[20, -3], BLUE, tolerance=0)


@pytest.mark.parametrize(
    ("values", "format"),
    [
        (np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16), "PNG"),  # I;16
        (np.linspace(0, 4000, 64 * 64).reshape(64, 64).astype(np.float32), "TIFF"),  # F
    ],
)
def test_high_bit_depth_greyscale_spans_0_to_255(values, format):
    array = decode_image(encode(Image.fromarray(values), format), size=64)
    assert array.min() <= 5 and array.max() >= 250
    assert abs(array.mean() - 127.5) < 5  # clipped at 255, it would be almost all white
    assert np.all(array[..., 0] == array[..., 1])


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F"])
def test_every_mode_becomes_rgb(mode):
    format = "TIFF" if mode in ("CMYK", "I", "F") else "PNG"
    array = decode_image(encode(Image.new(mode, (30, 20)), format), size=16)
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8


# --- decode_image: bad data --------------------------------------------------------------


def test_text_named_jpg_is_not_an_image():
    error = assert_error("not_an_image", decode_image, b"<html>Not Found</html>", size=32)
    assert "<html>" in error.message


def test_truncated_jpeg_fails_to_decode():
    data = encode(bands(200, 200, (RED, GREEN, BLUE)), "JPEG")
    assert_error("decode_failed", decode_image, data[: len(data) // 2], size=32)


def test_one_pixel_is_too_small():
    assert_error("too_small", decode_image, encode(Image.new("RGB", (1, 1)), "PNG"), size=32)
    assert_error("too_small", decode_image, encode(Image.new("RGB", (300, 7)), "PNG"), size=32)


def test_image_over_max_pixels_is_too_large():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    error = assert_error("too_large", decode_image, data, size=32, max_pixels=9_999)
    assert "--max_image_pixels=9,999" in error.message


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("dimensions", [(12_000, 9_000), (100_000, 100_000)])
def test_decompression_bomb_is_too_large_and_costs_nothing(dimensions):
    # 108 million pixels: over our limit, under Pillow's; 10 billion: over both.
    data = png_claiming(*dimensions)
    assert len(data) < 100
    start = time.monotonic()
    assert_error("too_large", decode_image, data, size=224)
    assert time.monotonic() - start < 0.5
