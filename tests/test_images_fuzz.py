"""decode_image under fuzzing: whatever the bytes, a model-ready array or an ImageError,
within a time and a memory bound.

The seeds are small images made here, in each accepted format and in the modes paintings
come in; hypothesis mutates them (bit flips, truncations, inserted and deleted runs, the
header's width and height set to extremes) or writes random bytes, with or without a
format's signature in front. The default run is short and derandomized, so it is the same
every time; `-m slow` runs thousands of examples.
"""

from __future__ import annotations

import io
import re
import struct
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from transforms import images
from transforms.images import ImageError, decode_image

# The kinds decode_image may raise; the others belong to reading bytes.
DECODE_KINDS = {"too_large", "not_an_image", "decode_failed", "too_small"}

# The pixel cap under test: small, so that the memory bound below says something.
MAX_PIXELS = 2**22

# A call decodes one small image in milliseconds; the bound leaves room for a loaded machine.
TIME_LIMIT_S = 2.0

# How far one call's peak resident memory may rise above where it started: 4 MP of 4-byte
# pixels is 16 MiB a copy, so a handful of copies, never the gigabytes a forged header asks.
MEMORY_LIMIT_BYTES = 256 * 2**20

# Linux keeps the process's peak resident memory (VmHWM), and resets it on request.
PROCESS = Path("/proc/self")

