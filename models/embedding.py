"""What a model's embedding is: one vector per painting, compared by cosine distance.

A bundle that emits an embedding describes it with an `EmbeddingSpec`; the run's embeddings
files carry that description in their schema, and an index built from them in its manifest,
so that vectors of different models (or of one model's different outputs) are never
compared. Importable without Keras, Beam or FAISS: the service reads it at start-up.

Vectors are L2-normalised, so that the cosine distance of two of them is 1 - their dot
product: 0 for the same direction, 1 for unrelated ones, 2 for opposite ones. They are
stored as float16: half the bytes of float32, and a distance moves by about 1e-3 at most.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

STORED_DTYPE = np.float16
# The bundle head's layer whose output is its embedding, and that embedding's kind.
PROJECTION_LAYER = "projection"
HEAD_PROJECTION = "head_projection"


class EmbeddingSpecError(ValueError):
    """A description of an embedding that is not one (a wrong key or value)."""


@dataclass(frozen=True)
class EmbeddingSpec:
    """What the vector is (`kind`, the bundle's own words, such as "pooled_features") and
    its dimension: two vectors compare only if both are the same."""

    dimension: int
    kind: str

    def to_json(self) -> dict[str, Any]:
        return {"dimension": self.dimension, "kind": self.kind}

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
        return cls(dimension, kind)

    def describe(self) -> str:
        return f"{self.kind}, {self.dimension} dimensions"


def unit_vectors(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, as float32. A zero row stays zero: it is at distance 1 from
    everything, rather than NaN."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, not shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
