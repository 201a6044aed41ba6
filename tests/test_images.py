"""Reading and decoding images: every image here is made by the test itself.

The only network is an HTTP server on 127.0.0.1, started by the `http_root` fixture.
"""

from __future__ import annotations

import io
import pickle
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from fsspec.registry import known_implementations
from PIL import Image

from transforms import images
from transforms.images import ImageError, decode_image, read_bytes

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


# --- read_bytes --------------------------------------------------------------------------


def test_reads_local_paths_and_file_uris(tmp_path):
    path = write(tmp_path / "a.jpg", b"some bytes")
    assert read_bytes(path) == b"some bytes"
    assert read_bytes(f"file://{path}") == b"some bytes"


def test_missing_file_is_not_found(tmp_path):
    error = assert_error("not_found", read_bytes, str(tmp_path / "missing.jpg"))
    assert "missing.jpg" in error.message


def test_empty_file_is_empty(tmp_path):
    assert_error("empty", read_bytes, write(tmp_path / "empty.jpg", b""))


def test_directory_is_not_a_file(tmp_path):
    error = assert_error("not_a_file", read_bytes, str(tmp_path))
    assert "directory" in error.message


def test_file_over_max_bytes_is_too_large(tmp_path):
    error = assert_error(
        "too_large", read_bytes, write(tmp_path / "a.jpg", b"x" * 101), max_bytes=100
    )
    assert "max_bytes=100" in error.message
    assert read_bytes(write(tmp_path / "b.jpg", b"x" * 100), max_bytes=100) == b"x" * 100


def test_unknown_scheme_is_unsupported():
    error = assert_error("unsupported_scheme", read_bytes, "nosuch://x/y.jpg")
    assert "nosuch://" in error.message


def test_scheme_whose_package_is_missing_says_what_to_install(monkeypatch):
    implementation = {"class": "nosuchpkg.NoSuchFileSystem", "err": "Install nosuchpkg"}
    monkeypatch.setitem(known_implementations, "nosuchfs", implementation)
    error = assert_error("unsupported_scheme", read_bytes, "nosuchfs://bucket/y.jpg")
    assert "Install nosuchpkg" in error.message


class Handler(SimpleHTTPRequestHandler):
    """Serves a folder; /error/... answers 500; /unsized/NAME sends NAME with no length.

    HTTP/1.0, the default, so closing the connection is what ends an unsized body.
    """

    def do_HEAD(self):
        if self.path.startswith(("/error/", "/unsized/")):
            self.do_GET()
        else:
            super().do_HEAD()

    def do_GET(self):
        if self.path.startswith("/error/"):
            self.send_error(500)
        elif self.path.startswith("/unsized/"):
            self.send_response(200)
            self.end_headers()
            if self.command == "GET":
                name = self.path.split("/")[-1]
                self.send_in_two_parts((Path(self.directory) / name).read_bytes())
            self.close_connection = True
        else:
            super().do_GET()

    def send_in_two_parts(self, data: bytes):
        """With a pause between, so the client's first read likely gets only the first."""
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        time.sleep(0.05)
        self.wfile.write(data[len(data) // 2 :])

    def log_message(self, *args):  # keep pytest's output to the tests
        pass


@pytest.fixture
def http_root(tmp_path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder it serves), from a server on 127.0.0.1 in a thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()
    server.server_close()


def test_reads_http(http_root):
    url, root = http_root
    data = encode(Image.new("RGB", (16, 16)), "PNG")
    write(root / "a.png", data)
    assert read_bytes(f"{url}/a.png") == data


def test_reads_http_without_a_length_and_still_caps_it(http_root):
    url, root = http_root
    data = bytes(range(256)) * 400
    write(root / "big.bin", data)
    assert read_bytes(f"{url}/unsized/big.bin") == data
    assert_error("too_large", read_bytes, f"{url}/unsized/big.bin", max_bytes=1000)


def test_http_404_is_not_found(http_root):
    url, _ = http_root
    assert_error("not_found", read_bytes, f"{url}/missing.jpg")


def test_http_500_is_fetch_failed(http_root):
    url, _ = http_root
    error = assert_error("fetch_failed", read_bytes, f"{url}/error/a.jpg")
    assert "500" in error.message


def test_unreachable_http_fails_fast():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    start = time.monotonic()
    error = assert_error("fetch_failed", read_bytes, f"http://127.0.0.1:{port}/a.jpg")
    assert time.monotonic() - start < 5
    assert "127.0.0.1" in error.message


def test_silent_http_server_times_out(monkeypatch):
    monkeypatch.setattr(images, "HTTP_TIMEOUT_S", 0.2)
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.monotonic()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/a.jpg"
        error = assert_error("fetch_failed", read_bytes, url)
    assert time.monotonic() - start < 5
    assert "timed out" in error.message


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
    assert "max_pixels=9,999" in error.message


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("dimensions", [(12_000, 9_000), (100_000, 100_000)])
def test_decompression_bomb_is_too_large_and_costs_nothing(dimensions):
    # 108 million pixels: over our limit, under Pillow's; 10 billion: over both.
    data = png_claiming(*dimensions)
    assert len(data) < 100
    start = time.monotonic()
    assert_error("too_large", decode_image, data, size=224)
    assert time.monotonic() - start < 0.5