# Repeatable: the same examples every run, wherever it runs. Hundreds of examples in the
# default suite, thousands under -m slow.
REPEATABLE = settings(
    derandomize=True,
    database=None,
    deadline=None,  # timed per call below, where the limit is an assertion of its own
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SIZES = st.sampled_from([8, 33, 224])


# --- Seeds -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    """A valid image file, and where its header stores the width and height."""

    data: bytes
    dimension_fields: tuple[tuple[int, int, str], ...]  # (offset, bytes, byte order)


# Odd sizes, so that their encodings seldom occur by chance elsewhere in a file.
WIDTH, HEIGHT = 53, 37


def picture(mode: str, width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> Image.Image:
    """A gradient with noise in `mode`: compressible, yet every codec has work to do."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(height) * 3, np.arange(width) * 2)
    rgba = np.stack([ramp, ramp[::-1], ramp[:, ::-1], 255 - ramp], axis=-1) % 256
    noisy = np.clip(rgba + rng.normal(0, 12, rgba.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(noisy, "RGBA")
    if mode == "I;16":
        return Image.fromarray(noisy[..., 0].astype(np.uint16) * 257)
    if mode == "F":
        return Image.fromarray(noisy[..., 0].astype(np.float32) * 15.7)
    if mode == "P":
        return image.convert("RGB").quantize(16)
    return image.convert(mode)


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_rgb48() -> bytes:
    """A 16-bit-per-channel RGB PNG, as scanners write: Pillow can read, not write, one."""
    pixels = np.asarray(picture("RGB"), np.uint16) * 257
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", WIDTH, HEIGHT, 16, 2, 0, 0, 0)
    chunks = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
    return PNG_SIGNATURE + chunks + png_chunk(b"IEND", b"")


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header claims width x height, and whose pixels are missing."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00"))
    return PNG_SIGNATURE + chunks + png_chunk(b"IEND", b"")


def frames(mode: str) -> list[Image.Image]:
    return [picture(mode, seed=seed) for seed in range(3)]


def rotated_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: shown rotated 90 degrees clockwise
    return exif


def seed_files() -> dict[str, bytes]:
    rgb = picture("RGB")
    return {
        "jpeg_rgb": encode(rgb, "JPEG", quality=80),
        "jpeg_l": encode(picture("L"), "JPEG"),
        "jpeg_cmyk": encode(picture("CMYK"), "JPEG"),
        "jpeg_progressive": encode(rgb, "JPEG", progressive=True),
        "jpeg_exif_rotated": encode(rgb, "JPEG", exif=rotated_exif()),
        "png_rgb": encode(rgb, "PNG"),
        "png_l": encode(picture("L"), "PNG"),
        "png_rgba": encode(picture("RGBA"), "PNG"),
        "png_p_transparent": encode(picture("P"), "PNG", transparency=0),
        "png_16bit_grey": encode(picture("I;16"), "PNG"),
        "png_16bit_rgb": png_rgb48(),
        "png_animated": encode(rgb, "PNG", save_all=True, append_images=frames("RGB")),
        "webp_lossy": encode(rgb, "WEBP", quality=70),
        "webp_lossless_rgba": encode(picture("RGBA"), "WEBP", lossless=True),
        "webp_animated": encode(rgb, "WEBP", save_all=True, append_images=frames("RGB")),
        "tiff_rgb": encode(rgb, "TIFF"),
        "tiff_l_deflate": encode(picture("L"), "TIFF", compression="tiff_adobe_deflate"),
        "tiff_cmyk_lzw": encode(picture("CMYK"), "TIFF", compression="tiff_lzw"),
        "tiff_rgba_packbits": encode(picture("RGBA"), "TIFF", compression="packbits"),
        "tiff_16bit_grey": encode(picture("I;16"), "TIFF"),
        "tiff_float": encode(picture("F"), "TIFF"),
        "tiff_pages": encode(rgb, "TIFF", save_all=True, append_images=frames("RGB")),
        "gif": encode(picture("P"), "GIF"),
        "gif_animated_transparent": encode(
            picture("P"), "GIF", save_all=True, append_images=frames("P"), transparency=0
        ),
        "bmp_rgb": encode(rgb, "BMP"),
        "bmp_p": encode(picture("P"), "BMP"),
        "jpeg2000": encode(rgb, "JPEG2000"),
        "jpeg2000_codestream": encode(rgb, "JPEG2000", no_jp2=True),
        "avif": encode(rgb, "AVIF", quality=60),
    }


# How each format stores WIDTH and HEIGHT: bytes a field, byte order, and the two values.
DIMENSION_LAYOUTS = {
    "png": [(4, "big", WIDTH, HEIGHT)],  # IHDR, and APNG's fcTL for each frame
    "jpeg": [(2, "big", HEIGHT, WIDTH)],  # SOFn
    "gif": [(2, "little", WIDTH, HEIGHT)],  # the screen, and each frame
    "bmp": [(4, "little", WIDTH, HEIGHT)],
    "webp": [
        (2, "little", WIDTH, HEIGHT),  # VP8's frame header (lossless VP8L packs 14 bits)
        (3, "little", WIDTH - 1, HEIGHT - 1),  # VP8X's canvas, and ANMF's frames
    ],
    "jpeg2000": [(4, "big", WIDTH, HEIGHT), (4, "big", HEIGHT, WIDTH)],  # SIZ; the ihdr box
    "avif": [(4, "big", WIDTH, HEIGHT)],  # ispe
    "tiff": [],  # not side by side: see tiff_dimension_fields
}


def dimension_fields(format: str, data: bytes) -> tuple[tuple[int, int, str], ...]:
    """Where `data` stores WIDTH and HEIGHT: (offset, bytes, byte order) of each field."""
    fields = list(tiff_dimension_fields(data)) if format == "tiff" else []
    for size, order, first, second in DIMENSION_LAYOUTS[format]:
        pattern = first.to_bytes(size, order) + second.to_bytes(size, order)
        for start in occurrences(pattern, data):
            fields += [(start, size, order), (start + size, size, order)]
    return tuple(fields)


def tiff_dimension_fields(data: bytes) -> Iterator[tuple[int, int, str]]:
    """The values of TIFF's ImageWidth and ImageLength entries, SHORT or LONG."""
    for tag, value in ((256, WIDTH), (257, HEIGHT)):
        for type_, size in ((3, 2), (4, 4)):
            for order in ("little", "big"):
                entry = b"".join(n.to_bytes(k, order) for n, k in ((tag, 2), (type_, 2), (1, 4)))
                for start in occurrences(entry + value.to_bytes(size, order), data):
                    yield start + 8, size, order


def occurrences(pattern: bytes, data: bytes) -> Iterator[int]:
    start = data.find(pattern)
    while start >= 0:
        yield start
        start = data.find(pattern, start + 1)


SEEDS = {
    name: Seed(data, dimension_fields(name.split("_")[0], data))
    for name, data in seed_files().items()
}

SIGNATURES = [
    b"\xff\xd8\xff\xe0",
    PNG_SIGNATURE,
    b"GIF89a",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x00\x10\x00\x00WEBPVP8 ",
    b"BM",
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",
    b"\xff\x4f\xff\x51",
    b"\x00\x00\x00\x1cftypavif",
]


# --- Mutations ---------------------------------------------------------------------------

# Values that break parsers: zero, just under and over MIN_SIDE, each field's maximum, and
# sizes whose products overflow 32 bits.
EXTREMES = st.sampled_from([0, 1, 7, 8, 9, 2**14 - 1, 2**15, 2**16 - 1, 2**24 - 1, 2**31 - 1])
DIMENSIONS = EXTREMES | st.integers(0, 2**32 - 1)

# Padding, fill and the markers' 0xFF, repeated: what a broken writer leaves behind.
RUNS_OF_ONE_BYTE = st.builds(
    lambda byte, count: bytes([byte]) * count, st.integers(0, 255), st.integers(1, 1024)
)


def flip(draw: st.DrawFn, data: bytearray, seed: Seed) -> bytearray:
    position = draw(st.integers(0, len(data) - 1))
    data[position] ^= 1 << draw(st.integers(0, 7))
    return data


def overwrite(draw: st.DrawFn, data: bytearray, seed: Seed) -> bytearray:
    position = draw(st.integers(0, len(data) - 1))
    data[position] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]) | st.integers(0, 255))
    return data


