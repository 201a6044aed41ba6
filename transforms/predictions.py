"""Prediction rows: one per catalog row, in one fixed Arrow schema, errors included.

The tool's own columns (`TOOL_COLUMNS`: uri, label, style, confidence, top_k_styles,
top_k_probabilities, model, error) always keep their names. A catalog column passed through
under one of those names, or one that an earlier version gave its own column
(`EARLIER_NAMES`: an earlier run's predictions used as a catalog have most of them), is
renamed `catalog_<name>`, prefixed again until no other column has the name: `style`
becomes `catalog_style`, or `catalog_catalog_style` if the catalog also has a
`catalog_style`. The rename is the same whatever the flags, so a query written for one
run's output works on another's.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any, cast

import numpy as np
import pyarrow as pa
from apache_beam.ml.inference.base import PredictionResult

from transforms.catalog import Catalog, ImageRecord
from transforms.top_k import top_k_fields

STYLE_FIELDS = (
    pa.field("style", pa.string()),
    pa.field("confidence", pa.float32()),
    pa.field("top_k_styles", pa.list_(pa.string())),
    pa.field("top_k_probabilities", pa.list_(pa.float32())),
    pa.field("model", pa.string()),
    pa.field("error", pa.string()),
)
# The names earlier versions gave the tool's columns: the readers of a run's files (the
# report) take either.
EARLIER_NAMES = {"top_k_probs": "top_k_probabilities"}
TOOL_COLUMNS = frozenset({"uri", "label", *(field.name for field in STYLE_FIELDS), *EARLIER_NAMES})
CLASH_PREFIX = "catalog_"


def prediction_schema(catalog: Catalog) -> pa.Schema:
    """uri, the catalog's other columns, label, then the prediction: the same for every row."""
    names = passthrough_names(tuple(field.name for field in catalog.extra_fields))
    extra = [field.with_name(name) for field, name in zip(catalog.extra_fields, names, strict=True)]
    label = (pa.field("label", pa.string()),) if catalog.has_labels else ()
    return pa.schema([pa.field("uri", pa.string()), *extra, *label, *STYLE_FIELDS])


@cache  # called for every row, with the one tuple of names every record of a run has
def passthrough_names(catalog_names: tuple[str, ...]) -> tuple[str, ...]:
    """The output names of the catalog's pass-through columns, by the module's rule."""
    taken = {*TOOL_COLUMNS, *catalog_names}
    names = []
    for name in catalog_names:
        if name in TOOL_COLUMNS:
            while name in taken:
                name = CLASH_PREFIX + name
            taken.add(name)
        names.append(name)
    return tuple(names)


def _record_columns(record: ImageRecord, has_labels: bool) -> dict[str, Any]:
    names = passthrough_names(tuple(name for name, _ in record.extra))
    values = (value for _, value in record.extra)
    columns = {"uri": record.uri, **dict(zip(names, values, strict=True))}
    if has_labels:
        columns["label"] = record.label
    return columns


def with_current_names(row: dict[str, Any]) -> dict[str, Any]:
    """A prediction row as read from a run's files, its columns under today's names."""
    return {EARLIER_NAMES.get(name, name): value for name, value in row.items()}


def prediction_row(
    inferred: tuple[ImageRecord, PredictionResult],
    *,
    classes: Sequence[str],
    top_k: int,
    model_id: str,
    has_labels: bool,
) -> dict[str, Any]:
    record, result = inferred
    probabilities = cast(np.ndarray, result.inference)  # Beam types it as a bare TypeVar
    return {
        **_record_columns(record, has_labels),
        **top_k_fields(probabilities, classes=classes, top_k=top_k),
        "model": model_id,
        "error": None,
    }


def prediction_and_embedding(
    inferred: tuple[ImageRecord, PredictionResult], **row_context: Any
) -> tuple[dict[str, Any], np.ndarray]:
    """The prediction row and the embedding of an image, from a classifier that gives both
    (its inference is the pair); `row_context` as prediction_row's keywords."""
    record, result = inferred
    probabilities, embedding = cast(tuple[np.ndarray, np.ndarray], result.inference)
    with_probabilities = PredictionResult(result.example, probabilities, result.model_id)
    return prediction_row((record, with_probabilities), **row_context), embedding


def error_row(
    failure: tuple[ImageRecord, str], *, model_id: str, has_labels: bool
) -> dict[str, Any]:
    record, error = failure
    return {
        **_record_columns(record, has_labels),
        "style": None,
        "confidence": None,
        "top_k_styles": None,
        "top_k_probabilities": None,
        "model": model_id,
        "error": error,
    }
