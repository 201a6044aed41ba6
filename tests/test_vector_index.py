"""The index layer: FAISS's search, checked against brute force; adds; saving that an
interruption cannot break; loading that trusts nothing; near pairs and their groups."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models import vector_index
from models.embedding import EmbeddingSpec, unit_vectors
from models.vector_index import (
    DUPLICATE_SCHEMA,
    EXACT_LIMIT,
    NEIGHBOUR_SCHEMA,
    IndexManifest,
    IvfParameters,
    RunRecord,
    VectorIndex,
    VectorIndexError,
    chosen_parameters,
    writing,
)
from tests import embedding_runs

SPEC = EmbeddingSpec(16, "test_features")
IVF = IvfParameters(nlist=20, nprobe=4)


def unit_rows(n: int, dimension: int = SPEC.dimension, seed: int = 0) -> np.ndarray:
    return embedding_runs.unit_rows(n, dimension, seed)


def items_for(n: int, start: int = 0) -> pa.Table:
    return pa.table(
        {
            "uri": [f"p{i}.jpg" for i in range(start, start + n)],
            "title": [f"Painting {i}" for i in range(start, start + n)],
            "style": ["Baroque"] * n,
            "confidence": pa.array(np.full(n, 0.75), pa.float32()),
        }
    )


def index_of(vectors: np.ndarray, approximate: IvfParameters | None = None) -> VectorIndex:
    index = VectorIndex.new("test-model-v1", SPEC, approximate)
    index.add(vectors, items_for(len(vectors)))
    return index


def clustered(n: int, seed: int = 0) -> np.ndarray:
    """Vectors around 20 centres, as embeddings of paintings are."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, SPEC.dimension))
    vectors = centres[rng.integers(20, size=n)] + 0.5 * rng.normal(size=(n, SPEC.dimension))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    distances = 1 - queries @ vectors.T
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(distances, order, 1)


def test_exact_search_is_brute_force_with_cosine_distances():
    vectors, queries = unit_rows(300), unit_rows(7, seed=1) * 3.0  # queries normalised too
    found = index_of(vectors).search(queries, k=5)
    ids, distances = brute_force(vectors, queries / 3.0, 5)
    for one, row_ids, row_distances in zip(found, ids, distances, strict=True):
        np.testing.assert_array_equal(one.ids, row_ids)
        np.testing.assert_allclose(one.distances, row_distances, atol=1e-5)


def test_a_painting_is_its_own_nearest_at_distance_zero_and_distances_stay_in_0_2():
    vectors = unit_rows(50)
    index = index_of(np.concatenate([vectors, -vectors[:1]]))
    (one,) = index.search(vectors[0], k=51)
    assert one.ids[0] == 0 and one.distances[0] == pytest.approx(0, abs=1e-6)
    assert one.ids[-1] == 50 and one.distances[-1] == pytest.approx(2, abs=1e-6)
    assert ((one.distances >= 0) & (one.distances <= 2)).all()


def test_k_past_the_size_gives_every_item_and_max_distance_cuts_the_list():
    index = index_of(unit_rows(4))
    assert len(index.search(unit_rows(1, seed=3), k=10)[0].ids) == 4
    (near,) = index.search(unit_rows(1, seed=3), k=10, max_distance=1.0)
    assert (near.distances <= 1.0).all()
    (everything,) = index.search(unit_rows(1, seed=3), k=10)
    assert len(near.ids) == int((everything.distances <= 1.0).sum())
    with pytest.raises(ValueError, match="k must be at least 1"):
        index.search(unit_rows(1), k=0)


def test_a_query_of_another_dimension_is_one_line():
    with pytest.raises(VectorIndexError, match="do not fit an index of 16 dimensions"):
        index_of(unit_rows(4)).search(np.ones(5), k=1)


def test_the_approximate_index_finds_nearly_all_of_the_true_ten_nearest():
    vectors, queries = clustered(3000), clustered(50, seed=1)
    found = index_of(vectors, IVF).search(queries, k=10)
    truth, _ = brute_force(vectors, queries, 10)
    recall = np.mean([len(set(a.ids) & set(b)) / 10 for a, b in zip(found, truth, strict=True)])
    assert recall >= 0.9


