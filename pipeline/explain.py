"""`python -m pipeline.explain IMAGE_OR_URI... --output DIR`: why the model said what it said.

Per image, DIR/NAME.png: the painting as the model sees it, Grad-CAM for its top style (or
--style), and the top styles as bars. With --feature_maps LAYER, also DIR/LAYER-filters.png
(the layer's filters, where they are spatial) and DIR/NAME-LAYER.png (its activation maps
for the image): the pictures of the classic "what a network sees" pages.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.bundle import DEFAULT_BUNDLE, ModelBundle
from pipeline import terminal
from pipeline.flags import UsageError
from transforms.fetch import BackgroundFetcher, FetchPolicy
from transforms.images import ImageError, brief, decode_image

# Keras, TensorFlow and Beam load when a run starts, not with this module: --help and a bad
# flag answer at once.
if TYPE_CHECKING:
    from models.feature_maps import LayerViewer
    from models.gradcam import GradCam

TOP_STYLES = 5
BATCH = 8  # images per Grad-CAM call


class ExplainError(ValueError):
    """Some images could not be read (each is named on stderr, the rest are explained): one
    line and exit status 1. A bad flag is a UsageError instead, before any work."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.explain",
        description="Writes, per image, a PNG of the painting, Grad-CAM for its top style "
        "and its top styles.",
        allow_abbrev=False,
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_URI", help="Local paths or URIs.")
    parser.add_argument("--output", required=True, metavar="DIR", help="Folder for the PNGs.")
    parser.add_argument("--model", default=DEFAULT_BUNDLE, help="A model bundle folder.")
    parser.add_argument(
        "--style", default=None, help="Explain this style instead of each image's top style."
    )
    parser.add_argument(
        "--feature_maps",
        metavar="LAYER",
        default=None,
        help="Also draw this backbone layer's filters and activation maps ('stem_conv', "
        "'block3_dwconv', 'stage4_out', ...; 'efficientnet_lite2/stem_conv' for the second "
        "backbone of an ensemble).",
    )
    parser.add_argument("--backbone_weights", default=None, help="As for python -m pipeline.")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> None:
    """Explains every image it can read; then raises ExplainError if some could not be."""
    from models.feature_maps import LayerError, LayerViewer
    from models.gradcam import bundle_grad_cam
    from pipeline import figures

    args = parse_args(sys.argv[1:] if argv is None else argv)
    bundle = ModelBundle.load(args.model)
    style = _style_index(bundle, args.style)
    try:
        viewer = args.feature_maps and LayerViewer(bundle, args.feature_maps, args.backbone_weights)
    except LayerError as error:
        raise UsageError(f"--feature_maps: {error}") from None
    explainer = _Explainer(bundle, bundle_grad_cam(bundle, args.backbone_weights), style)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if viewer:
        _write_filters(viewer, bundle, output)

    failures = 0
    names = unique_names(args.images)
    for batch in _batches(_read_images(args.images, bundle.input_size), BATCH):
        for index, problem in ((i, image) for i, image in batch if isinstance(image, str)):
            print(f"artstyle: {brief(args.images[index])}: {problem}", file=sys.stderr)
            failures += 1
        readable = [(i, image) for i, image in batch if not isinstance(image, str)]
        for (index, image), figure in zip(readable, explainer(readable, args.images), strict=True):
            path = output / f"{names[index]}.png"
            path.write_bytes(figure)
            print(f"{brief(args.images[index])} -> {path}")
            if viewer:
                maps = output / f"{names[index]}-{_file_safe(args.feature_maps)}.png"
                maps.write_bytes(figures.activations_figure(viewer(image), names[index]))
    if failures:
        raise ExplainError(f"{failures} of {len(args.images)} images could not be read")


class _Explainer:
    """Batches of images -> their explanation figures (PNG bytes)."""

    def __init__(self, bundle: ModelBundle, grad_cam: GradCam, style: int | None):
        self._bundle = bundle
        self._grad_cam = grad_cam
        self._style = style

    def __call__(self, batch: list[tuple[int, np.ndarray]], uris: list[str]) -> list[bytes]:
        from models.gradcam import overlay
        from models.head import calibrated_probabilities
        from pipeline import figures
        from transforms.predictions import top_k_fields

        if not batch:
            return []
        images = np.stack([image for _, image in batch])
        styles = None if self._style is None else np.full(len(images), self._style)
        explained = self._grad_cam(images, styles)
        temperature = self._bundle.manifest.head.temperature
        probabilities = np.asarray(calibrated_probabilities(explained.logits, temperature))
        classes = self._bundle.classes
        pictures = []
        for i, (index, image) in enumerate(batch):
            top = top_k_fields(probabilities[i], classes=classes, top_k=TOP_STYLES)
            pictures.append(
                figures.explanation_figure(
                    image,
                    overlay(image, explained.heatmaps[i]),
                    classes[explained.styles[i]],
                    top["top_k_styles"],
                    top["top_k_probs"],
                    brief(uris[index], 90),
                )
            )
        return pictures


def _style_index(bundle: ModelBundle, style: str | None) -> int | None:
    if style is None:
        return None
    if style not in bundle.classes:
        raise UsageError(
            f"--style: model {bundle.id} knows no style {style!r}; its styles: "
            f"{', '.join(bundle.classes)}"
        )
    return bundle.classes.index(style)


def _write_filters(viewer: LayerViewer, bundle: ModelBundle, output: Path) -> None:
    """The layer's filters: the same for every image, so drawn once."""
    from pipeline import figures

    blank = np.zeros((bundle.input_size, bundle.input_size, 3), np.uint8)
    pictures = viewer(blank)
    picture = figures.filters_figure(pictures)
    if picture is None:
        print(f"{pictures.backbone} {pictures.layer} has {pictures.filters_note}")
        return
    path = output / f"{_file_safe(f'{pictures.backbone}/{pictures.layer}')}-filters.png"
    path.write_bytes(picture)
    print(f"filters of {pictures.backbone} {pictures.layer} -> {path}")


def _read_images(uris: list[str], size: int) -> Iterator[tuple[int, np.ndarray | str]]:
    """(index, image) in the given order, or (index, "kind: message") for an image that
    cannot be read; fetched concurrently."""
    with BackgroundFetcher(FetchPolicy()) as fetcher:
        fetches = [fetcher.submit(uri) for uri in uris]
        for index, fetch in enumerate(fetches):
            try:
                yield index, decode_image(fetch.result(), size=size)
            except ImageError as error:
                yield index, str(error)


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def unique_names(uris: list[str]) -> list[str]:
    """A file name stem per URI, from its last path segment, numbered where two agree."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for uri in uris:
        stem = _file_safe(Path(uri.rstrip("/").split("?")[0]).stem or "image")
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def _file_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"


def main() -> None:
    parse_args(sys.argv[1:])  # --help and a bad flag, before the run's imports
    from pipeline.options import run_command

    try:
        run_command(run)
    except ExplainError as error:
        raise SystemExit(f"artstyle: {error}") from None


if __name__ == "__main__":
    main()
    terminal.end_process()
