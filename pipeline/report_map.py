"""The report's map of a run and its likely duplicates, drawn from the run's embeddings.

A run made with `--embeddings` has `embeddings-*.parquet` beside its predictions: one row per
predicted row, made from the same element as that prediction row in the same Beam step,
with its `uri`, the catalog's columns, `label`, `style` and `confidence`
(transforms/embeddings.py). So the map and the duplicates read all they show from the
embeddings files and join nothing: a join with the predictions by URI would be wrong, as a
catalog may list one URI twice and both rows are the run's. Error rows have no embedding:
they are absent from both, and the page says how many.

The run's paintings become an index as `python -m pipeline.index` builds one: read as stored,
in float16, then held once in FAISS as float32, the only copy of them all in float32 (the
adds convert a chunk at a time). Its likely duplicates are the index's `near_pairs` at its
embedding's `same_picture_distance`: the pairs and groups that `python -m
pipeline.duplicates` lists. The map is at most MAP_MAX_POINTS of the paintings, chosen by a
digest of their URI (the same ones however the run's files are sharded), placed by the first
two principal components of their vectors' style parts, computed by numpy on those
paintings alone: a linear projection, so paintings near in style are near on the map (not
always the converse), and the same vectors always give the same map.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.embedding import STYLE
from models.vector_index import VectorIndex
from pipeline.figures import style_colours
from pipeline.index import new_index, new_paintings
from transforms.embeddings import RunEmbeddings
from transforms.explanations import is_known_mistake

# Points drawn: a map stays readable, and the page's size bounded, however large the run.
MAP_MAX_POINTS = 3000
MAP_WIDTH, MAP_HEIGHT, MAP_MARGIN = 720, 540, 10  # the map's drawing, in SVG units
TOOLTIP_CHARACTERS = 120  # of a URI or a title in a point's tooltip
MAX_GROUPS_SHOWN = 12  # groups of likely duplicates on the page, the closest first
MAX_PAINTINGS_PER_GROUP = 6  # paintings pictured of each group shown
# What the page shows of a painting of a group, from the index's items.
PAINTING_COLUMNS = ("uri", "title", "style", "confidence", "label")


@dataclass(frozen=True)
class MapPoint:
    """One painting on the map: where (SVG coordinates), its predicted style and that
    style's colour, and its tooltip."""

    x: float
    y: float
    style: str
    colour: str
    mistake: bool  # labelled with a style the model knows, and predicted another
    tooltip: str


@dataclass(frozen=True)
class MapStyle:
    """A line of the map's key: a predicted style, its colour and its points drawn."""

    style: str
    colour: str
    points: int


@dataclass(frozen=True)
class RunMap:
    """The map: its points, mistakes last (drawn on top), and what the page says of it."""

    points: tuple[MapPoint, ...]
    styles: tuple[MapStyle, ...]
    n_paintings: int  # the run's paintings with an embedding, drawn or not
    n_mistakes: int  # of those, the labelled and wrong
    variance: tuple[float, float]  # the share of the drawn vectors' variance on each axis
    width: int = MAP_WIDTH
    height: int = MAP_HEIGHT

    @property
    def n_mistakes_drawn(self) -> int:
        return sum(point.mistake for point in self.points)


@dataclass(frozen=True)
class DuplicateGroup:
    """One group of likely duplicates: its number (as `python -m pipeline.duplicates`
    numbers it), its size, its pairs' distances, and its first paintings by URI."""

    number: int
    size: int
    closest: float
    farthest: float
    paintings: tuple[dict[str, Any], ...]  # PAINTING_COLUMNS


@dataclass(frozen=True)
class LikelyDuplicates:
    """The run's pairs of paintings at most `max_distance` apart, grouped; the closest
    groups, to be shown."""

    max_distance: float
    n_pairs: int
    n_groups: int
    n_paintings: int  # in any group
    approximate: bool  # found by an approximate (IVF) search: a pair may be missed
    groups: tuple[DuplicateGroup, ...]

    def paintings(self) -> list[dict[str, Any]]:
        """The paintings of the groups shown, to be pictured."""
        return [painting for group in self.groups for painting in group.paintings]


