"""What a model's embedding is: one vector per painting, compared by cosine distance.

A bundle that emits an embedding describes it with an `EmbeddingSpec`; the run's embeddings
files carry that description in their schema, and an index built from them in its manifest,
so that vectors of different models (or of one model's different outputs) are never
compared. Importable without Keras, Beam or FAISS: the service reads it at start-up.

Vectors are L2-normalised, so that the cosine distance of two of them is 1 - their dot
product: 0 for the same direction, 1 for unrelated ones, 2 for opposite ones. They are
stored as float16: half the bytes of float32, and a distance moves by about 1e-3 at most.

A bundle's vector is two vectors in one (`STYLE_AND_FINGERPRINT`): its style, which ranks
similar paintings, then its fingerprint, which finds the same picture again however it was
scanned, cropped, framed or re-encoded (duplicates). Each part is a unit vector scaled by
1/sqrt(2), so the whole is a unit vector too, and each part is compared on its own: a
painting of the same style is rarely the same picture, and the same picture altered can
have drifted in style (docs/similar.md measures both ways of ranking).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from models.settings import SAME_PICTURE_DISTANCE

STORED_DTYPE = np.float16
# The bundle head's layer whose output begins the style part of its embedding.
PROJECTION_LAYER = "projection"
STYLE_AND_FINGERPRINT = "style_and_fingerprint"
STYLE, FINGERPRINT = "style", "fingerprint"  # the parts of a vector, as `part` names them


class EmbeddingSpecError(ValueError):
    """A description of an embedding that is not one (a wrong key or value)."""


@dataclass(frozen=True)
class EmbeddingSpec:
    """What the vector is (`kind`, the bundle's own words, such as "pooled_features") and
    its dimension: two vectors compare only if both are the same. Its last
    `fingerprint_dimension` numbers are its fingerprint and the others its style; with none,
    the whole vector is both."""

    dimension: int
    kind: str
    fingerprint_dimension: int = 0
    # Fingerprints this near are the same picture (models.settings says how it is chosen).
    same_picture_distance: float = SAME_PICTURE_DISTANCE

    def __post_init__(self) -> None:
        if not 0 <= self.fingerprint_dimension < self.dimension:
            raise EmbeddingSpecError(
                f"'embedding.fingerprint_dimension' must be from 0 to {self.dimension - 1}, "
                f"not {self.fingerprint_dimension!r}"
            )
        if not 0 < self.same_picture_distance <= 2:
            raise EmbeddingSpecError(
                "'embedding.same_picture_distance' must be above 0 and at most 2, "
                f"not {self.same_picture_distance!r}"
            )

    def to_json(self) -> dict[str, Any]:
        parts = {"fingerprint_dimension": self.fingerprint_dimension,
                 "same_picture_distance": self.same_picture_distance}  # fmt: skip
        return {"dimension": self.dimension, "kind": self.kind,
                **(parts if self.fingerprint_dimension else {})}  # fmt: skip

    @classmethod
    def from_json(cls, data: Any, where: str) -> EmbeddingSpec:
        """Raises EmbeddingSpecError naming `where` and the key at fault."""
        if not isinstance(data, dict):
            raise EmbeddingSpecError(f"{where}: 'embedding' must be an object, not {data!r}")
        dimension, kind = data.get("dimension"), data.get("kind")
        if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 1:
            raise EmbeddingSpecError(
                f"{where}: 'embedding.dimension' must be a whole number of at least 1, "
                f"not {dimension!r}"
            )
        if not isinstance(kind, str) or not kind:
            raise EmbeddingSpecError(f"{where}: 'embedding.kind' must be a name, not {kind!r}")
        fingerprint = data.get("fingerprint_dimension", 0)
        if isinstance(fingerprint, bool) or not isinstance(fingerprint, int):
            raise EmbeddingSpecError(
                f"{where}: 'embedding.fingerprint_dimension' must be a whole number, "
                f"not {fingerprint!r}"
            )
        same = data.get("same_picture_distance", SAME_PICTURE_DISTANCE)
        if isinstance(same, bool) or not isinstance(same, (int, float)):
            raise EmbeddingSpecError(
                f"{where}: 'embedding.same_picture_distance' must be a number, not {same!r}"
            )
        try:
            return cls(dimension, kind, fingerprint, float(same))
        except EmbeddingSpecError as error:
            raise EmbeddingSpecError(f"{where}: {error}") from None

    def describe(self) -> str:
        whole = f"{self.kind}, {self.dimension} dimensions"
        if not self.fingerprint_dimension:
            return whole
        style = self.dimension - self.fingerprint_dimension
        return f"{whole} ({style} of style, {self.fingerprint_dimension} of fingerprint)"

    def part(self, vectors: np.ndarray, name: str) -> np.ndarray:
        """The `name` part (STYLE or FINGERPRINT) of each of `vectors`, as unit vectors
        (float32); a vector without parts is both whole."""
        if not self.fingerprint_dimension:
            return unit_vectors(vectors)
        return unit_vectors(vectors[:, self._columns(name)])

    def query(self, vectors: np.ndarray, name: str) -> np.ndarray:
        """Whole-length queries whose dot product with a stored vector is the cosine of their
        `name` parts: that part at unit length times sqrt(2) (a stored part's length is
        1/sqrt(2)), the other part zero. One index of whole vectors answers both."""
        vectors = unit_vectors(vectors)
        if not self.fingerprint_dimension:
            return vectors
        queries = np.zeros_like(vectors)
        queries[:, self._columns(name)] = self.part(vectors, name) * np.sqrt(2.0)
        return queries

    def _columns(self, name: str) -> slice:
        """Where the `name` part (STYLE or FINGERPRINT) lies in a vector of two parts."""
        cut = self.dimension - self.fingerprint_dimension
        return slice(None, cut) if name == STYLE else slice(cut, None)


def unit_vectors(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, as float32. A zero row stays zero: it is at distance 1 from
    everything, rather than NaN."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, not shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
