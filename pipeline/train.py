"""`python -m pipeline.train`: features of every catalog image, a head fitted on them, a bundle.

1. A Beam pipeline, with the prediction pipeline's own reading and decoding, writes one
   feature vector per image to Parquet (the expensive part: a backbone forward pass).
2. A Keras head is fitted on the training split's features; a stratified fold held out of
   that split decides when to stop and calibrates the confidence (temperature scaling).
3. The evaluation split is scored once, and the bundle is written with its manifest:
   data, flags, the exact command and the scores, so any figure can be reproduced.
"""

from __future__ import annotations

import hashlib
import shlex
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

import apache_beam as beam
import fsspec
import keras
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.options.pipeline_options import PipelineOptions

from models.backbones import backbones_of, feature_extractor, input_size_of, with_mirror
from models.bundle import BackboneSpec, HeadSpec, Manifest, save_bundle
from models.head import (
    HeadConfig,
    calibrated_probabilities,
    check_fold_count,
    fit_head,
    fit_temperature,
    merge_heads,
    stratified_folds,
)
from models.metrics import Scoreboard
from pipeline.options import (
    TRAIN_COMMAND,
    CatalogOptions,
    ImageOptions,
    ModelOptions,
    TrainOptions,
    run_command,
)
from pipeline.progress_bar import progress_bar
from transforms.catalog import Catalog, CatalogError, ImageRecord, ReadCatalog, open_catalog
from transforms.infer_images import InferImages
from transforms.keras_handler import KerasModelHandler

EMBEDDING_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string()),
        pa.field("label", pa.string()),
        pa.field("split", pa.string()),
        pa.field("features", pa.list_(pa.float32())),
        pa.field("mirrored_features", pa.list_(pa.float32())),  # with --augment_mirror
        pa.field("error", pa.string()),
    ]
)


def load_training_extractor(
    backbone: str, features: str, weights_path: str | None, mirror: bool
) -> keras.Model:
    """Module-level, so that RunInference can pickle it as the model loader."""
    extractor = feature_extractor(backbone, features, weights_path=weights_path)
    return with_mirror(extractor) if mirror else extractor


def _split_of(record: ImageRecord, split_column: str) -> str | None:
    return dict(record.extra).get(split_column)


def embedding_row(
    inferred: tuple[ImageRecord, PredictionResult], *, split_column: str, mirror: bool
) -> dict[str, Any]:
    """The vectors stay float32 arrays, which Arrow writes as lists: the DirectRunner holds
    the rows until the Parquet sink takes them, and as lists of Python floats (8 times the
    bytes) three backbones' features of WikiArt16 ran out of 24 GB; as arrays, 12.5 GB."""
    record, result = inferred
    vector = result.inference.astype(np.float32)
    features, mirrored = np.split(vector, 2) if mirror else (vector, None)
    return {
        "uri": record.uri,
        "label": record.label,
        "split": _split_of(record, split_column),
        "features": features,
        "mirrored_features": mirrored,
        "error": None,
    }


def embedding_error_row(failure: tuple[ImageRecord, str], *, split_column: str) -> dict[str, Any]:
    record, error = failure
    return {
        "uri": record.uri,
        "label": record.label,
        "split": _split_of(record, split_column),
        "features": None,
        "mirrored_features": None,
        "error": error,
    }


def build_embedding_graph(
    pipeline: beam.Pipeline,
    options: PipelineOptions,
    catalog: Catalog,
    embeddings: str,
) -> None:
    model, images = options.view_as(ModelOptions), options.view_as(ImageOptions)
    args = options.view_as(TrainOptions)
    extractor = KerasModelHandler(
        partial(
            load_training_extractor,
            args.backbone,
            args.features,
            model.backbone_weights,
            args.augment_mirror,
        ),
        model.batch_size,
    )
    records = pipeline | "ReadCatalog" >> ReadCatalog(catalog)
    inferred, failures = records | "InferFeatures" >> InferImages(
        extractor,
        input_size_of(args.backbone),
        images.max_image_pixels,
        images.policy(),
    )
    vectors = inferred | "FeatureRows" >> beam.Map(
        embedding_row, split_column=args.split_column, mirror=args.augment_mirror
    )
    errors = failures | "ErrorRows" >> beam.Map(embedding_error_row, split_column=args.split_column)
    _ = (
        (vectors, errors)
        | "AllRows" >> beam.Flatten()
        | "WriteFeatures"
        >> beam.io.WriteToParquet(
            f"{embeddings}/features", EMBEDDING_SCHEMA, file_name_suffix=".parquet"
        )
    )


