"""What one layer of a backbone holds: its filters, and its activation maps for an image.

The pictures of the classic "what a convolutional network sees" pages: the first layer's
filters look like edge and colour detectors, its maps like the painting in relief; deeper
maps grow coarse and abstract.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from models.backbones import backbones_of, resized
from models.bundle import ModelBundle
from models.precision import building_in

MAX_CHANNELS = 64  # pictures per grid: enough to see the kinds of filters, few enough to see


class LayerError(ValueError):
    """--feature_maps names no layer of the bundle's backbones."""


@dataclass(frozen=True)
class LayerPictures:
    backbone: str
    layer: str
    filters: np.ndarray | None  # (n, kh, kw, 3 or 1) in 0..1; None where not spatial
    filters_note: str  # what the filter pictures are: "in colour", "one per channel", ...
    activations: np.ndarray  # (n, h, w): the first n channels of the layer's output
    channels: int  # how many channels the layer has (n is at most MAX_CHANNELS)


class LayerViewer:
    """One backbone layer of a bundle, ready to show for any image (built once, in float32)."""

    def __init__(self, bundle: ModelBundle, layer: str, backbone_weights: str | None = None):
        """`layer`: a layer name of the bundle's first backbone ('stem_conv'), or of another,
        written 'backbone/layer' ('efficientnet_lite2/stem_conv')."""
        spec = bundle.manifest.backbone
        backbones = {b.name: b for b in backbones_of(spec.name)}
        backbone_name, _, layer_name = layer.rpartition("/")
        backbone = backbones.get(backbone_name or next(iter(backbones)))
        if backbone is None:
            raise LayerError(f"{backbone_name!r} is not a backbone of this bundle: {spec.name}")
        with building_in("float32"):
            model = backbone.build(weights=spec.weights, weights_path=backbone_weights)
        try:
            self._layer = model.get_layer(layer_name)
        except ValueError:
            raise LayerError(
                f"{backbone.name} has no layer {layer_name!r}; its convolutions: "
                f"{', '.join(spatial_layers(model))}, ..."
            ) from None
        images = keras.Input((bundle.input_size, bundle.input_size, 3))
        outputs = keras.Model(model.input, self._layer.output)(resized(images, backbone.input_size))
        self._activations = keras.Model(images, outputs)
        self._backbone = backbone.name

    def __call__(self, image: np.ndarray) -> LayerPictures:
        """The layer's filters and its activation maps for one image (uint8, the bundle's size)."""
        activations = np.asarray(self._activations(image[None].astype("float32")))[0]
        filters, note = spatial_filters(self._layer)
        return LayerPictures(
            backbone=self._backbone,
            layer=self._layer.name,
            filters=filters,
            filters_note=note,
            activations=np.moveaxis(activations[..., :MAX_CHANNELS], -1, 0),
            channels=activations.shape[-1],
        )


def spatial_layers(model: keras.Model, first: int = 8) -> list[str]:
    """The names of the model's first convolutions with a kernel wider than one pixel."""
    names = [layer.name for layer in model.layers if _spatial_kernel(layer) is not None]
    return names[:first]


def spatial_filters(layer: keras.layers.Layer) -> tuple[np.ndarray | None, str]:
    """(n, kh, kw, 3 or 1) filters in 0..1, each scaled on its own (None for a 1x1 kernel
    or a layer without one), and a note on what they show.

    A first layer's filters read RGB and are shown in colour. A deeper convolution's read
    many channels: each is shown on the input channel it weighs most. A depthwise
    convolution has one spatial filter per channel.
    """
    kernel = _spatial_kernel(layer)
    if kernel is None:
        return None, "no spatial filters (a 1x1 kernel, or none)"
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # (kh, kw, channels, 1)
        filters = np.moveaxis(kernel[..., 0], -1, 0)[:MAX_CHANNELS, ..., None]
        note = "one per channel"
    else:  # (kh, kw, inputs, outputs)
        per_output = np.moveaxis(kernel, -1, 0)[:MAX_CHANNELS]
        if per_output.shape[-1] == 3:
            filters, note = per_output, "in RGB"
        else:
            strongest = np.argmax(np.square(per_output).sum(axis=(1, 2)), axis=-1)
            filters = np.take_along_axis(per_output, strongest[:, None, None, None], axis=-1)
            note = "each on the input channel it weighs most"
    low = filters.min(axis=(1, 2, 3), keepdims=True)
    span = np.maximum(filters.max(axis=(1, 2, 3), keepdims=True) - low, 1e-12)
    return ((filters - low) / span).astype("float32"), note


def _spatial_kernel(layer: keras.layers.Layer) -> np.ndarray | None:
    """A convolution's kernel (kh, kw, inputs, outputs or multiplier), if wider than 1x1."""
    if not isinstance(layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D):
        return None
    kernel = np.asarray(layer.get_weights()[0])
    return kernel if kernel.shape[0] * kernel.shape[1] > 1 else None
