"""The catalog: which images to read, what their labels are, and what to pass through.

A catalog is a CSV or Parquet file (or a glob of shards, in one folder or many), or a
folder or glob of images, in which case every image is a row of its own. A path that
exists is that file or folder, whatever its name holds (`cat [2024]/catalog.csv`); only a
path that does not exist is read as a glob. Everything that can be checked before the
pipeline starts (files exist, every shard has the URI column, the shards' column types
agree) is checked in `open_catalog`, so a wrong column name is one clear message at
start-up, not thousands of error rows.

What the catalog promises the rest of the pipeline:
- A relative URI is relative to the folder of the catalog file its row is in (as in a web
  page), so shards in different folders each find their own images; so is the archive in
  an archive member's URI (`zip://MEMBER::ARCHIVE`). URIs with a scheme (`gs://`,
  `HTTP://`, `data:`) and absolute paths are used as they are.
- `uri` is the URI exactly as written, the key users join predictions on; only the
  location the bytes are fetched from is stripped of surrounding spaces.
- Each pass-through column has one type across all shards: the shards' own type where they
  agree, int64 for integers of several widths, float64 for integers mixed with floats, and
  text otherwise (bytes become their UTF-8 text); values are converted to it as rows are
  read. A URI or label column of bytes is read as text.
- A row that cannot be read whole (a CSV line with more or fewer fields than the header,
  or broken quoting; text in CSV or Parquet whose bytes are not UTF-8) is a record whose
  `error` says `bad_catalog_row: line N: ...` (`row N` in Parquet), with the columns it
  could read: it becomes an error row like an unreadable image, and the run goes on.
- A catalog that is an earlier run's predictions (it has `top_k_styles` and `confidence`)
  has predictions in its `style` column, not labels: it has labels only if --label_column
  names them.
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal, TextIO

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from transforms.fetch import ARCHIVE_SCHEMES, scheme_of

CatalogFormat = Literal["csv", "parquet", "images"]

DEFAULT_LABEL_COLUMN = "style"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")
# Columns only artstyle's own predictions have: such a catalog's `style` is not a label.
PREDICTION_COLUMNS = frozenset({"top_k_styles", "confidence"})
BAD_ROW = "bad_catalog_row"
PARQUET_BATCH_ROWS = 1024  # rows read at a time: memory stays small for any shard size
# Python's csv module stops at 128 KiB a field; a `data:` URI of a large image is longer.
MAX_CSV_FIELD_CHARS = 256 * 2**20
CSV_COUNT_CHUNK_BYTES = 2**20
# A CSV record as read: (its first line, its fields or None, what is wrong with it or None).
CsvRecord = tuple[int, list[str] | None, str | None]


class CatalogError(ValueError):
    """The catalog as a whole is unusable; raised before the pipeline starts."""


@dataclass(frozen=True)
class ImageRecord:
    """One catalog row on its way through the pipeline."""

    uri: str | None  # exactly as written in the catalog: the key users join predictions on
    location: str  # where the bytes are: `uri` resolved against its catalog file's folder
    label: str | None
    extra: tuple[tuple[str, Any], ...] = ()  # the catalog's other columns, in order
    error: str | None = None  # "kind: message" when the row itself could not be read


@dataclass(frozen=True)
class Catalog:
    """What `open_catalog` learnt about the input before the pipeline runs."""

    pattern: str
    format: CatalogFormat
    files: tuple[str, ...]  # the catalog files, each as fsspec opens it; () for images
    uri_column: str
    label_column: str | None  # None: the catalog has no labels
    extra_fields: tuple[pa.Field, ...]  # pass-through columns with their unified types
    listed: bool = True  # False: `files` are the pattern, listed by the job when it runs

    @property
    def has_labels(self) -> bool:
        return self.label_column is not None


def open_catalog(
    pattern: str,
    *,
    uri_column: str = "uri",
    label_column: str | None = None,
) -> Catalog:
    """Inspects every catalog file's columns; raises CatalogError with the fix in it.

    `label_column=None` takes labels from a "style" column where there is one: a catalog
    without labels is normal. A label column named explicitly must exist.
    """
    fs, path = fsspec.core.url_to_fs(pattern)
    catalog_format = _format_of(fs, path)
    if catalog_format == "images":
        return Catalog(pattern, "images", (), "uri", None, ())
    files = tuple(list_catalog_files(pattern))
    if not files:
        hint = " (In a glob, write [[] for a '[' in a name.)" if "[" in pattern else ""
        raise CatalogError(f"No catalog file matches {pattern!r}.{hint}")
    schemas = [_read_schema(file, catalog_format) for file in files]
    for file, schema in zip(files, schemas, strict=True):
        _check_columns(file, schema.names, uri_column, label_column)
    schema = _unified_schema(schemas)
    if label_column is None:
        label_column = _default_label_column(pattern, schema.names)
    extra = tuple(f for f in schema if f.name not in (uri_column, label_column))
    return Catalog(pattern, catalog_format, files, uri_column, label_column, extra)


def describe_catalog(pattern: str, *, uri_column: str, label_column: str | None) -> Catalog:
    """The catalog as the flags describe it, without reading a byte of it: for a job that
    is built now and run later elsewhere (a Dataflow template), where the catalog's bucket
    may not be reachable. Its files are listed when the job runs; it passes no other
    columns through, since their names and types are unknown, and has labels only if
    --label_column names them."""
    catalog_format = table_format_of(pattern)
    if catalog_format is None:
        return Catalog(pattern, "images", (), "uri", None, ())
    return Catalog(pattern, catalog_format, (pattern,), uri_column, label_column, (), False)


def list_catalog_files(pattern: str) -> list[str]:
    """The files a catalog pattern matches, each as fsspec opens it: a file that exists is
    itself, whatever its name holds; only a path that does not exist is a glob."""
    fs, path = fsspec.core.url_to_fs(pattern)
    matches = [path] if fs.isfile(path) else sorted(fs.glob(path))
    return [_unstrip(pattern, fs, match) for match in matches]


def table_format_of(path: str) -> CatalogFormat | None:
    """'csv' or 'parquet' by the name's extension; None for any other name."""
    lowered = path.lower()
    if lowered.endswith(".csv"):
        return "csv"
    if lowered.endswith((".parquet", ".pq")):
        return "parquet"
    return None


