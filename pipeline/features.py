"""The features' pass of training: a Beam graph that writes one feature vector per catalog
image to Parquet (the expensive part: a backbone forward pass, with the prediction
pipeline's own reading and decoding), and the matrices read back from those files.
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import apache_beam as beam
import fsspec
import keras
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.options.pipeline_options import PipelineOptions

from models.backbones import feature_extractor, input_size_of, with_mirror
from models.crossfit import LabelledSet, TrainingData
from models.precision import grow_gpu_memory_on_demand
from pipeline.options import ImageOptions, ModelOptions, TrainOptions
from transforms.catalog import Catalog, ImageRecord, ReadCatalog
from transforms.infer_images import InferImages
from transforms.model_handler import FixedBatchModelHandler

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
    grow_gpu_memory_on_demand()
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
    inference = cast(np.ndarray, result.inference)  # Beam types it as a bare TypeVar
    vector = inference.astype(np.float32)
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
    extractor = FixedBatchModelHandler(
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


def labelled_set(rows: pa.Table, classes: list[str], mirrored: bool = False) -> LabelledSet:
    """`mirrored`: read the mirrors' features too (only training uses them)."""
    index = {name: i for i, name in enumerate(classes)}
    names = np.array(rows["label"].to_pylist(), dtype=object)
    return LabelledSet(
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
        labelled_set(train_rows, classes, mirrored=args.augment_mirror),
        labelled_set(evaluation, classes) if evaluation.num_rows else None,
        {"rows": table.num_rows, "errors": table.num_rows - table["error"].null_count},
    )