def read_embeddings(embeddings: str) -> pa.Table:
    """An Arrow table, not a DataFrame: converting would copy every vector once more, a
    gigabyte and a half for an ensemble's features."""
    fs, path = fsspec.core.url_to_fs(embeddings)
    files = sorted(fs.glob(f"{path}/features-*.parquet"))
    if not files:
        raise FileNotFoundError(f"No features-*.parquet under {embeddings!r}")
    return pq.read_table(files, filesystem=fs)


def matrix_of(column: pa.ChunkedArray) -> np.ndarray:
    """A list<float> column without nulls -> a (rows, width) float32 matrix."""
    values = column.combine_chunks().flatten().to_numpy()
    return values.reshape(len(column), -1).astype(np.float32, copy=False)


@dataclass(frozen=True)
class LabelledSet:
    features: np.ndarray
    mirrored: np.ndarray | None  # the features of each image's mirror, when training on them
    labels: np.ndarray  # class indices
    names: np.ndarray  # label names, unknown ones included

    @classmethod
    def of(cls, rows: pa.Table, classes: list[str], mirrored: bool = False) -> LabelledSet:
        """`mirrored`: read the mirrors' features too (only training uses them)."""
        index = {name: i for i, name in enumerate(classes)}
        names = np.array(rows["label"].to_pylist(), dtype=object)
        return cls(
            matrix_of(rows["features"]),
            _mirrored_matrix(rows) if mirrored else None,
            np.array([index.get(n, -1) for n in names]),
            names,
        )


def _mirrored_matrix(rows: pa.Table) -> np.ndarray:
    if "mirrored_features" not in rows.column_names or rows["mirrored_features"].null_count:
        raise ValueError(
            "--augment_mirror: these embeddings hold no mirror features; "
            "write them again (without --reuse_embeddings)"
        )
    return matrix_of(rows["mirrored_features"])


def rows_of_split(rows: pa.Table, split: str) -> pa.Table:
    return rows.filter(pc.equal(rows["split"], split))


@dataclass(frozen=True)
class TrainingData:
    classes: list[str]
    train: LabelledSet
    evaluation: LabelledSet | None
    counts: dict[str, int]


def training_data(embeddings: str, args: TrainOptions) -> TrainingData:
    """The splits' matrices, read from the feature files. The Arrow table (and the copies
    its filters make) is let go on return: only the matrices stay through the fit."""
    table = read_embeddings(embeddings)
    usable = table.filter(pc.and_(pc.is_null(table["error"]), pc.is_valid(table["label"])))
    train_rows = rows_of_split(usable, args.train_split) if args.split_column else usable
    if train_rows.num_rows == 0:
        raise ValueError(f"No usable rows in split {args.train_split!r} to train on")
    classes = sorted(set(train_rows["label"].to_pylist()))
    evaluation = rows_of_split(usable, args.eval_split)
    return TrainingData(
        classes,
        LabelledSet.of(train_rows, classes, mirrored=args.augment_mirror),
        LabelledSet.of(evaluation, classes) if evaluation.num_rows else None,
        {"rows": table.num_rows, "errors": table.num_rows - table["error"].null_count},
    )


def fit_bundle_head(data: TrainingData, args: TrainOptions) -> tuple[keras.Model, dict[str, Any]]:
    """Cross-fits one head per fold of the training split and merges them into one.

    Head k trains on every fold but k and stops early where fold k stops improving, so all
    of the split trains the bundle and every training painting is also scored once by a
    head that never saw it. Those out-of-fold logits calibrate the temperature and give
    the choices of flags a score over the whole split, not over a small fold.
    Returns the merged head with everything the manifest records.
    """
    classes, train, held_out = data.classes, data.train, data.evaluation
    folds = stratified_folds(train.labels, args.folds, args.seed)
    config = HeadConfig(
        hidden_units=args.hidden_units,
        dropout=args.dropout,
        l2=args.l2,
        label_smoothing=args.label_smoothing,
        learning_rate=args.learning_rate,
        epochs=args.epochs,
        seed=args.seed,
    )
    heads, epochs, out_of_fold = cross_fit_heads(train, folds, len(classes), config)
    head = merge_heads(heads)
    temperature = fit_temperature(out_of_fold, train.labels)
    scores = {"out_of_fold": _score(out_of_fold, temperature, train.names, classes)}
    if held_out is not None:
        eval_logits = head.predict(held_out.features, verbose=0)
        scores[args.eval_split] = _score(eval_logits, temperature, held_out.names, classes)
    report = {
        "classes": classes,
        "head": HeadSpec(
            temperature=temperature,
            fit={
                "folds": args.folds,
                **config.as_dict(),
                "epochs_trained": epochs,  # each head's, where its fold stopped improving
            },
        ),
        "counts": {
            **data.counts,
            "train": len(train.labels),
            "train_mirrored": 0 if train.mirrored is None else len(train.labels),
            "eval": 0 if held_out is None else len(held_out.labels),
        },
        "scores": scores,
    }
    return head, report


