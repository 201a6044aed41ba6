"""The report page of a run: `DIR/report.html` and its pictures in `DIR/report_files/`.

The page opens from disk, offline: no script, no font or style from the network; its
pictures are PNG and JPEG files beside it. Its numbers are the run's own (summary.json,
metrics-*.parquet), its charts are drawn from them, and its thumbnails are a few sampled
rows explained with Grad-CAM in a small Beam pipeline over `DIR/predictions-*.parquet`.
A run with embeddings (`embeddings-*.parquet`) also has a map of its paintings and its
likely duplicates (pipeline/report_map.py), whose paintings the same pipeline pictures.
`python -m pipeline.report DIR` writes it for a finished run, `python -m pipeline ...
--report` after its own.

The page and its pictures are written in the output folder's staging folder and published
from there like a run's results (pipeline/outputs.py): a failed report leaves the earlier
page whole, and the page names `DIR`, where its run's results are, not the staging folder.
Its figures are named by their content, so a browser never shows an earlier report's.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
import fsspec
import jinja2
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions

from models.bundle import ModelBundle
from models.metrics import CALIBRATION_BINS
from pipeline import figures
from pipeline.flags import REPORT_PER_STYLE, REPORT_SAMPLES, UsageError
from pipeline.options import ImageOptions, ModelOptions
from pipeline.outputs import (
    METRICS_FILES,
    PREDICTION_FILES,
    REPORT_FILES,
    REPORT_PAGE,
    SUMMARY_FILE,
    OutputFolder,
    RunFiles,
)
from pipeline.report_map import EmbeddingSections, LikelyDuplicates, embedding_sections
from transforms.catalog import Catalog
from transforms.embeddings import EMBEDDING_FILES, EmbeddingsError, run_embeddings
from transforms.evaluation import RunSummary
from transforms.explanations import (
    CONFIDENT_MISTAKES,
    DUPLICATES,
    GALLERY,
    LEAST_CONFIDENT,
    ExplainSamples,
    by_confidence,
)
from transforms.fetch import FetchPolicy
from transforms.images import DEFAULT_MAX_PIXELS

SAMPLES_FILE = "samples.json"
MAX_ERROR_ROWS = 500  # listed on the page; all of them are in the predictions' error column
TOP_K_SCORES = ((1, "top-1 accuracy"), (3, "top-3 accuracy"), (5, "top-5 accuracy"))
SECTIONS = {
    CONFIDENT_MISTAKES: (
        "The most confident mistakes",
        "Wrong, and sure of it: the first place to look for mislabelled paintings and "
        "styles the model confuses. Beside each painting, Grad-CAM for the predicted style.",
    ),
    LEAST_CONFIDENT: (
        "The least confident predictions",
        "Right or wrong, the paintings the model was least sure of, with Grad-CAM for the "
        "style it chose.",
    ),
    GALLERY: (
        "The most confident paintings of each predicted style",
        "What the model takes each style to look like, with Grad-CAM for that style.",
    ),
}
TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)
TEMPLATES.filters["style"] = figures.display_name
TEMPLATES.filters["percent"] = lambda value: "n/a" if value is None else f"{value:.1%}"


class ReportError(UsageError):
    """DIR is not the output of a finished run, or --model is not the run's model: one line
    and exit status 2, as a bad flag."""


def write_report(
    output: OutputFolder,
    results: RunFiles,
    bundle: ModelBundle,
    *,
    catalog: Catalog | None = None,
    backbone_weights: str | None = None,
    fetch_policy: FetchPolicy | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    beam_options: PipelineOptions | None = None,
    samples: int = REPORT_SAMPLES,
    per_style: int = REPORT_PER_STYLE,
) -> str:
    """Writes the page of the run whose files are `results`, with its pictures, in
    `output`'s staging folder, for `output.publish()`; returns where the page is then.

    `bundle` must be the run's model: the sampled rows are explained with it. `catalog`
    (the run's, which knows where each row's image is), `fetch_policy` and `max_pixels`
    read the sampled images again as the run read them.
    """
    summary = _read_summary(results)
    if summary.model_id != bundle.id:
        raise ReportError(
            f"{output.url}'s predictions are by model {summary.model_id!r}, not by "
            f"{bundle.id!r}: name its bundle with --model"
        )
    embedded = _embedding_sections(results, summary, bundle)
    files_dir = f"{output.staging}/{REPORT_FILES}"
    fsspec.core.url_to_fs(files_dir)[0].makedirs(files_dir, exist_ok=True)
    labelled = summary.n_labelled > 0
    explain = ExplainSamples(
        bundle,
        labelled=labelled,
        files_dir=files_dir,
        catalog=catalog,
        backbone_weights=backbone_weights,
        fetch_policy=fetch_policy,
        max_pixels=max_pixels,
        count=samples,
        per_style=per_style,
        duplicates=embedded.duplicates.paintings() if embedded else (),
    )
    explained = _explain_samples(results, explain, files_dir, beam_options)
    html = _page(output.url, results, summary, bundle, labelled, explained, files_dir, embedded)
    with fsspec.open(f"{output.staging}/{REPORT_PAGE}", "w", encoding="utf-8") as file:
        file.write(html)
    return f"{output.url}/{REPORT_PAGE}"


def check_finished_run(folder: str) -> None:
    """ReportError where `folder` holds no summary.json: not a finished run's output."""
    fs, path = fsspec.core.url_to_fs(folder)
    if not fs.isfile(f"{path.rstrip('/')}/{SUMMARY_FILE}"):
        raise _not_a_run(folder)