def _format_of(fs: fsspec.AbstractFileSystem, path: str) -> CatalogFormat:
    table_format = table_format_of(path)
    if table_format is not None:
        return table_format
    if fs.isdir(path) or (_has_glob(path) and not fs.exists(path)):
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


def _read_schema(file: str, catalog_format: str) -> pa.Schema:
    """A Parquet file's footer, or a CSV file's header. CSV columns are strings: CSV has no
    types, and guessing them per shard would give shards different schemas."""
    if catalog_format == "parquet":
        with fsspec.open(file, "rb") as f:
            return pq.read_schema(f)
    with _csv_text(file) as text:
        names = _csv_header(file, _csv_lines(text))
    return pa.schema([pa.field(name, pa.string()) for name in names])


def _check_columns(file: str, names: list[str], uri_column: str, label_column: str | None) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CatalogError(
            f"The catalog {file!r} has more than one column named {', '.join(repeated)}: "
            "give each column a name of its own."
        )
    if uri_column not in names:
        raise CatalogError(
            f"The catalog {file!r} has no column {uri_column!r} (columns: "
            f"{', '.join(names)}). Name the image column with --uri_column."
        )
    if label_column is not None and label_column not in names:
        raise CatalogError(
            f"The catalog {file!r} has no label column {label_column!r} (columns: "
            f"{', '.join(names)})."
        )


def _unified_schema(schemas: Iterable[pa.Schema]) -> pa.Schema:
    """Every column of any shard, in the order first seen, each with one type for all."""
    types: dict[str, list[pa.DataType]] = {}
    for schema in schemas:
        for field in schema:
            types.setdefault(field.name, []).append(field.type)
    return pa.schema([pa.field(name, unified_type(found)) for name, found in types.items()])


def unified_type(types: Iterable[pa.DataType]) -> pa.DataType:
    """One type that holds every shard's values of a column (a null column holds none)."""
    found = {t for t in types if not pa.types.is_null(t)}
    if not found:
        return pa.null()
    if len(found) == 1:
        return found.pop()
    if all(_fits_int64(t) for t in found):
        return pa.int64()
    if all(_fits_int64(t) or pa.types.is_floating(t) for t in found):
        return pa.float64()
    return pa.string()