@pytest.mark.parametrize("approximate", [None, IVF], ids=["exact", "ivf"])
def test_adding_continues_the_ids_and_keeps_what_was_there(approximate):
    first, second = clustered(200), clustered(100, seed=2)
    index = index_of(first, approximate)
    before = index.search(first[:5], k=1)
    index.add(second, items_for(100, start=200))
    assert index.size == 300 and index.items.column("id").to_pylist() == list(range(300))
    assert [one.ids[0] for one in index.search(second[:5], k=1)] == [200, 201, 202, 203, 204]
    assert [one.ids[0] for one in index.search(first[:5], k=1)] == [b.ids[0] for b in before]


def test_items_keep_what_a_person_recognises_and_cast_a_numeric_title_to_text():
    index = VectorIndex.new("m", SPEC)
    index.add(unit_rows(2, dimension=16), pa.table({"uri": ["a", "b"], "title": [1897, None]}))
    assert index.items.to_pylist()[0] == {
        "id": 0, "uri": "a", "title": "1897", "style": None, "confidence": None, "label": None
    }  # fmt: skip


@pytest.mark.parametrize("approximate", [None, IVF], ids=["exact", "ivf"])
def test_a_saved_index_loads_as_it_was(tmp_path, approximate):
    vectors = clustered(500)
    index = index_of(vectors, approximate)
    index.record_run(RunRecord("out/", 500, 0))
    index.save(str(tmp_path / "index"))
    loaded = VectorIndex.load(str(tmp_path / "index"))
    assert loaded.manifest == index.manifest and loaded.manifest.kind == index.manifest.kind
    assert loaded.items.equals(index.items)
    for a, b in zip(loaded.search(vectors[:20], 5), index.search(vectors[:20], 5), strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(loaded.vectors(np.array([3, 7])), vectors[[3, 7]], atol=1e-6)


def test_the_manifest_says_what_the_index_is(tmp_path):
    index_of(unit_rows(30), IVF).save(str(tmp_path))
    manifest = VectorIndex.load(str(tmp_path)).manifest
    data = manifest.to_json()
    assert data["format"] == "artstyle.index/1" and data["model"] == "test-model-v1"
    assert data["embedding"] == {"dimension": 16, "kind": "test_features"}
    assert data["metric"] == "cosine" and data["items"] == 30
    assert data["index"] == {"kind": "ivf", "nlist": 20, "nprobe": 4}
    assert data["files"]["vectors"] in os.listdir(tmp_path)
    assert IndexManifest.from_json(json.loads(json.dumps(data)), "m.json") == manifest


def saved(tmp_path, n: int = 30) -> tuple[str, VectorIndex]:
    folder = str(tmp_path / "index")
    index = index_of(unit_rows(n, dimension=16))
    index.save(folder)
    return folder, index


def fail(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize(
    "step",
    ["vectors", "items", "manifest", "rename"],
)
def test_a_save_stopped_at_any_step_leaves_the_previous_index_whole(tmp_path, monkeypatch, step):
    folder, before = saved(tmp_path)
    grown = VectorIndex.load(folder)
    grown.add(unit_rows(10, dimension=16, seed=5), items_for(10, start=30))
    faiss = vector_index._faiss()
    with monkeypatch.context() as patch:
        if step == "vectors":
            patch.setattr(faiss, "write_index", fail)
        elif step == "items":
            patch.setattr(vector_index.pq, "write_table", fail)
        elif step == "manifest":
            patch.setattr(vector_index.json, "dump", fail)
        else:
            patch.setattr(vector_index.os, "replace", fail)
        with pytest.raises(VectorIndexError, match=r"cannot write the index .*No space left"):
            grown.save(folder)
    after = VectorIndex.load(folder)
    assert after.size == 30 and after.items.equals(before.items)
    grown.save(folder)  # the next save goes through, and takes the leftovers away
    assert VectorIndex.load(folder).size == 40
    assert len(os.listdir(folder)) == 3  # manifest, vectors, items


def one_line(error: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_folder_without_an_index_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder, says in [("nowhere", "no such folder"), ("empty", "it has no manifest.json")]:
        with pytest.raises(VectorIndexError) as error:
            VectorIndex.load(str(tmp_path / folder))
        assert says in one_line(error)


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda f, m: (f / "manifest.json").write_text("{"), "cannot be read"),
        (lambda f, m: (f / "manifest.json").write_text('{"format": "x"}'), "artstyle.index/1"),
        (lambda f, m: (f / m["files"]["vectors"]).write_bytes(b"garbage" * 10),
         "is not a readable FAISS index"),
        (lambda f, m: (f / m["files"]["vectors"]).unlink(), "is missing"),
        (lambda f, m: (f / m["files"]["items"]).write_bytes(b"garbage"),
         "is not a readable Parquet file"),
        (lambda f, m: pq.write_table(pa.table({"x": [1]}), f / m["files"]["items"]),
         "does not have the items' columns"),
        (lambda f, m: edit(f, m, items=31), "inconsistent: 30 vectors, 30 items, 31"),
        (lambda f, m: edit(f, m, embedding={"dimension": 8, "kind": "k"}),
         "its vectors have 16 dimensions, its manifest says 8"),
        (lambda f, m: edit(f, m, index={"kind": "ivf", "nlist": 8, "nprobe": 8}),
         "manifest says ivf"),
        (lambda f, m: edit(f, m, files={"vectors": "../x.faiss", "items": "i.parquet"}),
         "must name files in the index's folder"),
        (lambda f, m: edit(f, m, metric="l2"), "'metric' must be 'cosine'"),
    ],
)  # fmt: skip
def test_a_damaged_index_is_one_line_naming_what_is_wrong(tmp_path, damage, says):
    folder, _ = saved(tmp_path)
    path = tmp_path / "index"
    damage(path, json.loads((path / "manifest.json").read_text()))
    with pytest.raises(VectorIndexError) as error:
        VectorIndex.load(folder)
    assert says in one_line(error)


