import hashlib
import logging
import zipfile

import apache_beam as beam
import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.train import catalog_digest
from tests.conftest import painting
from transforms.catalog import (
    CatalogError,
    ImageRecord,
    ReadCatalog,
    catalog_size,
    open_catalog,
    read_records,
    resolve_location,
    unified_type,
)
from transforms.fetch import BackgroundFetcher, FetchPolicy


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


@pytest.mark.parametrize(
    "uri",
    [
        "HTTPS://example.org/a.jpg",
        "Gs://bucket/a.jpg",
        "data:image/png;base64,iVBORw0KGgo=",
        "DATA:image/png;base64,iVBORw0KGgo=",
        "/abs/a.jpg",
    ],
)
def test_uris_with_a_scheme_and_absolute_paths_are_never_joined(uri):
    assert resolve_location(uri, "gs://bucket/set") == uri


def test_an_archive_members_relative_archive_is_relative_to_the_catalog_folder():
    assert resolve_location("zip://a.jpg::paintings.zip", "/data/set") == (
        "zip://a.jpg::/data/set/paintings.zip"
    )
    assert resolve_location("TAR://x/a.jpg::gs://b/p.tar", "/data") == "TAR://x/a.jpg::gs://b/p.tar"
    assert resolve_location("zip://a.jpg::/abs/p.zip", "/data") == "zip://a.jpg::/abs/p.zip"
    assert resolve_location("zip://a.jpg", "/data") == "zip://a.jpg"  # an error row later


def test_an_archive_beside_the_catalog_is_read_from_any_working_folder(tmp_path, monkeypatch):
    folder = tmp_path / "museum"
    image = painting(folder / "a.jpg", (200, 30, 30), seed=0)
    with zipfile.ZipFile(folder / "paintings.zip", "w") as archive:
        archive.write(image, "a.jpg")
    (folder / "catalog.csv").write_text("uri\nzip://a.jpg::paintings.zip\n")
    monkeypatch.chdir(tmp_path)
    (record,) = records_of(open_catalog(str(folder / "catalog.csv")))
    with BackgroundFetcher(FetchPolicy()) as fetcher:
        assert fetcher.fetch(record.location) == image.read_bytes()
    assert record.uri == "zip://a.jpg::paintings.zip"


def test_only_a_scheme_at_the_start_counts():
    assert resolve_location("images/x://a.jpg", "/data") == "/data/images/x://a.jpg"


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


@pytest.mark.parametrize("folder", ["cat [2024]", "cat*", "cat?"])
def test_a_catalog_path_that_exists_is_that_file_whatever_its_characters(tmp_path, folder):
    """Only a path that does not exist is a glob: `cat*/catalog.csv` would match the decoy."""
    for name, uri in ((folder, "a.jpg"), ("cat2", "decoy.jpg")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "catalog.csv").write_text(f"uri\n{uri}\n")
    path = tmp_path / folder / "catalog.csv"
    catalog = open_catalog(str(path))
    assert catalog.files == (str(path),)
    assert [(r.uri, r.location) for r in records_of(catalog)] == [
        ("a.jpg", f"{tmp_path}/{folder}/a.jpg")
    ]
    assert catalog_size(catalog) == 1
    assert catalog_digest(catalog.files) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_folder_of_images_whose_name_holds_glob_characters(tmp_path):
    folder = tmp_path / "scans [2024]"
    for name in ("a.jpg", "b.png"):
        painting(folder / name, (0, 0, 0), seed=0)
    (tmp_path / "scans 2").mkdir()  # what `scans [2024]` matches as a glob
    painting(tmp_path / "scans 2" / "decoy.jpg", (0, 0, 0), seed=0)
    catalog = open_catalog(str(folder))
    assert catalog.format == "images" and catalog_size(catalog) == 2
    with TestPipeline() as pipeline:
        uris = pipeline | ReadCatalog(catalog) | beam.Map(lambda record: record.location)
        assert_that(uris, equal_to([str(folder / "a.jpg"), str(folder / "b.png")]))


def test_a_glob_in_a_folder_with_a_bracket_says_how_to_write_one(tmp_path):
    (tmp_path / "cat [2024]").mkdir()
    (tmp_path / "cat [2024]" / "a.csv").write_text("uri\na.jpg\n")
    with pytest.raises(CatalogError, match=r"write \[\[\] for a '\[' in a name"):
        open_catalog(str(tmp_path / "cat [2024]" / "*.csv"))
    escaped = open_catalog(str(tmp_path / "cat [[]2024]" / "*.csv"))
    assert escaped.files == (str(tmp_path / "cat [2024]" / "a.csv"),)


