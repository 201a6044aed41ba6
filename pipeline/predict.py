"""The prediction pipeline: catalog -> images -> styles -> Parquet and metrics.

The whole graph is in `build_graph`, top to bottom; everything it calls is a plain
function or a small PTransform from `transforms/`, testable on its own.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from operator import itemgetter
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
)

from models.bundle import ModelBundle, load_classifier
from models.openvino_engine import load_openvino_classifier
from pipeline.flags import PREDICT_COMMAND
from pipeline.interrupts import exit_on_interrupt
from pipeline.options import (
    CatalogOptions,
    ImageOptions,
    ModelOptions,
    PredictOptions,
    parse_options,
    run_command,
)
from pipeline.outputs import SUMMARY_FILE, OutputFolder
from pipeline.plan import RunPlan, plan_run
from pipeline.progress_bar import progress_bar
from transforms.catalog import Catalog, ReadCatalog, describe_catalog, open_catalog
from transforms.embeddings import (
    EMBEDDING_FILE_PREFIX,
    EMBEDDING_FILES,
    EmbeddingsOrigin,
    embedding_row,
    embedding_schema,
)
from transforms.evaluation import Evaluate, RunSummary
from transforms.infer_images import InferImages
from transforms.model_handler import FixedBatchModelHandler
from transforms.parquet import WriteParquet
from transforms.predictions import (
    error_row,
    prediction_and_embedding,
    prediction_row,
    prediction_schema,
)

IMPORTED_AT = time.monotonic()  # where /proc cannot say when the process started


def build_graph(
    pipeline: beam.Pipeline,
    options: PipelineOptions,
    plan: RunPlan,
    catalog: Catalog,
    bundle: ModelBundle,
    output_dir: str | None = None,
) -> beam.PCollection[dict]:
    """Writes to `output_dir` (default: --output; `run` gives its staging folder) and returns
    the prediction rows, for tests to inspect."""
    image_options = options.view_as(ImageOptions)
    output_dir = output_dir or options.view_as(CatalogOptions).output
    top_k = {"classes": bundle.classes, "top_k": options.view_as(PredictOptions).top_k}
    classifier = FixedBatchModelHandler(
        classifier_loader(options, plan, bundle), options.view_as(ModelOptions).batch_size
    )
    row_context = {"model_id": bundle.id, "has_labels": catalog.has_labels}

    records = pipeline | "ReadCatalog" >> ReadCatalog(catalog)
    inferred, failures = records | "InferStyles" >> InferImages(
        classifier,
        bundle.input_size,
        image_options.max_image_pixels,
        image_options.policy(),
    )
    if plan.embeddings:
        schema = embeddings_schema(catalog, bundle)
        pairs = inferred | "TopK" >> beam.Map(prediction_and_embedding, **top_k, **row_context)
        predictions = pairs | "PredictionRows" >> beam.Map(itemgetter(0))
        _ = (
            pairs
            | "EmbeddingRows" >> beam.MapTuple(embedding_row)
            | "WriteEmbeddings" >> WriteParquet(f"{output_dir}/{EMBEDDING_FILE_PREFIX}", schema)
        )
    else:
        predictions = inferred | "TopK" >> beam.Map(prediction_row, **top_k, **row_context)
    errors = failures | "ErrorRows" >> beam.Map(error_row, **row_context)
    rows = (predictions, errors) | "AllRows" >> beam.Flatten()
    _ = rows | "WritePredictions" >> beam.io.WriteToParquet(
        f"{output_dir}/predictions", prediction_schema(catalog), file_name_suffix=".parquet"
    )
    _ = rows | "Evaluate" >> Evaluate(
        bundle.classes, output_dir, bundle.id, plan.engine, plan.precision
    )
    return rows


def embeddings_schema(catalog: Catalog, bundle: ModelBundle) -> pa.Schema:
    """The run's embeddings files' schema: its prediction rows' keys, and the bundle's vector."""
    assert bundle.manifest.embedding is not None  # plan_run checked
    origin = EmbeddingsOrigin(bundle.id, bundle.manifest.embedding)
    return embedding_schema(prediction_schema(catalog), origin)


def classifier_loader(
    options: PipelineOptions, plan: RunPlan, bundle: ModelBundle
) -> Callable[[], Any]:
    """What each worker calls to load the classifier, on the plan's engine and in its
    arithmetic (which a worker elsewhere resolves for itself where it is `auto`), with the
    embeddings where the plan asks for them."""
    model_options = options.view_as(ModelOptions)
    weights, precision = model_options.backbone_weights, plan.precision.precision
    if plan.engine.engine == "openvino":
        batch_size = model_options.batch_size
        return partial(
            load_openvino_classifier, bundle.path, weights, precision, batch_size, plan.embeddings
        )
    return partial(load_classifier, bundle.path, weights, precision, plan.embeddings)


def run(
    argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None
) -> RunSummary | None:
    """Runs the pipeline to the end, puts its results in place and returns its summary.
    Every flag, the bundle and the model on its engine, the catalog and the output folder
    are checked first. With --template_location, only builds the job (see
    `build_job_template`) and returns None."""
    options = parse_options(argv, PREDICT_COMMAND)
    catalog_options = options.view_as(CatalogOptions)
    predict_options = options.view_as(PredictOptions)
    bundle = ModelBundle.load(predict_options.model)
    plan = plan_run(options, bundle)
    logging.info("artstyle: %s (--engine=%s)", plan.engine, predict_options.engine)
    if options.view_as(GoogleCloudOptions).template_location:
        build_job_template(options, plan, bundle)
        return None
    catalog = open_catalog(
        catalog_options.input,
        uri_column=catalog_options.uri_column,
        label_column=catalog_options.label_column,
    )

    with OutputFolder.claim(catalog_options.output, overwrite=predict_options.overwrite) as output:
        with exit_on_interrupt(output.interrupted_message, cleanup=output.release):
            pipeline = test_pipeline or beam.Pipeline(options=options)
            build_graph(pipeline, options, plan, catalog, bundle, output.staging)
            with progress_bar(plan.workers, catalog):
                result = pipeline.run()
                result.wait_until_finish()
            if result.state != beam.runners.runner.PipelineState.DONE:
                raise RuntimeError(f"The pipeline ended in state {result.state}")
            report = None
            if predict_options.report:  # Grad-CAM loads Keras, which OpenVINO's runs do not
                from pipeline.report_page import report_after_run

                report = report_after_run(options, catalog, bundle, output)
        output.publish()
        summary = RunSummary.read(f"{output.url}/{SUMMARY_FILE}")
        others = output.others_files()
    seconds = seconds_since_process_start()
    print(human_summary(summary, output.url, seconds, others, plan.embeddings))
    if report:
        print(report)
    return summary


def build_job_template(options: PipelineOptions, plan: RunPlan, bundle: ModelBundle) -> None:
    """Builds the Dataflow job and writes it to --template_location without running it: the
    dry run before paying. Nothing of the catalog or the output is read or written now (the
    catalog is listed when the job runs, and the job writes straight to --output, since no
    launcher stays to publish a staging folder)."""
    catalog_options = options.view_as(CatalogOptions)
    catalog = describe_catalog(
        catalog_options.input,
        uri_column=catalog_options.uri_column,
        label_column=catalog_options.label_column,
    )
    pipeline = beam.Pipeline(options=options)
    build_graph(pipeline, options, plan, catalog, bundle, catalog_options.output)
    pipeline.run().wait_until_finish()
    template = options.view_as(GoogleCloudOptions).template_location
    print(f"artstyle: the job is written to {template} (built, not run)")


def seconds_since_process_start() -> float:
    """From the kernel's record of the process's start, so that Python's and TensorFlow's
    start-up count too; where /proc is missing, from this module's import."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command's name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except OSError:
        return time.monotonic() - IMPORTED_AT
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in ticks
    return uptime - started


