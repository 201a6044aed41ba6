"""Catalogs a user really has, end to end on DirectRunner: shards in several folders, an
earlier run's predictions as input, a bad line late in a CSV, shards whose types differ."""

import logging

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.predict import run
from tests.conftest import COLOURS, painting


def argv_for(catalog, output, bundle):
    return [f"--input={catalog}", f"--output={output}", f"--model={bundle}", "--batch_size=4"]


def read_predictions(output):
    """As a user reads them: pyarrow and pandas both, over all the shards."""
    table = pq.read_table([str(path) for path in output.glob("predictions-*.parquet")])
    return table, table.to_pandas().set_index("uri", drop=False)


@pytest.fixture
def museums_csv(tmp_path):
    """Two museums' shards of an earlier run's predictions, each with its own images: the
    same relative name is a painting in one folder and a text file in the other. Museum A
    has a line with an unquoted comma in its title; museum B one cp1252 byte."""
    for museum, colour in (("a", "Blue_Period"), ("b", "Red_Period")):
        painting(tmp_path / f"museum_{museum}/images/{museum}.jpg", COLOURS[colour], 1)
    painting(tmp_path / "museum_a/images/same.jpg", COLOURS["Green_Period"], 2)
    (tmp_path / "museum_b/images/same.jpg").write_text("a text file, not a painting")
    header = b"uri,title,label,style,confidence,top_k_styles,model,error\n"
    earlier = b"Cubism,0.9,['Cubism'],old-model,"
    (tmp_path / "museum_a/catalog.csv").write_bytes(
        header
        + b"images/a.jpg,Harbour,Baroque," + earlier + b"\n"
        + b"images/same.jpg,Field,Rococo," + earlier + b"\n"
        + b" images/a.jpg ,Harbour again,Baroque," + earlier + b"\n"
        + b"images/a.jpg,Harbour, at night,Baroque," + earlier + b"\n"
    )  # fmt: skip
    (tmp_path / "museum_b/catalog.csv").write_bytes(
        header
        + b"images/b.jpg,Dunes,Baroque," + earlier + b"\n"
        + b"images/same.jpg,Letter,Rococo," + earlier + b"\n"
        + b"images/b.jpg,Caf\x92 at night,Baroque," + earlier + b"\n"
    )  # fmt: skip
    return tmp_path / "museum_*/catalog.csv"


def test_csv_shards_of_an_earlier_run_with_bad_lines(museums_csv, tmp_path, tiny_bundle, caplog):
    output = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        summary = run(argv_for(museums_csv, output, tiny_bundle))

    table, frame = read_predictions(output)
    assert len(frame) == 7  # one row per catalog line, bad lines included
    assert table.column_names == [
        "uri", "title", "catalog_label", "catalog_style", "catalog_confidence",
        "catalog_top_k_styles", "catalog_model", "catalog_error",
        "style", "confidence", "top_k_styles", "top_k_probabilities", "model", "error",
    ]  # fmt: skip
    by_title = frame.set_index("title")
    # Each museum's relative URIs are its own folder's.
    assert by_title.loc["Dunes", "error"] is None
    assert by_title.loc["Field", "error"] is None
    assert by_title.loc["Letter", "error"].startswith("not_an_image: ")
    # The URI as written, spaces and all, fetched from where it points.
    assert by_title.loc["Harbour again", "uri"] == " images/a.jpg "
    assert by_title.loc["Harbour again", "error"] is None
    # Bad lines are error rows that say where they are; the rest of the run goes on.
    bad = frame[frame.error.str.startswith("bad_catalog_row", na=False)]
    assert sorted(bad.error.str.extract(r"^bad_catalog_row: (line \d+): ")[0]) == [
        "line 4",
        "line 5",
    ]
    assert set(bad.uri) == {"images/a.jpg", "images/b.jpg"}
    # They keep what the line gives: its fields in the header's order (past an unquoted
    # comma, each a column late), a field with a bad byte left out.
    assert sorted(bad.title.fillna("-")) == ["-", "Harbour"]
    assert sorted(bad.catalog_model) == ["['Cubism']", "old-model"]
    assert summary.n_images == 7
    assert summary.errors_by_kind == {"bad_catalog_row": 2, "not_an_image": 1}
    # The earlier run's `style` is a prediction: never taken for a label.
    assert summary.top1 is None and "label" not in table.column_names
    assert "--label_column label" in caplog.text
    assert not list(output.glob("beam-temp-*"))


