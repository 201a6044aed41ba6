"""The service's settings, from `python -m pipeline.serve`'s flags: the flags it shares with
the pipeline come from the pipeline's groups (pipeline/flags.py), declared there once."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from models.settings import DEFAULT_BUNDLE
from pipeline import flags
from pipeline.cli import called_as
from pipeline.flags import number, whole_number
from transforms.images import DEFAULT_MAX_PIXELS

SERVE_ABOUT = "Serves the art style of paintings over HTTP: an API, metrics and a page."
OWN_DEFAULTS = (
    "The service's --fetch_timeout_s and --max_image_bytes are below the pipeline's: a "
    "client waits for each answer, and the service may hold --max_queue request bodies in "
    "memory at once. They also bound each request's body: its deadline (408 past it) and "
    "its size (413)."
)


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """The flags' values; the defaults are the flags' (a test holds them equal)."""

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
    # Larger uploads are refused (413) and larger fetched images are error answers (422):
    # smaller than the pipeline's, since max_queue bodies may be in memory at once.
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    # The deadline for reading a request's body, and for fetching a URL: then 408 or 504.
    # Shorter than the pipeline's: a client is waiting.
    fetch_timeout_s: float = 15.0
    precision: str = "auto"
    engine: str = "auto"
    # Grad-CAM for ?heatmap=true: a float32 Keras copy of the backbones in memory.
    heatmaps: bool = True
    allow_private_urls: bool = False
    access_log: bool = False
    # An index of --model's embeddings: POST /similar, and the page's similar paintings.
    index: str | None = None

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000

    @property
    def max_body_bytes_held(self) -> int:
        """Request bodies in memory at once: as many as the queue holds, each at the cap."""
        return self.max_queue * self.max_image_bytes


def parse_config(argv: list[str] | None = None) -> ServeConfig:
    """The flags, each value checked by its argparse type; --help lists them."""
    return ServeConfig(**vars(serve_parser().parse_args(argv)))


def serve_parser() -> argparse.ArgumentParser:
    defaults = ServeConfig()
    parser = argparse.ArgumentParser(
        prog=called_as("pipeline.serve"), description=SERVE_ABOUT, epilog=OWN_DEFAULTS
    )
    flags.add(parser, flags.add_classifier_flags, flags.add_image_limit_flags)
    parser.set_defaults(
        fetch_timeout_s=defaults.fetch_timeout_s, max_image_bytes=defaults.max_image_bytes
    )
    parser.add_argument("--host", default=defaults.host, help="The address to listen on.")
    parser.add_argument("--port", type=whole_number(0), default=defaults.port)
    parser.add_argument(
        "--max_batch",
        type=whole_number(1),
        default=defaults.max_batch,
        help="The most images per batch. Keras runs a batch in one call, padded to the next "
        "of 1, 2, 4, ... --max_batch images; OpenVINO, which holds a copy of the weights for "
        "each size of call, in calls of one image or of a few.",
    )
    parser.add_argument(
        "--max_wait_ms",
        type=number(0),
        default=defaults.max_wait_ms,
        help="How long a batch waits for more images once it has one.",
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
        "--no_heatmaps",
        dest="heatmaps",
        action="store_false",
        help="Serve no Grad-CAM heatmaps: /predict?heatmap=true then answers without one. "
        "Grad-CAM runs on Keras (TensorFlow, and a float32 copy of the backbones): on the "
        "Keras engine it loads with the model, on OpenVINO at the first heatmap asked for.",
    )
    parser.add_argument(
        "--allow_private_urls",
        action="store_true",
        help="Fetch URLs whose host is loopback, private, link-local or reserved too (tests, "
        "intranets). Without it such URLs are refused (403).",
    )
    parser.add_argument("--access_log", action="store_true", help="Log every request.")
    flags.INDEX.but(
        "With it, POST /similar answers the index's paintings nearest to an image, and the "
        "page shows them under its prediction; the index's images are read for their "
        "thumbnails (relative paths from the folder the service runs in, http(s) URLs "
        "through the same guard as a request's)."
    )(parser)
    return parser
