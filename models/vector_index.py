"""A nearest-neighbour index of paintings' embeddings: a folder that a search loads whole.

## The folder
- `manifest.json`: an `IndexManifest` (format, the bundle's id and embedding, the metric,
  exact or approximate with its parameters, the item count, its files, the runs added).
- `vectors-<generation>.faiss`: FAISS's index of the vectors; FAISS's id of a vector is
  its item's `id`.
- `items-<generation>.parquet`: one row per vector, in the order added: `id`, `uri`, and
  what a person recognises a painting by (`title`, the predicted `style` and its
  `confidence`, the catalog's `label`; null where the runs had none).

A save writes a new generation's files beside the current ones, then replaces
manifest.json, which names them, in one rename; then it removes the older generation. So an
index that a save leaves half-way (Ctrl-C, a full disk, a crash) is the index it was: its
manifest still names the files it had. Writers take a lock on the folder (`writing`).

## Search
Vectors are unit length and compared by cosine distance, 1 - their dot product (FAISS's
inner product). A vector of two parts (models/embedding.py) is compared a part at a time,
by a query that is zero outside that part: similar paintings by their style, except that
the painting whose fingerprint is nearest the query's comes first where it is the same
picture (within the embedding's `same_picture_distance`); duplicates by their fingerprints.

Up to EXACT_LIMIT items the index is exact (`IndexFlatIP`, every vector compared); past
it, approximate: IVF, the vectors filed under the nearest of `nlist` cells (k-means
centroids fitted on the first vectors added) and a query compared with those of its
`nprobe` nearest cells, whose recall against exact search is measured in
bench/similar.py and docs/similar.md. Both take more vectors without a rebuild.

Importable without Keras, TensorFlow or Beam, and FAISS loads on first use: the service and
the commands' --help import this module at start-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import json
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.embedding import FINGERPRINT, STYLE, EmbeddingSpec, EmbeddingSpecError, unit_vectors
from models.settings import INDEX_SEARCHES

if TYPE_CHECKING:
    import faiss

INDEX_FORMAT = "artstyle.index/1"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".artstyle-lock"
VECTORS_PREFIX, VECTORS_SUFFIX = "vectors-", ".faiss"
ITEMS_PREFIX, ITEMS_SUFFIX = "items-", ".parquet"
PARTIAL_SUFFIX = ".partial"  # a manifest being written
METRIC = "cosine"  # 1 - the dot product of unit vectors
EXACT, APPROXIMATE = "exact", "ivf"
# Up to this many items a new index is exact (with --search auto): one query from Python
# then takes under half of its 5 ms target on the benchmark's machine (docs/similar.md).
EXACT_LIMIT = 10_000
# Fewer queries than this are searched on one thread. FAISS's threads would split one query's
# scan, and on a busy machine wait for a core more than they gain (docs/similar.md).
ONE_THREAD_BELOW = 20
# An approximate index's cells: 4 x sqrt(items), the low end of FAISS's guidance (fewer
# cells, fitted sooner), each fitted on TRAINING_PER_CELL vectors (FAISS asks for 39 at least).
CELLS_PER_SQRT_ITEMS = 4
TRAINING_PER_CELL = 40
# Cells a query visits: recall against time (bench/similar.py measures both).
NPROBE = 32
# ... times this for a query by fingerprint: the cells are fitted on whole vectors, so a
# fingerprint's nearest lie in fewer of the cells nearest by fingerprint alone (over the
# 33,725 paintings, the most similar painting of an altered copy is the exact search's for
# 98.0% of copies at 1 x, 99.7% at 4 x, 99.9% at 8 x: docs/similar.md).
FINGERPRINT_CELLS_FACTOR = 8
# Vectors normalised and handed to FAISS at a time by `add`.
ADD_CHUNK = 65_536
# Queries per FAISS call in `near_pairs`: each block's similarities are computed at once.
PAIR_QUERY_BLOCK = 4096

ITEM_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("title", pa.string()),
        pa.field("style", pa.string()),
        pa.field("confidence", pa.float32()),
        pa.field("label", pa.string()),
    ]
)
ITEM_COLUMNS = tuple(ITEM_SCHEMA.names[1:])  # what an item takes from a run's rows
# `python -m pipeline.similar`'s rows: one per (query, neighbour), nearest first, with the
# neighbour's item. `distance` is the style's; `same_picture` says the fingerprints match
# (those rows come first). A query without neighbours is one row of its own, with no
# neighbour: one that could not be asked (its image unreadable, `error` says why), or that
# has none within the distance asked.
NEIGHBOUR_ITEM_COLUMNS = ("id", "title", "style", "confidence", "label")
NEIGHBOUR_SCHEMA = pa.schema(
    [
        pa.field("query", pa.string()),
        pa.field("rank", pa.int32()),
        pa.field("uri", pa.string()),
        pa.field("distance", pa.float32()),
        pa.field("same_picture", pa.bool_()),
        *(ITEM_SCHEMA.field(name).with_nullable(True) for name in NEIGHBOUR_ITEM_COLUMNS),
        pa.field("error", pa.string()),
    ]
)
# `python -m pipeline.duplicates`'s rows: one per near pair (by fingerprint), `group`
# joining pairs that share a painting (connected components), numbered from 1 in the order
# of their first item.
DUPLICATE_SCHEMA = pa.schema(
    [
        pa.field("uri_a", pa.string()),
        pa.field("uri_b", pa.string()),
        pa.field("distance", pa.float32()),
        pa.field("group", pa.int64()),
        pa.field("id_a", pa.int64()),
        pa.field("id_b", pa.int64()),
    ]
)


class VectorIndexError(ValueError):
    """An index that cannot be read, written or used as asked: one line naming it."""


@dataclass(frozen=True)
class IvfParameters:
    """FAISS's IVF settings: `nlist` cells, `nprobe` of them visited by a query."""

    nlist: int
    nprobe: int = NPROBE

    @classmethod
    def for_items(cls, n_items: int) -> IvfParameters:
        cells = round(CELLS_PER_SQRT_ITEMS * np.sqrt(n_items))
        return cls(nlist=max(1, min(cells, n_items)))