def cross_fit_heads(
    train: LabelledSet, folds: np.ndarray, n_classes: int, config: HeadConfig
) -> tuple[list[keras.Model], list[int], np.ndarray]:
    """One head per fold, trained on the other folds (and their mirrors) and stopped early
    on its own; returns the heads, their epochs and every painting's out-of-fold logits."""
    out_of_fold = np.zeros((len(train.labels), n_classes), dtype=np.float32)
    heads, epochs = [], []
    for k in range(folds.max() + 1):
        held = folds == k
        x_train, y_train = train.features[~held], train.labels[~held]
        if train.mirrored is not None:
            x_train = np.concatenate([x_train, train.mirrored[~held]])
            y_train = np.concatenate([y_train, y_train])
        head, head_epochs = fit_head(
            x_train,
            y_train,
            train.features[held],
            train.labels[held],
            n_classes,
            replace(config, seed=config.seed + k),
        )
        out_of_fold[held] = head.predict(train.features[held], verbose=0)
        heads.append(head)
        epochs.append(head_epochs)
    return heads, epochs, out_of_fold


def _score(
    logits: np.ndarray, temperature: float, names: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    probabilities = keras.ops.convert_to_numpy(calibrated_probabilities(logits, temperature))
    board = Scoreboard(tuple(classes))
    board.add_probabilities(names, probabilities)
    summary = board.summary()
    summary["per_class_f1"] = {row["label"]: row["f1"] for row in board.per_class()}
    return summary


def catalog_digest(pattern: str) -> str:
    """sha256 of the catalog file(s): the manifest says exactly which data trained it."""
    fs, path = fsspec.core.url_to_fs(pattern)
    digest = hashlib.sha256()
    for name in sorted(fs.glob(path)):
        digest.update(fs.cat_file(name))
    return digest.hexdigest()


def run(argv: list[str] | None = None) -> dict[str, Any]:
    options = TRAIN_COMMAND.parse(argv)
    io, args = options.view_as(CatalogOptions), options.view_as(TrainOptions)
    backbones_of(args.backbone)  # an unknown name fails here, before any image is read
    check_fold_count(args.folds)  # and so does a fold count that cannot cross-fit
    catalog = open_catalog(io.input, uri_column=io.uri_column, label_column=io.label_column)
    if not catalog.has_labels:
        raise CatalogError("Training needs labels: name the label column with --label_column.")
    output = io.output.rstrip("/")
    embeddings = args.embeddings or f"{output}.embeddings"

    started = time.perf_counter()
    if not args.reuse_embeddings:
        with progress_bar(options, catalog), beam.Pipeline(options=options) as pipeline:
            build_embedding_graph(pipeline, options, catalog, embeddings)  # runs on leaving
    embedding_seconds = time.perf_counter() - started
    head, report = fit_bundle_head(training_data(embeddings, args), args)
    model_id = args.model_id or f"artstyle-{args.backbone}-{args.features}"
    manifest = Manifest(
        id=model_id,
        version=datetime.now(UTC).strftime("%Y.%m.%d"),
        backbone=BackboneSpec(
            name=args.backbone, input_size=input_size_of(args.backbone), features=args.features
        ),
        head=report["head"],
        classes=tuple(report["classes"]),
        training={
            "command": shlex.join(["python", "-m", "pipeline.train", *(argv or sys.argv[1:])]),
            "catalog": io.input,
            "catalog_sha256": catalog_digest(io.input),
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
    run_command(run)


if __name__ == "__main__":
    main()