def _read_summary(results: RunFiles) -> RunSummary:
    """The run's summary.json; ReportError where it has none or cannot read it (not a
    finished run)."""
    if SUMMARY_FILE not in results.names:
        raise _not_a_run(results.folder)
    try:
        return RunSummary.read(results.url(SUMMARY_FILE))
    except ValueError as error:
        raise ReportError(str(error)) from None


def _not_a_run(folder: str) -> ReportError:
    return ReportError(
        f"{folder!r} has no {SUMMARY_FILE}: not the output of a finished run of python -m pipeline"
    )


def _embedding_sections(
    results: RunFiles, summary: RunSummary, bundle: ModelBundle
) -> EmbeddingSections | None:
    """The map and the likely duplicates of a run with embeddings of at least one painting
    (None for another). Its embeddings must be its model's, one per predicted row:
    ReportError where they are not (files of another run, or not embeddings files)."""
    names = results.named(EMBEDDING_FILES)
    n_predicted = summary.n_images - summary.n_errors
    if not names or not n_predicted:
        return None
    try:
        embeddings = run_embeddings(results.folder, [results.url(name) for name in names])
    except EmbeddingsError as error:
        raise ReportError(str(error)) from None
    if embeddings.origin.model_id != bundle.id or embeddings.n_rows != n_predicted:
        raise ReportError(
            f"{results.folder}'s embeddings do not match its predictions: {embeddings.n_rows:,} "
            f"rows of model {embeddings.origin.model_id!r}, for {n_predicted:,} predicted rows "
            f"of model {bundle.id!r} (move {EMBEDDING_FILES} away to report without them)"
        )
    return embedding_sections(embeddings, bundle.classes)


def _no_map_note(bundle: ModelBundle, summary: RunSummary) -> str:
    """Why a page has no map, and how to have one."""
    if summary.n_images == summary.n_errors:
        return "No map of the run: none of its paintings was predicted."
    if bundle.manifest.embedding is None:
        return (
            f"No map of the run: model {bundle.id} gives no embeddings (a bundle trained with "
            "--projection does; python -m pipeline --embeddings then writes them, and its "
            "report maps the paintings and lists their likely duplicates)."
        )
    return (
        "No map of the run: it has no embeddings. Run python -m pipeline with --embeddings "
        "to write them, and the report maps the paintings and lists their likely duplicates."
    )


def _explain_samples(
    results: RunFiles,
    explain: ExplainSamples,
    files_dir: str,
    beam_options: PipelineOptions | None,
) -> list[dict[str, Any]]:
    """Runs the Beam pipeline that samples rows and explains them; returns the samples."""
    samples_path = f"{files_dir}/{SAMPLES_FILE}"
    predictions = [results.url(name) for name in results.named(PREDICTION_FILES)]
    with beam.Pipeline(options=beam_options or PipelineOptions([])) as pipeline:
        _ = (
            pipeline
            | "PredictionFiles" >> beam.Create(predictions)
            | "SpreadFiles" >> beam.Reshuffle()
            | "ReadPredictions" >> beam.FlatMap(_parquet_rows)
            | "ExplainSamples" >> explain
            | "AllSamples" >> beam.combiners.ToList()
            | "WriteSamples" >> beam.Map(_write_json, samples_path)
        )
    with fsspec.open(samples_path) as file:
        return json.load(file)