@dataclass(frozen=True)
class EmbeddingSections:
    """The sections of the page that the run's embeddings make."""

    run_map: RunMap
    duplicates: LikelyDuplicates


def embedding_sections(embeddings: RunEmbeddings, classes: Sequence[str]) -> EmbeddingSections:
    """The map and the likely duplicates of the run whose embeddings these are."""
    index = run_index(embeddings)
    return EmbeddingSections(
        run_map(index, classes),
        likely_duplicates(index, index.manifest.embedding.same_picture_distance),
    )


def run_index(embeddings: RunEmbeddings) -> VectorIndex:
    """An index of the run's paintings, in memory, as `python -m pipeline.index` builds one."""
    vectors, items, _ = new_paintings([embeddings], set())
    index = new_index(embeddings.origin, "auto", len(vectors))
    index.add(vectors, items)
    return index


# --- The map -----------------------------------------------------------------------------


def run_map(index: VectorIndex, classes: Sequence[str]) -> RunMap:
    """At most MAP_MAX_POINTS of the index's paintings on their principal plane, coloured
    by predicted style in `classes`' order, the labelled mistakes marked."""
    items = index.items.select(PAINTING_COLUMNS)
    mistakes = np.array(
        [is_known_mistake(row, classes) for row in items.select(["style", "label"]).to_pylist()],
        dtype=bool,
    )
    drawn = drawn_ids(items.column("uri"), MAP_MAX_POINTS)
    styles = index.manifest.embedding.part(index.vectors(drawn), STYLE)
    coordinates, variance = principal_plane(styles)
    xs, ys = _fitted(coordinates, MAP_WIDTH, MAP_HEIGHT, MAP_MARGIN)
    rows = items.take(pa.array(drawn, pa.int64())).to_pylist()
    colours = style_colours(classes)
    points = [
        MapPoint(
            float(x),
            float(y),
            row["style"],
            colours[row["style"]],
            bool(mistakes[i]),
            _tooltip(row),
        )
        for i, x, y, row in zip(drawn, xs, ys, rows, strict=True)
    ]
    points.sort(key=lambda point: point.mistake)  # stable: mistakes last, over the others
    counts = Counter(point.style for point in points)
    return RunMap(
        points=tuple(points),
        styles=tuple(MapStyle(s, colours[s], counts[s]) for s in classes if counts[s]),
        n_paintings=index.size,
        n_mistakes=int(mistakes.sum()),
        variance=variance,
    )


def drawn_ids(uris: pa.ChunkedArray, most: int) -> np.ndarray:
    """The ids (row numbers) of at most `most` rows, in order: all of them, or those whose
    URIs have the smallest digests, ties in row order. A digest, not a random draw, so that
    the map is the same whatever order the run's files hold its rows in."""
    if len(uris) <= most:
        return np.arange(len(uris), dtype=np.int64)
    digests = np.fromiter((_digest(uri) for uri in uris.to_pylist()), np.uint64, len(uris))
    return np.sort(np.argsort(digests, kind="stable")[:most]).astype(np.int64)


def _digest(uri: str | None) -> int:
    value = hashlib.blake2b((uri or "").encode(), digest_size=8).digest()
    return int.from_bytes(value, "big")


