"""The prediction pipeline: catalog -> images -> styles -> Parquet and metrics.

The whole graph is in `build_graph`, top to bottom; everything it calls is a plain
function or a small PTransform from `transforms/`, testable on its own.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from operator import itemgetter
from typing import Any

import apache_beam as beam
import fsspec
import pyarrow as pa
from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
)

from models.bundle import ModelBundle, check_backbone_weights, load_classifier
from models.engine_choice import EngineChoice, choose_engine
from models.openvino_engine import (
    converted_file,
    load_openvino_classifier,
    openvino_precision_of,
)
from models.precision import choose_precision
from pipeline.flags import PREDICT_COMMAND
from pipeline.interrupts import exit_on_interrupt
from pipeline.options import (
    CatalogOptions,
    ImageOptions,
    ModelOptions,
    PredictOptions,
    parse_options,
    run_command,
    runs_on_this_machine,
)
from pipeline.outputs import SUMMARY_FILE, OutputFolder
from pipeline.progress_bar import progress_bar
from transforms.catalog import Catalog, ReadCatalog, describe_catalog, open_catalog
from transforms.embeddings import (
    EMBEDDING_FILE_PREFIX,
    EMBEDDING_FILES,
    EmbeddingsOrigin,
    embedding_row,
    embedding_schema,
)
from transforms.evaluation import Evaluate
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
    catalog: Catalog,
    bundle: ModelBundle,
    output_dir: str | None = None,
) -> beam.PCollection[dict]:
    """Writes to `output_dir` (default: --output; `run` gives its staging folder) and returns
    the prediction rows, for tests to inspect."""
    io, model, images = (
        options.view_as(view) for view in (CatalogOptions, ModelOptions, ImageOptions)
    )
    output_dir = output_dir or io.output
    predict = options.view_as(PredictOptions)
    engine = engine_of_run(options)
    logging.info("artstyle: %s (--engine=%s)", engine, predict.engine)
    precision = precision_of_workers(options, bundle, engine.engine)
    loader = classifier_loader(options, bundle, engine.engine, precision["precision"])
    classifier = FixedBatchModelHandler(loader, model.batch_size)
    row_context = {"model_id": bundle.id, "has_labels": catalog.has_labels}
    top_k = {"classes": bundle.classes, "top_k": predict.top_k}

    records = pipeline | "ReadCatalog" >> ReadCatalog(catalog)
    inferred, failures = records | "InferStyles" >> InferImages(
        classifier,
        bundle.input_size,
        images.max_image_pixels,
        images.policy(),
    )
    if predict.embeddings:
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
    run_facts = {"engine": engine.to_json(), "precision": precision}
    _ = rows | "Evaluate" >> Evaluate(bundle.classes, output_dir, bundle.id, run_facts)
    return rows


def embeddings_schema(catalog: Catalog, bundle: ModelBundle) -> pa.Schema:
    """The run's embeddings files' schema: its prediction rows' keys, and the bundle's vector."""
    assert bundle.manifest.embedding is not None  # check_model checked
    origin = EmbeddingsOrigin(bundle.id, bundle.manifest.embedding)
    return embedding_schema(prediction_schema(catalog), origin)


def engine_of_run(options: PipelineOptions) -> EngineChoice:
    """--engine, with `auto` resolved here: the choice decides which loader the graph holds."""
    asked = options.view_as(PredictOptions).engine
    return choose_engine(asked, runs_on_this_machine(options))


def classifier_loader(
    options: PipelineOptions, bundle: ModelBundle, engine: str, precision: str
) -> Callable[[], Any]:
    """What each worker calls to load the classifier, on `engine`, in `precision`: the one
    resolved for the run where its workers are on this machine (so that none measures
    again, and perhaps differently), else as asked, for each worker to resolve."""
    model = options.view_as(ModelOptions)
    embeddings = options.view_as(PredictOptions).embeddings
    if engine == "openvino":
        return partial(
            load_openvino_classifier,
            bundle.path,
            model.backbone_weights,
            precision,
            model.batch_size,
            embeddings,
        )
    return partial(load_classifier, bundle.path, model.backbone_weights, precision, embeddings)


def precision_of_workers(
    options: PipelineOptions, bundle: ModelBundle, engine: str
) -> dict[str, str]:
    """The backbone's arithmetic on `engine` and why, for summary.json and the workers. A
    local runner's workers run on this machine, so it is resolved here, once, and they run
    in it; on other runners each worker resolves its own, and logs it."""
    asked = options.view_as(PredictOptions).precision
    if not runs_on_this_machine(options):
        return {"precision": asked, "reason": "resolved per worker (see the workers' logs)"}
    model = options.view_as(ModelOptions)
    if engine == "openvino":
        embeddings = options.view_as(PredictOptions).embeddings
        return openvino_precision_of(
            bundle.path, model.backbone_weights, asked, model.batch_size, embeddings
        ).to_json()
    build = partial(bundle.classifier, model.backbone_weights)
    return choose_precision(asked, build, bundle.id).to_json()


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict:
    """Runs the pipeline to the end, puts its results in place and returns summary.json's
    content. Every flag, the bundle, the catalog and the output folder are checked first.
    With --template_location, only builds the job (see `build_job_template`)."""
    options = parse_options(argv, PREDICT_COMMAND)
    io, predict = options.view_as(CatalogOptions), options.view_as(PredictOptions)
    bundle = ModelBundle.load(predict.model)
    check_model(options, bundle)
    if options.view_as(GoogleCloudOptions).template_location:
        return build_job_template(options, bundle)
    catalog = open_catalog(io.input, uri_column=io.uri_column, label_column=io.label_column)

    with OutputFolder.claim(io.output, overwrite=predict.overwrite) as output:
        with exit_on_interrupt(output.interrupted_message, cleanup=output.release):
            pipeline = test_pipeline or beam.Pipeline(options=options)
            build_graph(pipeline, options, catalog, bundle, output.staging)
            with progress_bar(options, catalog):
                result = pipeline.run()
                result.wait_until_finish()
            if result.state != beam.runners.runner.PipelineState.DONE:
                raise RuntimeError(f"The pipeline ended in state {result.state}")
            report = None
            if predict.report:  # its Grad-CAM loads Keras: a run on OpenVINO otherwise never does
                from pipeline.report_page import report_after_run

                report = report_after_run(options, catalog, bundle, output)
        output.publish()
        with fsspec.open(f"{output.url}/{SUMMARY_FILE}") as f:
            summary = json.load(f)
        others = output.others_files()
    seconds = seconds_since_process_start()
    print(human_summary(summary, output.url, seconds, others, predict.embeddings))
    if report:
        print(report)
    return summary


def check_model(options: PipelineOptions, bundle: ModelBundle) -> None:
    """What would stop the model in its workers is one line now, before the catalog is
    read: backbone weights that cannot be its, a head that Keras refuses, embeddings asked
    of a bundle that gives none. (OpenVINO, running files it converted before, needs no
    check of the head: Keras read it then.)"""
    weights = options.view_as(ModelOptions).backbone_weights
    check_backbone_weights(bundle.manifest.backbone.name, weights)
    embeddings = options.view_as(PredictOptions).embeddings
    if embeddings:
        bundle.check_embedding()
    engine = engine_of_run(options).engine
    if engine == "keras" or not converted_file(bundle, weights, embeddings).is_file():
        bundle.check_head()


def build_job_template(options: PipelineOptions, bundle: ModelBundle) -> dict:
    """Builds the Dataflow job and writes it to --template_location without running it: the
    dry run before paying. Nothing of the catalog or the output is read or written now (the
    catalog is listed when the job runs, and the job writes straight to --output, since no
    launcher stays to publish a staging folder). Returns where the job was written."""
    io = options.view_as(CatalogOptions)
    catalog = describe_catalog(io.input, uri_column=io.uri_column, label_column=io.label_column)
    pipeline = beam.Pipeline(options=options)
    build_graph(pipeline, options, catalog, bundle, io.output)
    pipeline.run().wait_until_finish()
    template = options.view_as(GoogleCloudOptions).template_location
    print(f"artstyle: the job is written to {template} (built, not run)")
    return {"template_location": template}


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
    summary: dict,
    output: str,
    seconds: float,
    others: Sequence[str] = (),
    embeddings: bool = False,
) -> str:
    """`seconds` since the process started; `others`: files in the output folder that look
    like results but that the tool did not write (left as they are); `embeddings`: whether
    the run wrote them."""
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
    if embeddings:
        lines.append(f"  embeddings:  {output}/{EMBEDDING_FILES}")
    if others:
        lines.append(
            f"  note: {output} also holds files artstyle did not write: {', '.join(others)}"
        )
    return "\n".join(lines)


def main() -> None:
    run_command(run)