def truncate(draw: st.DrawFn, data: bytearray, seed: Seed) -> bytearray:
    return data[: draw(st.integers(1, len(data)))]


def insert(draw: st.DrawFn, data: bytearray, seed: Seed) -> bytearray:
    position = draw(st.integers(0, len(data)))
    run = draw(st.binary(min_size=1, max_size=64) | RUNS_OF_ONE_BYTE)
    return data[:position] + run + data[position:]


def delete(draw: st.DrawFn, data: bytearray, seed: Seed) -> bytearray:
    position = draw(st.integers(0, len(data) - 1))
    return data[:position] + data[position + draw(st.integers(1, 256)) :]


def set_dimension(draw: st.DrawFn, data: bytearray, seed: Seed) -> bytearray:
    if not seed.dimension_fields:
        return flip(draw, data, seed)
    offset, size, order = draw(st.sampled_from(seed.dimension_fields))
    value = draw(DIMENSIONS) % 2 ** (8 * size)
    data[offset : offset + size] = value.to_bytes(size, order)
    return data


MUTATIONS = [flip, overwrite, truncate, insert, delete, set_dimension]


def with_png_checksums(data: bytearray) -> bytearray:
    """A PNG's CRCs recomputed, so that mutations get past the check to the parser; other
    formats as they are."""
    if not data.startswith(PNG_SIGNATURE):
        return data
    position = len(PNG_SIGNATURE)
    while position + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, position)
        end = position + 8 + length
        if end + 4 > len(data):
            break
        data[end : end + 4] = struct.pack(">I", zlib.crc32(data[position + 4 : end]))
        position = end + 4
    return data


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    seed = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
    data = bytearray(seed.data)
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=4)):
        if data:
            data = mutation(draw, data, seed)
    if draw(st.booleans()):
        data = with_png_checksums(data)
    return bytes(data)


RANDOM_BYTES = st.binary(max_size=4096) | st.builds(
    bytes.__add__, st.sampled_from(SIGNATURES), st.binary(max_size=4096)
)


# --- The property ------------------------------------------------------------------------


def reset_peak_memory() -> int:
    """The resident memory now, from which the peak starts again."""
    (PROCESS / "clear_refs").write_text("5")
    return peak_memory()


def peak_memory() -> int:
    status = (PROCESS / "status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) * 1024


def assert_decodes_or_refuses(data: bytes, size: int) -> None:
    """An array of the promised shape, or an ImageError of a decoding kind in one line;
    quickly, without raising the peak memory by more than the bound, and without warnings
    of its own or Pillow's decompression bomb warning (max_pixels is the limit)."""
    memory_before = reset_peak_memory()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            array = decode_image(data, size=size, max_pixels=MAX_PIXELS)
        except ImageError as error:
            assert error.kind in DECODE_KINDS, str(error)
            assert error.message and "\n" not in str(error), repr(error.message)
        else:
            assert isinstance(array, np.ndarray)
            assert array.shape == (size, size, 3) and array.dtype == np.uint8
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_LIMIT_S, f"{elapsed:.2f} s for {len(data)} bytes"
    growth = peak_memory() - memory_before
    assert growth < MEMORY_LIMIT_BYTES, f"peak memory rose {growth / 2**20:.0f} MiB"
    unwanted = [
        warning
        for warning in caught
        if issubclass(warning.category, Image.DecompressionBombWarning)
        or warning.filename == images.__file__
    ]
    assert not unwanted, str(unwanted[0].message)


# --- The seeds themselves ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_decodes(name):
    array = decode_image(SEEDS[name].data, size=33, max_pixels=MAX_PIXELS)
    assert array.shape == (33, 33, 3) and array.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(set(SEEDS) - {"webp_lossless_rgba"}))
