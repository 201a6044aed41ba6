import apache_beam as beam
import pandas as pd
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.catalog import (
    CatalogError,
    ImageRecord,
    ReadCatalog,
    open_catalog,
    resolve_location,
)


@pytest.fixture
def csv_catalog(tmp_path):
    path = tmp_path / "catalog.csv"
    pd.DataFrame(
        {
            "uri": ["images/a.jpg", "/abs/b.jpg", "https://example.org/c.jpg"],
            "style": ["Baroque", "", "Cubism"],
            "year": ["1650", "1900", ""],
        }
    ).to_csv(path, index=False)
    return path


def test_relative_uris_are_relative_to_the_catalog_folder():
    assert resolve_location("images/a.jpg", "/data/set") == "/data/set/images/a.jpg"
    assert resolve_location("images/a.jpg", "gs://bucket/set") == "gs://bucket/set/images/a.jpg"
    assert resolve_location("/abs/a.jpg", "/data") == "/abs/a.jpg"
    assert resolve_location("s3://b/a.jpg", "/data") == "s3://b/a.jpg"


def test_csv_catalog_columns(csv_catalog):
    catalog = open_catalog(str(csv_catalog))
    assert catalog.format == "csv"
    assert catalog.label_column == "style"
    assert [f.name for f in catalog.extra_fields] == ["year"]
    assert catalog.extra_fields[0].type == pa.string()


def test_missing_uri_column_is_a_startup_error_that_names_the_fix(csv_catalog):
    with pytest.raises(CatalogError, match=r"no column 'image'.*--uri_column"):
        open_catalog(str(csv_catalog), uri_column="image")


def test_named_label_column_must_exist(csv_catalog):
    with pytest.raises(CatalogError, match="no label column 'genre'"):
        open_catalog(str(csv_catalog), label_column="genre")


def test_unlabelled_catalog_and_unknown_input(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("uri\na.jpg\n")
    assert open_catalog(str(path)).has_labels is False
    with pytest.raises(CatalogError, match="No catalog file matches"):
        open_catalog(str(tmp_path / "missing.csv"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CatalogError, match="Cannot tell what"):
        open_catalog(str(tmp_path / "notes.txt"))


def test_read_csv_catalog_resolves_and_passes_columns_through(csv_catalog):
    catalog = open_catalog(str(csv_catalog))
    folder = str(csv_catalog.parent)
    expected = [
        ImageRecord("images/a.jpg", f"{folder}/images/a.jpg", "Baroque", (("year", "1650"),)),
        ImageRecord("/abs/b.jpg", "/abs/b.jpg", None, (("year", "1900"),)),
        ImageRecord("https://example.org/c.jpg", "https://example.org/c.jpg", "Cubism",
                    (("year", None),)),
    ]  # fmt: skip
    with TestPipeline() as pipeline:
        assert_that(pipeline | ReadCatalog(catalog), equal_to(expected))


def test_read_parquet_catalog_keeps_column_types(tmp_path):
    path = tmp_path / "catalog.parquet"
    pd.DataFrame({"uri": ["x.png"], "year": [1889], "genre": ["Post_Impressionism"]}).to_parquet(
        path
    )
    catalog = open_catalog(str(path), label_column="genre")
    assert [(f.name, f.type) for f in catalog.extra_fields] == [("year", pa.int64())]
    expected = [ImageRecord("x.png", f"{tmp_path}/x.png", "Post_Impressionism", (("year", 1889),))]
    with TestPipeline() as pipeline:
        assert_that(pipeline | ReadCatalog(catalog), equal_to(expected))


def test_a_folder_of_images_is_a_catalog_of_one_row_per_image(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.jpg", "sub/b.PNG", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    catalog = open_catalog(str(tmp_path))
    assert catalog.format == "images" and not catalog.has_labels
    expected = [str(tmp_path / "a.jpg"), str(tmp_path / "sub/b.PNG")]
    with TestPipeline() as pipeline:
        uris = pipeline | ReadCatalog(catalog) | beam.Map(lambda record: record.location)
        assert_that(uris, equal_to(expected))


def test_malformed_csv_is_a_startup_error(tmp_path):
    path = tmp_path / "broken.csv"
    path.write_text("uri,style\na.jpg,Baroque\nb.jpg,Rococo,extra,fields\n")
    catalog = open_catalog(str(path))
    with pytest.raises(CatalogError, match="not valid CSV"), TestPipeline() as pipeline:
        _ = pipeline | ReadCatalog(catalog)
