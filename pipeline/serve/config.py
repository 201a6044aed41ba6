"""The service's settings, from `python -m pipeline.serve`'s flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from models.bundle import DEFAULT_BUNDLE
from models.precision import PRECISIONS
from pipeline.cli import called_as
from pipeline.flags import number, whole_number
from transforms.images import DEFAULT_MAX_PIXELS

SERVE_ABOUT = "Serves the art style of paintings over HTTP: an API, metrics and a page."


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    model: str = DEFAULT_BUNDLE
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 10.0
    top_k: int = 5
    # Images in the queue at once, from when their bytes are in hand until their answer,
    # and, apart, as many URLs being fetched. What waits on a client or a host holds no
    # place in the queue: a body still arriving holds only its bytes (all bodies at most
    # max_body_bytes_held), a URL being fetched a place of its own.
    max_queue: int = 64
    # Larger uploads are refused (413) and larger fetched images are error answers (422).
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    # The deadline for reading a request's body, and for fetching a URL: then 408 or 504.
    fetch_timeout_s: float = 15.0
    precision: str = "auto"
    # Grad-CAM for ?heatmap=true: a second, float32 copy of the backbones in memory.
    heatmaps: bool = True
    allow_private_urls: bool = False
    access_log: bool = False

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000

    @property
    def max_body_bytes_held(self) -> int:
        """Request bodies in memory at once: as many as the queue holds, each at the cap."""
        return self.max_queue * self.max_image_bytes


def parse_config(argv: list[str] | None = None) -> ServeConfig:
    """The flags, each value checked by its argparse type; --help lists them."""
    defaults = ServeConfig()
    parser = argparse.ArgumentParser(prog=called_as("pipeline.serve"), description=SERVE_ABOUT)
    parser.add_argument("--model", default=defaults.model, help="A model bundle folder.")
    parser.add_argument("--host", default=defaults.host, help="The address to listen on.")
    parser.add_argument("--port", type=whole_number(0), default=defaults.port)
    parser.add_argument(
        "--max_batch",
        type=whole_number(1),
        default=defaults.max_batch,
        help="The most images per model call.",
    )
    parser.add_argument(
        "--max_wait_ms",
        type=number(0),
        default=defaults.max_wait_ms,
        help="How long a batch waits for more images once it has one.",
    )
    parser.add_argument(
        "--top_k", type=whole_number(1), default=defaults.top_k, help="Styles listed per image."
    )
    parser.add_argument(
        "--max_queue",
        type=whole_number(1),
        default=defaults.max_queue,
        help="Images in the service at once, from when their bytes are in hand until their "
        "answer, and apart, URLs being fetched at once; past either, 503 with Retry-After. "
        "Request bodies in memory are bounded at this many times --max_image_bytes.",
    )
    parser.add_argument(
        "--max_image_bytes",
        type=whole_number(1),
        default=defaults.max_image_bytes,
        help="The largest request body (413 past it) and the largest image fetched.",
    )
    parser.add_argument(
        "--max_image_pixels",
        type=whole_number(1),
        default=defaults.max_image_pixels,
        help="Larger images are refused (decompression-bomb guard).",
    )
    parser.add_argument(
        "--fetch_timeout_s",
        type=number(0, above=True),
        default=defaults.fetch_timeout_s,
        help="Deadline for a URL's image (504 past it) and for reading a request's body.",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=defaults.precision,
        help="The backbone's arithmetic, as the pipeline's flag.",
    )
    parser.add_argument(
        "--no_heatmaps",
        dest="heatmaps",
        action="store_false",
        help="Do not load Grad-CAM (a float32 copy of the backbones): less memory and a "
        "quicker start; /predict?heatmap=true then answers without a heatmap.",
    )
    parser.add_argument(
        "--allow_private_urls",
        action="store_true",
        help="Fetch URLs whose host is loopback, private, link-local or reserved too (tests, "
        "intranets). Without it such URLs are refused (403).",
    )
    parser.add_argument("--access_log", action="store_true", help="Log every request.")
    return ServeConfig(**vars(parser.parse_args(argv)))
