"""`python -m pipeline.train`: features of every catalog image, heads fitted on them, a bundle.

1. A Beam pipeline writes one feature vector per image to Parquet (pipeline/features.py).
2. Heads are cross-fitted on the training split's features and merged into one, and their
   out-of-fold logits calibrate its temperature (models/crossfit.py); with --voters,
   the training paintings are kept to vote beside it (models/vote.py).
3. With --projection, the embedding's fingerprint is fitted on a sample of the training
   paintings, which a second, smaller pass reads (models/fingerprint.py).
4. The evaluation split is scored once, and the bundle is written with its manifest:
   data, flags, the exact command and the scores, so any figure can be reproduced.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import fsspec

from pipeline import terminal
from pipeline.flags import TRAIN_COMMAND

if TYPE_CHECKING:
    from apache_beam.options.pipeline_options import PipelineOptions

    from models.bundle import Manifest
    from models.fingerprint import Fingerprint
    from transforms.catalog import Catalog


def catalog_digest(files: Sequence[str]) -> str:
    """sha256 of the catalog file(s): the manifest says exactly which data trained it."""
    digest = hashlib.sha256()
    for name in files:
        with fsspec.open(name, "rb") as file:
            digest.update(file.read())
    return digest.hexdigest()


def run(argv: list[str] | None = None) -> Manifest:
    from models.bundle import BackboneSpec, Manifest, check_backbone_weights, save_bundle
    from pipeline.options import CatalogOptions, ModelOptions, TrainOptions, parse_options

    options = parse_options(argv, TRAIN_COMMAND)  # a bad flag stops here, before TensorFlow
    catalog_options = options.view_as(CatalogOptions)
    train_options = options.view_as(TrainOptions)
    weights = options.view_as(ModelOptions).backbone_weights
    check_backbone_weights(train_options.backbone, weights)
    import apache_beam as beam

    from models.backbones import input_size_of
    from models.crossfit import fit_bundle_head
    from models.embedding import STYLE_AND_FINGERPRINT, EmbeddingSpec
    from pipeline.features import build_feature_graph, default_features_dir, training_data
    from pipeline.plan import Workers
    from pipeline.progress_bar import progress_bar
    from transforms.catalog import CatalogError, open_catalog

    catalog = open_catalog(
        catalog_options.input,
        uri_column=catalog_options.uri_column,
        label_column=catalog_options.label_column,
    )
    if not catalog.has_labels:
        raise CatalogError("Training needs labels: name the label column with --label_column.")
    output = catalog_options.output.rstrip("/")
    features_dir = train_options.features_dir or default_features_dir(
        output, train_options.reuse_features
    )

    started = time.perf_counter()
    if not train_options.reuse_features:
        with progress_bar(Workers.of(options), catalog), beam.Pipeline(options=options) as pipeline:
            build_feature_graph(pipeline, options, catalog, features_dir)  # runs on leaving
    feature_seconds = time.perf_counter() - started
    data = training_data(features_dir, train_options)
    head, fit = fit_bundle_head(
        data,
        train_options.head_config(),
        train_options.folds,
        train_options.eval_split,
        train_options.vote_config(),
    )
    backbone, feature_kind = train_options.backbone, train_options.feature_kind
    projection = train_options.projection
    fingerprint, embedding = None, None
    if projection:
        fingerprint = fitted_fingerprint(options, catalog, features_dir)
        dimension = projection + len(fit.classes) + fingerprint.dimension
        embedding = EmbeddingSpec(dimension, STYLE_AND_FINGERPRINT, fingerprint.dimension)
    manifest = Manifest(
        id=train_options.model_id or f"artstyle-{backbone}-{feature_kind}",
        version=datetime.now(UTC).strftime("%Y.%m.%d"),
        backbone=BackboneSpec(
            name=backbone, input_size=input_size_of(backbone), feature_kind=feature_kind
        ),
        head=fit.head,
        classes=fit.classes,
        embedding=embedding,
        vote=None if fit.vote is None else fit.vote.record(),
        training={
            "command": shlex.join(["python", "-m", "pipeline.train", *(argv or sys.argv[1:])]),
            "catalog": catalog_options.input,
            "catalog_sha256": catalog_digest(catalog.files),
            "splits": {"train": train_options.train_split, "eval": train_options.eval_split},
            "counts": fit.counts,
            "feature_seconds": round(feature_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
        },
        scores=fit.scores,
    )
    save_bundle(output, manifest, head, fingerprint, fit.vote)
    print(training_summary(manifest, output))
    return manifest


def fitted_fingerprint(
    options: PipelineOptions, catalog: Catalog, features_dir: str
) -> Fingerprint:
    """The embedding's fingerprint (models/fingerprint.py), fitted on the sources of a sample
    of the training paintings (as they are: a mirror is another picture), which a pass of
    their own writes beside the features; with --reuse_features, an earlier pass's."""
    import apache_beam as beam

    from models.backbones import feature_extractor, source_columns
    from models.fingerprint import Fingerprint
    from models.settings import FINGERPRINT_DIMENSION, FINGERPRINT_PAINTINGS
    from pipeline.features import (
        SOURCES_PREFIX,
        build_fingerprint_source_graph,
        has_feature_files,
        read_fingerprint_sources,
        training_sample,
    )
    from pipeline.options import TrainOptions
    from pipeline.plan import Workers
    from pipeline.progress_bar import progress_bar

    train_options = options.view_as(TrainOptions)
    if not (train_options.reuse_features and has_feature_files(features_dir, SOURCES_PREFIX)):
        sample = training_sample(features_dir, train_options, FINGERPRINT_PAINTINGS)
        logging.info("artstyle: fitting the fingerprint on %d training paintings", len(sample))
        with (
            progress_bar(Workers.of(options), catalog, images=len(sample)),
            beam.Pipeline(options=options) as pipeline,
        ):
            build_fingerprint_source_graph(pipeline, options, catalog, features_dir, sample)
    sources = read_fingerprint_sources(features_dir)
    backbone, feature_kind = train_options.backbone, train_options.feature_kind
    extractor = feature_extractor(backbone, feature_kind, weights=None, fingerprint_source=True)
    columns = source_columns(extractor, backbone, feature_kind)  # the shapes alone
    return Fingerprint.fitted(sources, columns, FINGERPRINT_DIMENSION)


def training_summary(manifest: Manifest, output: str) -> str:
    lines = [f"artstyle: trained {manifest.id} -> {output}"]
    for split, scores in manifest.scores.items():
        lines.append(
            f"  {split}: top-1 {_percent(scores.top1)}  top-3 {_percent(scores.top3)}  "
            f"macro F1 {scores.macro_f1 or 0:.3f}  ECE {_percent(scores.ece)}  "
            f"({scores.n_labelled} images)"
        )
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def main() -> None:
    TRAIN_COMMAND.answer_help(sys.argv[1:])  # before run_command's module brings Beam in
    from pipeline.options import run_command

    run_command(run)


if __name__ == "__main__":
    main()
    terminal.end_process()