def _parquet_rows(url: str) -> Iterator[dict[str, Any]]:
    """The rows of one Parquet file, a batch at a time. (Beam's ReadFromParquet takes a
    glob: a `*` in the name of the run's folder would match other folders.)"""
    with fsspec.open(url, "rb") as file:
        for batch in pq.ParquetFile(file).iter_batches():
            yield from batch.to_pylist()


def _write_json(value: Any, path: str) -> None:
    with fsspec.open(path, "w") as file:
        json.dump(value, file, indent=1)


def _page(
    output: str,
    results: RunFiles,
    summary: RunSummary,
    bundle: ModelBundle,
    labelled: bool,
    explained: list[dict],
    files_dir: str,
    embedded: EmbeddingSections | None,
) -> str:
    """The page's HTML, which names `output`, the folder its run's results are published
    in; its figures are written to `files_dir` on the way."""
    classes = bundle.classes
    metrics = _read_metrics(results)
    predictions = _read_predictions(results)
    per_class = _per_class(metrics)
    pictures: dict[str, bytes] = {
        "confidence": figures.confidence_histogram_figure(predictions.confidences)
    }
    if labelled:
        assert summary.ece is not None, "a run with labelled rows is scored"
        bins = _reliability(metrics)
        true_styles = [row["label"] for row in per_class if row["support"]]
        pictures |= {
            "confusion": figures.confusion_figure(
                true_styles, classes, _confusion(metrics, true_styles, classes)
            ),
            "per_style": figures.per_style_figure(per_class),
            "reliability": figures.reliability_figure(bins, 1 / CALIBRATION_BINS, summary.ece),
        }
    else:
        pictures["style_counts"] = figures.style_counts_figure(predictions.style_counts)
    figure_files = {
        name: _write_content_named(files_dir, name, png) for name, png in pictures.items()
    }
    return TEMPLATES.get_template(REPORT_PAGE).render(
        output=output,
        summary=summary,
        labelled=labelled,
        scores=[
            (f"top{k}", name, score)
            for k, name in TOP_K_SCORES
            if (score := summary.top_k(k)) is not None
        ],
        per_class=per_class,
        figures={name: f"{REPORT_FILES}/{file}" for name, file in figure_files.items()},
        files=REPORT_FILES,
        sections=_sections(explained, labelled),
        errors=predictions.errors,
        run_map=embedded.run_map if embedded else None,
        duplicates=embedded.duplicates if embedded else None,
        duplicate_groups=_duplicate_groups(embedded.duplicates, explained) if embedded else [],
        no_map=None if embedded else _no_map_note(bundle, summary),
    )


def _write_content_named(files_dir: str, name: str, content: bytes) -> str:
    file_name = f"{name}-{hashlib.sha256(content).hexdigest()[:16]}.png"
    with fsspec.open(f"{files_dir}/{file_name}", "wb") as file:
        file.write(content)
    return file_name


def _sections(explained: list[dict], labelled: bool) -> list[dict[str, Any]]:
    """The sampled rows, grouped for the page: by section, and by style in the gallery."""
    sections = []
    for section in (CONFIDENT_MISTAKES, LEAST_CONFIDENT) if labelled else (GALLERY,):
        rows = [s for s in explained if s["section"] == section]
        most_first = section != LEAST_CONFIDENT
        rows.sort(key=by_confidence, reverse=most_first)
        if section == GALLERY:
            groups = [
                {"title": style, "samples": [s for s in rows if s["style"] == style]}
                for style in sorted({s["style"] for s in rows})
            ]
        else:
            groups = [{"title": None, "samples": rows}] if rows else []
        title, note = SECTIONS[section]
        sections.append(
            {"id": section.replace("_", "-"), "title": title, "note": note, "groups": groups}
        )
    return sections


