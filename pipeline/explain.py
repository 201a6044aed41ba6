"""`python -m pipeline.explain IMAGE_OR_URI... --output DIR`: why the model said what it said.

Per image, DIR/NAME.png: the painting as the model sees it, Grad-CAM for its top style (or
--style), and the top styles as bars. With --feature_maps LAYER, also
DIR/BACKBONE_LAYER-filters.png (the layer's filters, where they are spatial) and
DIR/NAME-LAYER.png (its activation maps for the image): the pictures of the classic "what a
network sees" pages.

NAME is the image's own file name, made safe and unique (`output_names`). An image that
cannot be read, drawn or written costs its own pictures and one line on stderr, never the
others'.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.bundle import ModelBundle, check_backbone_weights
from pipeline import terminal
from pipeline.flags import EXPLAIN_COMMAND, UsageError
from transforms.fetch import BackgroundFetcher, FetchPolicy
from transforms.images import ImageError, brief, decode_image, describe

# Keras, TensorFlow and Beam load when a run starts, not with this module: --help and a bad
# flag answer at once.
if TYPE_CHECKING:
    from models.feature_maps import LayerViewer
    from models.gradcam import GradCam

TOP_STYLES = 5
# The readable part of an output's name, in UTF-8 bytes: with a digest, a layer's name and
# ".png" after it, well below the 255 bytes a file name may take on common file systems.
MAX_NAME_BYTES = 100
DIGEST_LENGTHS = (8, 16, 64)  # hex digits of the URI's SHA-256 that a name takes if it must


class ExplainError(ValueError):
    """Some images could not be explained (each is named on stderr, the rest are): one line
    and exit status 1. A bad flag is a UsageError instead, before any work."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    return EXPLAIN_COMMAND.parser(allow_abbrev=False).parse_args(argv)


def run(argv: list[str] | None = None) -> None:
    """Explains every image it can; then raises ExplainError if some could not be."""
    from models.feature_maps import LayerError, LayerViewer
    from models.gradcam import BATCH_SIZE, bundle_grad_cam

    args = parse_args(sys.argv[1:] if argv is None else argv)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output: {output} is a file, not a folder")
    bundle = ModelBundle.load(args.model)
    check_backbone_weights(bundle.manifest.backbone.name, args.backbone_weights)
    style = _style_index(bundle, args.style)
    try:
        viewer = args.feature_maps and LayerViewer(bundle, args.feature_maps, args.backbone_weights)
    except LayerError as error:
        raise UsageError(f"--feature_maps: {error}") from None
    explainer = _Explainer(bundle, bundle_grad_cam(bundle, args.backbone_weights), style)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--output: cannot make {output} ({error})") from None
    maps = f"-{_file_safe(args.feature_maps)}" if viewer else None
    filters = _write_filters(viewer, bundle, output) if viewer else None
    names = output_names(args.images, ("", maps) if maps else ("",), [filters] if filters else [])

    failures = 0
    for batch in _batches(_read_images(args.images, bundle.input_size), BATCH_SIZE):
        readable = [(i, image) for i, image in batch if not isinstance(image, str)]
        problems = {i: problem for i, problem in batch if isinstance(problem, str)}
        for (index, image), draw in zip(readable, explainer(readable, args.images), strict=True):
            pictures = {f"{names[index]}.png": draw}
            if maps:
                pictures[f"{names[index]}{maps}.png"] = partial(
                    _activations_figure, viewer, image, names[index]
                )
            problem = _write_pictures(output, pictures)
            if problem:
                problems[index] = problem
            else:
                print(f"{brief(args.images[index])} -> {output / next(iter(pictures))}")
        for index, problem in sorted(problems.items()):
            print(f"artstyle: {brief(args.images[index])}: {problem}", file=sys.stderr)
        failures += len(problems)
    if failures:
        raise ExplainError(f"{failures} of {len(args.images)} images could not be explained")


def _write_pictures(output: Path, pictures: dict[str, Callable[[], bytes]]) -> str | None:
    """Draws and writes one image's pictures; what stopped them, if anything, as "kind:
    message", so that one image's failure is its own."""
    for name, draw in pictures.items():
        try:
            picture = draw()
        except Exception as error:  # a library's surprise over this image: its alone
            return f"draw_failed: {name}: {describe(error)}"
        try:
            (output / name).write_bytes(picture)
        except OSError as error:
            return f"write_failed: {output / name}: {describe(error)}"
    return None


