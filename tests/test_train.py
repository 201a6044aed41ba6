"""Training end to end on small made-up paintings, then predicting with what it made."""

import json

import numpy as np
import pandas as pd
import pytest

from models.bundle import ModelBundle
from models.settings import SAME_PICTURE_DISTANCE
from pipeline.features import SOURCES_PREFIX, read_features
from pipeline.predict import run as predict
from pipeline.train import run as train
from tests.conftest import CLASSES, COLOURS, painting


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


def test_train_then_predict_agree_on_the_held_out_split(labelled_catalog):
    bundle = labelled_catalog / "bundle"
    argv = [f"--input={labelled_catalog / 'catalog.csv'}", f"--output={bundle}",
            "--backbone=efficientnet_lite0", "--feature_kind=pooled", "--folds=3",
            "--epochs=40", "--batch_size=8", "--model_id=colours",
            "--projection=8"]  # fmt: skip
    manifest = train(argv)

    saved = json.loads((bundle / "manifest.json").read_text())
    assert saved == manifest.to_json()
    assert ModelBundle.load(str(bundle)).manifest == manifest
    assert manifest.classes == tuple(CLASSES)
    assert manifest.backbone.feature_kind == saved["backbone"]["features"] == "pooled"
    assert manifest.training["command"].startswith("python -m pipeline.train --input=")
    assert manifest.training["counts"] == {"rows": 24, "errors": 0, "train": 18,
                                           "train_mirrored": 0, "eval": 6}  # fmt: skip
    assert manifest.head.fit["folds"] == 3 and len(manifest.head.fit["epochs_trained"]) == 3
    fingerprint = ModelBundle.load(str(bundle)).load_fingerprint()
    assert fingerprint.columns == ((0, 1280),)  # Lite0's centre-pooled map, all of it
    assert fingerprint.paintings == 18  # all the training paintings: fewer than a sample's
    assert 1 <= fingerprint.dimension <= 17  # the directions 18 training paintings span
    sampled = read_features(f"{bundle}.features", SOURCES_PREFIX).to_pandas()
    catalog = pd.read_csv(labelled_catalog / "catalog.csv")
    assert sorted(sampled.uri) == sorted(catalog.uri[catalog.split == "train"])
    assert sampled.error.isna().all()
    assert saved["embedding"] == {
        "dimension": 8 + len(CLASSES) + fingerprint.dimension,  # projection, styles, fingerprint
        "kind": "style_and_fingerprint",
        "fingerprint_dimension": fingerprint.dimension,
        "same_picture_distance": SAME_PICTURE_DISTANCE,
    }
    assert manifest.scores["out_of_fold"].n_labelled == 18
    vote = ModelBundle.load(str(bundle)).load_vote()  # --voters' default: every painting
    assert saved["vote"] == vote.record() and saved["vote"]["paintings"] == 18
    assert vote.voters == 17 and vote.temperature > 0  # all the others, at most
    assert len(manifest.training["catalog_sha256"]) == 64
    assert (labelled_catalog / "bundle.features").is_dir()
    val = manifest.scores["val"]
    assert val.n_labelled == 6 and val.top1 >= 0.8  # colours are easy to tell apart
    assert set(val.per_class_f1) == set(CLASSES)

    summary = predict([f"--input={labelled_catalog / 'val.csv'}",
                       f"--output={labelled_catalog / 'out'}", f"--model={bundle}"])  # fmt: skip
    assert summary.model_id == "colours"
    assert summary.top1 == pytest.approx(val.top1)
    assert summary.macro_f1 == pytest.approx(val.macro_f1)

    classifier = ModelBundle.load(str(bundle)).classifier(embeddings=True)
    images = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    probabilities, embeddings = classifier.predict_on_batch(images)
    assert probabilities.shape == (2, 3)
    assert embeddings.shape == (2, saved["embedding"]["dimension"])
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)

    with pytest.raises(ValueError, match="no mirrors' features"):
        train([*argv, "--reuse_features", "--augment_mirror"])
    with pytest.raises(ValueError, match="--folds: must be at least 2"):
        train([*argv, "--folds=1"])  # before any feature is computed


@pytest.mark.slow
def test_an_ensemble_trained_with_mirrors_predicts_what_training_scored(labelled_catalog):
    bundle = labelled_catalog / "ensemble"
    argv = [f"--input={labelled_catalog / 'catalog.csv'}", f"--output={bundle}",
            "--backbone=efficientnet_lite1+efficientnet_lite0", "--feature_kind=pooled",
            "--augment_mirror", "--folds=3", "--epochs=40",
            "--batch_size=8"]  # fmt: skip
    manifest = train(argv)

    assert manifest.backbone.name == "efficientnet_lite1+efficientnet_lite0"
    assert manifest.backbone.input_size == 240
    assert manifest.training["counts"]["train_mirrored"] == 18
    feature_files = read_features(f"{bundle}.features").to_pandas()
    features = np.stack(feature_files["features"].to_numpy())
    mirrored = np.stack(feature_files["mirrored_features"].to_numpy())
    assert features.shape == mirrored.shape == (24, 2 * 1280)
    assert not np.allclose(features, mirrored)  # the paintings are not symmetric
    summary = predict([f"--input={labelled_catalog / 'val.csv'}",
                       f"--output={labelled_catalog / 'out'}", f"--model={bundle}"])  # fmt: skip
    assert summary.top1 == pytest.approx(manifest.scores["val"].top1)
