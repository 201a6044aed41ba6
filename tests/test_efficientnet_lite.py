"""The EfficientNet-Lite backbone: its shape, its weight loading, and its ImageNet predictions."""

from collections.abc import Callable

import keras
import numpy as np
import pytest
from PIL import Image

import models.efficientnet_lite as efficientnet_lite
from models.efficientnet_lite import (
    INPUT_SIZES,
    build_efficientnet_lite,
    imagenet_class_names,
    imagenet_weights_path,
)
from models.torch_weights import read_torch_state_dict

TAPS = {f"stage{i}_out" for i in range(1, 8)} | {"head_conv", "avg_pool"}
CAT = {"tabby", "tiger_cat", "Egyptian_cat", "Persian_cat", "Siamese_cat"}
# Photos shipped inside scikit-image's wheel, each with the ImageNet classes that fit it.
PHOTOS = {
    "chelsea": CAT,
    "coffee": {"espresso", "cup", "coffee_mug"},
    "rocket": {"missile", "projectile", "space_shuttle"},
}


@pytest.fixture(scope="module")
def lite0() -> keras.Model:
    return build_efficientnet_lite("efficientnet_lite0")


def square_photo(name: str, size: int) -> np.ndarray:
    """Centre crop, resized as ImageNet evaluation does: float32 RGB in 0..255."""
    from skimage import data  # test dependency: scikit-image ships these photos

    image = getattr(data, name)()
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = Image.fromarray(image[top : top + side, left : left + side])
    return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC), np.float32)


def top5(model: keras.Model, photos: np.ndarray) -> list[list[str]]:
    names = imagenet_class_names()
    probabilities = model.predict(photos, verbose=0)
    return [[names[i] for i in np.argsort(p)[::-1][:5]] for p in probabilities]


def test_class_names_follow_imagenet_order() -> None:
    names = imagenet_class_names()

    assert len(names) == 1000
    assert (names[281], names[504], names[967]) == ("tabby", "coffee_mug", "espresso")


@pytest.mark.parametrize("variant", sorted(INPUT_SIZES))
def test_builds_untrained_with_taps(variant: str) -> None:
    size = INPUT_SIZES[variant]
    model = build_efficientnet_lite(variant, weights=None)

    assert model.input_shape == (None, size, size, 3)
    assert model.output_shape == (None, 1000)
    assert TAPS.issubset(layer.name for layer in model.layers)
    assert model.get_layer("avg_pool").output.shape == (None, 1280)
    assert model.get_layer("stage1_out").output.shape == (None, size // 2, size // 2, 16)
    (kernel, _) = model.get_layer("stem_conv").get_weights()
    assert kernel.std() > 0  # drawn at random: only weights read from a file start at zero


def folded(state: dict[str, np.ndarray], norm: str) -> tuple[np.ndarray, np.ndarray]:
    """A batch norm's per-channel scale and shift: what folding it into a convolution uses."""
    scale = state[f"{norm}.weight"] / np.sqrt(state[f"{norm}.running_var"] + 1e-3)
    return scale, state[f"{norm}.bias"] - state[f"{norm}.running_mean"] * scale


def test_every_imagenet_tensor_is_assigned(lite0: keras.Model) -> None:
    path = imagenet_weights_path("efficientnet_lite0")
    state = read_torch_state_dict(path)
    weights = {n: t for n, t in state.items() if not n.endswith("num_batches_tracked")}
    # Each batch norm's four vectors become one bias of its convolution.
    norms = [n for n in weights if "_bn" in n and n.endswith(".weight")]
    folded_away = sum(weights[n].size * 3 for n in norms)

    assert lite0.count_params() == sum(t.size for t in weights.values()) - folded_away
    stem, stem_bias = lite0.get_layer("stem_conv").get_weights()
    scale, shift = folded(state, "_bn0")
    np.testing.assert_allclose(stem, state["_conv_stem.weight"].transpose(2, 3, 1, 0) * scale)
    np.testing.assert_allclose(stem_bias, shift)
    depthwise, depthwise_bias = lite0.get_layer("block3_dwconv").get_weights()
    scale, shift = folded(state, "_blocks.3._bn1")
    channels_first = np.moveaxis(depthwise[..., 0], -1, 0)
    expected = state["_blocks.3._depthwise_conv.weight"][:, 0] * scale[:, None, None]
    np.testing.assert_allclose(channels_first, expected)
    np.testing.assert_allclose(depthwise_bias, shift)
    kernel, _ = lite0.get_layer("predictions").get_weights()
    np.testing.assert_array_equal(kernel, state["_fc.weight"].T)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda state: state.update(extra=np.zeros(1)), "tensors the model lacks"),
        (lambda state: state.pop("_blocks.3._bn1.running_var"), "no tensor _blocks.3._bn1"),
        (lambda state: state.update({"_fc.bias": np.zeros(999)}), "predictions/bias"),
    ],
    ids=["unused", "missing", "misshapen"],
)
def test_loading_fails_loudly_on_a_mismatched_file(
    monkeypatch: pytest.MonkeyPatch, change: Callable[[dict], object], message: str
) -> None:
    state = read_torch_state_dict(imagenet_weights_path("efficientnet_lite0"))
    change(state)
    monkeypatch.setattr(efficientnet_lite, "read_torch_state_dict", lambda _path: state)

    with pytest.raises(ValueError, match=message):
        build_efficientnet_lite("efficientnet_lite0")


def test_lite0_recognises_photos(lite0: keras.Model) -> None:
    photos = np.stack([square_photo(name, 224) for name in PHOTOS])

    for (name, classes), labels in zip(PHOTOS.items(), top5(lite0, photos), strict=True):
        assert classes & set(labels), f"{name}: top-5 {labels}"


@pytest.mark.parametrize("variant", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_variants_recognise_photos(variant: str) -> None:
    model = build_efficientnet_lite(variant)
    photos = np.stack([square_photo(name, INPUT_SIZES[variant]) for name in PHOTOS])

    for (name, classes), labels in zip(PHOTOS.items(), top5(model, photos), strict=True):
        assert classes & set(labels), f"{name}: top-5 {labels}"
