"""Image bytes from any URI, and model-ready arrays from image bytes.

Every way one image can be unusable raises `ImageError` with a short `kind`, so the
pipeline can turn it into an error row and count it, instead of failing the run:

    not_found           nothing at the URI (missing file or object, HTTP 404)
    not_a_file          the URI names a directory
    unsupported_scheme  no fsspec filesystem for the URI's scheme, or its package is missing
    fetch_failed        network, DNS, timeout, permission or other HTTP/storage errors
    too_large           more than max_bytes, or more than max_pixels (decompression bombs)
    empty               0 bytes
    not_an_image        bytes that are not an image in one of ACCEPTED_FORMATS
    decode_failed       a truncated or corrupt image
    too_small           under MIN_SIDE pixels on a side: a prediction would be meaningless
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import fsspec
import numpy as np
from fsspec.core import url_to_fs
from fsspec.utils import get_protocol
from PIL import Image, ImageOps, UnidentifiedImageError

# Whole museum scans run to tens of megabytes; anything beyond this is more likely a
# mistake (a video, an archive) than a painting, and would hold a worker's memory hostage.
DEFAULT_MAX_BYTES = 64 * 2**20

# Large scans are legitimate (8000 x 12000 is 96 million pixels), decompression bombs are
# not: a few kilobytes of PNG can declare billions of pixels, and decoding them would take
# gigabytes. Pillow's own guard stops at 2 x Image.MAX_IMAGE_PIXELS (~179 million) whatever
# this says, so raising max_pixels above that also needs that global raised by the caller.
DEFAULT_MAX_PIXELS = 100_000_000

# A few pixels say nothing about a painting's style, however they are upsampled.
MIN_SIDE = 8

# Connecting, and every wait for the next bytes, give up after this long; a whole download
# is not capped, so a large scan over a slow link still arrives. fsspec tries HEAD, then
# GET, before it gives up on a URL, so an unreachable host fails within twice this.
HTTP_TIMEOUT_S = 10.0

# The formats paintings come in. Pillow can open dozens more, but each decoder is attack
# surface for untrusted input (and EPS would run Ghostscript), so the rest are refused.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "JPEG2000", "AVIF")

# What Pillow raises for corrupt or truncated data; anything else would be a bug here.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)

# Downscale in at most 3x bicubic steps after a fast integer reduction: Pillow documents
# the result as indistinguishable from a full bicubic resize, at a fraction of the cost.
_REDUCING_GAP = 3.0


class ImageError(Exception):
    """A problem with one input image: becomes an error row, never stops the run."""

    def __init__(self, kind: str, message: str):
        # Both go to Exception, so the error survives pickling between Beam workers.
        super().__init__(kind, message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


# --- Reading bytes -----------------------------------------------------------------------


def read_bytes(uri: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes at `uri` (a local path, file://, gs://, s3://, http(s)://, ...).

    The size is checked before reading where the filesystem knows it, and the read itself
    stops one byte past `max_bytes`, so a server that misreports sizes cannot flood memory.
    """
    fs, path = _filesystem(uri)
    with _fetch_errors(uri):
        info = fs.info(path)
    size = _check_info(info, uri, max_bytes)
    # One byte past what is expected shows a file that grew, or a server that said too
    # little; asking for max_bytes + 1 of a small file would allocate all of that first.
    limit = max_bytes + 1 if size is None else min(size, max_bytes) + 1
    with _fetch_errors(uri), fs.open(path, "rb") as file:
        data = _read_at_most(file, limit)
    if len(data) > max_bytes:
        raise ImageError("too_large", f"{_brief(uri)} is {_limit(max_bytes)}")
    if not data:
        raise ImageError("empty", f"{_brief(uri)} is empty (0 bytes)")
    return data


def _check_info(info: dict[str, Any], uri: str, max_bytes: int) -> int | None:
    """What the filesystem knows before reading: that it is a directory, or too large.
    Returns the size it says the file has, if it says."""
    if info["type"] != "file":
        raise ImageError("not_a_file", f"{_brief(uri)} is a {info['type']}, not an image file")
    size = info.get("size")  # None: an HTTP server that does not say
    if size is not None and size > max_bytes:
        raise ImageError("too_large", f"{_brief(uri)} is {size:,} bytes, {_limit(max_bytes)}")
    return size


