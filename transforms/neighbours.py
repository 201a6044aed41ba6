"""Similarity queries in a Beam job: each image's embedding looked up in an index.

The index is a folder on the machine the job runs on, loaded once per worker process and
shared by its threads (an index of a million paintings holds gigabytes). Every query gives
its rows of models.vector_index.NEIGHBOUR_SCHEMA: its neighbours, nearest first, or one row
without any (with its error, where it failed).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.utils.shared import Shared

from models.vector_index import VectorIndex, query_without_neighbours
from transforms.catalog import ImageRecord


class NeighbourRowsFn(beam.DoFn):
    """(record, a classifier's (probabilities, embedding)) -> the record's neighbour rows."""

    def __init__(self, index_folder: str, k: int, max_distance: float | None):
        self._folder, self._k, self._max_distance = index_folder, k, max_distance
        self._shared = Shared()

    def setup(self) -> None:
        self._index = self._shared.acquire(lambda: VectorIndex.load(self._folder))

    def process(self, inferred: tuple[ImageRecord, PredictionResult]) -> Iterator[dict[str, Any]]:
        record, result = inferred
        _, embedding = cast(tuple[np.ndarray, np.ndarray], result.inference)
        found = self._index.search(embedding, self._k, self._max_distance)
        if not len(found[0].ids):
            yield query_without_neighbours(record.uri)
            return
        yield from self._index.neighbour_table([record.uri], found).to_pylist()


def failed_query(failure: tuple[ImageRecord, str]) -> dict[str, Any]:
    """A query whose image could not be read or run: its one row."""
    record, error = failure
    return query_without_neighbours(record.uri, error)
