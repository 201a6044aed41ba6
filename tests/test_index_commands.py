"""`python -m pipeline.index` and `python -m pipeline.duplicates` on runs' real Parquet
embeddings, and the result tables that they and `pipeline.similar` print and write."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.embedding import EmbeddingSpec
from models.vector_index import DUPLICATE_SCHEMA, NEIGHBOUR_SCHEMA, VectorIndex
from pipeline import duplicates, index
from pipeline.result_tables import duplicates_text, neighbours_text, text_table, write_table
from tests.embedding_runs import ORIGIN, museum_catalog, unit_rows, write_run
from transforms.embeddings import EmbeddingsOrigin

REPO_ROOT = Path(__file__).resolve().parent.parent


def uris(numbers) -> list[str]:
    return [f"images/painting-{i:05d}.jpg" for i in numbers]


def build(*argv: str) -> VectorIndex:
    return index.run([str(arg) for arg in argv])


def fails_with(main, argv: list, capsys) -> str:
    """The command's one line on stderr, with exit status 2."""
    with pytest.raises(SystemExit) as stop:
        main([str(arg) for arg in argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("artstyle: ")
    return err.strip()


def test_an_index_of_two_runs_holds_their_paintings_recognisably(tmp_path, capsys):
    first = write_run(tmp_path / "out1", unit_rows(12), shards=3)
    second = write_run(tmp_path / "out2", unit_rows(5, seed=1), uris(range(100, 105)),
                       catalog=museum_catalog(labelled=False))  # fmt: skip
    built = build(first, second, "--output", tmp_path / "index")
    loaded = VectorIndex.load(str(tmp_path / "index"))
    assert loaded.size == built.size == 17 and loaded.manifest.kind == "exact"
    assert loaded.manifest.model_id == ORIGIN.model_id
    assert loaded.manifest.embedding == ORIGIN.embedding
    rows = loaded.items.to_pylist()
    assert rows[0] == {"id": 0, "uri": uris([0])[0], "title": "Painting 0", "style": "Baroque",
                       "confidence": 0.5, "label": "Cubism"}  # fmt: skip
    assert rows[12]["uri"] == uris([100])[0] and rows[12]["label"] is None
    assert [run.added for run in loaded.manifest.runs] == [12, 5]
    (found,) = loaded.search(unit_rows(5, seed=1)[2], k=1)
    assert found.ids[0] == 14
    out = capsys.readouterr().out
    assert f"{first}: 12 paintings added" in out
    assert f"index written to {tmp_path / 'index'}: 17 paintings, exact search" in out


def test_adding_a_later_run_keeps_the_index_and_each_uri_once(tmp_path, capsys):
    """A later run's painting whose URI is indexed already keeps its first item; rows of one
    run that share a URI (two records, one file) are items of their own."""
    build(write_run(tmp_path / "out1", unit_rows(6)), "--output", tmp_path / "index")
    before = VectorIndex.load(str(tmp_path / "index"))
    later = write_run(tmp_path / "out2", unit_rows(5, seed=2), uris([4, 5, 6, 7, 7]))
    build(later, "--output", tmp_path / "index", "--add")
    after = VectorIndex.load(str(tmp_path / "index"))
    assert after.items.slice(0, 6).equals(before.items)
    assert after.items.column("uri").to_pylist()[6:] == uris([6, 7, 7])
    assert after.manifest.runs[-1].added == 3 and after.manifest.runs[-1].skipped == 2
    assert "3 paintings added (2 already in the index by URI, kept as they were)" in (
        capsys.readouterr().out
    )


def test_adding_a_run_twice_adds_nothing_and_writes_nothing(tmp_path, capsys):
    run = write_run(tmp_path / "out1", unit_rows(6))
    build(run, "--output", tmp_path / "index")
    files = sorted(os.listdir(tmp_path / "index"))
    build(run, "--output", tmp_path / "index", "--add")
    assert sorted(os.listdir(tmp_path / "index")) == files
    assert f"nothing added: {tmp_path / 'index'} is as it was: 6 paintings" in (
        capsys.readouterr().out
    )


def test_building_from_two_runs_is_building_from_one_then_adding_the_other(tmp_path):
    a = write_run(tmp_path / "a", unit_rows(8), uris(range(8)))
    b = write_run(tmp_path / "b", unit_rows(8, seed=3), uris(range(4, 12)))
    together = build(a, b, "--output", tmp_path / "together")
    build(a, "--output", tmp_path / "stepwise")
    stepwise = build(b, "--output", tmp_path / "stepwise", "--add")
    assert together.items.equals(stepwise.items)
    np.testing.assert_array_equal(together.vectors(np.arange(12)), stepwise.vectors(np.arange(12)))


def test_replace_builds_anew_and_search_chooses_the_kind(tmp_path):
    build(write_run(tmp_path / "out1", unit_rows(6)), "--output", tmp_path / "index")
    rebuilt = build(write_run(tmp_path / "out2", unit_rows(3, seed=4)), "--output",
                    tmp_path / "index", "--replace", "--search", "approximate")  # fmt: skip
    loaded = VectorIndex.load(str(tmp_path / "index"))
    assert loaded.size == rebuilt.size == 3 and loaded.manifest.kind == "ivf"
    assert len(os.listdir(tmp_path / "index")) == 4  # the older generation is gone


def test_an_index_of_another_model_refuses_its_runs_in_one_line(tmp_path, capsys):
    build(write_run(tmp_path / "out1", unit_rows(4)), "--output", tmp_path / "index")
    other = write_run(tmp_path / "other", unit_rows(4),
                      origin=EmbeddingsOrigin("another-model", ORIGIN.embedding))  # fmt: skip
    files = sorted(os.listdir(tmp_path / "index"))
    line = fails_with(index.main, [other, "--output", tmp_path / "index", "--add"], capsys)
    assert "holds embeddings of model another-model" in line
    assert "vectors of different models do not compare" in line
    assert sorted(os.listdir(tmp_path / "index")) == files


def test_runs_of_two_models_or_two_dimensions_do_not_make_one_index(tmp_path, capsys):
    one = write_run(tmp_path / "one", unit_rows(4))
    longer = EmbeddingsOrigin(ORIGIN.model_id, EmbeddingSpec(9, ORIGIN.embedding.kind))
    other = write_run(tmp_path / "other", unit_rows(4, dimension=9), origin=longer)
    line = fails_with(index.main, [one, other, "--output", tmp_path / "index"], capsys)
    assert "(test_features, 9 dimensions), the first run" in line
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize(
    "setup, argv, says",
    [
        (None, ["{tmp}/nowhere", "--output", "{tmp}/index"], "no such folder"),
        ("empty", ["{tmp}/empty", "--output", "{tmp}/index"], "has no embeddings-*.parquet"),
        ("index", ["{tmp}/out", "--output", "{tmp}/index"], "is an index already: --add"),
        (None, ["{tmp}/out", "--output", "{tmp}/index", "--add"], "there is no index at"),
        ("foreign", ["{tmp}/out", "--output", "{tmp}/mine"], "is a folder of other files"),
        ("corrupt", ["{tmp}/out", "--output", "{tmp}/index", "--add"], "not a readable FAISS"),
        (None, ["{tmp}/out", "--output", "{tmp}/i", "--add", "--replace"], "not allowed with"),
        (None, ["{tmp}/out", "--output", "{tmp}/i", "--add", "--search", "exact"],
         "--search chooses a new index's search"),
        (None, ["{tmp}/out", "--output", "{tmp}/i", "--serch", "exact"], "unrecognized"),
        (None, ["{tmp}/out"], "required: --output"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, setup, argv, says):
    write_run(tmp_path / "out", unit_rows(4))
    if setup == "empty":
        (tmp_path / "empty").mkdir()
    if setup in ("index", "corrupt"):
        build(tmp_path / "out", "--output", tmp_path / "index")
    if setup == "corrupt":
        manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
        (tmp_path / "index" / manifest["files"]["vectors"]).write_bytes(b"\0" * 100)
    if setup == "foreign":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "thesis.docx").write_text("years of work")
    capsys.readouterr()
    line = fails_with(index.main, [arg.format(tmp=tmp_path) for arg in argv], capsys)
    assert says in line
    if setup == "foreign":
        assert os.listdir(tmp_path / "mine") == ["thesis.docx"]


# Adds a run to an index, and interrupts itself (SIGINT, as Ctrl-C) once the new generation's
# vectors are written: the command's own Ctrl-C handling does the rest.
INTERRUPTED_ADD = """
import os, signal, sys
from models import vector_index
from pipeline.index import main

faiss = vector_index._faiss()
write_index = faiss.write_index
def write_then_interrupt(index, path):
    write_index(index, path)
    os.kill(os.getpid(), signal.SIGINT)
faiss.write_index = write_then_interrupt
sys.argv = ["pipeline.index", *sys.argv[1:]]
main()
"""


def test_an_interrupted_add_leaves_the_index_as_it_was(tmp_path):
    build(write_run(tmp_path / "out1", unit_rows(6)), "--output", tmp_path / "index")
    before = VectorIndex.load(str(tmp_path / "index"))
    later = write_run(tmp_path / "out2", unit_rows(6, seed=1), uris(range(6, 12)))
    interrupted = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_ADD, str(later), f"--output={tmp_path / 'index'}",
         "--add"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    assert interrupted.returncode == 128 + signal.SIGINT, interrupted.stderr
    assert interrupted.stderr == "artstyle: interrupted; the index is as it was before\n"
    after = VectorIndex.load(str(tmp_path / "index"))
    assert after.manifest == before.manifest and after.items.equals(before.items)
    assert build(later, "--output", tmp_path / "index", "--add").size == 12  # and it goes on


def test_the_command_line_runs_as_a_user_types_it(tmp_path):
    run = write_run(tmp_path / "out", unit_rows(4))
    command = [sys.executable, "-m", "pipeline.index", str(run), f"--output={tmp_path / 'i'}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "4 paintings, exact search" in done.stdout
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1 and "is an index already" in again.stderr


def index_with_copies(tmp_path: Path) -> Path:
    """Paintings 0..19; 20 is a copy of 3 and 21 a copy of 20; 22 a copy of 7."""
    vectors = unit_rows(20)
    rng = np.random.default_rng(9)
    copy = lambda v: v + 0.003 * rng.normal(size=v.shape)  # noqa: E731
    copies = np.stack([copy(vectors[3]), copy(vectors[3]), copy(vectors[7])])
    run = write_run(tmp_path / "out", np.concatenate([vectors, copies]))
    build(run, "--output", tmp_path / "index")
    return tmp_path / "index"


def test_duplicates_lists_the_near_pairs_grouped_and_writes_them_all(tmp_path, capsys):
    folder = index_with_copies(tmp_path)
    capsys.readouterr()
    pairs = duplicates.run(
        [str(folder), "--max_distance", "0.05", "--output", str(tmp_path / "pairs.parquet")]
    )
    written = pq.read_table(tmp_path / "pairs.parquet")
    assert written.schema.remove_metadata() == DUPLICATE_SCHEMA and written.equals(pairs)
    assert {(r["id_a"], r["id_b"], r["group"]) for r in written.to_pylist()} == {
        (3, 20, 1), (3, 21, 1), (20, 21, 1), (7, 22, 2)
    }  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("4 pairs of paintings at most 0.05 apart, in 2 groups\n")
    assert "images/painting-00003.jpg  images/painting-00020.jpg" in out
    assert "4 pairs written to" in out


def test_duplicates_prints_the_first_pairs_and_says_how_many_more(tmp_path, capsys):
    folder = index_with_copies(tmp_path)
    capsys.readouterr()
    duplicates.run([str(folder), "--show", "1", "--max_distance", "0.01"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[1].split() == ["group", "distance", "uri_a", "uri_b"]
    assert out[3].startswith("... and 3 more pairs (--output writes them all)")


@pytest.mark.parametrize(
    "argv, says",
    [
        (["{tmp}/nowhere"], "is not an index: no such folder"),
        (["{tmp}/index", "--output", "{tmp}/pairs.csv"], "must name a .parquet file"),
        (["{tmp}/index", "--max_distance", "-1"], "must be at least 0"),
        (["{tmp}/index", "--output", "{tmp}/index"], "must name a .parquet file"),
    ],
)
def test_duplicates_bad_input_is_one_line_and_status_2(tmp_path, capsys, argv, says):
    index_with_copies(tmp_path)
    capsys.readouterr()
    line = fails_with(duplicates.main, [arg.format(tmp=tmp_path) for arg in argv], capsys)
    assert says in line


def test_a_parquet_output_that_cannot_be_written_whole_is_not_written(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", fail)
    with pytest.raises(ValueError, match="cannot be written"):
        write_table(pa.table({"a": [1]}), str(tmp_path / "out.parquet"))
    assert os.listdir(tmp_path) == []


def neighbour_rows(tmp_path: Path) -> pa.Table:
    folder = index_with_copies(tmp_path)
    loaded = VectorIndex.load(str(folder))
    found = loaded.search(loaded.vectors(np.array([3, 7])), k=3)
    return loaded.neighbour_table(["first.jpg", "second.jpg"], found)


def test_neighbours_print_under_each_query_nearest_first(tmp_path):
    table = neighbour_rows(tmp_path)
    assert table.schema == NEIGHBOUR_SCHEMA
    text = neighbours_text(table).splitlines()
    assert text[0] == "query: first.jpg"
    assert text[1].split() == ["rank", "distance", "uri", "title", "style", "confidence",
                               "label"]  # fmt: skip
    assert text[2].split()[:3] == ["1", "0.0000", "images/painting-00003.jpg"]
    assert text[6] == "query: second.jpg"
    assert neighbours_text(table.slice(0, 0)) == "no neighbours (none within --max_distance)"


def test_a_neighbour_table_written_and_read_back_is_the_same(tmp_path):
    table = neighbour_rows(tmp_path)
    write_table(table, str(tmp_path / "similar.parquet"))
    assert pq.read_table(tmp_path / "similar.parquet").equals(table)


def test_text_tables_align_numbers_right_cut_long_uris_and_leave_out_empty_columns():
    rows = [{"rank": 1, "uri": "gs://bucket/" + "deep/" * 20 + "final.jpg", "title": None},
            {"rank": 10, "uri": "b.jpg", "title": None}]  # fmt: skip
    lines = text_table(rows, ["rank", "uri"]).splitlines()
    assert lines[1].startswith("   1  …") and lines[1].endswith("/final.jpg")
    assert lines[2].startswith("  10  b.jpg")
    empty = pa.Table.from_pylist([], schema=DUPLICATE_SCHEMA)
    assert (
        duplicates_text(empty, 0.05, 20) == "0 pairs of paintings at most 0.05 apart, in 0 groups"
    )
