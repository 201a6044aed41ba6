"""The prediction pipeline: catalog -> images -> styles -> Parquet and metrics.

The whole graph is in `build_graph`, top to bottom; everything it calls is a plain
function or a small PTransform from `transforms/`, testable on its own.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial

import apache_beam as beam
import fsspec
from apache_beam.options.pipeline_options import PipelineOptions

from models.bundle import ModelBundle, load_classifier
from pipeline.options import (
    CatalogOptions,
    FetchOptions,
    PredictOptions,
    parse_options,
    run_command,
)
from transforms.catalog import Catalog, ReadCatalog, open_catalog
from transforms.evaluation import Evaluate
from transforms.infer import InferImages
from transforms.inference import KerasModelHandler
from transforms.predictions import error_row, prediction_row, prediction_schema

PREDICT_ABOUT = "Predicts the art style of every image of a catalog, with Apache Beam."
OUTPUT_PATTERNS = ("predictions-*.parquet", "metrics-*.parquet", "summary.json")


def build_graph(
    pipeline: beam.Pipeline, options: PipelineOptions, catalog: Catalog, bundle: ModelBundle
) -> beam.PCollection[dict]:
    """Returns the prediction rows (also written to Parquet), for tests to inspect."""
    io = options.view_as(CatalogOptions)
    predict = options.view_as(PredictOptions)
    classifier = KerasModelHandler(
        partial(load_classifier, bundle.path, io.backbone_weights, predict.precision),
        io.batch_size,
    )
    row_context = {"model_id": bundle.id, "has_labels": catalog.has_labels}

    records = pipeline | "ReadCatalog" >> ReadCatalog(catalog)
    inferred, failures = records | "InferStyles" >> InferImages(
        classifier,
        bundle.input_size,
        io.max_image_pixels,
        options.view_as(FetchOptions).policy(),
    )
    predictions = inferred | "TopK" >> beam.Map(
        prediction_row, classes=bundle.classes, top_k=predict.top_k, **row_context
    )
    errors = failures | "ErrorRows" >> beam.Map(error_row, **row_context)
    rows = (predictions, errors) | "AllRows" >> beam.Flatten()
    _ = rows | "WritePredictions" >> beam.io.WriteToParquet(
        f"{io.output}/predictions", prediction_schema(catalog), file_name_suffix=".parquet"
    )
    _ = rows | "Evaluate" >> Evaluate(bundle.classes, io.output, bundle.id)
    return rows


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict:
    """Runs the pipeline to the end and returns summary.json's content."""
    options = parse_options(
        argv, (CatalogOptions, FetchOptions, PredictOptions), "python -m pipeline", PREDICT_ABOUT
    )
    io = options.view_as(CatalogOptions)
    io.output = io.output.rstrip("/")
    catalog = open_catalog(io.input, uri_column=io.uri_column, label_column=io.label_column)
    bundle = ModelBundle.load(options.view_as(PredictOptions).model)
    _prepare_output(io.output)

    started = time.perf_counter()
    pipeline = test_pipeline or beam.Pipeline(options=options)
    build_graph(pipeline, options, catalog, bundle)
    result = pipeline.run()
    result.wait_until_finish()
    if result.state != beam.runners.runner.PipelineState.DONE:
        raise RuntimeError(f"The pipeline ended in state {result.state}")
    with fsspec.open(f"{io.output}/summary.json") as f:
        summary = json.load(f)
    print(human_summary(summary, io.output, time.perf_counter() - started))
    return summary


def _prepare_output(output: str) -> None:
    """Creates the folder and removes our own files of an earlier run: stale shards of a
    run with more shards would otherwise be read as part of this one."""
    fs, path = fsspec.core.url_to_fs(output)
    fs.makedirs(path, exist_ok=True)
    for pattern in OUTPUT_PATTERNS:
        for stale in fs.glob(f"{path}/{pattern}"):
            logging.info("Removing %s from an earlier run", stale)
            fs.rm(stale)


def human_summary(summary: dict, output: str, seconds: float) -> str:
    n = summary["n_images"]
    lines = [
        f"artstyle: {n} images, {summary['n_errors']} errors, model {summary['model']}, "
        f"{seconds:.1f} s ({n / seconds:.1f} images/s including start-up)"
    ]
    if summary.get("top1") is not None:
        scores = "  ".join(
            f"{name} {summary[key]:.1%}"
            for name, key in (("top-1", "top1"), ("top-3", "top3"), ("top-5", "top5"))
            if summary.get(key) is not None
        )
        lines.append(
            f"  {scores}  macro F1 {summary['macro_f1']:.3f}  ECE {summary['ece']:.1%}"
            f"  ({summary['n_labelled']} labelled)"
        )
    if summary["n_unknown_label"]:
        lines.append(f"  labels the model does not know: {summary['unknown_labels']}")
    if summary["errors_by_kind"]:
        kinds = ", ".join(f"{kind} {count}" for kind, count in summary["errors_by_kind"].items())
        lines.append(f"  errors by kind: {kinds} (see the 'error' column)")
    lines.append(f"  predictions: {output}/predictions-*.parquet")
    lines.append(f"  metrics:     {output}/metrics-*.parquet, {output}/summary.json")
    return "\n".join(lines)


def main() -> None:
    run_command(run)