def principal_plane(vectors: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Each vector's coordinates on the first two principal components of `vectors`, and
    the share of their variance that each component holds. The components are the
    eigenvectors of the vectors' scatter matrix (dimension x dimension: cheaper than an SVD
    of the vectors themselves); each one's sign is set by its largest loading, which it makes
    positive, so that the same vectors give the same map."""
    vectors = np.asarray(vectors, dtype=np.float64)
    coordinates = np.zeros((len(vectors), 2))
    if len(vectors) < 2:
        return coordinates, (0.0, 0.0)
    centred = vectors - vectors.mean(axis=0)
    variances, components = np.linalg.eigh(centred.T @ centred)  # ascending
    variances = np.clip(variances[::-1][:2], 0.0, None)
    kept = components[:, ::-1][:, :2].T
    signs = np.sign(kept[np.arange(len(kept)), np.abs(kept).argmax(axis=1)])
    kept = kept * np.where(signs == 0, 1.0, signs)[:, None]
    coordinates[:, : len(kept)] = centred @ kept.T
    total = float(np.einsum("ij,ij->", centred, centred))
    shares = [float(v / total) if total > 0 else 0.0 for v in variances]
    shares += [0.0] * (2 - len(shares))
    return coordinates, (shares[0], shares[1])


def _fitted(
    coordinates: np.ndarray, width: int, height: int, margin: int
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates scaled alike on both axes (distances on the map stay comparable) and
    centred in a drawing of `width` x `height`, `margin` from its edges; y grows downwards,
    as in SVG."""
    if not len(coordinates):
        return np.zeros(0), np.zeros(0)
    low, high = coordinates.min(axis=0), coordinates.max(axis=0)
    spans = np.maximum(high - low, 1e-12)
    scale = min((width - 2 * margin) / spans[0], (height - 2 * margin) / spans[1])
    middle = (low + high) / 2
    xs = width / 2 + (coordinates[:, 0] - middle[0]) * scale
    ys = height / 2 - (coordinates[:, 1] - middle[1]) * scale
    return np.round(xs, 1), np.round(ys, 1)


def _tooltip(row: dict[str, Any]) -> str:
    lines = [_clipped(row["uri"] or "", from_start=True)]
    if row["title"]:
        lines.append(_clipped(row["title"], from_start=False))
    line = f"predicted {row['style']} ({row['confidence']:.0%})"
    if row["label"]:
        line += f", labelled {_clipped(row['label'], from_start=False)}"
    return "\n".join([*lines, line])


def _clipped(text: str, from_start: bool) -> str:
    """At most TOOLTIP_CHARACTERS of `text`: its end where `from_start` (a URI's file name
    is at its end), else its start."""
    if len(text) <= TOOLTIP_CHARACTERS:
        return text
    keep = TOOLTIP_CHARACTERS - 1
    return "…" + text[-keep:] if from_start else text[:keep] + "…"


# --- The likely duplicates ---------------------------------------------------------------


def likely_duplicates(index: VectorIndex, max_distance: float) -> LikelyDuplicates:
    """The index's pairs at most `max_distance` apart and their groups (the index's
    `near_pairs`), with the MAX_GROUPS_SHOWN groups whose closest pair is closest."""
    pairs = index.near_pairs(max_distance)
    ends = pa.concat_tables(  # each pair twice: once by each of its paintings
        pairs.select(["group", end, "distance"]).rename_columns(["group", "id", "distance"])
        for end in ("id_a", "id_b")
    )
    groups = (
        ends.group_by("group")
        .aggregate([("id", "distinct"), ("distance", "min"), ("distance", "max")])
        .sort_by([("distance_min", "ascending"), ("group", "ascending")])
    )
    shown = [
        _group(index, row["group"], row["id_distinct"], row["distance_min"], row["distance_max"])
        for row in groups.slice(0, MAX_GROUPS_SHOWN).to_pylist()
    ]
    return LikelyDuplicates(
        max_distance=max_distance,
        n_pairs=len(pairs),
        n_groups=len(groups),
        n_paintings=pc.count_distinct(ends.column("id")).as_py(),
        approximate=index.manifest.approximate is not None,
        groups=tuple(shown),
    )


def _group(
    index: VectorIndex, number: int, ids: list[int], closest: float, farthest: float
) -> DuplicateGroup:
    rows = index.items.take(pa.array(sorted(ids), pa.int64())).select(PAINTING_COLUMNS)
    paintings = sorted(rows.to_pylist(), key=lambda row: row["uri"] or "")
    return DuplicateGroup(
        number=number,
        size=len(ids),
        closest=closest,
        farthest=farthest,
        paintings=tuple(paintings[:MAX_PAINTINGS_PER_GROUP]),
    )
