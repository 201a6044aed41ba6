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
from models.settings import CENTRE_POOLED, FEATURE_KINDS, check_backbone_names


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
            last_layer="head_conv",
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
    check_backbone_names(name)
    return BACKBONES[name]


def backbones_of(spec: str) -> list[Backbone]:
    """A backbone name, or several joined by '+' (an ensemble: their features concatenated)."""
    check_backbone_names(spec)
    return [BACKBONES[name] for name in spec.split("+")]


def input_size_of(spec: str) -> int:
    """The side the pipeline decodes images to: the first backbone's; the others resize."""
    return backbones_of(spec)[0].input_size


def feature_extractor(
    spec: str,
    feature_kind: str,
    weights: str | None = "imagenet",
    weights_path: str | None = None,
    fingerprint_source: bool = False,
) -> keras.Model:
    """images (0..255) -> one feature vector per image, from one backbone or an ensemble;
    with `fingerprint_source`, also what the embedding's fingerprint is made of (each
    backbone's `centre_pooled` last map, side by side), a second output of the same pass.

    In an ensemble ("efficientnet_lite2+efficientnet_lite0") each backbone sees the image at
    its own input size (resized inside the model, so decoding stays one step) and the
    vectors are concatenated: networks of different depth and resolution err on different
    paintings, and one head fitted on both learns which to trust for which style.
    """
    backbones = backbones_of(spec)
    if weights_path is not None and len(backbones) > 1:
        raise ValueError("--backbone_weights names one backbone's weights; not for an ensemble")
    size = backbones[0].input_size
    images = keras.Input((size, size, 3), name="images")
    outputs = [
        backbone_features(backbone, feature_kind, weights, weights_path, fingerprint_source)(
            resized(images, backbone.input_size)
        )
        for backbone in backbones
    ]
    name = f"{'_and_'.join(b.name for b in backbones)}_features"
    if not fingerprint_source:
        return keras.Model(images, _side_by_side(outputs, "ensemble"), name=name)
    vectors, sources = zip(*outputs, strict=True)
    return keras.Model(
        images,
        [_side_by_side(list(vectors), "ensemble"), _side_by_side(list(sources), "sources")],
        name=name,
    )


def _side_by_side(vectors: list, name: str):
    return vectors[0] if len(vectors) == 1 else layers.Concatenate(name=name)(vectors)


def with_mirror(extractor: keras.Model) -> keras.Model:
    """images -> the features of each image and of its left-right mirror, concatenated.

    A painting's style survives mirroring, so its mirror is a second training example for
    free: one model call computes both, in the feature pass (prediction sees the image as is).
    """
    images = keras.Input(extractor.input.shape[1:], name="images")
    mirrored = ops.flip(images, axis=2)
    vectors = [extractor(images), extractor(mirrored)]
    return keras.Model(images, layers.Concatenate(name="with_mirror")(vectors), name="with_mirror")


def resized(images, size: int):
    """`images` resized to size x size as two matrix products, one per axis, in operations
    that XLA and ONNX export support (neither has TensorFlow's antialiased resize, and ONNX
    Runtime's own differs at the borders).

    Shrinking is antialiased bilinear (the values of Keras's Resizing layer); enlarging is
    bicubic, the filter the pipeline decodes with, so a backbone that sees the decoded
    image enlarged here sees what it would have seen had it been decoded at its own size.
    """
    if images.shape[1] == size:
        return images
    matrix = resize_matrix(images.shape[1], size)
    rows_resized = ops.einsum("hp,npqc->nhqc", matrix, images)
    return ops.einsum("wq,nhqc->nhwc", matrix, rows_resized)


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size): the weight each output row takes from each input row, read off
    by resizing an identity image along its rows with the backend's own resize."""
    interpolation = "bicubic" if out_size > in_size else "bilinear"
    identity = np.eye(in_size, dtype="float32")[None, :, :, None]
    rows = ops.image.resize(
        identity, (out_size, in_size), interpolation=interpolation, antialias=True
    )
    return ops.convert_to_numpy(rows)[0, :, :, 0]


