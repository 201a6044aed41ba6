"""A run's embeddings files: the schema the pipeline writes (with Beam too), and the reader
that the index's command trusts."""

import json

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from models.embedding import EmbeddingSpec, unit_vectors
from tests.embedding_runs import (
    DIMENSION,
    ORIGIN,
    museum_catalog,
    prediction_row,
    unit_rows,
    write_run,
)
from transforms.embeddings import (
    EMBEDDING_FILE_PREFIX,
    METADATA_KEY,
    PREDICTION_ONLY_COLUMNS,
    EmbeddingsError,
    EmbeddingsOrigin,
    embedding_row,
    embedding_schema,
    open_run_embeddings,
)
from transforms.predictions import STYLE_FIELDS, prediction_schema


def test_the_schema_keys_rows_as_the_predictions_do_and_names_its_origin():
    predictions = prediction_schema(museum_catalog())
    schema = embedding_schema(predictions, ORIGIN)
    assert schema.names == ["uri", "title", "accession", "label", "style", "confidence",
                            "embedding"]  # fmt: skip
    assert schema.field("accession").type == pa.int64()  # the catalog's own type, as predicted
    assert schema.field("embedding").type == pa.list_(pa.float16(), DIMENSION)
    assert json.loads(schema.metadata[METADATA_KEY]) == {
        "model": "test-model-v1",
        "embedding": {"dimension": DIMENSION, "kind": "test_features"},
    }
    assert EmbeddingsOrigin.from_schema(schema, "here") == ORIGIN


def test_the_columns_left_out_are_the_predictions_own():
    """A guard on the names: they are prediction columns (a renamed one would be kept)."""
    assert {field.name for field in STYLE_FIELDS} - PREDICTION_ONLY_COLUMNS == {
        "style",
        "confidence",
    }


def test_a_row_is_its_prediction_less_the_top_k_with_a_unit_float16_vector():
    row = embedding_row(prediction_row(3, "a.jpg", museum_catalog()), np.arange(1, 9) * 2.0)
    assert set(row) == {"uri", "title", "accession", "label", "style", "confidence", "embedding"}
    assert row["embedding"].dtype == np.float16
    assert np.linalg.norm(row["embedding"].astype(np.float32)) == pytest.approx(1, abs=1e-3)


def test_files_read_back_in_order_as_stored_with_their_rows(tmp_path):
    vectors = unit_rows(10)
    run = write_run(tmp_path / "out", vectors, shards=3)
    embeddings = open_run_embeddings(str(run))
    assert embeddings.origin == ORIGIN and embeddings.n_rows == 10 and len(embeddings.files) == 3
    batches = list(embeddings.batches(["uri", "title", "style", "no_such_column"]))
    read = np.concatenate([vectors for vectors, _ in batches])
    rows = pa.concat_tables(pa.Table.from_batches([b]) for _, b in batches)
    assert read.dtype == np.float16
    np.testing.assert_allclose(read, vectors, atol=2e-3)
    assert rows.column_names == ["uri", "title", "style"]
    assert rows.column("uri").to_pylist() == [f"images/painting-{i:05d}.jpg" for i in range(10)]


def test_beam_writes_the_files_with_the_schema_and_its_metadata(tmp_path):
    """The pipeline's way: beam.io.WriteToParquet of embedding rows, Beam's shard names."""
    catalog = museum_catalog()
    schema = embedding_schema(prediction_schema(catalog), ORIGIN)
    vectors = unit_rows(5)
    rows = [embedding_row(prediction_row(i, f"{i}.jpg", catalog), v) for i, v in enumerate(vectors)]
    with TestPipeline() as pipeline:
        _ = (
            pipeline
            | beam.Create(rows)
            | beam.io.WriteToParquet(
                str(tmp_path / EMBEDDING_FILE_PREFIX), schema, file_name_suffix=".parquet"
            )
        )
    embeddings = open_run_embeddings(str(tmp_path))
    assert embeddings.origin == ORIGIN and embeddings.n_rows == 5
    (read, table), *_ = embeddings.batches(["uri", "accession"])
    order = np.argsort(table.column("uri").to_pylist())
    np.testing.assert_allclose(read[order], vectors, atol=2e-3)
    assert sorted(table.column("accession").to_pylist()) == [1000, 1001, 1002, 1003, 1004]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_missing_folder_a_file_and_a_folder_without_embeddings_are_named(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    for folder, says in [
        (tmp_path / "nowhere", "no such folder"),
        (tmp_path / "file.txt", "it is a file"),
        (tmp_path / "empty", "has no embeddings-*.parquet: run python -m pipeline with"),
    ]:
        with pytest.raises(EmbeddingsError) as error:
            open_run_embeddings(str(folder))
        assert says in one_line(error)


def test_a_file_that_is_not_parquet_or_not_embeddings_is_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "embeddings-0.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "b").mkdir()
    pq.write_table(pa.table({"uri": ["x"]}), tmp_path / "b" / "embeddings-0.parquet")
    for folder, says in [("a", "is not a readable Parquet file"), ("b", "no 'artstyle' metadata")]:
        with pytest.raises(EmbeddingsError) as error:
            open_run_embeddings(str(tmp_path / folder))
        assert says in one_line(error) and "embeddings-0.parquet" in one_line(error)


def test_files_of_two_models_in_one_run_are_refused(tmp_path):
    write_run(tmp_path / "out", unit_rows(4))
    other = EmbeddingsOrigin("other-model", ORIGIN.embedding)
    write_run(tmp_path / "other", unit_rows(4), origin=other)
    (tmp_path / "other" / "embeddings-00000-of-00001.parquet").rename(
        tmp_path / "out" / "embeddings-zz.parquet"
    )
    with pytest.raises(EmbeddingsError) as error:
        open_run_embeddings(str(tmp_path / "out"))
    assert "a run's files are of one model" in one_line(error)


def test_vectors_of_another_length_than_the_metadata_says_are_refused(tmp_path):
    liar = EmbeddingsOrigin(ORIGIN.model_id, EmbeddingSpec(DIMENSION + 1, "test_features"))
    schema = embedding_schema(pa.schema([("uri", pa.string())]), ORIGIN)
    table = pa.table({"uri": ["a"], "embedding": [np.ones(DIMENSION, np.float16)]}, schema=schema)
    pq.write_table(table.replace_schema_metadata(liar.metadata()),
                   tmp_path / "embeddings-0.parquet")  # fmt: skip
    with pytest.raises(EmbeddingsError) as error:
        open_run_embeddings(str(tmp_path))
    assert f"have {DIMENSION} dimensions, and its metadata says {DIMENSION + 1}" in one_line(error)


def test_a_run_without_a_predicted_row_has_no_embeddings_to_index(tmp_path):
    write_run(tmp_path / "out", np.zeros((0, DIMENSION), np.float32), uris=[])
    with pytest.raises(EmbeddingsError) as error:
        open_run_embeddings(str(tmp_path / "out"))
    assert "hold no rows" in one_line(error)


def test_a_zero_vector_stays_zero_rather_than_nan():
    vectors = unit_vectors(np.array([[0.0, 0.0], [3.0, 4.0]]))
    np.testing.assert_allclose(vectors, [[0, 0], [0.6, 0.8]])
