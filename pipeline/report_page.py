"""The report page of a run: `DIR/report.html` and its pictures in `DIR/report_files/`.

The page opens from disk, offline: no script, no font or style from the network; its
pictures are PNG and JPEG files beside it. Its numbers are the run's own (summary.json,
metrics-*.parquet), its charts are drawn from them, and its thumbnails are a few sampled
rows explained with Grad-CAM in a small Beam pipeline over `DIR/predictions-*.parquet`.
`python -m pipeline.report DIR` writes it for a finished run, `python -m pipeline ...
--report` after its own.

A failed report leaves the earlier page whole: every file under report_files/ is named by
its content, the page replaces the old one in one rename, and only then are files that no
page names any more removed.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
import uuid
from collections.abc import Sequence
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
from apache_beam.options.pipeline_options import PipelineOptions

from models.bundle import ModelBundle
from models.metrics import CALIBRATION_BINS
from pipeline import figures
from pipeline.flags import REPORT_PER_STYLE, REPORT_SAMPLES, UsageError
from pipeline.options import CatalogOptions, ImageOptions, ModelOptions
from pipeline.outputs import REPORT_FILES, REPORT_PAGE
from transforms.catalog import Catalog
from transforms.explanations import (
    CONFIDENT_MISTAKES,
    GALLERY,
    LEAST_CONFIDENT,
    ExplainSamples,
    by_confidence,
)
from transforms.fetch import FetchPolicy
from transforms.images import DEFAULT_MAX_PIXELS

SAMPLES_FILE = "samples.json"
MAX_ERROR_ROWS = 500  # listed on the page; all of them are in the predictions' error column
SCORES = (("top-1 accuracy", "top1"), ("top-3 accuracy", "top3"), ("top-5 accuracy", "top5"))
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
    output: str,
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
    """Writes `output`/report.html and its files; returns the page's path.

    `bundle` must be the run's model: the sampled rows are explained with it. `catalog`
    (the run's, which knows where each row's image is), `fetch_policy` and `max_pixels`
    read the sampled images again as the run read them.
    """
    output = output.rstrip("/")
    summary = _read_summary(output)
    if summary["model"] != bundle.id:
        raise ReportError(
            f"{output}'s predictions are by model {summary['model']!r}, not by {bundle.id!r}: "
            "name its bundle with --model"
        )
    fs, _ = fsspec.core.url_to_fs(output)
    files_dir = f"{output}/{REPORT_FILES}"
    fs.makedirs(files_dir, exist_ok=True)
    labelled = summary["n_labelled"] > 0
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
    )
    explained = _explain_samples(output, explain, files_dir, beam_options)
    page = _page(output, summary, bundle.classes, labelled, explained, files_dir)
    path = f"{output}/{REPORT_PAGE}"
    temporary = f"{output}/.{REPORT_PAGE}.{uuid.uuid4().hex}"
    with fsspec.open(temporary, "w", encoding="utf-8") as file:
        file.write(page.html)
    fs.mv(temporary, path)
    _remove_unnamed(fs, files_dir, page.files)
    return path


def _read_summary(output: str) -> dict[str, Any]:
    try:
        with fsspec.open(f"{output}/summary.json") as file:
            return json.load(file)
    except FileNotFoundError:
        raise ReportError(
            f"{output!r} has no summary.json: not the output of a finished run of "
            "python -m pipeline"
        ) from None


def _explain_samples(
    output: str, explain: ExplainSamples, files_dir: str, beam_options: PipelineOptions | None
) -> list[dict[str, Any]]:
    """Runs the Beam pipeline that samples rows and explains them; returns the samples."""
    samples_path = f"{files_dir}/{SAMPLES_FILE}"
    with beam.Pipeline(options=beam_options or PipelineOptions([])) as pipeline:
        _ = (
            pipeline
            | "ReadPredictions" >> beam.io.ReadFromParquet(f"{output}/predictions-*.parquet")
            | "ExplainSamples" >> explain
            | "AllSamples" >> beam.combiners.ToList()
            | "WriteSamples" >> beam.Map(_write_json, samples_path)
        )
    with fsspec.open(samples_path) as file:
        return json.load(file)


def _write_json(value: Any, path: str) -> None:
    with fsspec.open(path, "w") as file:
        json.dump(value, file, indent=1)


@dataclass(frozen=True)
class _Page:
    html: str
    files: set[str]  # the names under report_files/ the page uses


def _page(
    output: str,
    summary: dict,
    classes: Sequence[str],
    labelled: bool,
    explained: list[dict],
    files_dir: str,
) -> _Page:
    metrics = _read_metrics(output)
    predictions = _read_predictions(output)
    per_class = _per_class(metrics)
    pictures: dict[str, bytes] = {
        "confidence": figures.confidence_histogram_figure(predictions.confidences)
    }
    if labelled:
        bins = _reliability(metrics)
        true_styles = [row["label"] for row in per_class if row["support"]]
        pictures |= {
            "confusion": figures.confusion_figure(
                true_styles, classes, _confusion(metrics, true_styles, classes)
            ),
            "per_style": figures.per_style_figure(per_class),
            "reliability": figures.reliability_figure(bins, 1 / CALIBRATION_BINS, summary["ece"]),
        }
    else:
        pictures["style_counts"] = figures.style_counts_figure(predictions.style_counts)
    figure_files = {
        name: _write_content_named(files_dir, name, png) for name, png in pictures.items()
    }
    html = TEMPLATES.get_template(REPORT_PAGE).render(
        output=output,
        summary=summary,
        labelled=labelled,
        scores=[(key, name) for name, key in SCORES if summary.get(key) is not None],
        per_class=per_class,
        figures={name: f"{REPORT_FILES}/{file}" for name, file in figure_files.items()},
        files=REPORT_FILES,
        sections=_sections(explained, labelled),
        errors=predictions.errors,
    )
    sample_files = {s[kind] for s in explained for kind in ("image", "gradcam") if s.get(kind)}
    return _Page(html, {*figure_files.values(), *sample_files, SAMPLES_FILE})


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


# --- The run's numbers -------------------------------------------------------------------


def _read_metrics(output: str) -> pd.DataFrame:
    fs, path = fsspec.core.url_to_fs(output)
    files = fs.glob(f"{path}/metrics-*.parquet")
    if not files:
        raise ReportError(f"{output!r} has no metrics-*.parquet: not the output of a finished run")
    return ds.dataset(files, format="parquet", filesystem=fs).to_table().to_pandas()


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


def _read_predictions(output: str) -> _Predictions:
    fs, path = fsspec.core.url_to_fs(output)
    dataset = ds.dataset(fs.glob(f"{path}/predictions-*.parquet"), format="parquet", filesystem=fs)
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


def _remove_unnamed(fs: fsspec.AbstractFileSystem, files_dir: str, named: set[str]) -> None:
    """Removes the files of earlier reports that the page no longer names."""
    _, path = fsspec.core.url_to_fs(files_dir)
    for file in fs.ls(path, detail=False):
        if posixpath.basename(file) not in named:
            fs.rm(file)


def report_after_run(
    options: PipelineOptions, catalog: Catalog, bundle: ModelBundle, staging: str
) -> str:
    """`python -m pipeline --report`: the report of the run just finished, written beside
    its results in `staging` (so that it is published, and later replaced, with them), with
    the run's options (runner, backbone weights); returns the line the run prints."""
    started = time.perf_counter()
    io, images = options.view_as(CatalogOptions), options.view_as(ImageOptions)
    write_report(
        staging,
        bundle,
        catalog=catalog,
        backbone_weights=options.view_as(ModelOptions).backbone_weights,
        fetch_policy=images.policy(),
        max_pixels=images.max_image_pixels,
        beam_options=options,
    )
    path = f"{io.output.rstrip('/')}/{REPORT_PAGE}"
    return f"  report:      {path} ({time.perf_counter() - started:.1f} s)"
