"""Training end to end on small made-up paintings, then predicting with what it made."""

import json

import numpy as np
import pandas as pd
import pytest
from apache_beam.ml.inference.base import PredictionResult

from models.bundle import ModelBundle, save_bundle
from models.head import HeadConfig, build_head, fit_temperature, merge_heads, stratified_folds
from pipeline.features import embedding_row, read_embeddings
from pipeline.predict import run as predict
from pipeline.train import run as train
from tests.conftest import CLASSES, COLOURS, lite0_manifest, painting
from transforms.catalog import ImageRecord


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
    np.testing.assert_allclose(reloaded.predict(features, verbose=0), expected, atol=1e-5)


def test_heads_of_different_shapes_are_not_merged():
    features = np.zeros((4, 6), np.float32)
    heads = [build_head(features, 3, HeadConfig(hidden_units=h)) for h in (0, 4)]
    with pytest.raises(ValueError, match="one configuration"):
        merge_heads(heads)


@pytest.fixture
def labelled_catalog(tmp_path):
    rows = []
    for style in CLASSES:
        for i in range(8):
            path = painting(tmp_path / "images" / f"{style}_{i}.jpg", COLOURS[style], seed=i)
            rows.append({"uri": f"images/{path.name}", "style": style,
                         "split": "val" if i >= 6 else "train"})  # fmt: skip
    catalog = pd.DataFrame(rows)
    catalog.to_csv(tmp_path / "catalog.csv", index=False)
    catalog[catalog.split == "val"].to_csv(tmp_path / "val.csv", index=False)
    return tmp_path


def test_feature_rows_keep_float32_arrays_one_half_per_view():
    """Arrays, not lists of Python floats: the feature pass holds every row in memory."""
    record = ImageRecord(uri="a.jpg", location="a.jpg", label="Cubism", extra=(("split", "train"),))
    vector = np.arange(6, dtype=np.float64)
    row = embedding_row((record, PredictionResult(None, vector)), split_column="split", mirror=True)

    assert row["split"] == "train"
    assert row["features"].dtype == row["mirrored_features"].dtype == np.float32
    np.testing.assert_array_equal(row["features"], [0, 1, 2])
    np.testing.assert_array_equal(row["mirrored_features"], [3, 4, 5])


def test_train_then_predict_agree_on_the_held_out_split(labelled_catalog):
    bundle = labelled_catalog / "bundle"
    argv = [f"--input={labelled_catalog / 'catalog.csv'}", f"--output={bundle}",
            "--backbone=efficientnet_lite0", "--features=pooled", "--folds=3",
            "--epochs=40", "--batch_size=8", "--model_id=colours"]  # fmt: skip
    manifest = train(argv)

    saved = json.loads((bundle / "manifest.json").read_text())
    assert saved == manifest
    assert manifest["classes"] == CLASSES
    assert manifest["training"]["command"].startswith("python -m pipeline.train --input=")
    assert manifest["training"]["counts"] == {"rows": 24, "errors": 0, "train": 18,
                                              "train_mirrored": 0, "eval": 6}  # fmt: skip
    assert manifest["head"]["folds"] == 3 and len(manifest["head"]["epochs_trained"]) == 3
    assert manifest["scores"]["out_of_fold"]["n_labelled"] == 18
    assert len(manifest["training"]["catalog_sha256"]) == 64
    val = manifest["scores"]["val"]
    assert val["n_labelled"] == 6 and val["top1"] >= 0.8  # colours are easy to tell apart

    summary = predict([f"--input={labelled_catalog / 'val.csv'}",
                       f"--output={labelled_catalog / 'out'}", f"--model={bundle}"])  # fmt: skip
    assert summary["model"] == "colours"
    assert summary["top1"] == pytest.approx(val["top1"])
    assert summary["macro_f1"] == pytest.approx(val["macro_f1"])

    with pytest.raises(ValueError, match="no mirror features"):
        train([*argv, "--reuse_embeddings", "--augment_mirror"])
    with pytest.raises(ValueError, match="--folds: must be at least 2"):
        train([*argv, "--folds=1"])  # before any feature is computed


def test_an_ensemble_trained_with_mirrors_predicts_what_training_scored(labelled_catalog):
    bundle = labelled_catalog / "ensemble"
    argv = [f"--input={labelled_catalog / 'catalog.csv'}", f"--output={bundle}",
            "--backbone=efficientnet_lite1+efficientnet_lite0", "--features=pooled",
            "--augment_mirror", "--folds=3", "--epochs=40",
            "--batch_size=8"]  # fmt: skip
    manifest = train(argv)

    assert manifest["backbone"]["name"] == "efficientnet_lite1+efficientnet_lite0"
    assert manifest["backbone"]["input_size"] == 240
    assert manifest["training"]["counts"]["train_mirrored"] == 18
    embeddings = read_embeddings(f"{bundle}.embeddings").to_pandas()
    features = np.stack(embeddings["features"].to_numpy())
    mirrored = np.stack(embeddings["mirrored_features"].to_numpy())
    assert features.shape == mirrored.shape == (24, 2 * 1280)
    assert not np.allclose(features, mirrored)  # the paintings are not symmetric
    summary = predict([f"--input={labelled_catalog / 'val.csv'}",
                       f"--output={labelled_catalog / 'out'}", f"--model={bundle}"])  # fmt: skip
    assert summary["top1"] == pytest.approx(manifest["scores"]["val"]["top1"])
