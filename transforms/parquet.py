"""Parquet files written by the steps that make the rows, a row group at a time.

Beam's WriteToParquet runs as a step of its own on the DirectRunner (its writer waits for a
side input), so every row it is given is held in memory, encoded, until the steps before
it have finished with all of them: harmless for prediction rows of a few hundred bytes,
fatal for feature vectors of tens of kilobytes over tens of thousands of paintings. Here
each bundle's rows go to a file of their own as they arrive, and only the files' names are
gathered at the end, to be renamed `PREFIX-00000-of-0000N.parquet`.
"""

from __future__ import annotations

import posixpath
import re
import uuid
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

ROWS_PER_GROUP = 256  # rows held before they are written: a few megabytes of features


class _WriteShardFn(beam.DoFn):
    """Rows -> one Parquet file per bundle in `folder`, whose path is output when it closes."""

    def __init__(self, folder: str, schema: pa.Schema, rows_per_group: int):
        self._folder, self._schema, self._rows_per_group = folder, schema, rows_per_group

    def start_bundle(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self._file: Any = None
        self._writer: pq.ParquetWriter | None = None
        self._path = ""

    def process(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self._rows_per_group:
            self._write_group()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        self._write_group()
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            yield WindowedValue(self._path, GlobalWindow().max_timestamp(), (GlobalWindow(),))

    def _write_group(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            fs, folder = fsspec.core.url_to_fs(self._folder)
            fs.makedirs(folder, exist_ok=True)
            self._path = posixpath.join(self._folder, f"{uuid.uuid4().hex}.parquet")
            self._file = fsspec.open(self._path, "wb").open()
            self._writer = pq.ParquetWriter(self._file, self._schema)
        self._writer.write_table(pa.Table.from_pylist(self._rows, self._schema))
        self._rows = []


def _publish(paths: list[str], prefix: str, folder: str, schema: pa.Schema) -> list[str]:
    """Renames the bundles' files `PREFIX-SSSSS-of-NNNNN.parquet` (one empty file, with the
    schema, if no row came), then removes the folder they were written in: files of bundles
    that failed and ran again are left out, as their names never arrived here. The shards
    of an earlier write under the same prefix go too (see `_remove_earlier_shards`)."""
    fs, _ = fsspec.core.url_to_fs(prefix)
    if not paths:
        empty = f"{prefix}-00000-of-00001.parquet"
        with fsspec.open(empty, "wb") as f:
            pq.write_table(schema.empty_table(), f)
        published = [empty]
    else:
        published = []
        for shard, path in enumerate(sorted(paths)):
            name = f"{prefix}-{shard:05d}-of-{len(paths):05d}.parquet"
            fs.mv(path, name)
            published.append(name)
    if fs.exists(folder):
        fs.rm(folder, recursive=True)
    _remove_earlier_shards(fs, prefix, published)
    return published


def _remove_earlier_shards(
    fs: fsspec.AbstractFileSystem, prefix: str, published: list[str]
) -> None:
    """Removes the shards under `prefix` that this write did not write: those of an earlier
    write in more shards (training's features written again, in as many shards as that
    run's bundles), which would be read with this write's as one set. They go only once
    this write's shards are in place, so a write that fails leaves the earlier one whole."""
    _, path = fsspec.core.url_to_fs(prefix)
    stem = posixpath.basename(path)
    shard = re.compile(rf"{re.escape(stem)}-\d{{5}}-of-\d{{5}}\.parquet")
    kept = {posixpath.basename(name) for name in published}
    for name in fs.glob(f"{path}-*-of-*.parquet"):
        base = posixpath.basename(name)
        if shard.fullmatch(base) and base not in kept:
            fs.rm(name)


class WriteParquet(beam.PTransform):
    """Rows (dicts with `schema`'s fields), or a tuple of PCollections of them, -> Parquet
    files `PREFIX-SSSSS-of-NNNNN.parquet`; returns the published paths, once, as a list.

    A tuple is written branch by branch, not flattened first: a Flatten of branches made
    in other steps holds their rows in memory on the DirectRunner as WriteToParquet does.
    """

    def __init__(self, prefix: str, schema: pa.Schema, rows_per_group: int = ROWS_PER_GROUP):
        super().__init__()
        self._prefix, self._schema, self._rows_per_group = prefix, schema, rows_per_group
        stem = posixpath.basename(prefix)
        self._folder = posixpath.join(posixpath.dirname(prefix), f".{stem}-{uuid.uuid4().hex}")

    def expand(self, rows):
        branches = rows if isinstance(rows, tuple) else (rows,)
        write = _WriteShardFn(self._folder, self._schema, self._rows_per_group)
        written = [
            branch | f"WriteShards{i}" >> beam.ParDo(write) for i, branch in enumerate(branches)
        ]
        return (
            written
            | "AllShards" >> beam.Flatten()
            | "Gather" >> beam.combiners.ToList()
            | "Publish"
            >> beam.Map(_publish, prefix=self._prefix, folder=self._folder, schema=self._schema)
        )