def _fits_int64(data_type: pa.DataType) -> bool:
    return pa.types.is_integer(data_type) and data_type != pa.uint64()


def _default_label_column(pattern: str, names: list[str]) -> str | None:
    if DEFAULT_LABEL_COLUMN not in names:
        return None
    if not set(names) >= PREDICTION_COLUMNS:
        return DEFAULT_LABEL_COLUMN
    hint = (
        "to score against its 'label' column, pass --label_column label"
        if "label" in names
        else "to score against labels, name their column with --label_column"
    )
    logging.warning(
        "%s looks like artstyle's own predictions (it has columns %s): its %r column is a "
        "prediction, not a label, so it is not read as one; %s.",
        pattern,
        " and ".join(sorted(PREDICTION_COLUMNS)),
        DEFAULT_LABEL_COLUMN,
        hint,
    )
    return None


def resolve_location(uri: str, base_dir: str) -> str:
    """Relative URIs are relative to the catalog file's folder, as in a web page; so is the
    archive of an archive's member (`zip://MEMBER::ARCHIVE`), itself a URI of the catalog."""
    scheme = scheme_of(uri) if uri else None
    if scheme in ARCHIVE_SCHEMES:
        member, chained, archive = uri.partition("::")
        return f"{member}{chained}{resolve_location(archive, base_dir)}" if chained else uri
    if not uri or scheme is not None or posixpath.isabs(uri):
        return uri
    return posixpath.join(base_dir, uri)


def to_record(row: dict[str, Any], catalog: Catalog, base_dir: str) -> ImageRecord:
    """`base_dir`: the folder of the catalog file the row is in."""
    uri = row.get(catalog.uri_column)
    uri = None if uri is None else str(uri)
    location = resolve_location((uri or "").strip(), base_dir)
    label = _text(row.get(catalog.label_column)) if catalog.label_column else None
    extra = tuple((f.name, _blank_to_none(row.get(f.name))) for f in catalog.extra_fields)
    return ImageRecord(uri, location, label, extra)


def _text(value: Any) -> str | None:
    value = _blank_to_none(value)
    return None if value is None else str(value).strip() or None


def _blank_to_none(value: Any) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and value != value:  # NaN
        return None
    return value


def read_records(file: str, catalog: Catalog) -> Iterator[ImageRecord]:
    """One record per row of one catalog file, bad rows included."""
    reader = read_csv_records if catalog.format == "csv" else read_parquet_records
    return reader(file, catalog)


def read_parquet_records(file: str, catalog: Catalog) -> Iterator[ImageRecord]:
    base_dir = posixpath.dirname(file)
    with fsspec.open(file, "rb") as f:
        for number, row in enumerate(_parquet_values(pq.ParquetFile(f), catalog), start=1):
            unreadable = {name: v.byte for name, v in row.items() if isinstance(v, NotUtf8)}
            if not unreadable:
                yield to_record(row, catalog, base_dir)
                continue
            problem = "; ".join(_not_utf8(byte, name) for name, byte in unreadable.items())
            readable = {name: value for name, value in row.items() if name not in unreadable}
            yield _bad_record(readable, catalog, f"row {number}", problem, file)


def _parquet_values(parquet: pq.ParquetFile, catalog: Catalog) -> Iterator[dict[str, Any]]:
    """The rows, read a batch at a time, each column in the catalog's type for it."""
    types = {f.name: f.type for f in catalog.extra_fields}
    wanted = {catalog.uri_column, catalog.label_column, *types}
    columns = [name for name in parquet.schema_arrow.names if name in wanted]
    for batch in parquet.iter_batches(PARQUET_BATCH_ROWS, columns=columns):
        values = {
            name: column_values(column, types.get(name, _text_type_of(column.type)))
            for name, column in zip(batch.schema.names, batch.columns, strict=True)
        }
        for index in range(batch.num_rows):
            yield {name: column[index] for name, column in values.items()}


@dataclass(frozen=True)
class NotUtf8:
    """A value whose bytes are not UTF-8 text: Parquet readers do not check a string
    column's bytes, and a binary column cast to text is not checked either."""

    byte: int  # the first that is not UTF-8