def edit(folder, manifest: dict, **changes) -> None:
    (folder / "manifest.json").write_text(json.dumps({**manifest, **changes}))


def test_a_second_writer_is_kept_out_while_the_first_holds_the_folder(tmp_path):
    with (
        writing(str(tmp_path / "index")),
        pytest.raises(VectorIndexError, match="another command is writing"),
        writing(str(tmp_path / "index")),
    ):
        pass
    with writing(str(tmp_path / "index")):  # released
        pass


@pytest.mark.parametrize("approximate", [None, IVF], ids=["exact", "ivf"])
def test_within_finds_every_item_in_range_even_past_the_first_k(approximate):
    """A painting with 40 near copies: more than an approximate index's first k (16)."""
    base = unit_rows(1, dimension=16)[0]
    rng = np.random.default_rng(0)
    copies = base + 0.02 * rng.normal(size=(40, 16))
    vectors = np.concatenate([clustered(400), copies]).astype(np.float32)
    index = index_of(vectors, approximate)
    (found,) = index.within(base, max_distance=0.01)
    _, distances = brute_force(index.vectors(np.arange(index.size)), base[None], index.size)
    assert len(found.ids) == int((distances <= 0.01).sum()) >= 40
    assert (np.diff(found.distances) >= 0).all()


@pytest.mark.parametrize("approximate", [None, IVF], ids=["exact", "ivf"])
def test_near_pairs_are_listed_once_and_grouped_by_what_joins_them(approximate):
    vectors = clustered(200)
    rng = np.random.default_rng(1)
    near = lambda i: vectors[i] + 0.005 * rng.normal(size=16)  # noqa: E731
    # 200 is a copy of 10, 201 of 200 (so of 10 too): one group; 202 of 50: another.
    vectors = np.concatenate([vectors, [near(10)], [near(10)], [near(50)]]).astype(np.float32)
    pairs = index_of(vectors, approximate).near_pairs(max_distance=0.002)
    assert pairs.schema == DUPLICATE_SCHEMA
    rows = {(r["id_a"], r["id_b"]): r for r in pairs.to_pylist()}
    assert set(rows) == {(10, 200), (10, 201), (200, 201), (50, 202)}
    assert {rows[p]["group"] for p in [(10, 200), (10, 201), (200, 201)]} == {1}
    assert rows[(50, 202)]["group"] == 2
    assert rows[(10, 200)]["uri_a"] == "p10.jpg" and rows[(10, 200)]["uri_b"] == "p200.jpg"
    assert all(r["distance"] <= 0.002 for r in rows.values())