def backbone_features(
    backbone: Backbone,
    feature_kind: str,
    weights: str | None,
    weights_path: str | None,
    fingerprint_source: bool = False,
) -> keras.Model:
    """images (0..255) -> one backbone's feature vector (and with `fingerprint_source`, its
    `centre_pooled` last map).

    "pooled": the global average of the last feature map, the usual transfer-learning
    feature vector. "stage_stats": that, plus the per-channel mean and standard deviation of
    each stage in `stage_layers`: style is as much texture and colour statistics of the
    middle layers as it is objects in the last one. "stage_covariance": that, plus the
    channel covariance of the early `covariance_layers`, the texture statistic of neural
    style transfer (a Gram matrix, centred), which says which features occur together.
    """
    if feature_kind not in FEATURE_KINDS:
        raise ValueError(
            f"Unknown feature kind {feature_kind!r}; known: {', '.join(FEATURE_KINDS)}"
        )
    if feature_kind == "stage_covariance" and not backbone.covariance_layers:
        raise ValueError(f"{backbone.name} has no layers for 'stage_covariance' features")
    model = backbone.build(weights=weights, weights_path=weights_path)
    last_map = model.get_layer(backbone.last_layer).output
    parts = [layers.GlobalAveragePooling2D(name="pooled")(last_map)]
    stats_layers, covariance_layers = _statistics_layers(backbone, feature_kind)
    for name in stats_layers:
        stage = model.get_layer(name).output
        parts += [ops.mean(stage, axis=(1, 2)), ops.std(stage, axis=(1, 2))]
    parts += [channel_covariance(model.get_layer(name).output) for name in covariance_layers]
    vector = _side_by_side(parts, "features")
    outputs = [vector, centre_pooled(last_map)] if fingerprint_source else vector
    return keras.Model(model.input, outputs, name=f"{backbone.name}_{feature_kind}")


def centre_pooled(feature_map):
    """(batch, h, w, c) -> (batch, c): the map's average without its outer ring of cells.
    A frame, a border or a slight rotation of a picture changes those cells most and its
    middle least, so the middle's average finds the same picture again more often than the
    whole map's does (docs/similar.md measures both). A map of fewer than 3 cells a side
    has no middle, and is averaged whole."""
    height, width = feature_map.shape[1:3]
    if height is not None and width is not None and min(height, width) >= 3:
        feature_map = layers.Cropping2D(1)(feature_map)
    return layers.GlobalAveragePooling2D(name=CENTRE_POOLED)(feature_map)


def feature_layers(backbone: Backbone, feature_kind: str) -> list[str]:
    """The layers whose outputs the features of `feature_kind` are statistics of (Grad-CAM's
    feature maps): the last map for 'pooled'; also the stages for 'stage_stats' and
    'stage_covariance' (the covariance layers are early stages)."""
    stats_layers, covariance_layers = _statistics_layers(backbone, feature_kind)
    return list(dict.fromkeys([backbone.last_layer, *stats_layers, *covariance_layers]))


def _statistics_layers(backbone: Backbone, feature_kind: str) -> tuple[tuple[str, ...], ...]:
    """The layers `feature_kind` reads channel means and deviations of, and those it reads the
    covariance of, beside the last map's average."""
    stats = backbone.stage_layers if feature_kind in ("stage_stats", "stage_covariance") else ()
    covariance = backbone.covariance_layers if feature_kind == "stage_covariance" else ()
    return stats, covariance


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


def source_columns(extractor: keras.Model, spec: str, feature_kind: str) -> list[tuple[int, int]]:
    """Where each backbone's part lies in the fingerprint source that `extractor` (built by
    `feature_extractor(spec, feature_kind, fingerprint_source=True)`) gives."""
    columns, start = [], 0
    for backbone in backbones_of(spec):
        part = extractor.get_layer(f"{backbone.name}_{feature_kind}")
        width = part.get_layer(CENTRE_POOLED).output.shape[-1]
        columns.append((start, start + width))
        start += width
    return columns


def pooled_columns(extractor: keras.Model, spec: str, feature_kind: str) -> list[tuple[int, int]]:
    """Where each backbone's pooled features lie in the vector `extractor` (built by
    `feature_extractor(spec, feature_kind)`) gives: each backbone's part begins with them."""
    columns, start = [], 0
    for backbone in backbones_of(spec):
        part = extractor.get_layer(f"{backbone.name}_{feature_kind}")
        pooled = part.get_layer("pooled").output.shape[-1]
        columns.append((start, start + pooled))
        start += part.outputs[0].shape[-1]  # the features, beside any fingerprint source
    return columns
