import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from models.backbones import (
    BACKBONES,
    centre_pooled,
    channel_covariance,
    feature_extractor,
    get_backbone,
    input_size_of,
    resize_matrix,
    resized,
    source_columns,
    with_mirror,
)
from models.settings import BACKBONE_NAMES


def test_resnet50_path_builds_and_taps_its_stages_with_random_weights():
    """ImageNet weights for ResNet50 come from Keras's download or --backbone_weights; the
    graph itself is tested here with random weights."""
    model = feature_extractor("resnet50", "stage_stats", weights=None)
    assert model.input.shape[1:] == (224, 224, 3)
    assert model.output.shape[-1] == 2048 + 2 * (256 + 512 + 1024)
    images = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    features = model.predict_on_batch(images)
    assert features.shape == (2, 5632) and np.isfinite(features).all()


def test_lite2_stage_statistics_have_the_expected_width():
    pooled = feature_extractor("efficientnet_lite2", "pooled", weights=None)
    stats = feature_extractor("efficientnet_lite2", "stage_stats", weights=None)
    assert pooled.output.shape[-1] == 1280
    assert stats.output.shape[-1] == 1280 + 2 * (48 + 88 + 120 + 208 + 352)


def test_the_names_a_bundle_is_checked_against_are_the_backbones_built():
    """models.settings lists them for checks that run before Keras loads."""
    assert tuple(BACKBONES) == BACKBONE_NAMES


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown backbone 'vgg'"):
        get_backbone("vgg")
    with pytest.raises(ValueError, match="Unknown feature kind 'gram'"):
        feature_extractor("efficientnet_lite0", "gram", weights=None)


def test_channel_covariance_is_the_signed_root_of_numpys_covariance():
    feature_map = np.random.default_rng(2).normal(size=(2, 5, 4, 3)).astype(np.float32)
    got = np.asarray(channel_covariance(feature_map))
    rows, cols = np.triu_indices(3)
    for image, vector in zip(feature_map, got, strict=True):
        covariance = np.cov(image.reshape(20, 3), rowvar=False, bias=True)[rows, cols]
        np.testing.assert_allclose(vector, np.sign(covariance) * np.sqrt(np.abs(covariance)),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip


def test_lite2_covariance_features_add_the_early_stages_covariances():
    model = feature_extractor("efficientnet_lite2", "stage_covariance", weights=None)
    stats_width = 1280 + 2 * (48 + 88 + 120 + 208 + 352)
    assert model.output.shape[-1] == stats_width + 48 * 49 // 2 + 88 * 89 // 2
    with pytest.raises(ValueError, match="resnet50 has no layers"):
        feature_extractor("resnet50", "stage_covariance", weights=None)


def test_an_ensemble_concatenates_its_backbones_features_at_their_own_sizes():
    ensemble = feature_extractor("efficientnet_lite2+efficientnet_lite0", "pooled", weights=None)
    assert input_size_of("efficientnet_lite2+efficientnet_lite0") == 260
    assert ensemble.input.shape[1:] == (260, 260, 3)
    images = np.random.default_rng(4).uniform(0, 255, (2, 260, 260, 3)).astype(np.float32)
    features = np.asarray(ensemble.predict_on_batch(images))
    assert features.shape == (2, 1280 + 1280) and np.isfinite(features).all()
    lite0 = ensemble.get_layer("efficientnet_lite0_pooled")
    assert lite0.input.shape[1:] == (224, 224, 3)  # resized inside the model, not at decoding
    resized = keras.layers.Resizing(224, 224, antialias=True)(images)
    np.testing.assert_allclose(
        features[:, 1280:], lite0.predict_on_batch(resized), rtol=1e-4, atol=1e-4
    )


def test_the_in_model_resize_is_kerass_antialiased_resize_and_xla_compiles_it():
    """An ensemble's second backbone gets its input size from two matrix products: the
    values of Keras's Resizing layer, borders included, in operations XLA can compile."""
    assert resize_matrix(260, 224).shape == (224, 260)
    np.testing.assert_allclose(resize_matrix(260, 224).sum(axis=1), 1.0, atol=1e-6)
    inputs = keras.Input((260, 260, 3))
    resize = keras.Model(inputs, resized(inputs, 224))
    images = np.random.default_rng(5).uniform(0, 255, (2, 260, 260, 3)).astype(np.float32)
    expected = keras.layers.Resizing(224, 224, antialias=True)(images)
    np.testing.assert_allclose(resize.predict_on_batch(images), expected, atol=1e-3)
    compiled = tf.function(resize, jit_compile=True)
    np.testing.assert_allclose(compiled(images), expected, atol=1e-3)


def test_the_in_model_enlargement_is_the_decodings_bicubic():
    """A backbone larger than the decoded image sees it enlarged as Pillow would have
    enlarged it while decoding (up to Pillow's rounding to 8 bits between its two passes)."""
    rng = np.random.default_rng(6)
    smooth = Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).resize(
        (224, 224), Image.Resampling.BILINEAR
    )
    pillow = np.asarray(smooth.resize((260, 260), Image.Resampling.BICUBIC), np.float32)
    inputs = keras.Input((224, 224, 3))
    enlarge = keras.Model(inputs, resized(inputs, 260))
    ours = np.asarray(enlarge.predict_on_batch(np.asarray(smooth, np.float32)[None]))[0]
    assert np.abs(ours - pillow).max() < 1.5


def test_backbone_weights_file_is_for_a_single_backbone():
    with pytest.raises(ValueError, match="not for an ensemble"):
        feature_extractor("efficientnet_lite2+efficientnet_lite0", "pooled", weights_path="w.pth")


def test_with_mirror_adds_the_features_of_the_left_right_mirror():
    extractor = feature_extractor("efficientnet_lite0", "pooled", weights=None)
    images = np.random.default_rng(5).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    both = np.asarray(with_mirror(extractor).predict_on_batch(images))
    expected = [extractor.predict_on_batch(images), extractor.predict_on_batch(images[:, :, ::-1])]
    np.testing.assert_allclose(both, np.concatenate(expected, axis=1), rtol=1e-4, atol=1e-4)


def test_the_fingerprint_source_is_each_backbones_last_map_averaged_without_its_outer_ring():
    spec = "efficientnet_lite0+efficientnet_lite2"
    extractor = feature_extractor(spec, "pooled", weights=None, fingerprint_source=True)
    images = np.random.default_rng(6).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    features, sources = extractor.predict_on_batch(images)
    plain = feature_extractor(spec, "pooled", weights=None)
    np.testing.assert_allclose(features, plain.predict_on_batch(images), rtol=1e-4, atol=1e-4)
    assert source_columns(extractor, spec, "pooled") == [(0, 1280), (1280, 2560)]
    lite0 = extractor.get_layer("efficientnet_lite0_pooled")
    maps = keras.Model(lite0.input, lite0.get_layer("head_conv").output).predict_on_batch(
        resized(images, 224)
    )
    assert maps.shape[1:3] == (7, 7)
    np.testing.assert_allclose(
        sources[:, :1280], maps[:, 1:6, 1:6].mean(axis=(1, 2)), rtol=1e-4, atol=1e-5
    )


def test_a_map_of_fewer_than_three_cells_a_side_is_averaged_whole():
    maps = np.random.default_rng(7).uniform(size=(2, 2, 5, 3)).astype(np.float32)
    pooled = keras.Model(inputs := keras.Input((2, 5, 3)), centre_pooled(inputs))
    np.testing.assert_allclose(pooled.predict_on_batch(maps), maps.mean(axis=(1, 2)), rtol=1e-5)
