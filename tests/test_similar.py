"""`python -m pipeline.similar`: images and catalogs queried against a real index of a real
run's embeddings, on the default engine."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.ml.inference.base import PredictionResult
from PIL import Image

from models.vector_index import NEIGHBOUR_SCHEMA, VectorIndex, query_without_neighbours
from pipeline.index import run as index
from pipeline.predict import run as predict
from pipeline.result_tables import neighbours_text
from pipeline.similar import main, run
from tests.conftest import CLASSES, COLOURS, painting, projection_bundle_at
from transforms.catalog import ImageRecord
from transforms.neighbours import NeighbourRowsFn

PAINTINGS = [f"{style}-{i}.jpg" for style in CLASSES for i in range(3)]
EXACT = "--precision=float32"  # the run's and the queries' arithmetic: the same embeddings


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, projection_bundle):
    """A folder of paintings, a run over them with --embeddings, and its index."""
    folder = tmp_path_factory.mktemp("similar")
    for i, name in enumerate(PAINTINGS):
        painting(folder / "images" / name, COLOURS[name.split("-")[0]], seed=i, size=(120, 90),
                 shapes=6)  # fmt: skip
    pd.DataFrame(
        {"uri": [f"images/{name}" for name in PAINTINGS],
         "title": [f"Painting {i}" for i in range(len(PAINTINGS))]}
    ).to_csv(folder / "catalog.csv", index=False)  # fmt: skip
    predict([f"--input={folder / 'catalog.csv'}", f"--output={folder / 'run'}",
             f"--model={projection_bundle}", EXACT, "--embeddings"])  # fmt: skip
    index([str(folder / "run"), f"--output={folder / 'index'}"])
    return folder


def query(indexed, projection_bundle, *argv):
    return run([*argv, f"--index={indexed / 'index'}", f"--model={projection_bundle}", EXACT])


def test_a_painting_finds_itself_first_and_an_altered_copy_finds_its_original(
    indexed, projection_bundle, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # queries named as a user in this folder names them
    shutil.copy(indexed / "images" / PAINTINGS[4], "original.jpg")
    with Image.open("original.jpg") as image:
        image.resize((image.width // 2, image.height // 2)).save("half.png")
    table = query(indexed, projection_bundle, "original.jpg", "half.png", "-k", "3")

    assert table.schema == NEIGHBOUR_SCHEMA
    rows = table.to_pylist()
    assert [(row["query"], row["rank"]) for row in rows] == [
        ("original.jpg", 1), ("original.jpg", 2), ("original.jpg", 3),
        ("half.png", 1), ("half.png", 2), ("half.png", 3),
    ]  # fmt: skip
    assert rows[0]["uri"] == f"images/{PAINTINGS[4]}" and rows[0]["distance"] < 2e-3
    assert rows[0]["title"] == "Painting 4"
    assert rows[3]["uri"] == f"images/{PAINTINGS[4]}"
    assert all(row["error"] is None for row in rows)
    assert [row["same_picture"] for row in rows] == [True, False, False, True, False, False]
    distances = [row["distance"] for row in rows[:3]]
    assert distances == sorted(distances)

    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "query: original.jpg"
    assert printed[1].split() == ["rank", "distance", "same_picture", "uri", "title", "style",
                                  "confidence"]  # fmt: skip
    assert printed[2].split()[:4] == ["1", f"{rows[0]['distance']:.4f}", "yes", rows[0]["uri"]]
    assert printed[3].split()[:3] == ["2", f"{rows[1]['distance']:.4f}", rows[1]["uri"]]
    assert printed[6] == "query: half.png"
    assert printed[-1] == "artstyle: 2 queries, 6 neighbours (k = 3)"


def test_a_catalog_runs_every_row_and_a_row_that_cannot_be_read_is_a_row_with_its_error(
    indexed, projection_bundle, tmp_path
):
    catalog = tmp_path / "queries.csv"
    shutil.copy(indexed / "images" / PAINTINGS[0], tmp_path / "a.jpg")
    shutil.copy(indexed / "images" / PAINTINGS[8], tmp_path / "b.jpg")
    catalog.write_text("uri,note\na.jpg,x\nb.jpg,y\nmissing.jpg,z\n")
    output = tmp_path / "out" / "similar.parquet"
    query(indexed, projection_bundle, str(catalog), "-k", "2", f"--output={output}")

    written = pq.read_table(output)
    assert written.schema == NEIGHBOUR_SCHEMA
    rows = written.to_pylist()
    assert [(row["query"], row["rank"]) for row in rows] == [
        ("a.jpg", 1), ("a.jpg", 2), ("b.jpg", 1), ("b.jpg", 2), ("missing.jpg", None)
    ]  # fmt: skip
    assert rows[0]["uri"] == f"images/{PAINTINGS[0]}"
    assert rows[2]["uri"] == f"images/{PAINTINGS[8]}"
    assert rows[4]["error"].startswith("not_found:") and rows[4]["uri"] is None


def test_max_distance_cuts_the_list_and_leaves_a_query_with_none_as_one_row(
    indexed, projection_bundle, tmp_path
):
    lone = str(indexed / "images" / PAINTINGS[1])
    near = query(indexed, projection_bundle, lone, "--max_distance=0.01", "-k", "5").to_pylist()
    assert near[0]["uri"] == f"images/{PAINTINGS[1]}"
    assert all(row["distance"] <= 0.01 for row in near)

    find = NeighbourRowsFn(str(indexed / "index"), k=3, max_distance=0.5)
    find.setup()
    index = VectorIndex.load(str(indexed / "index"))
    opposite = -index.vectors(np.array([1]))[0]  # 2 from the painting, far from every other
    record = ImageRecord("opposite.jpg", "opposite.jpg", None)
    (row,) = find.process((record, PredictionResult(None, (np.ones(3) / 3, opposite))))
    assert row == query_without_neighbours("opposite.jpg")
    table = pa.Table.from_pylist([row], NEIGHBOUR_SCHEMA)
    assert neighbours_text(table) == "query: opposite.jpg\nno neighbours within --max_distance"


def test_only_the_first_queries_are_printed_with_show(indexed, projection_bundle, capsys):
    images = [str(indexed / "images" / name) for name in PAINTINGS[:3]]
    table = query(indexed, projection_bundle, *images, "-k", "1", "--show", "1")
    assert table.num_rows == 3
    printed = capsys.readouterr().out
    assert printed.count("query: ") == 1
    assert "... and 2 more queries (--output writes them all)" in printed


def one_line_and_status_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("artstyle: "), error
    return error


def test_bad_queries_and_flags_are_one_line_and_status_2(
    indexed, projection_bundle, tmp_path, capsys
):
    (tmp_path / "text.jpg").write_text("not a painting")
    common = [f"--index={indexed / 'index'}", f"--model={projection_bundle}", EXACT]
    image = str(indexed / "images" / PAINTINGS[0])
    said = one_line_and_status_2([str(tmp_path / "text.jpg"), *common], capsys)
    assert f"{tmp_path / 'text.jpg'}: not_an_image" in said
    said = one_line_and_status_2([str(tmp_path / "missing.jpg"), *common], capsys)
    assert "missing.jpg: not_found" in said
    assert "-k: must be at least 1" in one_line_and_status_2([image, "-k", "0", *common], capsys)
    said = one_line_and_status_2([image, *common, "--output=similar.csv"], capsys)
    assert "must name a .parquet file" in said


def test_an_index_that_is_missing_empty_or_corrupt_is_one_line(
    indexed, projection_bundle, tmp_path, capsys
):
    image = str(indexed / "images" / PAINTINGS[0])
    model = f"--model={projection_bundle}"
    said = one_line_and_status_2([image, f"--index={tmp_path / 'nowhere'}", model], capsys)
    assert "is not an index" in said

    corrupt = shutil.copytree(indexed / "index", tmp_path / "corrupt")
    (vectors,) = corrupt.glob("vectors-*.faiss")
    vectors.write_bytes(b"not faiss")
    said = one_line_and_status_2([image, f"--index={corrupt}", model], capsys)
    assert "is not a readable FAISS index" in said

    empty = shutil.copytree(indexed / "index", tmp_path / "empty")
    run_folder = tmp_path / "empty-run"
    run_folder.mkdir()
    manifest = json.loads((empty / "manifest.json").read_text())
    from models.embedding import EmbeddingSpec
    from models.vector_index import VectorIndex

    VectorIndex.new(manifest["model"], EmbeddingSpec(**manifest["embedding"])).save(str(empty))
    said = one_line_and_status_2([image, f"--index={empty}", model], capsys)
    assert "holds no paintings" in said


def test_another_models_queries_are_refused_in_one_line(indexed, tiny_bundle, tmp_path, capsys):
    image = str(indexed / "images" / PAINTINGS[0])
    other = projection_bundle_at(tmp_path / "other", model_id="another-model")
    said = one_line_and_status_2([image, f"--index={indexed / 'index'}", f"--model={other}"],
                                 capsys)  # fmt: skip
    assert "vectors of different models do not compare" in said
    assert "another-model" in said and "tiny-projection-model" in said
    said = one_line_and_status_2(
        [image, f"--index={indexed / 'index'}", f"--model={tiny_bundle}"], capsys
    )
    assert "gives no embeddings" in said


def test_the_command_line_runs_as_a_user_types_it(indexed, projection_bundle):
    image = f"images/{PAINTINGS[2]}"
    done = subprocess.run(
        [sys.executable, "-c", "from pipeline.cli import main; main()", "similar", image, "-k", "2",
         f"--index={indexed / 'index'}", f"--model={projection_bundle}", EXACT],
        capture_output=True, text=True, cwd=indexed,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"query: {image}"
    assert f"images/{PAINTINGS[2]}" in done.stdout.splitlines()[2]
    assert done.stderr == ""
