"""The pictures of `pipeline.explain` and `pipeline.report`, drawn with matplotlib as PNG bytes.

Figures are made with matplotlib's object API (`Figure`, never pyplot's global state) on
its Agg canvas: no display is needed, and no figure outlives its function. Their text is
drawn as written, never parsed as mathtext: titles and labels come from file names, URIs
and a bundle's style names, where a `$` pair would otherwise be parsed, and fail.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import ParamSpec, TypeVar

import matplotlib
import numpy as np
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from models.feature_maps import LayerPictures

HIGHLIGHT = "#d95f02"
BAR = "#7570b3"
PRECISION_RECALL_F1 = ("#1b9e77", "#7570b3", "#d95f02")
DPI = 100

Arguments = ParamSpec("Arguments")
Picture = TypeVar("Picture")


def literal_text(draw: Callable[Arguments, Picture]) -> Callable[Arguments, Picture]:
    """`draw` with every text it makes, and every text made as it is saved, taken as written.
    (matplotlib reads the setting as each text is made, so it holds for the whole call.)"""

    @functools.wraps(draw)
    def drawn(*args: Arguments.args, **kwargs: Arguments.kwargs) -> Picture:
        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return drawn


def display_name(style: str) -> str:
    """'Naive_Art_Primitivism' -> 'Naive Art Primitivism'."""
    return style.replace("_", " ")


def style_colours(styles: Sequence[str]) -> dict[str, str]:
    """A colour (#rrggbb) for each style, told apart by hue first: tab20's ten strong
    colours, then its ten light ones; past twenty, hues spread evenly over turbo's."""
    if len(styles) <= 20:
        strong_first = [*range(0, 20, 2), *range(1, 20, 2)]
        palette = matplotlib.colormaps["tab20"](np.array(strong_first))
    else:
        palette = matplotlib.colormaps["turbo"](np.linspace(0.05, 0.95, len(styles)))
    return {style: to_hex(colour) for style, colour in zip(styles, palette, strict=False)}


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


# --- One painting --------------------------------------------------------------------------


@literal_text
def explanation_figure(
    image: np.ndarray,
    overlaid: np.ndarray,
    explained: str,
    styles: Sequence[str],
    probabilities: Sequence[float],
    title: str,
) -> bytes:
    """The painting, the Grad-CAM overlay for the `explained` style, the top styles as bars."""
    figure = Figure(figsize=(13, 4.4), layout="constrained")
    picture, heat, bars = figure.subplots(1, 3, width_ratios=(1, 1, 1.3))
    picture.imshow(image)
    picture.set_title("The painting, as the model sees it")
    heat.imshow(overlaid)
    heat.set_title(f"Grad-CAM: {display_name(explained)}")
    for axes in (picture, heat):
        axes.set_axis_off()
    order = np.arange(len(styles))[::-1]
    colours = [HIGHLIGHT if styles[i] == explained else BAR for i in order]
    bars.barh(order, [probabilities[i] for i in order], color=colours)
    bars.set_yticks(order, [display_name(styles[i]) for i in order])
    bars.set_xlim(0, 1)
    bars.set_xlabel("probability")
    bars.set_title(f"Top {len(styles)} styles")
    for i in order:
        bars.text(probabilities[i] + 0.01, i, f"{probabilities[i]:.1%}", va="center")
    figure.suptitle(title)
    return png(figure)


@literal_text
def filters_figure(pictures: LayerPictures) -> bytes | None:
    """The layer's spatial filters as a grid (None where it has none)."""
    if pictures.filters is None:
        return None
    filters = pictures.filters
    colour = filters.shape[-1] == 3
    shape = f"{filters.shape[1]}x{filters.shape[2]}"
    return _grid(
        filters if colour else filters[..., 0],
        f"{pictures.backbone} {pictures.layer}: {len(filters)} filters, {shape}, "
        f"{pictures.filters_note}",
        colourmap=None if colour else "gray",
    )


@literal_text
def activations_figure(pictures: LayerPictures, title: str) -> bytes:
    shown = len(pictures.activations)
    return _grid(
        pictures.activations,
        f"{pictures.backbone} {pictures.layer}: activation maps of {title} "
        f"({shown} of {pictures.channels} channels)",
        colourmap="viridis",
    )


def _grid(images: np.ndarray, title: str, colourmap: str | None) -> bytes:
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    figure = Figure(figsize=(1.3 * columns, 1.3 * rows + 0.5), layout="constrained")
    for index, axes in enumerate(figure.subplots(rows, columns, squeeze=False).flat):
        axes.set_axis_off()
        if index < len(images):
            axes.imshow(images[index], cmap=colourmap, interpolation="nearest")
    figure.suptitle(title)
    return png(figure)


# --- A run's report --------------------------------------------------------------------------


@literal_text
def confusion_figure(true_styles: Sequence[str], predicted_styles: Sequence[str], counts) -> bytes:
    """The confusion matrix normalised by true style: each row sums to 1 (the row's recall
    is its diagonal cell). `counts[i][j]`: rows of true style i predicted as style j."""
    counts = np.asarray(counts, dtype="float64")
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    size = 3 + 0.42 * max(len(predicted_styles), len(true_styles))
    figure = Figure(figsize=(size + 1.5, size), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), share in np.ndenumerate(shares):
        if share >= 0.005:
            colour = "white" if share > 0.5 else "black"
            axes.text(j, i, f"{share:.0%}", ha="center", va="center", fontsize=7, color=colour)
    axes.set_xticks(range(len(predicted_styles)), map(display_name, predicted_styles))
    axes.set_yticks(range(len(true_styles)), map(display_name, true_styles))
    axes.tick_params(axis="x", labelrotation=60)
    axes.set_xlabel("predicted style")
    axes.set_ylabel("true style")
    figure.colorbar(image, ax=axes, shrink=0.6, label="share of the true style's paintings")
    return png(figure)


@literal_text
def per_style_figure(per_class: Sequence[Mapping]) -> bytes:
    """Precision, recall and F1 of every style, as grouped horizontal bars."""
    figure = Figure(figsize=(6, 1.2 + 0.3 * len(per_class)), layout="constrained")
    axes = figure.subplots()
    positions = np.arange(len(per_class))[::-1]
    height = 0.27
    metrics = ("precision", "recall", "f1")
    for index, (metric, colour) in enumerate(zip(metrics, PRECISION_RECALL_F1, strict=True)):
        values = [row[metric] for row in per_class]
        axes.barh(positions + (1 - index) * height, values, height, color=colour, label=metric)
    axes.set_yticks(positions, [display_name(row["label"]) for row in per_class])
    axes.set_xlim(0, 1)
    axes.legend(loc="lower right", ncols=3)
    axes.grid(axis="x", alpha=0.3)
    return png(figure)


@literal_text
def reliability_figure(bins: Sequence[Mapping], bin_width: float, ece: float) -> bytes:
    """Accuracy against confidence per confidence bin (a calibrated model lies on the
    diagonal), with the rows per bin beneath."""
    figure = Figure(figsize=(5.2, 5.2), layout="constrained")
    diagram, counts = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    lows = np.array([b["bin_low"] for b in bins])
    diagram.bar(lows, [b["accuracy"] for b in bins], bin_width, align="edge", color=BAR,
                edgecolor="white", label="accuracy")  # fmt: skip
    diagram.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o",
                 color=HIGHLIGHT, label="mean confidence, accuracy")  # fmt: skip
    diagram.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    diagram.set_ylim(0, 1)
    diagram.set_ylabel("accuracy")
    diagram.set_title(f"Reliability (ECE {ece:.1%})")
    diagram.legend(loc="upper left")
    counts.bar(lows, [b["count"] for b in bins], bin_width, align="edge", color="gray",
               edgecolor="white")  # fmt: skip
    counts.set_xlim(0, 1)
    counts.set_xlabel("confidence (top style's probability)")
    counts.set_ylabel("paintings")
    return png(figure)


@literal_text
def confidence_histogram_figure(confidences: np.ndarray, bins: int = 20) -> bytes:
    figure = Figure(figsize=(5.2, 3), layout="constrained")
    axes = figure.subplots()
    axes.hist(confidences, bins=bins, range=(0, 1), color=BAR, edgecolor="white")
    axes.set_xlim(0, 1)
    axes.set_xlabel("confidence (top style's probability)")
    axes.set_ylabel("paintings")
    axes.set_title(f"Confidence of {len(confidences):,} predictions")
    return png(figure)


@literal_text
def style_counts_figure(counts: Mapping[str, int]) -> bytes:
    """How many paintings were given each style, most first."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    figure = Figure(figsize=(6, 1.2 + 0.3 * len(ordered)), layout="constrained")
    axes = figure.subplots()
    positions = np.arange(len(ordered))[::-1]
    axes.barh(positions, [n for _, n in ordered], color=BAR)
    axes.set_yticks(positions, [display_name(style) for style, _ in ordered])
    axes.set_xlabel("paintings")
    axes.set_title("Predicted styles")
    for position, (_, n) in zip(positions, ordered, strict=True):
        axes.text(n, position, f" {n:,}", va="center")
    return png(figure)