def test_each_seeds_dimension_fields_are_the_ones_decoding_reads(name):
    """Set to 3000 x 3000, they are refused by max_pixels. (Lossless WebP's are bit-packed.)"""
    seed = SEEDS[name]
    data = bytearray(seed.data)
    for offset, size, order in seed.dimension_fields:
        stored = 3000 - 1 if size == 3 else 3000  # WebP's 24-bit fields store the size - 1
        data[offset : offset + size] = stored.to_bytes(size, order)
    with pytest.raises(ImageError) as caught:
        decode_image(bytes(with_png_checksums(data)), size=33, max_pixels=MAX_PIXELS)
    assert str(caught.value).startswith("too_large: 3000x3000"), caught.value


# --- Fuzzing -----------------------------------------------------------------------------


@settings(REPEATABLE, max_examples=50)
@given(data=RANDOM_BYTES, size=SIZES)
def test_random_bytes_decode_or_are_refused(data, size):
    assert_decodes_or_refuses(data, size)


@settings(REPEATABLE, max_examples=150)
@given(data=mutated_images(), size=SIZES)
def test_mutated_images_decode_or_are_refused(data, size):
    assert_decodes_or_refuses(data, size)


@pytest.mark.slow
@settings(REPEATABLE, max_examples=2500)
@given(data=RANDOM_BYTES, size=SIZES)
def test_random_bytes_decode_or_are_refused_at_length(data, size):
    assert_decodes_or_refuses(data, size)


@pytest.mark.slow
@settings(REPEATABLE, max_examples=5000)
@given(data=mutated_images(), size=SIZES)
def test_mutated_images_decode_or_are_refused_at_length(data, size):
    assert_decodes_or_refuses(data, size)


# --- What fuzzing found ------------------------------------------------------------------


def test_avif_whose_pixels_are_corrupt_fails_to_decode():
    """The AVIF decoder raises RuntimeError for corrupt data, where others raise OSError."""
    data = SEEDS["avif"].data
    pixels_start = data.find(b"mdat") + 4
    corrupt = data[:pixels_start] + bytes(len(data) - pixels_start)
    with pytest.raises(ImageError) as caught:
        decode_image(corrupt, size=33)
    assert caught.value.kind == "decode_failed"
    assert "RuntimeError" in caught.value.message


def test_tiff_whose_strip_offsets_are_fractions_fails_to_decode():
    """Pillow reads that tag only when decoding, and then raises TypeError."""
    data = bytearray(SEEDS["tiff_rgb"].data)
    strip_offsets = data.find(struct.pack("<HH", 273, 4))  # StripOffsets, of type LONG
    data[strip_offsets + 2] = 5  # RATIONAL
    with pytest.raises(ImageError) as caught:
        decode_image(bytes(data), size=33)
    assert caught.value.kind == "decode_failed"
    assert "TypeError" in caught.value.message


def test_float_image_with_nan_infinities_and_a_huge_range_spans_its_finite_values():
    """NaN black, infinities black and white; a range past float32's still reaches white."""
    values = np.linspace(-1e38, 3e38, 64 * 64, dtype=np.float32).reshape(64, 64)
    values[0], values[1], values[2] = np.nan, np.inf, -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's warnings for NaN and overflow fail the test
        array = decode_image(encode(Image.fromarray(values), "TIFF"), size=64)[..., 0]
    assert (array[0] == 0).all() and (array[1] == 255).all() and (array[2] == 0).all()
    assert array[3:].min() <= 5 and array[3:].max() >= 250


# --- Pillow's own decompression bomb guard -----------------------------------------------


def test_image_that_max_pixels_allows_raises_no_decompression_bomb_warning():
    """90 million pixels: over Pillow's warning threshold, under DEFAULT_MAX_PIXELS."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        with pytest.raises(ImageError) as caught:
            decode_image(png_claiming(10_000, 9_000), size=224)
    assert caught.value.kind == "decode_failed", caught.value  # the header lies: no pixels


def test_pillows_decompression_bomb_error_is_too_large():
    """With max_pixels raised past Pillow's own limit, Pillow's refusal is still an ImageError."""
    with pytest.raises(ImageError) as caught:
        decode_image(png_claiming(15_000, 15_000), size=224, max_pixels=10**9)
    assert caught.value.kind == "too_large"
    assert "decompression bomb" in caught.value.message