def human_summary(
    summary: RunSummary,
    output: str,
    seconds: float,
    others: Sequence[str] = (),
    embeddings: bool = False,
) -> str:
    """`seconds` since the process started; `others`: files in the output folder that look
    like results but that the tool did not write (left as they are); `embeddings`: whether
    the run wrote them."""
    n = summary.n_images
    lines = [
        f"artstyle: {n} images, {summary.n_errors} errors, model {summary.model_id}, "
        f"{seconds:.1f} s ({n / seconds:.1f} images/s including start-up)"
    ]
    if summary.top1 is not None:
        scores = "  ".join(
            f"top-{k} {score:.1%}" for k in (1, 3, 5) if (score := summary.top_k(k)) is not None
        )
        lines.append(
            f"  {scores}  macro F1 {summary.macro_f1:.3f}  ECE {summary.ece:.1%}"
            f"  ({summary.n_labelled} labelled)"
        )
    if summary.n_unknown_label:
        lines.append(f"  labels the model does not know: {summary.unknown_labels}")
    if summary.errors_by_kind:
        kinds = ", ".join(f"{kind} {count}" for kind, count in summary.errors_by_kind.items())
        lines.append(f"  errors by kind: {kinds} (see the 'error' column)")
    lines.append(f"  predictions: {output}/predictions-*.parquet")
    lines.append(f"  metrics:     {output}/metrics-*.parquet, {output}/{SUMMARY_FILE}")
    if embeddings:
        lines.append(f"  embeddings:  {output}/{EMBEDDING_FILES}")
    if others:
        lines.append(
            f"  note: {output} also holds files artstyle did not write: {', '.join(others)}"
        )
    return "\n".join(lines)


def main() -> None:
    run_command(run)