@dataclass(frozen=True)
class RunRecord:
    """A run added to the index: its folder as given, and its rows added and left out (a
    URI already in the index keeps its item)."""

    path: str
    added: int
    skipped: int


@dataclass(frozen=True, kw_only=True)
class IndexManifest:
    """manifest.json: saving writes `to_json`, loading reads `from_json`, and nothing else
    reads or writes its keys."""

    model_id: str  # the JSON's `model`
    embedding: EmbeddingSpec
    approximate: IvfParameters | None  # None: exact
    items: int
    vectors_file: str
    items_file: str
    runs: tuple[RunRecord, ...] = ()
    metric: str = METRIC

    @property
    def kind(self) -> str:
        return EXACT if self.approximate is None else APPROXIMATE

    def to_json(self) -> dict[str, Any]:
        search = {"kind": self.kind, **(asdict(self.approximate) if self.approximate else {})}
        return {
            "format": INDEX_FORMAT,
            "model": self.model_id,
            "embedding": self.embedding.to_json(),
            "metric": self.metric,
            "index": search,
            "items": self.items,
            "files": {"vectors": self.vectors_file, "items": self.items_file},
            "runs": [asdict(run) for run in self.runs],
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> IndexManifest:
        """Raises VectorIndexError naming `where` and the key at fault."""
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise VectorIndexError(f"{where} is not in the {INDEX_FORMAT} format")
        try:
            embedding = EmbeddingSpec.from_json(data.get("embedding"), where)
            search = _json_object(data, "index", where)
            files = _json_object(data, "files", where)
            manifest = cls(
                model_id=_json_value(data, "model", str, where),
                embedding=embedding,
                approximate=_approximate_from_json(search, where),
                items=_json_value(data, "items", int, where),
                vectors_file=_json_value(files, "vectors", str, where),
                items_file=_json_value(files, "items", str, where),
                runs=tuple(RunRecord(**run) for run in data.get("runs", [])),
                metric=_json_value(data, "metric", str, where),
            )
        except (EmbeddingSpecError, TypeError) as error:
            raise VectorIndexError(f"{where}: {error}") from None
        problem = manifest.problem()
        if problem:
            raise VectorIndexError(f"{where}: {problem}")
        return manifest

    def problem(self) -> str | None:
        """What makes these values unusable, if anything (their types are right)."""
        if self.metric != METRIC:
            return f"'metric' must be {METRIC!r}, not {self.metric!r}"
        if self.items < 0:
            return f"'items' must be at least 0, not {self.items}"
        for name in (self.vectors_file, self.items_file):
            if name in ("", ".", "..") or os.path.basename(name) != name:
                return f"'files' must name files in the index's folder, not {name!r}"
        return None


def _json_object(data: dict, key: str, where: str) -> dict:
    value = data.get(key)
    if not isinstance(value, dict):
        raise VectorIndexError(f"{where}: {key!r} must be an object, not {value!r}")
    return value


def _json_value(data: dict, key: str, kind: type, where: str) -> Any:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise VectorIndexError(f"{where}: {key!r} must be a {kind.__name__}, not {value!r}")
    return value


def _approximate_from_json(search: dict, where: str) -> IvfParameters | None:
    kind = search.get("kind")
    if kind == EXACT:
        return None
    if kind != APPROXIMATE:
        raise VectorIndexError(f"{where}: 'index.kind' must be {EXACT!r} or {APPROXIMATE!r}")
    values = {name: _json_value(search, name, int, where) for name in ("nlist", "nprobe")}
    if min(values.values()) < 1:
        raise VectorIndexError(f"{where}: 'index.nlist' and 'index.nprobe' must be at least 1")
    return IvfParameters(**values)


@dataclass(frozen=True)
class Neighbours:
    """One query's neighbours: item ids and cosine distances, nearest first; of similar
    paintings (`search`, of an embedding with a fingerprint), the distances are their
    style's, and each says whether it is the same picture."""

    ids: np.ndarray  # int64
    distances: np.ndarray  # float32
    same_picture: np.ndarray | None = None  # bool

    def same_pictures(self) -> np.ndarray:
        """Whether each is the same picture: none is where no fingerprints were compared."""
        if self.same_picture is None:
            return np.zeros(len(self.ids), bool)
        return self.same_picture


class VectorIndex:
    """The vectors in FAISS, their items, and the manifest that describes both."""

    def __init__(self, manifest: IndexManifest, vectors: faiss.Index, items: pa.Table):
        _faiss_threads()  # read before any search changes it
        self.manifest = manifest
        self._vectors = vectors
        self.items = items

    @classmethod
    def new(
        cls, model_id: str, embedding: EmbeddingSpec, approximate: IvfParameters | None = None
    ) -> VectorIndex:
        """An empty index for the embedding of model `model_id`: exact, or IVF with these
        parameters (its cells fitted on the first vectors added)."""
        manifest = IndexManifest(
            model_id=model_id,
            embedding=embedding,
            approximate=approximate,
            items=0,
            vectors_file="",
            items_file="",
        )
        vectors = _empty_faiss_index(embedding.dimension, approximate)
        return cls(manifest, vectors, ITEM_SCHEMA.empty_table())

    @property
    def size(self) -> int:
        return self.manifest.items

    def add(self, vectors: np.ndarray, items: pa.Table) -> None:
        """Appends `vectors` (one per row of `items`, which has any of ITEM_COLUMNS; `uri` at
        least) as new items, with the next ids; they are normalised here, a chunk at a time.
        An approximate index's first vectors fit its cells: give it as many as it will
        hold, or a sample of them."""
        dimension = self.manifest.embedding.dimension
        if vectors.ndim != 2 or vectors.shape[1] != dimension:
            raise VectorIndexError(
                f"vectors of shape {vectors.shape} do not fit an index of {dimension} dimensions"
            )
        if len(vectors) != len(items):
            raise ValueError(f"{len(vectors)} vectors for {len(items)} items")
        if not self._vectors.is_trained:
            self._fit_cells(vectors)
        ids = pa.array(np.arange(self.size, self.size + len(items)), pa.int64())
        for start in range(0, len(vectors), ADD_CHUNK):
            self._vectors.add(unit_vectors(vectors[start : start + ADD_CHUNK]))
        self.items = pa.concat_tables([self.items, _item_rows(ids, items)])
        self.manifest = replace(self.manifest, items=self._vectors.ntotal)

    def _fit_cells(self, vectors: np.ndarray) -> None:
        """IVF's k-means, on a seeded sample of TRAINING_PER_CELL vectors a cell."""
        approximate = self.manifest.approximate
        assert approximate is not None  # an exact index has nothing to fit
        if len(vectors) < approximate.nlist:
            raise VectorIndexError(
                f"an approximate index of {approximate.nlist} cells needs at least as many "
                f"paintings to fit them, not {len(vectors)}: build an exact one"
            )
        size = min(len(vectors), TRAINING_PER_CELL * approximate.nlist)
        sample = np.sort(np.random.default_rng(0).choice(len(vectors), size, replace=False))
        ivf = _faiss().extract_index_ivf(self._vectors)
        ivf.cp.min_points_per_centroid = 1  # a small index has few; FAISS would print a warning
        ivf.train(unit_vectors(vectors[sample]))
        ivf.make_direct_map()  # for `vectors`: an item's vector by its id

    def record_run(self, record: RunRecord) -> None:
        """Notes in the manifest that a run was added."""
        self.manifest = replace(self.manifest, runs=(*self.manifest.runs, record))

    def search(
        self, queries: np.ndarray, k: int, max_distance: float | None = None
    ) -> list[Neighbours]:
        """Each query's `k` most similar items (fewer where the index has fewer, or where
        `max_distance` of style leaves some out), nearest in style first, except the item
        whose fingerprint is nearest, which comes first if it is the same picture (see
        `_same_picture_first`)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        queries = self._queries(queries)
        if self.size == 0:  # an approximate index without vectors has no cells to search
            return [_no_neighbours() for _ in queries]
        spec = self.manifest.embedding
        with _threads_for(len(queries)):
            similarities, ids = self._vectors.search(
                spec.query(queries, STYLE), k, params=self._search_parameters(STYLE)
            )
            if spec.fingerprint_dimension:
                _, nearest_pictures = self._vectors.search(
                    spec.query(queries, FINGERPRINT), 1, params=self._search_parameters(FINGERPRINT)
                )
        found = []
        for row, (row_ids, row_similarities) in enumerate(zip(ids, similarities, strict=True)):
            keep = row_ids >= 0  # FAISS pads with -1 where it has fewer than k
            distances = _distances(row_similarities[keep])
            row_ids = row_ids[keep].astype(np.int64)
            if max_distance is not None:
                near = distances <= max_distance
                row_ids, distances = row_ids[near], distances[near]
            by_style = Neighbours(row_ids, distances)
            if spec.fingerprint_dimension:
                by_style = self._same_picture_first(
                    queries[row], nearest_pictures[row, 0], by_style, k
                )
            found.append(by_style)
        return found

    def _same_picture_first(
        self, query: np.ndarray, nearest_picture: int, by_style: Neighbours, k: int
    ) -> Neighbours:
        """`by_style`, with the item of the nearest fingerprint first where it is the same
        picture (within the embedding's `same_picture_distance`), however far in style, and
        each item marked the same picture or not. The nearest fingerprint is that of the
        search by fingerprint (`nearest_picture`, -1 for none) or of one of `by_style`: on
        an approximate index each search visits its own cells, and finds what the other
        may miss.

        Only that one item is moved: a collection's paintings of one look lie within that
        distance of each other too, a few for each painting in a large collection, and all
        of them first would push the paintings of the query's style down the list
        (docs/similar.md measures both)."""
        ids, distances = by_style.ids, by_style.distances
        candidates = np.concatenate([[nearest_picture], ids]) if nearest_picture >= 0 else ids
        to_fingerprint = _distances(self._part_similarities(query, candidates, FINGERPRINT))
        same_picture = to_fingerprint <= self.manifest.embedding.same_picture_distance
        is_same = dict(zip(candidates.tolist(), same_picture, strict=True))
        nearest = int(candidates[np.argmin(to_fingerprint)]) if len(candidates) else -1
        if nearest >= 0 and is_same[nearest]:
            elsewhere = ids != nearest
            own = (
                distances[~elsewhere]
                if not elsewhere.all()
                else _distances(self._part_similarities(query, np.array([nearest]), STYLE))
            )
            ids = np.concatenate([[nearest], ids[elsewhere]])[:k]
            distances = np.concatenate([own, distances[elsewhere]])[:k]
        return Neighbours(ids, distances, np.array([is_same[i] for i in ids.tolist()], bool))

    def _part_similarities(self, query: np.ndarray, ids: np.ndarray, part: str) -> np.ndarray:
        """The dot products of `query`'s `part` with the items', each summed on its own (a
        matrix product's rounding would depend on how many items are asked about)."""
        part_query = self.manifest.embedding.query(query.reshape(1, -1), part)
        return np.sum(self.vectors(ids) * part_query, axis=1)

    def within(self, queries: np.ndarray, max_distance: float) -> list[Neighbours]:
        """Every item whose fingerprint is at most `max_distance` from each query's, nearest
        first (on an approximate index, those in the cells the query visits)."""
        queries = self.manifest.embedding.query(self._queries(queries), FINGERPRINT)
        if self.size == 0:
            return [_no_neighbours() for _ in queries]
        with _threads_for(len(queries)):
            limits, similarities, ids = self._vectors.range_search(
                queries,
                _similarity_floor(max_distance),
                params=self._search_parameters(FINGERPRINT),
            )
        found = []
        for start, end in itertools.pairwise(limits):
            distances = _distances(similarities[start:end])
            keep = distances <= max_distance
            order = np.lexsort((ids[start:end][keep], distances[keep]))
            found.append(
                Neighbours(ids[start:end][keep][order].astype(np.int64), distances[keep][order])
            )
        return found

    def near_pairs(self, max_distance: float) -> pa.Table:
        """Every pair of items whose fingerprints are at most `max_distance` apart
        (DUPLICATE_SCHEMA), each pair once, grouped: a group is the pairs that are joined
        through shared items."""
        firsts, seconds, distances = [], [], []
        for start in range(0, self.size, PAIR_QUERY_BLOCK):
            block = np.arange(start, min(start + PAIR_QUERY_BLOCK, self.size))
            neighbours = self.within(self.vectors(block), max_distance)
            for query, found in zip(block, neighbours, strict=True):
                later = found.ids > query  # each pair once, and not the item with itself
                firsts.append(np.full(int(later.sum()), query, np.int64))
                seconds.append(found.ids[later])
                distances.append(found.distances[later])
        if not firsts:
            return DUPLICATE_SCHEMA.empty_table()
        return self._pair_table(
            np.concatenate(firsts), np.concatenate(seconds), np.concatenate(distances)
        )

    def _pair_table(self, a: np.ndarray, b: np.ndarray, distances: np.ndarray) -> pa.Table:
        groups = _groups(a, b, self.size)
        order = np.lexsort((b, a, distances, groups))
        uris = self.items.column("uri")
        return pa.table(
            {
                "uri_a": uris.take(a[order]),
                "uri_b": uris.take(b[order]),
                "distance": pa.array(distances[order], pa.float32()),
                "group": pa.array(groups[order], pa.int64()),
                "id_a": pa.array(a[order], pa.int64()),
                "id_b": pa.array(b[order], pa.int64()),
            },
            schema=DUPLICATE_SCHEMA,
        )

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of these items (float32), to query with an item itself."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.size):
            raise VectorIndexError(f"no item with id {ids.max()} (the index has {self.size})")
        if not len(ids):
            return np.zeros((0, self.manifest.embedding.dimension), np.float32)
        return self._vectors.reconstruct_batch(ids)

    def neighbour_table(self, queries: Sequence[str], found: Sequence[Neighbours]) -> pa.Table:
        """NEIGHBOUR_SCHEMA's rows of `found`, each query's as named in `queries`."""
        counts = [len(one.ids) for one in found]
        ids = np.concatenate([np.zeros(0, np.int64), *(one.ids for one in found)])
        distances = np.concatenate([np.zeros(0, np.float32), *(one.distances for one in found)])
        ranks = np.concatenate([np.zeros(0, np.int32), *(np.arange(1, n + 1) for n in counts)])
        same = np.concatenate([np.zeros(0, bool), *(one.same_pictures() for one in found)])
        items = self.items.take(pa.array(ids, pa.int64()))
        columns = {
            "query": pa.array(np.repeat(np.asarray(queries, dtype=object), counts), pa.string()),
            "rank": pa.array(ranks, pa.int32()),
            "uri": items.column("uri"),
            "distance": pa.array(distances, pa.float32()),
            "same_picture": pa.array(same, pa.bool_()),
            **{name: items.column(name) for name in NEIGHBOUR_ITEM_COLUMNS},
            "error": pa.nulls(len(ids), pa.string()),
        }
        return pa.table(columns, schema=NEIGHBOUR_SCHEMA)

    def save(self, folder: str) -> None:
        """Writes the index into `folder` as a new generation (see the module's docstring):
        the folder holds its earlier index, whole, until the last rename. Take `writing`
        first where another process may write too."""
        path = Path(folder)
        generation = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
        manifest = replace(
            self.manifest,
            vectors_file=f"{VECTORS_PREFIX}{generation}{VECTORS_SUFFIX}",
            items_file=f"{ITEMS_PREFIX}{generation}{ITEMS_SUFFIX}",
        )
        try:
            path.mkdir(parents=True, exist_ok=True)
            _faiss().write_index(self._vectors, str(path / manifest.vectors_file))
            pq.write_table(self.items, path / manifest.items_file)
            partial = path / f"{MANIFEST_FILE}-{generation}{PARTIAL_SUFFIX}"
            with open(partial, "w") as file:
                json.dump(manifest.to_json(), file, indent=2)
                file.write("\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path / MANIFEST_FILE)
            _sync_folder(path)
        except OSError as error:
            raise VectorIndexError(f"cannot write the index {folder} ({error})") from None
        self.manifest = manifest
        _remove_other_generations(path, manifest)

    @classmethod
    def load(cls, folder: str) -> VectorIndex:
        """Reads and checks an index: VectorIndexError names the file at fault."""
        path = Path(folder)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            why = "it has no manifest.json" if path.is_dir() else "no such folder"
            raise VectorIndexError(f"{folder} is not an index: {why}")
        try:
            data = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise VectorIndexError(f"{manifest_path} cannot be read ({error})") from None
        manifest = IndexManifest.from_json(data, str(manifest_path))
        vectors = _read_faiss_index(path / manifest.vectors_file)
        items = _read_items(path / manifest.items_file)
        _check_agreement(manifest, vectors, items, folder)
        return cls(manifest, vectors, items)

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries)
        if queries.ndim == 1:
            queries = queries.reshape(1, -1)
        dimension = self.manifest.embedding.dimension
        if queries.ndim != 2 or queries.shape[1] != dimension:
            raise VectorIndexError(
                f"queries of shape {queries.shape} do not fit an index of {dimension} dimensions"
            )
        return unit_vectors(queries)

    def _search_parameters(self, part: str) -> faiss.SearchParameters | None:
        """IVF's nprobe, per call: more cells for the fingerprint part of a two-part vector."""
        approximate = self.manifest.approximate
        if approximate is None:
            return None
        two_parts = bool(self.manifest.embedding.fingerprint_dimension)
        factor = FINGERPRINT_CELLS_FACTOR if part == FINGERPRINT and two_parts else 1
        return _faiss().SearchParametersIVF(nprobe=approximate.nprobe * factor)


def query_without_neighbours(query: str | None, error: str | None = None) -> dict[str, Any]:
    """NEIGHBOUR_SCHEMA's one row of a query that could not be asked (`error` says why), or
    that found no neighbour within its distance."""
    return {**dict.fromkeys(NEIGHBOUR_SCHEMA.names), "query": query, "error": error}


def chosen_parameters(search: str, n_items: int) -> IvfParameters | None:
    """A new index's kind for --search (one of INDEX_SEARCHES) and the items it will hold:
    None for exact, else IVF's parameters."""
    if search not in INDEX_SEARCHES:
        raise ValueError(f"unknown search {search!r}; known: {', '.join(INDEX_SEARCHES)}")
    exact = search == "exact" or (search == "auto" and n_items <= EXACT_LIMIT)
    return None if exact else IvfParameters.for_items(n_items)


def _faiss() -> Any:
    """FAISS, loaded on first use (a quarter of a second)."""
    import faiss

    return faiss


@functools.cache
def _faiss_threads() -> int:
    """FAISS's threads (OpenMP's, one per core) as they were before `_threads_for`."""
    return _faiss().omp_get_max_threads()


@contextlib.contextmanager
def _threads_for(n_queries: int) -> Iterator[None]:
    """One thread for fewer than ONE_THREAD_BELOW queries, FAISS's own for more. (A change
    of FAISS's process-wide setting: a search in another thread meanwhile may run on one
    thread or on all, and finds the same neighbours either way.)"""
    if n_queries >= ONE_THREAD_BELOW:
        yield
        return
    faiss = _faiss()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(_faiss_threads())


def _empty_faiss_index(dimension: int, approximate: IvfParameters | None) -> faiss.Index:
    faiss = _faiss()
    if approximate is None:
        return faiss.IndexFlatIP(dimension)
    return faiss.index_factory(
        dimension, f"IVF{approximate.nlist},Flat", faiss.METRIC_INNER_PRODUCT
    )


def _no_neighbours() -> Neighbours:
    return Neighbours(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, bool))


def _distances(similarities: np.ndarray) -> np.ndarray:
    """Cosine distances of unit vectors' dot products, in [0, 2] (rounding takes a dot
    product a little past 1)."""
    return np.clip(1.0 - similarities, 0.0, 2.0).astype(np.float32)


def _similarity_floor(max_distance: float) -> float:
    """FAISS's range search keeps dot products above its radius: just under 1 - max."""
    return float(np.nextafter(np.float32(1.0 - max_distance), np.float32(-np.inf)))


def _item_rows(ids: pa.Array, rows: pa.Table) -> pa.Table:
    """ITEM_SCHEMA's rows: each column from `rows` where it has one, cast as the schema
    says (a catalog's numeric title becomes text), else nulls."""
    columns = {"id": ids}
    for name in ITEM_COLUMNS:
        kind = ITEM_SCHEMA.field(name).type
        columns[name] = (
            pc.cast(rows.column(name), kind)
            if name in rows.column_names
            else pa.nulls(len(rows), kind)
        )
    return pa.table(columns, schema=ITEM_SCHEMA)


def _groups(a: np.ndarray, b: np.ndarray, size: int) -> np.ndarray:
    """Each pair's group: connected components of the graph of pairs, numbered from 1 in
    the order of each group's smallest item."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(size, size))
    _, component = connected_components(graph, directed=False)
    first_item = np.full(component.max() + 1, size, np.int64)
    np.minimum.at(first_item, component[a], a)
    number = np.empty_like(first_item)
    number[np.argsort(first_item, kind="stable")] = np.arange(1, len(first_item) + 1)
    return number[component[a]]


@contextlib.contextmanager
def writing(folder: str) -> Iterator[None]:
    """Holds the folder's lock (the kernel's flock, released however the process ends)
    while one command reads, changes and saves its index."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise VectorIndexError(f"cannot write the index {folder} ({error})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VectorIndexError(
                f"another command is writing the index {folder}: wait for it to end"
            ) from None
        yield
    finally:
        os.close(fd)


def is_index(folder: str) -> bool:
    return (Path(folder) / MANIFEST_FILE).is_file()


def foreign_files(folder: str) -> list[str]:
    """The names in `folder` that no index wrote: a folder with any is not to be written."""
    path = Path(folder)
    if not path.is_dir():
        return []
    return sorted(name for name in os.listdir(path) if not _is_index_file(name))


def _is_index_file(name: str) -> bool:
    return (
        name in (MANIFEST_FILE, LOCK_FILE)
        or (name.startswith(VECTORS_PREFIX) and name.endswith(VECTORS_SUFFIX))
        or (name.startswith(ITEMS_PREFIX) and name.endswith(ITEMS_SUFFIX))
        or (name.startswith(MANIFEST_FILE) and name.endswith(PARTIAL_SUFFIX))
    )


def _remove_other_generations(path: Path, manifest: IndexManifest) -> None:
    """The files of earlier saves, and of saves that stopped half-way."""
    current = {MANIFEST_FILE, LOCK_FILE, manifest.vectors_file, manifest.items_file}
    for name in os.listdir(path):
        if _is_index_file(name) and name not in current:
            with contextlib.suppress(OSError):
                (path / name).unlink()


def _sync_folder(path: Path) -> None:
    """The rename itself on disk, not only in the kernel's cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_faiss_index(path: Path) -> faiss.Index:
    if not path.is_file():
        raise VectorIndexError(f"{path} is missing")
    try:
        return _faiss().read_index(str(path))
    except RuntimeError as error:  # FAISS's own errors
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise VectorIndexError(f"{path} is not a readable FAISS index ({reason})") from None


def _read_items(path: Path) -> pa.Table:
    try:
        items = pq.read_table(path)
    except FileNotFoundError:
        raise VectorIndexError(f"{path} is missing") from None
    except (OSError, pa.ArrowException) as error:
        raise VectorIndexError(f"{path} is not a readable Parquet file ({error})") from None
    if items.schema.remove_metadata() != ITEM_SCHEMA:
        raise VectorIndexError(f"{path} does not have the items' columns ({ITEM_SCHEMA.names})")
    return items


def _check_agreement(
    manifest: IndexManifest, vectors: faiss.Index, items: pa.Table, folder: str
) -> None:
    """The manifest, the FAISS file and the items describe the same index."""
    if vectors.d != manifest.embedding.dimension:
        raise VectorIndexError(
            f"{folder}: its vectors have {vectors.d} dimensions, its manifest says "
            f"{manifest.embedding.dimension}"
        )
    expected_kind = "IndexFlatIP" if manifest.approximate is None else "IndexIVFFlat"
    if type(vectors).__name__ != expected_kind:
        raise VectorIndexError(f"{folder}: its vectors are a {type(vectors).__name__}, its "
                               f"manifest says {manifest.kind}")  # fmt: skip
    cells = getattr(vectors, "nlist", None)  # an IVF index's
    if manifest.approximate is not None and cells != manifest.approximate.nlist:
        raise VectorIndexError(f"{folder}: its vectors are in {cells} cells, its manifest "
                               f"says {manifest.approximate.nlist}")  # fmt: skip
    if not vectors.ntotal == len(items) == manifest.items:
        raise VectorIndexError(
            f"{folder} is inconsistent: {vectors.ntotal} vectors, {len(items)} items, "
            f"{manifest.items} in its manifest"
        )
    ids = items.column("id").to_numpy()
    if not np.array_equal(ids, np.arange(len(items))):
        raise VectorIndexError(f"{folder}: its items' ids are not 0, 1, 2, ... in order")