def _activations_figure(viewer: LayerViewer, image: np.ndarray, name: str) -> bytes:
    from pipeline import figures

    return figures.activations_figure(viewer(image), name)


class _Explainer:
    """Batches of images -> what draws each one's explanation figure (PNG bytes): Grad-CAM
    runs per batch, the drawing per image."""

    def __init__(self, bundle: ModelBundle, grad_cam: GradCam, style: int | None):
        self._bundle = bundle
        self._grad_cam = grad_cam
        self._style = style

    def __call__(
        self, batch: list[tuple[int, np.ndarray]], uris: list[str]
    ) -> list[Callable[[], bytes]]:
        from keras.ops import softmax

        from models.gradcam import overlay
        from pipeline import figures
        from transforms.top_k import top_k_fields

        if not batch:
            return []
        images = np.stack([image for _, image in batch])
        styles = None if self._style is None else np.full(len(images), self._style)
        explained = self._grad_cam(images, styles)
        probabilities = np.asarray(softmax(explained.scores))
        classes = self._bundle.classes
        pictures: list[Callable[[], bytes]] = []
        for i, (index, image) in enumerate(batch):
            top = top_k_fields(probabilities[i], classes=classes, top_k=TOP_STYLES)
            pictures.append(
                partial(
                    figures.explanation_figure,
                    image,
                    overlay(image, explained.heatmaps[i]),
                    classes[explained.styles[i]],
                    top["top_k_styles"],
                    top["top_k_probabilities"],
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


def _write_filters(viewer: LayerViewer, bundle: ModelBundle, output: Path) -> str | None:
    """The layer's filters: the same for every image, so drawn once. Returns the file's
    name, which no image's picture may take (None: the layer has no spatial filters)."""
    from pipeline import figures

    blank = np.zeros((bundle.input_size, bundle.input_size, 3), np.uint8)
    pictures = viewer(blank)
    picture = figures.filters_figure(pictures)
    if picture is None:
        print(f"{pictures.backbone} {pictures.layer} has {pictures.filters_note}")
        return None
    name = f"{_file_safe(f'{pictures.backbone}/{pictures.layer}')}-filters.png"
    (output / name).write_bytes(picture)
    print(f"filters of {pictures.backbone} {pictures.layer} -> {output / name}")
    return name


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


def output_names(
    uris: Sequence[str], suffixes: Sequence[str] = ("",), reserved: Collection[str] = ()
) -> list[str]:
    """A file name stem per URI, for files named stem + suffix + ".png" (one per suffix).

    The stem is the URI's last path segment without its extension, made safe and cut to
    MAX_NAME_BYTES. Where two different URIs would share a file (compared without case, as
    some file systems do), or one would take a `reserved` file, each of them adds a digest of
    its whole URI. A stem depends on its URI and on the other URIs that would share it,
    never on the order given; the same URI twice is the same image, under one name.
    """
    readable = [_readable_stem(uri) for uri in uris]
    stems = list(readable)
    digest_length = dict.fromkeys(range(len(uris)), 0)
    taken = {name.casefold() for name in reserved}
    while clashing := _clashing(uris, stems, suffixes, taken):
        for index in clashing:
            longer = next(n for n in DIGEST_LENGTHS if n > digest_length[index])
            digest_length[index] = longer
            digest = hashlib.sha256(uris[index].encode()).hexdigest()[:longer]
            stems[index] = f"{readable[index]}-{digest}"
    return stems


def _clashing(
    uris: Sequence[str], stems: Sequence[str], suffixes: Sequence[str], taken: Collection[str]
) -> set[int]:
    """The indices of URIs with a file that another URI's file would overwrite, or that is
    taken."""
    files = [{f"{stem}{suffix}.png".casefold() for suffix in suffixes} for stem in stems]
    owners: dict[str, set[str]] = {}
    for uri, names in zip(uris, files, strict=True):
        for name in names:
            owners.setdefault(name, set()).add(uri)
    return {
        index
        for index, names in enumerate(files)
        if any(len(owners[name]) > 1 or name in taken for name in names)
    }


def _readable_stem(uri: str) -> str:
    """The last path segment without query, fragment or extension, in letters (of any
    script), digits, '.', '_' and '-', cut to MAX_NAME_BYTES; "image" where none is left."""
    segment = re.split(r"[?#]", uri, maxsplit=1)[0].rstrip("/").rsplit("/", 1)[-1]
    cut = _file_safe(Path(segment).stem).encode()[:MAX_NAME_BYTES].decode(errors="ignore")
    return _file_safe(cut)


def _file_safe(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("._-") or "image"


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