def test_no_near_pairs_is_an_empty_table_of_the_schema():
    pairs = index_of(unit_rows(20, dimension=16)).near_pairs(max_distance=0.0001)
    assert len(pairs) == 0 and pairs.schema == DUPLICATE_SCHEMA


def test_the_neighbour_table_has_a_row_per_query_and_neighbour_in_rank_order():
    vectors = unit_rows(10, dimension=16)
    index = index_of(vectors)
    found = index.search(vectors[:2], k=3)
    table = index.neighbour_table(["q1.jpg", "q2.jpg"], found)
    assert table.schema == NEIGHBOUR_SCHEMA
    assert table.column("query").to_pylist() == ["q1.jpg"] * 3 + ["q2.jpg"] * 3
    assert table.column("rank").to_pylist() == [1, 2, 3, 1, 2, 3]
    assert table.column("uri").to_pylist()[0] == "p0.jpg" and table["id"][3].as_py() == 1
    assert table.column("title").to_pylist()[0] == "Painting 0"
    assert len(index.neighbour_table([], [])) == 0


def test_an_item_id_out_of_range_is_refused():
    with pytest.raises(VectorIndexError, match="no item with id 4"):
        index_of(unit_rows(4, dimension=16)).vectors(np.array([4]))


def test_a_new_index_is_exact_up_to_the_limit_unless_asked_otherwise():
    assert chosen_parameters("auto", EXACT_LIMIT) is None
    assert chosen_parameters("auto", 250_000) == IvfParameters(nlist=2000)
    assert chosen_parameters("exact", 10 * EXACT_LIMIT) is None
    assert chosen_parameters("approximate", 100) == IvfParameters(nlist=40)


def test_an_approximate_index_fits_its_cells_on_its_first_vectors_and_needs_enough():
    index = VectorIndex.new("m", SPEC, IvfParameters(nlist=50))
    with pytest.raises(VectorIndexError, match="of 50 cells needs at least as many paintings"):
        index.add(unit_rows(49), items_for(49))
    index.add(clustered(500), items_for(500))
    index.add(unit_rows(3), items_for(3, start=500))  # later adds use the cells as fitted
    assert index.size == 503


@pytest.mark.parametrize("approximate", [None, IVF], ids=["exact", "ivf"])
def test_one_query_runs_on_one_thread_and_leaves_faiss_as_it_was(approximate, monkeypatch):
    faiss = vector_index._faiss()
    index = index_of(unit_rows(50), approximate)
    threads = faiss.omp_get_max_threads()
    during = []
    search = type(index._vectors).search
    monkeypatch.setattr(
        type(index._vectors),
        "search",
        lambda self, *a, **kw: during.append(faiss.omp_get_max_threads()) or search(self, *a, **kw),
    )
    index.search(unit_rows(1), k=3)
    index.search(unit_rows(40), k=3)
    assert during == [1, threads] and faiss.omp_get_max_threads() == threads


@pytest.mark.parametrize("approximate", [None, IVF], ids=["exact", "ivf"])
def test_an_empty_index_answers_with_no_neighbours(approximate):
    index = VectorIndex.new("m", SPEC, approximate)
    assert [len(one.ids) for one in index.search(unit_rows(2), k=3)] == [0, 0]
    assert [len(one.ids) for one in index.within(unit_rows(2), 0.5)] == [0, 0]
    assert len(index.near_pairs(0.5)) == 0


