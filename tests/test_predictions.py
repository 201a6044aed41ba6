"""Prediction rows and their schema: the tool's own column names against the catalog's."""

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from transforms.catalog import open_catalog, read_records
from transforms.predictions import (
    error_row,
    passthrough_names,
    prediction_schema,
    with_current_names,
)


def test_clashing_catalog_columns_are_renamed_and_the_output_is_readable(tmp_path):
    catalog_path = tmp_path / "predictions.csv"
    catalog_path.write_text(
        "uri,catalog_style,label,style,confidence,top_k_styles,top_k_probs,model,error\n"
        "a.jpg,x,Rococo,Baroque,0.9,['Baroque'],[0.9],old,\n"
    )
    catalog = open_catalog(str(catalog_path), label_column="label")
    schema = prediction_schema(catalog)
    assert schema.names == [
        "uri", "catalog_style", "catalog_catalog_style", "catalog_confidence",
        "catalog_top_k_styles", "catalog_top_k_probs", "catalog_model", "catalog_error",
        "label", "style", "confidence", "top_k_styles", "top_k_probabilities", "model", "error",
    ]  # fmt: skip
    [record] = read_records(catalog.files[0], catalog)
    row = error_row((record, "not_found: a.jpg"), model_id="new", has_labels=True)
    pq.write_table(pa.Table.from_pylist([row], schema), tmp_path / "out.parquet")
    written = pd.read_parquet(tmp_path / "out.parquet").iloc[0]
    assert (written["label"], written["catalog_catalog_style"]) == ("Rococo", "Baroque")
    assert (written["model"], written["catalog_model"]) == ("new", "old")


def test_the_rename_rule_is_the_same_whatever_the_flags():
    assert passthrough_names(("year", "label", "uri")) == ("year", "catalog_label", "catalog_uri")
    assert passthrough_names(("catalog_error", "error")) == (
        "catalog_error",
        "catalog_catalog_error",
    )


def test_a_row_of_an_earlier_runs_files_reads_under_todays_names():
    earlier = {"uri": "a.jpg", "style": "Baroque", "top_k_probs": [0.9], "title": "x"}
    assert with_current_names(earlier) == {
        "uri": "a.jpg", "style": "Baroque", "top_k_probabilities": [0.9], "title": "x"
    }  # fmt: skip
