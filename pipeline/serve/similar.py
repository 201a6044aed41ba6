"""Similar paintings, with --index: the index's paintings nearest to an image, and their
thumbnails.

An image's neighbours come from the same model pass as its prediction: a service with an
index runs the classifier that gives each image's embedding beside its probabilities
(service.py), and looks the embedding up here, on a thread of its own (one FAISS thread
per query: models/vector_index.py says why).

A thumbnail is of an item of the index, named by its id, and of nothing else: the service
reads the image the index names for that id (never a path or a URL from the request), as
guard.py's `check_index_uri` allows, decodes it under the same caps as any image, and keeps
the JPEG of its square (what the model compared) in a cache bounded by bytes. Its ETag
names the index's generation and the id, so a browser's copy stays right across a rebuilt
index.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.vector_index import NEIGHBOUR_ITEM_COLUMNS, VectorIndex
from pipeline.serve.errors import ServiceError

DEFAULT_K = 10  # as python -m pipeline.similar's -k
MAX_K = 100  # a page of neighbours; more is a batch job (python -m pipeline.similar)
THUMBNAIL_SIDE = 160  # pixels: shown at half that on the page, sharp on a 2x screen
THUMBNAIL_CACHE_BYTES = 32 * 2**20  # some 4,000 thumbnails of 8 KB
THUMBNAIL_ROUTE = "/similar/items/{item_id}/thumbnail"


@dataclass(frozen=True)
class NeighbourQuery:
    """What a request asks of the index: the `k` nearest, at most `max_distance` away."""

    k: int = DEFAULT_K
    max_distance: float | None = None


class ThumbnailCache:
    """Least recently used JPEGs by item id, at most `max_bytes` of them together."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.held = 0
        self._entries: OrderedDict[int, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, item_id: int) -> bytes | None:
        data = self._entries.get(item_id)
        if data is not None:
            self._entries.move_to_end(item_id)
        return data

    def put(self, item_id: int, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        previous = self._entries.pop(item_id, None)
        self.held -= len(previous) if previous is not None else 0
        self._entries[item_id] = data
        self.held += len(data)
        while self.held > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.held -= len(dropped)


class SimilarPaintings:
    """The service's index, searched off the event loop, and its thumbnails' cache."""

    def __init__(self, index: VectorIndex):
        self.index = index
        self.thumbnails = ThumbnailCache(THUMBNAIL_CACHE_BYTES)
        self._searcher = ThreadPoolExecutor(1, thread_name_prefix="search")
        self._uris: list[str | None] = index.items.column("uri").to_pylist()

    def close(self) -> None:
        self._searcher.shutdown(wait=False, cancel_futures=True)

    async def nearest(self, embedding: np.ndarray, query: NeighbourQuery) -> list[dict[str, Any]]:
        """The index's items most similar to `embedding` (the same picture first, then the
        nearest in style), each with its rank, its distance, whether it is the same picture,
        and its thumbnail's URL."""
        loop = asyncio.get_running_loop()
        (found,) = await loop.run_in_executor(
            self._searcher, self.index.search, embedding, query.k, query.max_distance
        )
        ids = found.ids.tolist()
        items = self.index.items.take(found.ids).to_pylist()
        return [
            {
                "rank": rank,
                "distance": float(distance),
                "same_picture": bool(same_picture),
                **{name: item[name] for name in ("uri", *NEIGHBOUR_ITEM_COLUMNS)},
                "thumbnail": thumbnail_url(item_id),
            }
            for rank, (item_id, distance, same_picture, item) in enumerate(
                zip(ids, found.distances, found.same_pictures(), items, strict=True), start=1
            )
        ]

    def uri_of(self, item_id: int) -> str:
        """The URI the index names for `item_id`: 404 unknown_item for an id it does not
        have, 502 for an item without a URI."""
        if not 0 <= item_id < len(self._uris):
            message = f"the index has no item {item_id} (its ids are 0 to {len(self._uris) - 1})"
            raise ServiceError(404, "unknown_item", message)
        uri = self._uris[item_id]
        if not uri or not uri.strip():
            raise ServiceError(502, "missing_uri", f"the index names no image for item {item_id}")
        return uri

    def etag(self, item_id: int) -> str:
        """The thumbnail's validator: the index's generation (its items file) and the id."""
        generation = self.index.manifest.items_file.removesuffix(".parquet")
        return f'"{generation}-{item_id}-{THUMBNAIL_SIDE}"'

    def describe(self) -> dict[str, Any]:
        """What GET /similar/index answers: enough for a client to know what it may ask."""
        manifest = self.index.manifest
        return {
            "model": manifest.model_id,
            "embedding": manifest.embedding.to_json(),
            "items": self.index.size,
            "search": manifest.kind,
            "metric": manifest.metric,
            "max_k": MAX_K,
        }


def thumbnail_url(item_id: int) -> str:
    return THUMBNAIL_ROUTE.format(item_id=item_id)
