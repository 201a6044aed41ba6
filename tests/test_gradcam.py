"""Grad-CAM: on a small model whose evidence is planted in one quadrant, and on bundles
built like the shipped one (stage statistics, covariances, an ensemble of backbones)."""

import dataclasses
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from keras.ops import softmax
from scipy.stats import spearmanr

from models.backbones import feature_layers, get_backbone
from models.bundle import DEFAULT_BUNDLE, BackboneSpec, ModelBundle, save_bundle
from models.gradcam import GradCam, bundle_grad_cam, overlay
from models.head import HeadConfig, build_head, merge_heads
from tests.conftest import COLOURS, painting
from transforms.images import decode_image

SIZE = 32
QUADRANTS = {"top_left": (0, 0), "top_right": (0, 1), "bottom_left": (1, 0), "bottom_right": (1, 1)}


def quadrant_model() -> GradCam:
    """A real two-stage Keras model: a convolution whose channel 0 answers red and channel
    1 answers blue (the rest: fixed random texture detectors), then the mean of each channel
    and a dense layer whose class 0 is "red" and class 1 "blue"."""
    rng = np.random.default_rng(0)
    images = keras.Input((SIZE, SIZE, 3))
    conv = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")
    maps = keras.Model(images, [conv(images)])
    kernel = rng.normal(0, 0.002, (3, 3, 3, 8)).astype("float32")
    kernel[..., :2] = 0
    kernel[1, 1, :, 0] = (1 / 255, -0.5 / 255, -0.5 / 255)  # redness
    kernel[1, 1, :, 1] = (-0.5 / 255, -0.5 / 255, 1 / 255)  # blueness
    conv.set_weights([kernel, np.zeros(8, "float32")])

    feature_map = keras.Input((SIZE // 2, SIZE // 2, 8))
    dense = keras.layers.Dense(2)
    head = keras.Model([feature_map], dense(keras.layers.GlobalAveragePooling2D()(feature_map)))
    weights = np.zeros((8, 2), "float32")
    weights[0, 0] = weights[1, 1] = 10.0
    dense.set_weights([weights, np.zeros(2, "float32")])
    return GradCam(maps, head)


def planted(quadrant: str, colour=(220, 30, 30), seed: int = 0) -> np.ndarray:
    """Grey noise with a patch of `colour` in the middle of one quadrant."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(128, 10, (SIZE, SIZE, 3)), 0, 255)
    row, column = QUADRANTS[quadrant]
    top, left = row * SIZE // 2 + 4, column * SIZE // 2 + 4
    image[top : top + 8, left : left + 8] = colour
    return image.astype("uint8")


def quadrant_shares(heatmap: np.ndarray) -> dict[str, float]:
    half = heatmap.shape[0] // 2
    return {
        name: float(heatmap[r * half : (r + 1) * half, c * half : (c + 1) * half].sum())
        for name, (r, c) in QUADRANTS.items()
    }


@pytest.mark.parametrize("quadrant", QUADRANTS)
def test_the_map_peaks_where_the_evidence_was_planted(quadrant):
    explained = quadrant_model()(planted(quadrant)[None])
    heatmap = explained.heatmaps[0]
    assert explained.styles.tolist() == [0]  # red: the top class
    peak = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    assert tuple(np.array(peak) // (SIZE // 2)) == QUADRANTS[quadrant]
    shares = quadrant_shares(heatmap)
    assert shares[quadrant] > 0.7 * sum(shares.values())


def test_each_style_is_explained_by_its_own_evidence():
    image = planted("top_left")
    image[20:28, 20:28] = (30, 30, 220)  # blue in the bottom right
    model = quadrant_model()
    red, blue = model(np.stack([image, image]), np.array([0, 1])).heatmaps
    assert max(quadrant_shares(red), key=quadrant_shares(red).get) == "top_left"
    assert max(quadrant_shares(blue), key=quadrant_shares(blue).get) == "bottom_right"


def test_randomising_the_head_changes_the_map():
    """The model-randomisation sanity check (Adebayo et al. 2018): a map that survives
    the loss of what the model learnt explains the image, not the model."""
    model = quadrant_model()
    image = planted("top_right")[None]
    learnt = model(image, np.array([0])).heatmaps[0]
    dense = model.head.layers[-1]
    rng = np.random.default_rng(1)
    dense.set_weights([rng.normal(0, 10, w.shape).astype("float32") for w in dense.get_weights()])
    randomised = model(image, np.array([0])).heatmaps[0]
    correlation = spearmanr(learnt.ravel(), randomised.ravel()).statistic
    assert np.nan_to_num(correlation) < 0.5  # nan: a randomised map with no evidence at all
    assert np.abs(learnt - randomised).max() > 0.5


def test_heatmaps_are_in_0_to_1_with_each_image_its_own_peak():
    images = np.stack([planted(q, seed=i) for i, q in enumerate(QUADRANTS)])
    explained = quadrant_model()(images)
    assert explained.heatmaps.shape == (4, SIZE, SIZE) and explained.heatmaps.dtype == np.float32
    assert explained.heatmaps.min() >= 0
    np.testing.assert_allclose(explained.heatmaps.max(axis=(1, 2)), 1.0)
    assert explained.scores.shape == (4, 2)


def test_no_evidence_is_an_empty_map_not_a_division_by_zero():
    grey = np.full((1, SIZE, SIZE, 3), 128, np.uint8)
    explained = quadrant_model()(grey, np.array([0]))
    assert np.all(explained.heatmaps == 0)


def test_overlay_keeps_the_image_shape_and_colours_where_the_heat_is():
    image = np.full((8, 8, 3), 128, np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[:4] = 1.0
    shown = overlay(image, heat)
    assert shown.shape == image.shape and shown.dtype == np.uint8
    assert not np.array_equal(shown[0, 0], shown[7, 7])


# --- Bundles built like the shipped one ------------------------------------------------------


@pytest.fixture(scope="module")
def covariance_bundle(tmp_path_factory, tiny_bundle) -> str:
    """EfficientNet-Lite0 and Lite1 (real weights), stage and covariance features, and a
    small untrained merged head of two: the shipped model's structure, in small."""
    name, features = "efficientnet_lite0+efficientnet_lite1", "stage_covariance"
    width = sum(
        1280 + 2 * (40 + 80 + 112 + 192 + 320) + 40 * 41 // 2 + 80 * 81 // 2 for _ in range(2)
    )
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(8, width)).astype(np.float32)
    heads = [build_head(samples, 3, HeadConfig(hidden_units=4, seed=s)) for s in (0, 1)]
    tiny = ModelBundle.load(tiny_bundle).manifest
    manifest = dataclasses.replace(
        tiny,
        id="tiny-covariance-ensemble",
        backbone=BackboneSpec(name=name, input_size=224, feature_kind=features),
        head=dataclasses.replace(tiny.head, temperature=1.3),
    )
    path = tmp_path_factory.mktemp("bundle") / "covariance"
    save_bundle(str(path), manifest, merge_heads(heads))
    return str(path)


@pytest.fixture(scope="module")
def paintings(tmp_path_factory) -> np.ndarray:
    folder = tmp_path_factory.mktemp("paintings")
    files = [painting(folder / f"{i}.png", colour, i) for i, colour in enumerate(COLOURS.values())]
    return np.stack([decode_image(f.read_bytes(), size=224) for f in files])


@pytest.fixture(scope="module")
def covariance_grad_cam(covariance_bundle) -> GradCam:
    return bundle_grad_cam(ModelBundle.load(covariance_bundle))


def test_the_two_stages_are_the_bundles_classifier(
    covariance_bundle, covariance_grad_cam, paintings
):
    """Split at the maps, the model still computes the bundle's probabilities."""
    bundle = ModelBundle.load(covariance_bundle)
    grad_cam = covariance_grad_cam
    assert len(grad_cam.maps.outputs) == 2 * len(
        feature_layers(get_backbone("efficientnet_lite0"), "stage_covariance")
    )
    explained = grad_cam(paintings)
    probabilities = softmax(explained.scores)
    expected = bundle.classifier().predict_on_batch(paintings.astype("float32"))
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert explained.heatmaps.shape == (3, 224, 224)
    assert explained.heatmaps.min() >= 0 and explained.heatmaps.max() <= 1
    assert explained.styles.tolist() == np.argmax(expected, axis=1).tolist()


def test_with_a_vote_the_heatmap_explains_the_bundles_own_probabilities(
    projection_bundle, paintings
):
    """The training paintings' vote is part of the scores Grad-CAM explains."""
    bundle = ModelBundle.load(projection_bundle)
    assert bundle.load_vote() is not None
    explained = bundle_grad_cam(bundle)(paintings)
    expected = bundle.classifier().predict_on_batch(paintings.astype("float32"))
    np.testing.assert_allclose(softmax(explained.scores), expected, atol=1e-5)
    assert explained.styles.tolist() == np.argmax(expected, axis=1).tolist()
    assert all(np.ptp(heatmap) > 0 for heatmap in explained.heatmaps)


def test_a_batchs_maps_equal_the_one_image_maps(covariance_grad_cam, paintings):
    grad_cam = covariance_grad_cam
    styles = np.array([2, 0, 1])
    batch = grad_cam(paintings, styles).heatmaps
    for i in range(len(paintings)):
        alone = grad_cam(paintings[i : i + 1], styles[i : i + 1]).heatmaps[0]
        np.testing.assert_allclose(batch[i], alone, atol=1e-5)


def test_grad_cam_computes_in_float32_where_prediction_runs_in_bfloat16(tiny_bundle, paintings):
    bundle = ModelBundle.load(tiny_bundle)
    float32 = bundle_grad_cam(bundle)(paintings).heatmaps
    keras.config.set_dtype_policy("mixed_bfloat16")  # as while a bfloat16 classifier is built
    try:
        grad_cam = bundle_grad_cam(bundle)
    finally:
        keras.config.set_dtype_policy("float32")
    assert {layer.compute_dtype for layer in grad_cam.maps.layers} == {"float32"}
    np.testing.assert_allclose(grad_cam(paintings).heatmaps, float32, atol=1e-6)


def test_randomising_a_bundles_head_changes_its_maps(tiny_bundle, paintings, tmp_path):
    bundle = ModelBundle.load(tiny_bundle)
    head = bundle.load_head()
    rng = np.random.default_rng(7)
    head.set_weights([rng.normal(0, 0.05, w.shape).astype("float32") for w in head.get_weights()])
    randomised = save_bundle(str(tmp_path / "randomised"), bundle.manifest, head)
    explained = bundle_grad_cam(bundle)(paintings)  # each painting's own top style, whose
    styles, learnt = explained.styles, explained.heatmaps  # evidence is there to be found
    assert all(np.ptp(heatmap) > 0 for heatmap in learnt), f"flat maps; scores {explained.scores}"
    shuffled = bundle_grad_cam(randomised)(paintings, styles).heatmaps
    assert spearmanr(learnt.ravel(), shuffled.ravel()).statistic < 0.5
    again = bundle_grad_cam(bundle)(paintings, styles).heatmaps
    assert spearmanr(learnt.ravel(), again.ravel()).statistic > 0.999


WIKIART16 = Path(__file__).resolve().parents[2] / "shared" / "wikiart16"


@pytest.mark.slow
@pytest.mark.skipif(not WIKIART16.is_dir(), reason="../shared/wikiart16 is not here")
def test_the_shipped_model_on_real_paintings():
    """Through the shipped ensemble: the classifier's probabilities, one-image maps, and
    maps that differ from style to style."""
    bundle = ModelBundle.load(DEFAULT_BUNDLE)
    catalog = pd.read_csv(WIKIART16 / "catalog.csv", dtype=str)
    uris = catalog[catalog["split"] == "val"].groupby("style").head(1)["uri"][:6]
    images = np.stack([decode_image((WIKIART16 / u).read_bytes(), size=224) for u in uris])
    grad_cam = bundle_grad_cam(bundle)
    explained = grad_cam(images)
    probabilities = softmax(explained.scores)
    expected = bundle.classifier().predict_on_batch(images.astype("float32"))
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    alone = grad_cam(images[2:3], explained.styles[2:3]).heatmaps[0]
    np.testing.assert_allclose(explained.heatmaps[2], alone, atol=1e-5)
    other = grad_cam(images[:1], (explained.styles[:1] + 1) % len(bundle.classes)).heatmaps[0]
    assert spearmanr(explained.heatmaps[0].ravel(), other.ravel()).statistic < 0.95
