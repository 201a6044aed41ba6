"""The features' pass of training: its rows."""

import numpy as np
from apache_beam.ml.inference.base import PredictionResult

from pipeline.features import default_features_dir, feature_row
from transforms.catalog import ImageRecord


def test_feature_rows_keep_float16_arrays_one_half_per_view():
    """Arrays, not lists of Python floats: the feature pass holds every row in memory."""
    record = ImageRecord(uri="a.jpg", location="a.jpg", label="Cubism", extra=(("split", "train"),))
    vector = np.arange(6, dtype=np.float64)
    row = feature_row((record, PredictionResult(None, vector)), split_column="split", mirror=True)

    assert row["split"] == "train"
    assert row["features"].dtype == row["mirrored_features"].dtype == np.float16
    np.testing.assert_array_equal(row["features"], [0, 1, 2])
    np.testing.assert_array_equal(row["mirrored_features"], [3, 4, 5])


def test_reused_features_are_read_from_an_earlier_versions_folder_where_only_it_has_them(
    tmp_path,
):
    output = str(tmp_path / "bundle")
    assert default_features_dir(output, reuse=True) == f"{output}.features"
    (tmp_path / "bundle.embeddings").mkdir()
    (tmp_path / "bundle.embeddings" / "features-00000-of-00001.parquet").write_bytes(b"")
    assert default_features_dir(output, reuse=True) == f"{output}.embeddings"
    assert default_features_dir(output, reuse=False) == f"{output}.features"
    (tmp_path / "bundle.features").mkdir()
    (tmp_path / "bundle.features" / "features-00000-of-00001.parquet").write_bytes(b"")
    assert default_features_dir(output, reuse=True) == f"{output}.features"