def _filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri`'s scheme, and the path within it."""
    protocol = get_protocol(uri)
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as error:  # fsspec's message names the package, e.g. "Install s3fs"
        message = f"{protocol}:// needs a package that is not installed: {error}"
        raise ImageError("unsupported_scheme", message) from error
    except ValueError as error:  # "Protocol not known"
        message = f"no filesystem reads {protocol}:// URIs ({_brief(uri)})"
        raise ImageError("unsupported_scheme", message) from error
    with _fetch_errors(uri):
        return url_to_fs(uri, **_storage_options(protocol))


def _storage_options(protocol: str) -> dict[str, Any]:
    """Bounded HTTP timeouts: aiohttp's default waits 5 minutes for an unreachable host."""
    if protocol not in ("http", "https"):
        return {}
    timeout = aiohttp.ClientTimeout(connect=HTTP_TIMEOUT_S, sock_read=HTTP_TIMEOUT_S)
    return {"client_kwargs": {"timeout": timeout}}


def _read_at_most(file: Any, limit: int) -> bytes:
    """Up to `limit` bytes: HTTP streams without a known length return short reads."""
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0 and (chunk := file.read(remaining)):
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


@contextmanager
def _fetch_errors(uri: str) -> Iterator[None]:
    """Turns whatever a filesystem raises into an ImageError naming `uri`.

    Each filesystem raises its own types (aiohttp's, gcsfs's HttpError, botocore's), and
    any of them, while fetching one image, means that image could not be fetched.
    """
    try:
        yield
    except Exception as error:
        raise _fetch_error(error, uri) from error


def _fetch_error(error: BaseException, uri: str) -> ImageError:
    cause = error.__cause__
    from_http = isinstance(cause, (aiohttp.ClientError, TimeoutError))
    if isinstance(error, FileNotFoundError) and from_http:
        # fsspec's HTTP filesystem reports every failed request as FileNotFoundError,
        # even a refused connection or an HTTP 500; its cause tells which it was.
        return _fetch_error(cause, uri)
    status = error.status if isinstance(error, aiohttp.ClientResponseError) else None
    if isinstance(error, FileNotFoundError) or status == 404:
        return ImageError("not_found", f"{_brief(uri)} does not exist")
    if isinstance(error, IsADirectoryError):
        return ImageError("not_a_file", f"{_brief(uri)} is a directory, not an image file")
    if isinstance(error, PermissionError):
        reason = "permission denied"
    elif isinstance(error, TimeoutError):
        reason = f"timed out (no answer within {HTTP_TIMEOUT_S:g} s)"
    elif isinstance(error, aiohttp.ClientResponseError):
        reason = f"HTTP {error.status} {error.message}"
    else:
        reason = _describe(error)
    return ImageError("fetch_failed", f"could not read {_brief(uri)}: {reason}")


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
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as error:
        # The first bytes tell an HTML error page or a Git LFS pointer at a glance.
        message = f"not a {'/'.join(ACCEPTED_FORMATS)} image; it starts {data[:24]!r}"
        raise ImageError("not_an_image", message) from error


def _check_dimensions(width: int, height: int, *, max_pixels: int) -> None:
    if width * height > max_pixels:
        message = f"{width}x{height} is {width * height:,} pixels, {_limit(max_pixels, 'pixels')}"
        raise ImageError("too_large", message)
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
        raise ImageError("decode_failed", _describe(error)) from error


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
    and maximum become black and white.
    """
    values = np.asarray(image, dtype=np.float32)
    if image.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    else:
        low, high = float(values.min()), float(values.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    return Image.fromarray(np.rint((values - low) * scale).astype(np.uint8), "L")


def _centre_square(image: Image.Image, size: int) -> Image.Image:
    """The centred square of the image, resized to size x size.

    The square starts on a whole pixel, and an image whose shorter side is already `size`
    is only cropped: Pillow skips resampling only when the box is the whole image, and
    otherwise runs its bicubic filter at scale 1, a cost that changes no pixel. ImageOps.fit
    does the same otherwise, but without `reducing_gap`, which is 5x slower on a large PNG
    or TIFF (JPEGs were already reduced by `draft`).
    """
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    if side == size:
        return image.crop(box)
    return image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=_REDUCING_GAP)


# --- Messages ----------------------------------------------------------------------------


def _brief(uri: str, limit: int = 120) -> str:
    """The URI, shortened in the middle: signed URLs can run to kilobytes."""
    if len(uri) <= limit:
        return uri
    keep = (limit - 3) // 2
    return f"{uri[:keep]}...{uri[-keep:]}"


def _describe(error: BaseException) -> str:
    """The exception's type and the first line of its message, kept short."""
    first_line = str(error).strip().split("\n", 1)[0]
    text = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
    return text[:200]


def _limit(maximum: int, unit: str = "bytes") -> str:
    return f"more than max_{unit}={maximum:,}"
