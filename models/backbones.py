"""The registry of backbones: a name -> how to build it, its input size, where to tap it.

Every backbone takes RGB images with values 0..255 (its own normalisation is inside the
model), so the pipeline's decoding is the same for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import keras
import numpy as np
from keras import layers, ops

from models import efficientnet_lite

FEATURE_KINDS = ("pooled", "stage_stats", "stage_covariance")


@dataclass(frozen=True)
class Backbone:
    name: str
    input_size: int
    build: Callable[..., keras.Model]  # build(weights=..., weights_path=...) -> keras.Model
    stage_layers: tuple[str, ...]  # middle-to-deep stage outputs: where texture and colour live
    last_layer: str  # the final feature map, before global pooling
    # Early stages narrow enough for a channel covariance (C * (C + 1) / 2 features each).
    covariance_layers: tuple[str, ...] = ()


def _resnet50(weights: str | None = "imagenet", weights_path: str | None = None) -> keras.Model:
    """keras.applications' ResNet50 with its 'caffe' preprocessing inside the model.

    Keras downloads the ImageNet weights on first use; `weights_path` names a local copy of
    the same file (resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5) for offline hosts.
    """
    images = keras.Input((224, 224, 3), name="images")
    bgr = ops.flip(images, axis=-1) - ops.convert_to_tensor([103.939, 116.779, 123.68])
    resnet = keras.applications.ResNet50(
        include_top=False, weights=weights_path or weights, input_tensor=bgr
    )
    return keras.Model(images, resnet.output, name="resnet50")


BACKBONES: dict[str, Backbone] = {
    **{
        name: Backbone(
            name=name,
            input_size=efficientnet_lite.INPUT_SIZES[name],
            build=partial(efficientnet_lite.build_efficientnet_lite, name),
            stage_layers=tuple(f"stage{i}_out" for i in range(3, 8)),
            last_layer="head_activation",
            covariance_layers=("stage3_out", "stage4_out"),
        )
        for name in efficientnet_lite.INPUT_SIZES
    },
    "resnet50": Backbone(
        name="resnet50",
        input_size=224,
        build=_resnet50,
        stage_layers=("conv2_block3_out", "conv3_block4_out", "conv4_block6_out"),
        last_layer="conv5_block3_out",
    ),
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"Unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None


def feature_extractor(
    backbone: Backbone, features: str, weights: str | None = "imagenet", weights_path=None
) -> keras.Model:
    """images (0..255) -> one feature vector per image.

    "pooled": the global average of the last feature map, the usual transfer-learning
    embedding. "stage_stats": that, plus the per-channel mean and standard deviation of
    each stage in `stage_layers`: style is as much texture and colour statistics of the
    middle layers as it is objects in the last one. "stage_covariance": that, plus the
    channel covariance of the early `covariance_layers`, the texture statistic of neural
    style transfer (a Gram matrix, centred), which says which features occur together.
    """
    if features not in FEATURE_KINDS:
        raise ValueError(f"Unknown features {features!r}; known: {', '.join(FEATURE_KINDS)}")
    if features == "stage_covariance" and not backbone.covariance_layers:
        raise ValueError(f"{backbone.name} has no layers for 'stage_covariance' features")
    model = backbone.build(weights=weights, weights_path=weights_path)
    pooled = layers.GlobalAveragePooling2D(name="pooled")(
        model.get_layer(backbone.last_layer).output
    )
    parts = [pooled]
    if features in ("stage_stats", "stage_covariance"):
        for name in backbone.stage_layers:
            stage = model.get_layer(name).output
            parts += [ops.mean(stage, axis=(1, 2)), ops.std(stage, axis=(1, 2))]
    if features == "stage_covariance":
        parts += [
            channel_covariance(model.get_layer(name).output) for name in backbone.covariance_layers
        ]
    vector = parts[0] if len(parts) == 1 else layers.Concatenate(name="features")(parts)
    return keras.Model(model.input, vector, name=f"{backbone.name}_{features}")


def channel_covariance(feature_map):
    """(batch, h, w, c) -> (batch, c * (c + 1) / 2): the upper triangle of each image's
    channel covariance over positions, square-rooted with its sign kept (the usual power
    normalisation of second-order features: it tames the few large entries)."""
    channels = feature_map.shape[-1]
    positions = ops.reshape(
        feature_map, (-1, feature_map.shape[1] * feature_map.shape[2], channels)
    )
    centred = positions - ops.mean(positions, axis=1, keepdims=True)
    covariance = ops.einsum("bpc,bpd->bcd", centred, centred) / positions.shape[1]
    rows, cols = np.triu_indices(channels)
    upper = ops.take(
        ops.reshape(covariance, (-1, channels * channels)), rows * channels + cols, axis=1
    )
    return ops.sign(upper) * ops.sqrt(ops.abs(upper))
