"""Evaluation inside the pipeline: combine prediction rows into a Scoreboard, write it out as
metrics-*.parquet and summary.json (`RunSummary`)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import fsspec
import pyarrow as pa

from models.engine_choice import EngineChoice
from models.metrics import Scoreboard, Scores
from models.precision import PrecisionChoice

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

    for metric, value in board.scores().to_json().items():
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


@dataclass(frozen=True, kw_only=True)
class RunSummary(Scores):
    """summary.json: a run's scores, its model's id (the JSON's `model`), and the engine and
    arithmetic it ran on, each with why. Writing it (`Evaluate`) and reading it (`read`)
    share this definition. The engine and arithmetic are None in a run's summary that
    does not say them."""

    model_id: str
    engine: EngineChoice | None = None
    precision: PrecisionChoice | None = None

    def to_json(self) -> dict[str, Any]:
        ran_on = {"engine": self.engine, "precision": self.precision}
        return {
            **super().to_json(),
            "model": self.model_id,
            **{key: choice.to_json() for key, choice in ran_on.items() if choice is not None},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSummary:
        engine, precision = data.get("engine"), data.get("precision")
        return cls(
            **vars(Scores.from_json(data)),
            model_id=data["model"],
            engine=EngineChoice.from_json(engine) if engine else None,
            precision=PrecisionChoice.from_json(precision) if precision else None,
        )

    @classmethod
    def read(cls, url: str) -> RunSummary:
        """The summary.json at `url`. ValueError where it is not one."""
        with fsspec.open(url, encoding="utf-8") as f:
            try:
                return cls.from_json(json.load(f))
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(f"{url} is not a run's summary ({error!r})") from None


def write_summary(
    board: Scoreboard,
    path: str,
    model_id: str,
    engine: EngineChoice | None = None,
    precision: PrecisionChoice | None = None,
) -> RunSummary:
    summary = RunSummary(
        **vars(board.scores()), model_id=model_id, engine=engine, precision=precision
    )
    with fsspec.open(path, "w") as f:
        json.dump(summary.to_json(), f, indent=2)
    return summary


class Evaluate(beam.PTransform):
    """Prediction rows -> metrics-*.parquet and summary.json under `output_dir`."""

    def __init__(
        self,
        classes: Sequence[str],
        output_dir: str,
        model_id: str,
        engine: EngineChoice | None = None,
        precision: PrecisionChoice | None = None,
    ):
        """`engine` and `precision`: what the model ran on, for summary.json."""
        super().__init__()
        self._classes = classes
        self._output_dir = output_dir.rstrip("/")
        self._model_id = model_id
        self._engine = engine
        self._precision = precision

    def expand(self, rows: beam.PCollection[dict]) -> beam.PCollection[RunSummary]:
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
            write_summary, summary_path, self._model_id, self._engine, self._precision
        )