def test_parquet_shards_whose_column_types_differ(tmp_path, tiny_bundle):
    for museum, year, height in (
        ("a", [1889, 1890], [73, 60]),
        ("b", ["c. 1500", None], [0.5, 1.25]),
    ):
        painting(tmp_path / f"museum_{museum}/images/{museum}.jpg", COLOURS["Red_Period"], 3)
        pd.DataFrame(
            {"uri": [f"images/{museum}.jpg", "images/missing.jpg"], "year": year, "height": height}
        ).to_parquet(tmp_path / f"museum_{museum}/catalog.parquet")
    output = tmp_path / "out"
    summary = run(argv_for(tmp_path / "museum_*/catalog.parquet", output, tiny_bundle))

    table, frame = read_predictions(output)
    assert table.schema.field("year").type == pa.string()
    assert table.schema.field("height").type == pa.float64()
    errors = frame.error.fillna("ok").str.split(":").str[0]
    rows = sorted(zip(frame.year.fillna("-"), frame.height, errors, strict=True))
    assert rows == [
        ("-", 1.25, "not_found"),
        ("1889", 73.0, "ok"),
        ("1890", 60.0, "not_found"),
        ("c. 1500", 0.5, "ok"),
    ]
    assert summary.n_images == 4 and summary.errors_by_kind == {"not_found": 2}


def test_a_catalog_in_a_folder_whose_name_holds_glob_characters(tmp_path, tiny_bundle):
    folder = tmp_path / "cat [2024]"
    for name in ("a.jpg", "b.jpg"):
        painting(folder / "images" / name, COLOURS["Blue_Period"], 4)
    pd.DataFrame({"uri": ["images/a.jpg", "images/b.jpg"], "id": [7, 8]}).to_csv(
        folder / "catalog.csv", index=False
    )
    output = tmp_path / "out"
    summary = run(argv_for(folder / "catalog.csv", output, tiny_bundle))

    _, frame = read_predictions(output)
    assert sorted(frame.id) == ["7", "8"] and frame.error.isna().all()  # CSV columns are text
    assert summary.n_images == 2 and summary.n_errors == 0


def test_parquet_shards_one_with_bytes_that_are_not_utf8(tmp_path, tiny_bundle):
    """A byte that is not UTF-8 costs its row, an error row, not the whole run in
    ReadCatalog."""
    for museum in ("a", "b"):
        painting(tmp_path / f"museum_{museum}/images/{museum}.jpg", COLOURS["Red_Period"], 5)
    pq.write_table(
        pa.table({"uri": ["images/a.jpg", "images/a.jpg"], "id": [1, 2],
                  "title": pa.array([b"Harbour", b"Caf\xff"], pa.binary())}),
        tmp_path / "museum_a/catalog.parquet",
    )  # fmt: skip
    pq.write_table(
        pa.table({"uri": ["images/b.jpg"], "id": [3], "title": ["Dunes"]}),
        tmp_path / "museum_b/catalog.parquet",
    )
    output = tmp_path / "out"
    summary = run(argv_for(tmp_path / "museum_*/catalog.parquet", output, tiny_bundle))

    _, frame = read_predictions(output)
    rows = sorted(zip(frame.id, frame.title.fillna("-"), frame.error.fillna("ok"), strict=True))
    assert [row[:2] for row in rows] == [(1, "Harbour"), (2, "-"), (3, "Dunes")]
    assert [row[2].split(":")[0] for row in rows] == ["ok", "bad_catalog_row", "ok"]
    assert "byte 0xFF in column 'title' is not UTF-8" in rows[1][2]
    assert summary.errors_by_kind == {"bad_catalog_row": 1}
