"""Heads: built, fitted, merged, calibrated, saved."""

import keras
import numpy as np
import pytest

from models.bundle import ModelBundle, save_bundle
from models.head import (
    HeadConfig,
    build_head,
    fit_temperature,
    low_rank_head,
    merge_heads,
    stratified_folds,
)
from tests.conftest import lite0_manifest


def test_temperature_undoes_a_known_sharpening():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 4))
    cumulative = np.exp(true_logits).cumsum(1) / np.exp(true_logits).sum(1, keepdims=True)
    labels = (rng.uniform(size=(4000, 1)) > cumulative).sum(1)
    assert fit_temperature(true_logits * 3.0, labels) == pytest.approx(3.0, rel=0.1)


def test_folds_deal_every_class_evenly():
    labels = np.array([0] * 10 + [1] * 20 + [2] * 3)
    folds = stratified_folds(labels, 5, seed=0)
    for label, per_fold in ((0, 2), (1, 4)):
        assert np.bincount(folds[labels == label], minlength=5).tolist() == [per_fold] * 5
    assert sorted(np.bincount(folds[labels == 2], minlength=5)) == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="at least 2 folds"):
        stratified_folds(labels, 1, seed=0)


@pytest.mark.parametrize("hidden_units", [0, 4], ids=["linear", "mlp"])
def test_merged_heads_give_the_mean_logits_and_survive_the_bundle(tmp_path, hidden_units):
    rng = np.random.default_rng(0)
    features = rng.normal(loc=3.0, scale=2.0, size=(32, 6)).astype(np.float32)
    heads = [
        build_head(features[seed::2], 3, HeadConfig(hidden_units=hidden_units, seed=seed))
        for seed in (0, 1)
    ]  # each head standardises with its own statistics, as cross-fitted heads do
    merged = merge_heads(heads)
    expected = np.mean([h.predict(features, verbose=0) for h in heads], axis=0)
    np.testing.assert_allclose(merged.predict(features, verbose=0), expected, atol=1e-5)
    assert len(merged.layers) == (2 if hidden_units == 0 else 3)  # input and dense layers

    save_bundle(str(tmp_path), lite0_manifest("two-heads", ["a", "b", "c"]), merged)
    reloaded = ModelBundle.load(str(tmp_path)).load_head()
    # The bundle stores the weights in float16: the merged head with its weights so rounded.
    merged.set_weights([w.astype(np.float16).astype(np.float32) for w in merged.get_weights()])
    stored = merged.predict(features, verbose=0)
    np.testing.assert_allclose(reloaded.predict(features, verbose=0), stored, atol=1e-5)


def test_heads_of_different_shapes_are_not_merged():
    features = np.zeros((4, 6), np.float32)
    heads = [build_head(features, 3, HeadConfig(hidden_units=h)) for h in (0, 4)]
    with pytest.raises(ValueError, match="one configuration"):
        merge_heads(heads)


def test_a_saved_head_keeps_its_weights_but_not_its_optimizer(tmp_path):
    features = np.random.default_rng(3).normal(size=(8, 6)).astype(np.float32)
    head = build_head(features, 3, HeadConfig(hidden_units=4, seed=0))
    head.compile(optimizer="adam", loss="categorical_crossentropy")
    head.fit(features, np.eye(3)[np.arange(8) % 3], epochs=1, verbose=0)
    bundle = save_bundle(str(tmp_path), lite0_manifest("t", ["a", "b", "c"]), head)
    loaded = bundle.load_head()
    assert getattr(loaded, "optimizer", None) is None
    assert not isinstance(loaded(keras.Input((6,))), list)  # as the classifier calls it
    logits = loaded.predict(features, verbose=0)
    assert isinstance(logits, np.ndarray) and logits.shape == (8, 3)
    np.testing.assert_allclose(logits, head.predict(features, verbose=0), rtol=1e-6)


def test_a_low_rank_head_at_full_rank_is_the_merged_head_and_close_below_it():
    rng = np.random.default_rng(0)
    hidden_factors = rng.normal(size=(600, 6))  # what the features vary by: 6 directions
    features = (hidden_factors @ rng.normal(size=(6, 40)) + 5.0).astype(np.float32)
    features += rng.normal(scale=0.01, size=features.shape).astype(np.float32)
    merged = merge_heads(
        [build_head(features, 3, HeadConfig(hidden_units=8, seed=seed)) for seed in (0, 1)]
    )
    expected = merged.predict(features, verbose=0)
    full = low_rank_head(merged, features, rank=16)  # the merged head's 16 hidden units
    np.testing.assert_allclose(full.predict(features, verbose=0), expected, atol=1e-4)
    small = low_rank_head(merged, features, rank=6)  # the features' own 6 directions
    assert [layer.name for layer in small.layers[1:]] == ["projection", "hidden", "logits"]
    assert small.get_layer("projection").get_weights()[0].shape == (40, 6)
    np.testing.assert_allclose(small.predict(features, verbose=0), expected, atol=0.05)
    projected = keras.Model(small.inputs, small.get_layer("projection").output)
    assert np.abs(projected.predict(features, verbose=0).mean(0)).max() < 1e-3  # centred
