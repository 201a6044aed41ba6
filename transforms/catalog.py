"""The catalog: which images to read, what their labels are, and what to pass through.

A catalog is a CSV or Parquet file (or a glob of shards), or a folder or glob of images,
in which case every image is a row of its own. Everything that can be checked before the
pipeline starts (files exist, the URI column is there) is checked in `open_catalog`, so a
wrong column name is one clear message at start-up, not thousands of error rows.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import apache_beam as beam
import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

CatalogFormat = Literal["csv", "parquet", "images"]

DEFAULT_LABEL_COLUMN = "style"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")


class CatalogError(ValueError):
    """The catalog as a whole is unusable; raised before the pipeline starts."""


@dataclass(frozen=True)
class ImageRecord:
    """One catalog row on its way through the pipeline."""

    uri: str  # as written in the catalog: the key users join predictions on
    location: str  # where the bytes are: `uri` resolved against the catalog's folder
    label: str | None
    extra: tuple[tuple[str, Any], ...] = ()  # the catalog's other columns, in order
    error: str | None = None  # "kind: message" when the row itself could not be read


@dataclass(frozen=True)
class Catalog:
    """What `open_catalog` learnt about the input before the pipeline runs."""

    pattern: str
    format: CatalogFormat
    base_dir: str
    uri_column: str
    label_column: str | None  # None: the catalog has no labels
    extra_fields: tuple[pa.Field, ...]  # pass-through columns with their Arrow types

    @property
    def has_labels(self) -> bool:
        return self.label_column is not None


def open_catalog(
    pattern: str,
    *,
    uri_column: str = "uri",
    label_column: str | None = None,
) -> Catalog:
    """Inspects the catalog's files and columns; raises CatalogError with the fix in it.

    `label_column=None` takes labels from a "style" column where there is one: a catalog
    without labels is normal. A label column named explicitly must exist.
    """
    fs, path = fsspec.core.url_to_fs(pattern)
    catalog_format = _format_of(fs, path)
    base_dir = _unstrip(pattern, fs, posixpath.dirname(path) if _has_glob(path) else path)
    if catalog_format == "images":
        return Catalog(pattern, "images", base_dir, "uri", None, ())
    files = sorted(fs.glob(path))
    if not files:
        raise CatalogError(f"No catalog file matches {pattern!r}.")
    base_dir = _unstrip(pattern, fs, posixpath.dirname(files[0]))
    schema = _read_schema(fs, files[0], catalog_format)
    if uri_column not in schema.names:
        raise CatalogError(
            f"The catalog {files[0]!r} has no column {uri_column!r} (columns: "
            f"{', '.join(schema.names)}). Name the image column with --uri_column."
        )
    if label_column is not None and label_column not in schema.names:
        raise CatalogError(
            f"The catalog {files[0]!r} has no label column {label_column!r} (columns: "
            f"{', '.join(schema.names)})."
        )
    if label_column is None and DEFAULT_LABEL_COLUMN in schema.names:
        label_column = DEFAULT_LABEL_COLUMN
    extra = tuple(f for f in schema if f.name not in (uri_column, label_column))
    return Catalog(pattern, catalog_format, base_dir, uri_column, label_column, extra)


def _format_of(fs: fsspec.AbstractFileSystem, path: str) -> CatalogFormat:
    lowered = path.lower()
    if lowered.endswith(".csv"):
        return "csv"
    if lowered.endswith((".parquet", ".pq")):
        return "parquet"
    if _has_glob(path) or fs.isdir(path):
        return "images"
    raise CatalogError(
        f"Cannot tell what {path!r} is: give a .csv or .parquet catalog (or a glob of them), "
        "or a folder or glob of images."
    )


def _has_glob(path: str) -> bool:
    return any(char in path for char in "*?[")


def _unstrip(pattern: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Puts the scheme back on a path that fsspec stripped, so it can be opened again."""
    return path if "://" not in pattern else fs.unstrip_protocol(path)


def _read_schema(fs: fsspec.AbstractFileSystem, path: str, catalog_format: str) -> pa.Schema:
    """CSV columns come through as strings: CSV has no types, and guessing them per shard
    would give shards different schemas."""
    with fs.open(path, "rb") as f:
        if catalog_format == "parquet":
            return pq.read_schema(f)
        try:
            header = pd.read_csv(f, nrows=0)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
            raise CatalogError(f"The catalog {path!r} is not a readable CSV file: {e}") from e
    return pa.schema([pa.field(str(name), pa.string()) for name in header.columns])


def resolve_location(uri: str, base_dir: str) -> str:
    """Relative URIs are relative to the catalog's folder, as in a web page."""
    if not uri or "://" in uri or uri.startswith("/"):
        return uri
    return posixpath.join(base_dir, uri)


def to_record(row: dict[str, Any], catalog: Catalog) -> ImageRecord:
    uri = _text(row.get(catalog.uri_column)) or ""
    label = _text(row.get(catalog.label_column)) if catalog.label_column else None
    extra = tuple((f.name, _blank_to_none(row.get(f.name))) for f in catalog.extra_fields)
    return ImageRecord(uri, resolve_location(uri, catalog.base_dir), label, extra)


def _text(value: Any) -> str | None:
    value = _blank_to_none(value)
    return None if value is None else str(value).strip() or None


def _blank_to_none(value: Any) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and value != value:  # NaN
        return None
    return value


def list_images(pattern: str) -> Iterator[str]:
    """The image files in a folder (recursively) or matched by a glob, in a stable order."""
    fs, path = fsspec.core.url_to_fs(pattern)
    matches = fs.glob(path) if _has_glob(path) else fs.find(path)
    for match in sorted(matches):
        if match.lower().endswith(IMAGE_EXTENSIONS):
            yield _unstrip(pattern, fs, match)


class ReadCatalog(beam.PTransform):
    """Reads a catalog into ImageRecords, one per row (or per image file)."""

    def __init__(self, catalog: Catalog):
        super().__init__()
        self._catalog = catalog

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[ImageRecord]:
        catalog = self._catalog
        if catalog.format == "images":
            return (
                pbegin
                | "Pattern" >> beam.Create([catalog.pattern])
                | "ListImages" >> beam.FlatMap(list_images)
                | "Spread" >> beam.Reshuffle()
                | "ToRecord" >> beam.Map(lambda uri: ImageRecord(uri, uri, None))
            )
        if catalog.format == "csv":
            try:  # Beam reads a first chunk here, to learn the schema
                rows = pbegin | "ReadCsv" >> beam.io.ReadFromCsv(
                    catalog.pattern, dtype=str, keep_default_na=False
                )
            except pd.errors.ParserError as error:
                raise CatalogError(f"{catalog.pattern!r} is not valid CSV: {error}") from None
            rows = rows | "AsDict" >> beam.Map(lambda row: row._asdict())
        else:
            rows = pbegin | "ReadParquet" >> beam.io.ReadFromParquet(catalog.pattern)
        return rows | "ToRecord" >> beam.Map(to_record, catalog)