def _text_type_of(data_type: pa.DataType) -> pa.DataType:
    """The type the URI and label columns are read in: text, where a shard has bytes."""
    binary = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary)
    return pa.string() if any(is_binary(data_type) for is_binary in binary) else data_type


def column_values(values: pa.Array, data_type: pa.DataType) -> list[Any]:
    """A shard's column as Python values of the catalog's type for it. Arrow casts what it
    can; values it cannot cast to text (nested ones) become Python's text of them; a value
    with bytes that are not UTF-8 is a NotUtf8: never a failed run."""
    if values.type != data_type:
        try:
            values = values.cast(data_type, safe=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return [
                value if value is None or isinstance(value, NotUtf8) else str(value)
                for value in _python_values(values)
            ]
    return _python_values(values)


def _python_values(values: pa.Array) -> list[Any]:
    try:
        return values.to_pylist()
    except UnicodeDecodeError:  # some value's text is not UTF-8: find which, one by one
        return [_python_value(value) for value in values]


def _python_value(value: pa.Scalar) -> Any:
    try:
        return value.as_py()
    except UnicodeDecodeError as error:
        return NotUtf8(error.object[error.start])


def _not_utf8(byte: int, column: str) -> str:
    return f"byte 0x{byte:02X} in column {column!r} is not UTF-8"


def _bad_record(
    row: dict[str, Any], catalog: Catalog, where: str, problem: str, file: str
) -> ImageRecord:
    """A row that cannot be trusted as a whole: an error record that fetches nothing but
    keeps the columns it could read, the id users join predictions on among them."""
    record = to_record(row, catalog, "")
    return replace(record, location="", error=f"{BAD_ROW}: {where}: {problem} ({file})")


def read_csv_records(file: str, catalog: Catalog) -> Iterator[ImageRecord]:
    base_dir = posixpath.dirname(file)
    with _csv_text(file) as text:
        lines = _csv_lines(text)
        names = _csv_header(file, lines)
        for line, fields, problem in lines:
            if fields == []:  # a blank line is no row
                continue
            if fields is None:  # the csv module could not parse the record: `problem` says why
                yield _bad_record({}, catalog, f"line {line}", str(problem), file)
                continue
            row = dict(zip(names, fields, strict=False))  # the header's columns, in order
            problem = _row_problem(fields, names)
            if problem is None:
                yield to_record(row, catalog, base_dir)
                continue
            readable = {name: value for name, value in row.items() if _bad_byte(value) is None}
            yield _bad_record(readable, catalog, f"line {line}", problem, file)


@contextmanager
def _csv_text(file: str) -> Iterator[TextIO]:
    """The file as text in which bytes that are not UTF-8 stay readable as lone surrogates
    (Python's surrogateescape), so that one bad byte spoils its row, not the file."""
    csv.field_size_limit(MAX_CSV_FIELD_CHARS)
    with fsspec.open(file, "rb") as raw:
        yield io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _csv_lines(text: TextIO) -> Iterator[CsvRecord]:
    """(line, fields, None) for each CSV record, or (line, None, what is wrong) where the
    csv module cannot parse one; `line` is the record's first line in the file."""
    reader = csv.reader(text, strict=True)
    line = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as error:  # the reader starts afresh on the next line
            yield line, None, str(error)
        else:
            yield line, fields, None
        line = reader.line_num + 1


def _csv_header(file: str, lines: Iterator[CsvRecord]) -> list[str]:
    """The column names of the first record. A blank name is `Unnamed: i`, as pandas names
    it (a catalog written by `DataFrame.to_csv` has a blank name over its index column), so
    that a query written for pandas' reading of the catalog works on the predictions."""
    for _, fields, problem in lines:
        if fields == []:
            continue
        for column, name in enumerate(fields or []):
            if (byte := _bad_byte(name)) is not None:
                problem = f"byte 0x{byte:02X} in its column {column + 1} is not UTF-8"
                break
        if problem:
            raise CatalogError(f"The catalog {file!r} has no readable header line: {problem}.")
        assert fields is not None  # a record the csv module could not parse has a problem
        return [name or f"Unnamed: {i}" for i, name in enumerate(fields)]
    raise CatalogError(f"The catalog {file!r} is empty: it needs a header line of column names.")


def _row_problem(fields: list[str], names: list[str]) -> str | None:
    """What is wrong with a parsed CSV line, if anything: the count of its fields, and each
    field of the header's columns whose bytes are not UTF-8."""
    problems = []
    if len(fields) > len(names):
        problems.append(
            f"{len(fields)} fields where the header has {len(names)} (a comma in a value "
            f"that is not quoted?): the columns hold the first {len(names)}"
        )
    elif len(fields) < len(names):
        problems.append(
            f"{len(fields)} field{'s' * (len(fields) != 1)} where the header has "
            f"{len(names)}: the columns from {names[len(fields)]!r} on are empty"
        )
    for name, field in zip(names, fields, strict=False):
        if (byte := _bad_byte(field)) is not None:
            problems.append(f"{_not_utf8(byte, name)} (save it as UTF-8)")
    return "; ".join(problems) or None


def _bad_byte(field: str) -> int | None:
    """The first byte of the field that is not UTF-8 (read as a lone surrogate), if any."""
    try:
        field.encode("utf-8")
    except UnicodeEncodeError as error:
        return ord(field[error.start]) - 0xDC00
    return None


def list_images(pattern: str) -> Iterator[str]:
    """The image files in a folder (recursively), or matched by a glob where no folder has
    that name, in a stable order."""
    fs, path = fsspec.core.url_to_fs(pattern)
    matches = fs.find(path) if fs.isdir(path) else fs.glob(path)
    for match in sorted(matches):
        if match.lower().endswith(IMAGE_EXTENSIONS):
            yield _unstrip(pattern, fs, match)


def catalog_size(catalog: Catalog) -> int | None:
    """The catalog's rows, where they can be counted without reading much: Parquet footers,
    local CSV files' lines after the header (near enough: a quoted field may hold a line
    break), a local folder's images. None otherwise, and where counting fails: reading the
    catalog is the run's business, and it reports its errors there."""
    if not catalog.listed:
        return None
    if catalog.format != "parquet" and not all(
        _is_local(url) for url in (catalog.pattern, *catalog.files)
    ):
        return None
    try:
        if catalog.format == "images":
            return sum(1 for _ in list_images(catalog.pattern))
        count_rows = _parquet_rows if catalog.format == "parquet" else _csv_rows
        return sum(count_rows(file) for file in catalog.files)
    except (OSError, ValueError):
        return None


def _parquet_rows(file: str) -> int:
    with fsspec.open(file, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _csv_rows(file: str) -> int:
    lines, last = 0, b"\n"
    with fsspec.open(file, "rb") as f:
        while chunk := f.read(CSV_COUNT_CHUNK_BYTES):
            lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    lines += last != b"\n"  # a last line without its newline
    return max(0, lines - 1)


def _is_local(url: str) -> bool:
    return isinstance(fsspec.core.url_to_fs(url)[0], LocalFileSystem)


def _image_record(uri: str) -> ImageRecord:
    return ImageRecord(uri, uri, None)


class ReadCatalog(beam.PTransform):
    """Reads a catalog into ImageRecords, one per row (or per image file).

    Each catalog file is read whole by one worker, which is how each row knows its file.
    A catalog in several files is spread over the workers file by file, and each file's
    rows flow on from there as they are read. A catalog in one file (or a folder of
    images) has its rows spread instead, so that more than one worker classifies them;
    local runners hold a reshuffled collection in memory whole, so a catalog of millions
    of rows keeps memory flat when it comes in several files.
    """

    def __init__(self, catalog: Catalog):
        super().__init__()
        self._catalog = catalog

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection[ImageRecord]:
        catalog = self._catalog
        if catalog.format == "images":
            images = (
                pbegin
                | "Pattern" >> beam.Create([catalog.pattern])
                | "ListImages" >> beam.FlatMap(list_images)
            )
            return images | "Spread" >> beam.Reshuffle() | "ToRecord" >> beam.Map(_image_record)
        files = pbegin | "Files" >> beam.Create(catalog.files)
        if not catalog.listed:
            files = files | "ListFiles" >> beam.FlatMap(list_catalog_files)
        records = (
            files
            | "SpreadFiles" >> beam.Reshuffle()
            | "ReadRows" >> beam.FlatMap(read_records, catalog)
        )
        if catalog.listed and len(catalog.files) > 1:
            return records
        return records | "Spread" >> beam.Reshuffle()
