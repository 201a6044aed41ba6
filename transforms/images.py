"""Model-ready arrays from image bytes, the error every unusable image raises, and JPEG
bytes from arrays (the pictures of a heatmap).

Every way one image can be unusable raises `ImageError` with a short `kind`, so the
pipeline can turn it into an error row and count it, instead of failing the run. Reading
the bytes (transforms/fetch.py) has its kinds; decoding adds:

    too_large           more than --max_image_pixels (decompression bombs)
    not_an_image        bytes that are not an image in one of ACCEPTED_FORMATS
    decode_failed       a truncated or corrupt image
    too_small           under MIN_SIDE pixels on a side: a prediction would be meaningless
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Large scans are legitimate (8000 x 12000 is 96 million pixels), decompression bombs are
# not: a few kilobytes of PNG can declare billions of pixels, and decoding them would take
# gigabytes. Pillow's own guard stops at 2 x Image.MAX_IMAGE_PIXELS (~179 million) whatever
# this says, so raising max_pixels above that also needs that global raised by the caller.
DEFAULT_MAX_PIXELS = 100_000_000

# A few pixels say nothing about a painting's style, however they are upsampled.
MIN_SIDE = 8

# The formats paintings come in. Pillow can open dozens more, but each decoder is attack
# surface for untrusted input (and EPS would run Ghostscript), so the rest are refused.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "JPEG2000", "AVIF")

# What Pillow raises for corrupt or truncated data; anything else would be a bug here.
# TypeError comes from TIFF tags of the wrong type, read only when decoding; RuntimeError
# from the AVIF decoder ("Failed to decode frame 0: ...").
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, TypeError, RuntimeError)

# Downscale in at most 3x bicubic steps after a fast integer reduction: Pillow documents
# the result as indistinguishable from a full bicubic resize, at a fraction of the cost.
_REDUCING_GAP = 3.0

# Threads that decode beside the model, in the pipeline and in the service: Pillow releases
# the GIL while it decodes. Two: decoding is a small share of the work, and the model wants
# the cores.
DECODE_THREADS = 2

JPEG_QUALITY = 88  # the pictures of heatmaps, in the report and the service's answers


class ImageError(Exception):
    """A problem with one input image: becomes an error row, never stops the run."""

    def __init__(self, kind: str, message: str):
        # Both go to Exception, so the error survives pickling between Beam workers.
        super().__init__(kind, message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


# --- Decoding pixels ---------------------------------------------------------------------


def decode_image(data: bytes, *, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A (size, size, 3) uint8 RGB array: the shorter side scaled to `size`, centre-cropped.

    Sizes are checked from the header, before any pixel is decoded, so a decompression
    bomb costs nothing. EXIF orientation is applied, so a photo taken sideways is upright.
    """
    with _decode_errors():
        image = _open(data)
    _check_dimensions(*image.size, max_pixels=max_pixels)
    # JPEGs only: libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below `size`, which
    # turns a 30-megapixel scan into a fraction of the work. Other formats ignore it.
    image.draft("RGB", (size, size))
    with _decode_errors():
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        rgb = _to_rgb(image)
    return np.array(_centre_square(rgb, size))


def _open(data: bytes) -> Image.Image:
    """The image with only its header read."""
    try:
        with warnings.catch_warnings():
            # max_pixels is the limit, checked next: Pillow's warning above its own, lower
            # MAX_IMAGE_PIXELS would only repeat it, or, made an error by -W, overrule it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as error:
        # The first bytes tell an HTML error page or a Git LFS pointer at a glance.
        message = f"not a {'/'.join(ACCEPTED_FORMATS)} image; it starts {data[:24]!r}"
        raise ImageError("not_an_image", message) from error


def _check_dimensions(width: int, height: int, *, max_pixels: int) -> None:
    if width * height > max_pixels:
        pixels = f"{width}x{height} is {width * height:,} pixels"
        raise ImageError("too_large", f"{pixels}, {over_the_cap(max_pixels, 'pixels')}")
    if min(width, height) < MIN_SIDE:
        raise ImageError("too_small", f"{width}x{height} pixels, under {MIN_SIDE} on a side")


@contextmanager
def _decode_errors() -> Iterator[None]:
    """Pillow's exceptions for bad data, as ImageErrors."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow's own guard (see DEFAULT_MAX_PIXELS), or its warning made an error by -W.
        raise ImageError("too_large", str(error)) from error
    except _DECODE_ERRORS as error:
        raise ImageError("decode_failed", describe(error)) from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode as 8-bit RGB, transparent areas shown on white, as on a gallery wall."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8_bits(image)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8_bits(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale scaled to 0..255 ("L").

    Pillow's own conversion clips at 255, which turns a 16-bit scan almost white. 16-bit
    modes are scaled from their full 0..65535 range, which keeps dark paintings dark; 32-bit
    and float data have no such range (float may be 0..1 or 0..4000), so their own minimum
    and maximum become black and white. Those are of the finite values: NaN (no data) is
    black, and infinities are black or white.
    """
    values = np.asarray(image, dtype=np.float32)
    if image.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    else:
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    scale = 255.0 / (high - low) if high > low else 0.0
    # A range wider than float32's overflows to infinity, which the clip makes white.
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.clip(np.rint((values - low) * scale), 0, 255)
    return Image.fromarray(np.nan_to_num(scaled, nan=0.0).astype(np.uint8), "L")


def _centre_square(image: Image.Image, size: int) -> Image.Image:
    """The centred square of the image, resized to size x size.

    The square starts on a whole pixel, and an image whose shorter side is already `size`
    is only cropped: Pillow skips resampling only when the box is the whole image, and
    otherwise runs its bicubic filter at scale 1, a cost that changes no pixel. ImageOps.fit
    does the same otherwise, but without `reducing_gap`, which is several times slower on a
    large PNG or TIFF (JPEGs were already reduced by `draft`).
    """
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    if side == size:
        return image.crop(box)
    return image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=_REDUCING_GAP)


# --- Encoding pixels ---------------------------------------------------------------------


def jpeg(pixels: np.ndarray) -> bytes:
    """An RGB uint8 array as a JPEG file's bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# --- Messages ----------------------------------------------------------------------------


def brief(uri: str, limit: int = 120) -> str:
    """The URI, shortened in the middle: signed URLs can run to kilobytes."""
    if len(uri) <= limit:
        return uri
    keep = (limit - 3) // 2
    return f"{uri[:keep]}...{uri[-keep:]}"


def describe(error: BaseException) -> str:
    """The exception's type and the first line of its message, kept short."""
    first_line = str(error).strip().split("\n", 1)[0]
    text = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
    return text[:200]


def over_the_cap(maximum: int, unit: str = "bytes") -> str:
    """Names the flag that sets the cap, so the message says what to change."""
    return f"more than --max_image_{unit}={maximum:,}"