def records_of(catalog):
    return [record for file in catalog.files for record in read_records(file, catalog)]


def test_each_shard_resolves_relative_uris_against_its_own_folder(tmp_path):
    for museum in ("a", "b"):
        (tmp_path / f"museum_{museum}").mkdir()
        (tmp_path / f"museum_{museum}/catalog.csv").write_text("uri\nimages/x.jpg\n")
    catalog = open_catalog(str(tmp_path / "museum_*/catalog.csv"))
    assert catalog.files == tuple(str(tmp_path / f"museum_{m}/catalog.csv") for m in "ab")
    expected = [str(tmp_path / f"museum_{m}/images/x.jpg") for m in "ab"]
    with TestPipeline() as pipeline:
        locations = pipeline | ReadCatalog(catalog) | beam.Map(lambda record: record.location)
        assert_that(locations, equal_to(expected))


def test_uri_is_kept_as_written_and_only_the_location_is_stripped(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_text('uri,style\n images/a.jpg ,Baroque\n"  ",Rococo\n,Cubism\n')
    records = records_of(open_catalog(str(path)))
    assert [(r.uri, r.location) for r in records] == [
        (" images/a.jpg ", f"{tmp_path}/images/a.jpg"),
        ("  ", ""),
        ("", ""),
    ]


def test_malformed_csv_rows_become_error_records_that_say_where(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_bytes(
        b"uri,title\n"
        b"a.jpg,Harbour\n"
        b'b.jpg,"Two\nlines"\n'
        b"\n"
        b"c.jpg,Harbour, at night\n"
        b"d.jpg\n"
        b"e.jpg,Caf\x92\n"
        b"\x92f.jpg,Cafe\n"
        b'g.jpg,"Quoted"x\n'
        b"h.jpg,Last\n"
        b'i.jpg,"never closed\n'
    )
    records = records_of(open_catalog(str(path)))
    assert [(r.uri, r.error) for r in records] == [
        ("a.jpg", None),
        ("b.jpg", None),
        ("c.jpg", f"bad_catalog_row: line 6: 3 fields where the header has 2 (a comma in a "
                  f"value that is not quoted?): the columns hold the first 2 ({path})"),
        ("d.jpg", f"bad_catalog_row: line 7: 1 field where the header has 2: the columns "
                  f"from 'title' on are empty ({path})"),
        ("e.jpg", f"bad_catalog_row: line 8: byte 0x92 in column 'title' is not UTF-8 "
                  f"(save it as UTF-8) ({path})"),
        (None, f"bad_catalog_row: line 9: byte 0x92 in column 'uri' is not UTF-8 "
               f"(save it as UTF-8) ({path})"),
        (None, f"bad_catalog_row: line 10: ',' expected after '\"' ({path})"),
        ("h.jpg", None),
        (None, f"bad_catalog_row: line 12: unexpected end of data ({path})"),
    ]  # fmt: skip
    assert records[1].extra == (("title", "Two\nlines"),)
    # A bad line fetches nothing, and keeps what it gives: the header's columns, in order.
    assert [(r.location, r.extra) for r in records[2:6]] == [
        ("", (("title", "Harbour"),)),
        ("", (("title", None),)),
        ("", (("title", None),)),
        ("", (("title", "Cafe"),)),
    ]


def test_a_bad_csv_line_keeps_the_id_users_join_on_and_its_label(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_bytes(
        b"id,uri,style,title\n"
        b"17,a.jpg,Baroque,Harbour, at night\n"
        b"18,b.jpg,Rococo,Caf\xe9,\xff\n"
    )  # fmt: skip
    catalog = open_catalog(str(path))
    assert [(r.uri, r.label, r.extra) for r in records_of(catalog)] == [
        ("a.jpg", "Baroque", (("id", "17"), ("title", "Harbour"))),
        ("b.jpg", "Rococo", (("id", "18"), ("title", None))),
    ]
    assert records_of(catalog)[1].error == (
        f"bad_catalog_row: line 3: 5 fields where the header has 4 (a comma in a value that "
        f"is not quoted?): the columns hold the first 4; byte 0xE9 in column 'title' is not "
        f"UTF-8 (save it as UTF-8) ({path})"
    )


def test_a_bad_byte_late_in_a_csv_is_a_row_not_a_startup_error(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_bytes(b"uri,title\n" + b"a.jpg,Harbour\n" * 1402 + b"b.jpg,Caf\x92\n")
    records = records_of(open_catalog(str(path)))
    assert len(records) == 1403
    assert records[-1].error.startswith("bad_catalog_row: line 1404: byte 0x92 in column")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"\n\n", "is empty"),
        (b"uri,ti\x92tle\na.jpg,x\n", "no readable header line: byte 0x92 in its column 2"),
        (b'uri,"title\n', "no readable header line: unexpected end of data"),
        (b"uri,year,year\na.jpg,1,2\n", "more than one column named year"),
    ],
)
def test_header_problems_are_startup_errors(tmp_path, content, message):
    (tmp_path / "catalog.csv").write_bytes(content)
    with pytest.raises(CatalogError, match=message):
        open_catalog(str(tmp_path / "catalog.csv"))


def test_every_shard_needs_the_uri_column(tmp_path):
    (tmp_path / "a.csv").write_text("uri,style\na.jpg,Baroque\n")
    (tmp_path / "b.csv").write_text("path,style\nb.jpg,Baroque\n")
    with pytest.raises(CatalogError, match=r"b\.csv' has no column 'uri'"):
        open_catalog(str(tmp_path / "*.csv"))


def test_a_blank_header_name_is_named_as_pandas_names_it(tmp_path):
    path = tmp_path / "catalog.csv"
    pd.DataFrame({"uri": ["a.jpg"], "style": ["Baroque"]}).to_csv(path)  # with its index
    catalog = open_catalog(str(path))
    assert [f.name for f in catalog.extra_fields] == ["Unnamed: 0"]
    assert records_of(catalog)[0].extra == (("Unnamed: 0", "0"),)


@pytest.mark.parametrize(
    ("types", "unified"),
    [
        ([pa.string(), pa.string()], pa.string()),
        ([pa.int32(), pa.int64(), pa.uint8()], pa.int64()),
        ([pa.int64(), pa.float32()], pa.float64()),
        ([pa.int64(), pa.null()], pa.int64()),
        ([pa.null()], pa.null()),
        ([pa.int64(), pa.string()], pa.string()),
        ([pa.uint64(), pa.int64()], pa.string()),
        ([pa.timestamp("s"), pa.date32()], pa.string()),
        ([pa.list_(pa.string()), pa.string()], pa.string()),
    ],
)
def test_one_type_per_column_across_shards(types, unified):
    assert unified_type(types) == unified


def test_parquet_shards_values_take_the_unified_type(tmp_path):
    pq.write_table(
        pa.table({"uri": ["a.jpg", None], "year": [1889, 1890], "height": [73, 60],
                  "tags": [["sea", "port"], None]}),
        tmp_path / "a.parquet",
    )  # fmt: skip
    pq.write_table(
        pa.table({"uri": ["b.jpg"], "year": ["c. 1500"], "height": [0.5], "tags": ["dunes"]}),
        tmp_path / "b.parquet",
    )
    catalog = open_catalog(str(tmp_path / "*.parquet"))
    assert [(f.name, f.type) for f in catalog.extra_fields] == [
        ("year", pa.string()),
        ("height", pa.float64()),
        ("tags", pa.string()),
    ]
    assert [(r.uri, r.extra) for r in records_of(catalog)] == [
        ("a.jpg", (("year", "1889"), ("height", 73.0), ("tags", "['sea', 'port']"))),
        (None, (("year", "1890"), ("height", 60.0), ("tags", None))),
        ("b.jpg", (("year", "c. 1500"), ("height", 0.5), ("tags", "dunes"))),
    ]


def test_parquet_bytes_that_are_not_utf8_spoil_their_row_not_the_run(tmp_path):
    """One shard's column is binary, the other's text: the catalog's type is text. A value
    that decodes is that text; one that does not is an error row keeping the rest."""
    pq.write_table(
        pa.table({"uri": ["a.jpg", "b.jpg", "c.jpg"], "id": [1, 2, 3],
                  "title": pa.array([b"Caf\xc3\xa9", b"\xff\xfe", None], pa.binary())}),
        tmp_path / "a.parquet",
    )  # fmt: skip
    pq.write_table(
        pa.table({"uri": ["d.jpg"], "id": [4], "title": ["Dunes"]}), tmp_path / "b.parquet"
    )
    catalog = open_catalog(str(tmp_path / "*.parquet"))
    assert catalog.extra_fields[1] == pa.field("title", pa.string())
    records = records_of(catalog)
    assert [(r.uri, r.extra, r.error) for r in records] == [
        ("a.jpg", (("id", 1), ("title", "Café")), None),
        ("b.jpg", (("id", 2), ("title", None)),
         f"bad_catalog_row: row 2: byte 0xFF in column 'title' is not UTF-8 "
         f"({tmp_path}/a.parquet)"),
        ("c.jpg", (("id", 3), ("title", None)), None),
        ("d.jpg", (("id", 4), ("title", "Dunes")), None),
    ]  # fmt: skip
    assert records[1].location == ""  # nothing is fetched for a row that cannot be trusted


def test_a_parquet_text_column_written_with_bytes_that_are_not_utf8(tmp_path):
    """Parquet readers do not check a string column's bytes: whatever its writer put there
    arrives, in the URI, the label, a pass-through column or a list of texts."""

    def text(*values):
        return pa.array(values, pa.binary()).cast(pa.string(), safe=False)

    tags = pa.ListArray.from_arrays([0, 1, 2, 3], text(b"sea", b"\xffport", b"dunes"))
    pq.write_table(
        pa.table({"uri": text(b"a.jpg", b"b\xe9.jpg", b"c.jpg"),
                  "style": text(b"Baroque", b"Rococo", b"Cubism\x92"),
                  "tags": tags}),
        tmp_path / "a.parquet",
    )  # fmt: skip
    pq.write_table(pa.table({"uri": ["d.jpg"], "tags": ["dunes"]}), tmp_path / "b.parquet")
    catalog = open_catalog(str(tmp_path / "*.parquet"))
    records = records_of(catalog)
    file = f"{tmp_path}/a.parquet"
    assert [(r.uri, r.label, r.extra, r.error) for r in records] == [
        ("a.jpg", "Baroque", (("tags", "['sea']"),), None),
        (None, "Rococo", (("tags", None),),
         f"bad_catalog_row: row 2: byte 0xE9 in column 'uri' is not UTF-8; byte 0xFF in "
         f"column 'tags' is not UTF-8 ({file})"),
        ("c.jpg", None, (("tags", "['dunes']"),),
         f"bad_catalog_row: row 3: byte 0x92 in column 'style' is not UTF-8 ({file})"),
        ("d.jpg", None, (("tags", "dunes"),), None),
    ]  # fmt: skip


def test_a_binary_uri_column_holds_text(tmp_path):
    pq.write_table(
        pa.table({"uri": pa.array([b"images/a.jpg"], pa.binary())}), tmp_path / "a.parquet"
    )
    [record] = records_of(open_catalog(str(tmp_path / "a.parquet")))
    assert (record.uri, record.location) == ("images/a.jpg", f"{tmp_path}/images/a.jpg")


def test_a_large_parquet_shard_is_read_in_batches(tmp_path):
    pq.write_table(pa.table({"uri": [f"{i}.jpg" for i in range(5000)]}), tmp_path / "c.parquet")
    records = records_of(open_catalog(str(tmp_path / "c.parquet")))
    assert [r.uri for r in records] == [f"{i}.jpg" for i in range(5000)]


def test_an_earlier_runs_style_is_not_taken_for_a_label(tmp_path, caplog):
    path = tmp_path / "predictions.parquet"
    pd.DataFrame(
        {"uri": ["a.jpg"], "label": ["Rococo"], "style": ["Baroque"], "confidence": [0.9],
         "top_k_styles": [["Baroque"]], "top_k_probabilities": [[0.9]], "model": ["old"]}
    ).to_parquet(path)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        catalog = open_catalog(str(path))
    assert not catalog.has_labels
    assert len(caplog.records) == 1
    assert "its 'style' column is a prediction" in caplog.text
    assert "--label_column label" in caplog.text
    named = open_catalog(str(path), label_column="label")
    assert named.label_column == "label" and "style" in [f.name for f in named.extra_fields]


def test_a_catalogs_size_from_parquet_footers_and_local_lines(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, n in enumerate((3, 5)):
        pq.write_table(
            pa.table({"uri": [f"{i}-{j}.png" for j in range(n)]}), shards / f"{i}.parquet"
        )
    assert catalog_size(open_catalog(str(shards / "*.parquet"))) == 8

    (tmp_path / "no_last_newline.csv").write_text("uri,style\na.png,x\nb.png,y")
    assert catalog_size(open_catalog(str(tmp_path / "no_last_newline.csv"))) == 2

    folder = tmp_path / "images"
    for i in range(3):
        painting(folder / f"{i}.png", (0, 0, 0), seed=i)
    assert catalog_size(open_catalog(str(folder))) == 3


def test_a_remote_csv_is_not_read_to_be_counted():
    with fsspec.open("memory://remote/catalog.csv", "w") as f:
        f.write("uri\na.png\n")
    assert catalog_size(open_catalog("memory://remote/catalog.csv")) is None
