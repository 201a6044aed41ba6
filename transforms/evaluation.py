"""Evaluation inside the pipeline: combine prediction rows into a Scoreboard, write it out."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
import fsspec
import pyarrow as pa

from models.metrics import Scoreboard

# Long form: every number is one row, so one schema holds overall scores, per-class
# scores, the confusion matrix and the reliability diagram, and filters are plain queries.
METRICS_SCHEMA = pa.schema(
    [
        pa.field("section", pa.string()),  # overall | per_class | confusion | reliability | ...
        pa.field("metric", pa.string()),
        pa.field("label", pa.string()),
        pa.field("predicted", pa.string()),
        pa.field("value", pa.float64()),
    ]
)


class ScoreRowsFn(beam.CombineFn):
    """Prediction rows -> one Scoreboard."""

    def __init__(self, classes: Sequence[str]):
        self._classes = tuple(classes)

    def create_accumulator(self) -> Scoreboard:
        return Scoreboard(self._classes)

    def add_input(self, board: Scoreboard, row: dict[str, Any]) -> Scoreboard:
        board.add(row.get("label"), row["top_k_styles"], row["confidence"], row["error"])
        return board

    def merge_accumulators(self, boards: Iterator[Scoreboard]) -> Scoreboard:
        merged = Scoreboard(self._classes)
        for board in boards:
            merged.merge(board)
        return merged

    def extract_output(self, board: Scoreboard) -> Scoreboard:
        return board


def metric_rows(board: Scoreboard) -> Iterator[dict[str, Any]]:
    def row(section: str, metric: str, value: float, label=None, predicted=None) -> dict:
        return {
            "section": section,
            "metric": metric,
            "label": label,
            "predicted": predicted,
            "value": None if value is None else float(value),
        }

    for metric, value in board.summary().items():
        if not isinstance(value, dict):
            yield row("overall", metric, value)
    for kind, count in board.errors_by_kind.items():
        yield row("errors", "count", count, label=kind)
    for label, count in board.unknown_labels.items():
        yield row("unknown_label", "count", count, label=label)
    for scores in board.per_class():
        for metric in ("precision", "recall", "f1", "support"):
            yield row("per_class", metric, scores[metric], label=scores["label"])
    for (label, predicted), count in sorted(board.confusion.items()):
        yield row("confusion", "count", count, label=label, predicted=predicted)
    for bin_ in board.reliability():
        for metric in ("count", "confidence", "accuracy"):
            yield row("reliability", metric, bin_[metric], label=f"{bin_['bin_low']:.3f}")


def write_summary(
    board: Scoreboard, path: str, model_id: str, run_facts: dict[str, Any] | None = None
) -> dict[str, Any]:
    summary = {**board.summary(), "model": model_id, **(run_facts or {})}
    with fsspec.open(path, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


class Evaluate(beam.PTransform):
    """Prediction rows -> metrics-*.parquet and summary.json under `output_dir`."""

    def __init__(
        self,
        classes: Sequence[str],
        output_dir: str,
        model_id: str,
        run_facts: dict[str, Any] | None = None,
    ):
        """`run_facts`: more keys for summary.json, such as the arithmetic the model used."""
        super().__init__()
        self._classes = classes
        self._output_dir = output_dir.rstrip("/")
        self._model_id = model_id
        self._run_facts = run_facts or {}

    def expand(self, rows: beam.PCollection[dict]) -> beam.PCollection[dict]:
        board = rows | "Score" >> beam.CombineGlobally(ScoreRowsFn(self._classes))
        _ = (
            board
            | "MetricRows" >> beam.FlatMap(metric_rows)
            | "WriteMetrics"
            >> beam.io.WriteToParquet(
                f"{self._output_dir}/metrics",
                METRICS_SCHEMA,
                file_name_suffix=".parquet",
                num_shards=1,
            )
        )
        summary_path = f"{self._output_dir}/summary.json"
        return board | "WriteSummary" >> beam.Map(
            write_summary, summary_path, self._model_id, self._run_facts
        )