# --- Vectors of two parts: style, then fingerprint --------------------------------------

PARTS = EmbeddingSpec(16, "test_style_and_fingerprint", fingerprint_dimension=6)


def two_part(style: np.ndarray, fingerprint: np.ndarray) -> np.ndarray:
    """Stored vectors as a bundle makes them: each part at unit length over sqrt(2)."""
    return np.concatenate([unit_vectors(style), unit_vectors(fingerprint)], axis=1) / 2**0.5


def test_similar_paintings_come_by_style_with_the_same_picture_first():
    """Item 0 shares the query's fingerprint (the same picture, altered) but is far from it
    in style; item 1 shares its style but is another picture: 0 first, marked, then 1."""
    rng = np.random.default_rng(3)
    style, fingerprint = rng.normal(size=(40, 10)), rng.normal(size=(40, 6))
    query_style, query_fingerprint = style[1] + 0.01, fingerprint[0] + 0.01
    index = VectorIndex.new("test-model-v1", PARTS)
    index.add(two_part(style, fingerprint), items_for(40))
    (found,) = index.search(two_part(query_style[None], query_fingerprint[None]), k=3)
    assert found.ids[:2].tolist() == [0, 1]
    assert found.same_picture.tolist() == [True, False, False]
    style_distances = 1 - unit_vectors(style[found.ids]) @ unit_vectors(query_style[None])[0]
    np.testing.assert_allclose(found.distances, style_distances, atol=1e-5)
    (near_only,) = index.search(two_part(query_style[None], query_fingerprint[None]), k=3,
                                max_distance=0.05)  # fmt: skip
    assert near_only.ids.tolist() == [0, 1]  # the same picture stays, however far in style
    table = index.neighbour_table(["q"], [found])
    assert table.column("same_picture").to_pylist() == [True, False, False]


def test_duplicates_are_pairs_of_fingerprints_whatever_their_style():
    rng = np.random.default_rng(4)
    style, fingerprint = rng.normal(size=(30, 10)), rng.normal(size=(30, 6))
    fingerprint[7] = fingerprint[3] + 0.01  # the same picture twice, in other styles
    style[12] = style[5]  # one style, two pictures
    index = VectorIndex.new("test-model-v1", PARTS)
    index.add(two_part(style, fingerprint), items_for(30))
    pairs = index.near_pairs(0.01)
    assert list(zip(pairs.column("id_a").to_pylist(), pairs.column("id_b").to_pylist(),
                    strict=True)) == [(3, 7)]  # fmt: skip


def test_the_same_picture_is_the_nearest_fingerprint_either_search_found():
    """On an approximate index the search by fingerprint may visit cells without the same
    picture, which the search by style found: the nearer fingerprint of the two comes first."""
    rng = np.random.default_rng(5)
    style, fingerprint = rng.normal(size=(30, 10)), rng.normal(size=(30, 6))
    query_style, query_fingerprint = rng.normal(size=10), rng.normal(size=6)
    style[3] = query_style  # the nearest in style, another picture
    style[8], fingerprint[8] = query_style + 0.2 * rng.normal(size=10), query_fingerprint + 0.01
    fingerprint[[3, 20]] = -query_fingerprint  # 20: what a search by fingerprint that missed gave
    index = VectorIndex.new("test-model-v1", PARTS)
    index.add(two_part(style, fingerprint), items_for(30))
    query = two_part(query_style[None], query_fingerprint[None])[0]
    from_style_alone = index.search(query, k=4)[0]
    assert from_style_alone.ids[:2].tolist() == [8, 3]  # the fingerprint search found 8
    style_order = np.array([3, 8, *from_style_alone.ids[2:]])  # as the search by style ranks
    style_only = vector_index.Neighbours(style_order, np.zeros(4, np.float32))
    found = index._same_picture_first(query, 20, style_only, k=4)
    assert found.ids[:2].tolist() == [8, 3] and found.same_picture.tolist()[:2] == [True, False]
