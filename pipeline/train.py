"""`python -m pipeline.train`: features of every catalog image, heads fitted on them, a bundle.

1. A Beam pipeline writes one feature vector per image to Parquet (pipeline/features.py).
2. Heads are cross-fitted on the training split's features and merged into one, and their
   out-of-fold logits calibrate its temperature (models/crossfit.py).
3. The evaluation split is scored once, and the bundle is written with its manifest:
   data, flags, the exact command and the scores, so any figure can be reproduced.
"""

from __future__ import annotations

import hashlib
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import fsspec

from pipeline import terminal
from pipeline.flags import TRAIN_COMMAND

if TYPE_CHECKING:
    from models.bundle import Manifest


def catalog_digest(files: Sequence[str]) -> str:
    """sha256 of the catalog file(s): the manifest says exactly which data trained it."""
    digest = hashlib.sha256()
    for name in files:
        with fsspec.open(name, "rb") as file:
            digest.update(file.read())
    return digest.hexdigest()


def run(argv: list[str] | None = None) -> dict[str, Any]:
    from models.bundle import BackboneSpec, Manifest, check_backbone_weights, save_bundle
    from pipeline.options import CatalogOptions, ModelOptions, TrainOptions, parse_options

    options = parse_options(argv, TRAIN_COMMAND)  # a bad flag stops here, before TensorFlow
    io, args = options.view_as(CatalogOptions), options.view_as(TrainOptions)
    check_backbone_weights(args.backbone, options.view_as(ModelOptions).backbone_weights)
    import apache_beam as beam

    from models.backbones import input_size_of
    from models.crossfit import fit_bundle_head
    from models.embedding import HEAD_PROJECTION, EmbeddingSpec
    from pipeline.features import build_embedding_graph, training_data
    from pipeline.plan import Workers
    from pipeline.progress_bar import progress_bar
    from transforms.catalog import CatalogError, open_catalog

    catalog = open_catalog(io.input, uri_column=io.uri_column, label_column=io.label_column)
    if not catalog.has_labels:
        raise CatalogError("Training needs labels: name the label column with --label_column.")
    output = io.output.rstrip("/")
    embeddings = args.embeddings or f"{output}.embeddings"

    started = time.perf_counter()
    if not args.reuse_embeddings:
        with progress_bar(Workers.of(options), catalog), beam.Pipeline(options=options) as pipeline:
            build_embedding_graph(pipeline, options, catalog, embeddings)  # runs on leaving
    embedding_seconds = time.perf_counter() - started
    head, report = fit_bundle_head(
        training_data(embeddings, args), args.head_config(), args.folds, args.eval_split
    )
    model_id = args.model_id or f"artstyle-{args.backbone}-{args.features}"
    manifest = Manifest(
        id=model_id,
        version=datetime.now(UTC).strftime("%Y.%m.%d"),
        backbone=BackboneSpec(
            name=args.backbone, input_size=input_size_of(args.backbone), features=args.features
        ),
        head=report["head"],
        classes=tuple(report["classes"]),
        embedding=EmbeddingSpec(args.projection, HEAD_PROJECTION) if args.projection else None,
        training={
            "command": shlex.join(["python", "-m", "pipeline.train", *(argv or sys.argv[1:])]),
            "catalog": io.input,
            "catalog_sha256": catalog_digest(catalog.files),
            "splits": {"train": args.train_split, "eval": args.eval_split},
            "counts": report["counts"],
            "embedding_seconds": round(embedding_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
        },
        scores=report["scores"],
    )
    save_bundle(output, manifest, head)
    print(training_summary(manifest, output))
    return manifest.to_json()


def training_summary(manifest: Manifest, output: str) -> str:
    lines = [f"artstyle: trained {manifest.id} -> {output}"]
    for split, scores in manifest.scores.items():
        lines.append(
            f"  {split}: top-1 {scores['top1']:.1%}  top-3 {scores['top3']:.1%}  "
            f"macro F1 {scores['macro_f1']:.3f}  ECE {scores['ece']:.1%}  "
            f"({scores['n_labelled']} images)"
        )
    return "\n".join(lines)


def main() -> None:
    TRAIN_COMMAND.answer_help(sys.argv[1:])  # before run_command's module brings Beam in
    from pipeline.options import run_command

    run_command(run)


if __name__ == "__main__":
    main()
    terminal.end_process()
