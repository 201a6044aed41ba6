"""The tables that the index's commands print and write: nearest paintings and duplicates.

Printing is for a person at a terminal: a few columns, long URIs cut from the left so
that their file names stay, empty columns left out. Writing keeps everything: Parquet, in
the schema of the rows (models.vector_index's NEIGHBOUR_SCHEMA, DUPLICATE_SCHEMA).
"""

from __future__ import annotations

import posixpath
import secrets
from collections.abc import Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

NEIGHBOUR_COLUMNS = ("rank", "distance", "same_picture", "uri", "title", "style", "confidence",
                     "label")  # fmt: skip
URI_WIDTH = 60  # characters of a URI printed (its end: the file name)
TEXT_WIDTH = 30  # of a title, a style or a label
ELLIPSIS = "…"


class TableOutputError(ValueError):
    """--output cannot take the table: one line."""


def neighbours_text(table: pa.Table, queries_shown: int | None = None) -> str:
    """Each query's neighbours (rows of NEIGHBOUR_SCHEMA), nearest first, under its name (or
    its error, or that it has none); the first `queries_shown` queries (default: all), in
    the table's order."""
    if not len(table):
        return "no neighbours (none within --max_distance)"
    neighbours = table.filter(pc.field("rank").is_valid())
    columns = [name for name in NEIGHBOUR_COLUMNS if _shows_something(neighbours[name])]
    by_query: dict[str, list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        query = "(no uri)" if row["query"] is None else row["query"]
        if query not in by_query and len(by_query) == queries_shown:
            break
        by_query.setdefault(query, []).append(row)
    blocks = [_query_block(query, rows, columns) for query, rows in by_query.items()]
    more = pc.count_distinct(table["query"], mode="all").as_py() - len(by_query)
    if more > 0:
        blocks.append(f"... and {more:,} more queries (--output writes them all)")
    return "\n\n".join(blocks)


def _shows_something(column: pa.ChunkedArray) -> bool:
    """A column worth printing: one with a value, and for `same_picture`, with a match."""
    if pa.types.is_boolean(column.type):
        return bool(pc.any(column).as_py())
    return column.null_count < len(column)


def _query_block(query: str, rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    head = f"query: {_cut_left(query, URI_WIDTH)}"
    if rows[0]["error"] is not None:
        return f"{head}\nerror: {rows[0]['error']}"
    if rows[0]["rank"] is None:
        return f"{head}\nno neighbours within --max_distance"
    return f"{head}\n{text_table(rows, columns)}"


def duplicates_text(pairs: pa.Table, max_distance: float, shown: int) -> str:
    """A summary line, then the first `shown` pairs (rows of DUPLICATE_SCHEMA, in group order)."""
    groups = len(set(pairs.column("group").to_pylist()))
    summary = (
        f"{len(pairs):,} pairs of paintings at most {max_distance:g} apart, in {groups:,} groups"
    )
    if not len(pairs) or not shown:
        return summary
    rows = pairs.slice(0, shown).to_pylist()
    lines = [summary, text_table(rows, ["group", "distance", "uri_a", "uri_b"])]
    if len(pairs) > shown:
        lines.append(f"... and {len(pairs) - shown:,} more pairs (--output writes them all)")
    return "\n".join(lines)


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """`columns` of `rows`, aligned under a header: numbers right, text left."""
    cells = [[_cell(name, row[name]) for name in columns] for row in rows]
    widths = [max(len(name), *(len(line[i]) for line in cells)) for i, name in enumerate(columns)]
    numeric = [all(_is_number(row[name]) for row in rows) for name in columns]

    def line(values: Sequence[str]) -> str:
        padded = (
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric, strict=True)
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(columns), *(line(values) for values in cells)])


def _cell(name: str, value: Any) -> str:
    if value is None or value is False:  # a match marked, its absence left blank
        return ""
    if value is True:
        return "yes"
    if isinstance(value, float):
        return f"{value:.2f}" if name == "confidence" else f"{value:.4f}"
    if name.startswith("uri"):
        return _cut_left(str(value), URI_WIDTH)
    text = str(value)
    return text if len(text) <= TEXT_WIDTH else text[: TEXT_WIDTH - 1] + ELLIPSIS


def _cut_left(text: str, width: int) -> str:
    return text if len(text) <= width else ELLIPSIS + text[-(width - 1) :]


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def check_table_output(url: str) -> None:
    """TableOutputError where `url` cannot name a Parquet file: before any work is done."""
    if not url.lower().endswith(".parquet"):
        raise TableOutputError(f"--output must name a .parquet file, not {url}")
    try:
        fs, path = fsspec.core.url_to_fs(url)
        is_folder = fs.isdir(path)
    except (ImportError, ValueError, OSError) as error:
        raise TableOutputError(f"--output {url} cannot be written ({error})") from None
    if is_folder:
        raise TableOutputError(f"--output {url} is a folder, not a file")


def write_table(table: pa.Table, url: str) -> None:
    """`table` as one Parquet file at `url` (any fsspec URI), written whole or not at all: on
    a local disk beside it, then renamed; an object store writes an object at once."""
    check_table_output(url)
    try:
        fs, path = fsspec.core.url_to_fs(url)
        local = isinstance(fs, LocalFileSystem)
        if local:
            fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
        target = f"{path}.{secrets.token_hex(4)}.partial" if local else path
        try:
            with fs.open(target, "wb") as file:
                pq.write_table(table, file)
            if local:
                fs.mv(target, path)
        finally:
            if local and fs.exists(target):
                fs.rm(target)
    except (ImportError, ValueError, OSError) as error:
        raise TableOutputError(f"--output {url} cannot be written ({error})") from None
