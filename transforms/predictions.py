"""Prediction rows: one per catalog row, in one fixed Arrow schema, errors included."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from apache_beam.ml.inference.base import PredictionResult

from transforms.catalog import Catalog, ImageRecord

STYLE_FIELDS = (
    pa.field("style", pa.string()),
    pa.field("confidence", pa.float32()),
    pa.field("top_k_styles", pa.list_(pa.string())),
    pa.field("top_k_probs", pa.list_(pa.float32())),
    pa.field("model", pa.string()),
    pa.field("error", pa.string()),
)


def prediction_schema(catalog: Catalog) -> pa.Schema:
    """uri, the catalog's other columns, label, then the prediction: the same for every row."""
    label = (pa.field("label", pa.string()),) if catalog.has_labels else ()
    return pa.schema([pa.field("uri", pa.string()), *catalog.extra_fields, *label, *STYLE_FIELDS])


def _record_columns(record: ImageRecord, has_labels: bool) -> dict[str, Any]:
    columns = {"uri": record.uri, **dict(record.extra)}
    if has_labels:
        columns["label"] = record.label
    return columns


def prediction_row(
    inferred: tuple[ImageRecord, PredictionResult],
    *,
    classes: Sequence[str],
    top_k: int,
    model_id: str,
    has_labels: bool,
) -> dict[str, Any]:
    record, result = inferred
    probabilities = result.inference
    ranked = np.argsort(-probabilities, kind="stable")[:top_k]
    return {
        **_record_columns(record, has_labels),
        "style": classes[ranked[0]],
        "confidence": float(probabilities[ranked[0]]),
        "top_k_styles": [classes[i] for i in ranked],
        "top_k_probs": [float(probabilities[i]) for i in ranked],
        "model": model_id,
        "error": None,
    }


def error_row(
    failure: tuple[ImageRecord, str], *, model_id: str, has_labels: bool
) -> dict[str, Any]:
    record, error = failure
    return {
        **_record_columns(record, has_labels),
        "style": None,
        "confidence": None,
        "top_k_styles": None,
        "top_k_probs": None,
        "model": model_id,
        "error": error,
    }