def _duplicate_groups(duplicates: LikelyDuplicates, explained: list[dict]) -> list[dict[str, Any]]:
    """The groups shown, each painting with its picture's file, or why it has none (the
    report's pipeline pictured every painting of them)."""
    pictures = {(s["uri"], s["style"]): s for s in explained if s["section"] == DUPLICATES}

    def pictured(painting: dict[str, Any]) -> dict[str, Any]:
        sample = pictures[(painting["uri"], painting["style"])]
        return painting | {"image": sample["image"], "error": sample["error"]}

    return [
        {"group": group, "paintings": [pictured(painting) for painting in group.paintings]}
        for group in duplicates.groups
    ]


# --- The run's numbers -------------------------------------------------------------------


def _dataset(results: RunFiles, pattern: str) -> ds.Dataset:
    """The run's files that match `pattern`, as one dataset; ReportError where there are none."""
    names = results.named(pattern)
    if not names:
        raise ReportError(f"{results.folder!r} has no {pattern}: not the output of a finished run")
    fs, folder = fsspec.core.url_to_fs(results.folder)
    return ds.dataset([f"{folder}/{name}" for name in names], format="parquet", filesystem=fs)


def _read_metrics(results: RunFiles) -> pd.DataFrame:
    return _dataset(results, METRICS_FILES).to_table().to_pandas()


def _per_class(metrics: pd.DataFrame) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of the styles the labels have or the model gave,
    in the run's class order (the others' zeros say nothing)."""
    table = metrics[metrics["section"] == "per_class"]
    wide = table.pivot(index="label", columns="metric", values="value")
    confusion = metrics[metrics["section"] == "confusion"]
    predicted = set(confusion.loc[confusion["value"] > 0, "predicted"])
    order = list(dict.fromkeys(table["label"]))
    rows = [{"label": label, **wide.loc[label].to_dict()} for label in order]
    return [row for row in rows if row["support"] or row["label"] in predicted]


def _reliability(metrics: pd.DataFrame) -> list[dict[str, float]]:
    table = metrics[metrics["section"] == "reliability"]
    wide = table.pivot(index="label", columns="metric", values="value")
    return [
        {"bin_low": float(low), **wide.loc[low].to_dict()} for low in sorted(wide.index, key=float)
    ]


def _confusion(metrics: pd.DataFrame, true_styles: list[str], classes: Sequence[str]) -> np.ndarray:
    table = metrics[metrics["section"] == "confusion"]
    counts = np.zeros((len(true_styles), len(classes)))
    rows, columns = {s: i for i, s in enumerate(true_styles)}, {s: j for j, s in enumerate(classes)}
    for label, predicted, value in zip(
        table["label"], table["predicted"], table["value"], strict=True
    ):
        if label in rows and predicted in columns:
            counts[rows[label], columns[predicted]] = value
    return counts


@dataclass(frozen=True)
class _Predictions:
    """What the page needs of every prediction row, read column by column."""

    confidences: np.ndarray  # of the predicted rows
    style_counts: dict[str, int]  # predicted rows per style
    errors: list[dict]  # uri and error of the first MAX_ERROR_ROWS error rows, by uri


def _read_predictions(results: RunFiles) -> _Predictions:
    dataset = _dataset(results, PREDICTION_FILES)
    predicted = dataset.to_table(
        columns=["style", "confidence"], filter=pc.field("error").is_null()
    )
    errors = dataset.to_table(columns=["uri", "error"], filter=pc.field("error").is_valid())
    errors = errors.sort_by("uri").slice(0, MAX_ERROR_ROWS)
    counts = pc.value_counts(predicted["style"]).to_pylist()
    return _Predictions(
        confidences=predicted["confidence"].to_numpy(),
        style_counts={item["values"]: item["counts"] for item in counts},
        errors=errors.to_pylist(),
    )


def report_after_run(
    options: PipelineOptions, catalog: Catalog, bundle: ModelBundle, output: OutputFolder
) -> str:
    """`python -m pipeline --report`: the report of the run just finished, written beside
    its staged results (so that it is published, and later replaced, with them), with the
    run's options (runner, backbone weights); returns the line the run prints."""
    started = time.perf_counter()
    image_options = options.view_as(ImageOptions)
    path = write_report(
        output,
        output.staged_results(),
        bundle,
        catalog=catalog,
        backbone_weights=options.view_as(ModelOptions).backbone_weights,
        fetch_policy=image_options.policy(),
        max_pixels=image_options.max_image_pixels,
        beam_options=options,
    )
    return f"  report:      {path} ({time.perf_counter() - started:.1f} s)"
