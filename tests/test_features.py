"""The features' pass of training: its rows."""

import numpy as np
from apache_beam.ml.inference.base import PredictionResult

from pipeline.features import embedding_row
from transforms.catalog import ImageRecord


def test_feature_rows_keep_float32_arrays_one_half_per_view():
    """Arrays, not lists of Python floats: the feature pass holds every row in memory."""
    record = ImageRecord(uri="a.jpg", location="a.jpg", label="Cubism", extra=(("split", "train"),))
    vector = np.arange(6, dtype=np.float64)
    row = embedding_row((record, PredictionResult(None, vector)), split_column="split", mirror=True)

    assert row["split"] == "train"
    assert row["features"].dtype == row["mirrored_features"].dtype == np.float32
    np.testing.assert_array_equal(row["features"], [0, 1, 2])
    np.testing.assert_array_equal(row["mirrored_features"], [3, 4, 5])
