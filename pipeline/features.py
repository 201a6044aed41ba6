"""The feature passes of training: Beam graphs that write one vector per catalog image to
Parquet (the expensive part: a backbone forward pass, with the prediction pipeline's own
reading and decoding), and the matrices read back from those files. The features, of every
image, are what the heads learn from; the fingerprint sources, of a sample of the training
paintings, what the embedding's fingerprint is fitted on.
"""

from __future__ import annotations

from collections.abc import Callable
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
from transforms.parquet import WriteParquet

FEATURE_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string()),
        pa.field("label", pa.string()),
        pa.field("split", pa.string()),
        # float16: half the bytes of the float32 the backbones compute, and heads fitted on
        # them score as on float32 (their standardisation dwarfs the rounding).
        pa.field("features", pa.list_(pa.float16())),
        pa.field("mirrored_features", pa.list_(pa.float16())),  # with --augment_mirror
        pa.field("error", pa.string()),
    ]
)

# The fingerprint's sample: each painting's centre-pooled maps (models.backbones), float16
# as the features are (the whitening fitted on them is stored in float16 too).
SOURCE_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string()),
        pa.field("fingerprint_source", pa.list_(pa.float16())),
        pa.field("error", pa.string()),
    ]
)
FEATURES_PREFIX = "features"  # the feature files: features-*.parquet
SOURCES_PREFIX = "fingerprint-sources"  # the fingerprint's sample, beside them


def load_training_extractor(
    backbone: str, feature_kind: str, weights_path: str | None, mirror: bool
) -> keras.Model:
    """Module-level, so that RunInference can pickle it as the model loader."""
    grow_gpu_memory_on_demand()
    extractor = feature_extractor(backbone, feature_kind, weights_path=weights_path)
    return with_mirror(extractor) if mirror else extractor


def _split_of(record: ImageRecord, split_column: str) -> str | None:
    return dict(record.extra).get(split_column)


def feature_row(
    inferred: tuple[ImageRecord, PredictionResult], *, split_column: str, mirror: bool
) -> dict[str, Any]:
    """The vectors stay numpy arrays, which Arrow writes as lists (as lists of Python floats
    they would take 16 times the bytes until the Parquet sink takes them)."""
    record, result = inferred
    inference = cast(np.ndarray, result.inference)  # Beam types it as a bare TypeVar
    vector = inference.astype(np.float16)
    features, mirrored = np.split(vector, 2) if mirror else (vector, None)
    return {
        "uri": record.uri,
        "label": record.label,
        "split": _split_of(record, split_column),
        "features": features,
        "mirrored_features": mirrored,
        "error": None,
    }


def feature_error_row(failure: tuple[ImageRecord, str], *, split_column: str) -> dict[str, Any]:
    record, error = failure
    return {
        "uri": record.uri,
        "label": record.label,
        "split": _split_of(record, split_column),
        "features": None,
        "mirrored_features": None,
        "error": error,
    }


def build_feature_graph(
    pipeline: beam.Pipeline,
    options: PipelineOptions,
    catalog: Catalog,
    features_dir: str,
) -> None:
    train_options = options.view_as(TrainOptions)
    weights, mirror = options.view_as(ModelOptions).backbone_weights, train_options.augment_mirror
    split_column = train_options.split_column
    _write_inferred_rows(
        pipeline | "ReadCatalog" >> ReadCatalog(catalog),
        options,
        partial(
            load_training_extractor,
            train_options.backbone,
            train_options.feature_kind,
            weights,
            mirror,
        ),
        partial(feature_row, split_column=split_column, mirror=mirror),
        partial(feature_error_row, split_column=split_column),
        WriteParquet(f"{features_dir}/{FEATURES_PREFIX}", FEATURE_SCHEMA),
    )


def build_fingerprint_source_graph(
    pipeline: beam.Pipeline,
    options: PipelineOptions,
    catalog: Catalog,
    features_dir: str,
    uris: frozenset[str],
) -> None:
    """The fingerprint's sources of the catalog's images at `uris` (a sample of the training
    paintings), to Parquet beside the features."""
    train_options = options.view_as(TrainOptions)
    weights = options.view_as(ModelOptions).backbone_weights
    records = (
        pipeline
        | "ReadCatalog" >> ReadCatalog(catalog)
        | "Sample" >> beam.Filter(_is_sampled, uris)
    )
    _write_inferred_rows(
        records,
        options,
        partial(
            load_fingerprint_source_extractor,
            train_options.backbone,
            train_options.feature_kind,
            weights,
        ),
        fingerprint_source_row,
        fingerprint_source_error_row,
        WriteParquet(f"{features_dir}/{SOURCES_PREFIX}", SOURCE_SCHEMA),
    )


def _is_sampled(record: ImageRecord, uris: frozenset[str]) -> bool:
    return record.uri in uris


def _write_inferred_rows(
    records: beam.PCollection[ImageRecord],
    options: PipelineOptions,
    load_model: Callable[[], keras.Model],
    row: Callable[[tuple[ImageRecord, PredictionResult]], dict[str, Any]],
    error_row: Callable[[tuple[ImageRecord, str]], dict[str, Any]],
    sink: WriteParquet,
) -> None:
    """Each record's image through `load_model`'s model, one row per record: `row` of what
    it gave, or `error_row` of why it could not."""
    model_options, image_options = options.view_as(ModelOptions), options.view_as(ImageOptions)
    inferred, failures = records | "Infer" >> InferImages(
        FixedBatchModelHandler(load_model, model_options.batch_size),
        input_size_of(options.view_as(TrainOptions).backbone),
        image_options.max_image_pixels,
        image_options.policy(),
    )
    rows = inferred | "Rows" >> beam.Map(row)
    errors = failures | "ErrorRows" >> beam.Map(error_row)
    _ = (rows, errors) | "Write" >> sink


def load_fingerprint_source_extractor(
    backbone: str, feature_kind: str, weights_path: str | None
) -> keras.Model:
    """Module-level, so that RunInference can pickle it as the model loader: images -> their
    fingerprint sources alone (Keras computes no more of the backbones than those need)."""
    grow_gpu_memory_on_demand()
    extractor = feature_extractor(
        backbone, feature_kind, weights_path=weights_path, fingerprint_source=True
    )
    return keras.Model(extractor.input, extractor.outputs[1])


def fingerprint_source_row(inferred: tuple[ImageRecord, PredictionResult]) -> dict[str, Any]:
    record, result = inferred
    source = cast(np.ndarray, result.inference).astype(np.float16)
    return {"uri": record.uri, "fingerprint_source": source, "error": None}


def fingerprint_source_error_row(failure: tuple[ImageRecord, str]) -> dict[str, Any]:
    record, error = failure
    return {"uri": record.uri, "fingerprint_source": None, "error": error}


def read_fingerprint_sources(features_dir: str) -> np.ndarray:
    """The fingerprint sources the sample's pass wrote, of the paintings it could read."""
    table = read_features(features_dir, SOURCES_PREFIX)
    usable = table.filter(pc.is_null(table["error"]))
    if usable.num_rows == 0:
        raise ValueError(f"{features_dir!r}: no training painting's fingerprint source was read")
    return matrix_of(usable["fingerprint_source"])


def training_sample(features_dir: str, train_options: TrainOptions, size: int) -> frozenset[str]:
    """The URIs of `size` training paintings with features (all of them, where there are
    fewer), the same ones on every run over the same features."""
    uris = sorted(_training_rows(_feature_rows(features_dir), train_options)["uri"].to_pylist())
    chosen = np.random.default_rng(0).choice(len(uris), min(size, len(uris)), replace=False)
    return frozenset(uris[i] for i in chosen)


FEATURES_DIR_SUFFIX = ".features"  # OUTPUT.features/, beside the bundle
EARLIER_FEATURES_DIR_SUFFIX = ".embeddings"  # where earlier versions wrote them


def default_features_dir(output: str, reuse: bool) -> str:
    """OUTPUT.features; where features are reused and only an earlier version's folder,
    OUTPUT.embeddings, has feature files, that one."""
    folder = f"{output}{FEATURES_DIR_SUFFIX}"
    earlier = f"{output}{EARLIER_FEATURES_DIR_SUFFIX}"
    if reuse and not has_feature_files(folder) and has_feature_files(earlier):
        return earlier
    return folder


def has_feature_files(features_dir: str, prefix: str = FEATURES_PREFIX) -> bool:
    try:
        feature_files(features_dir, prefix)
    except (FileNotFoundError, OSError, ValueError):
        return False
    return True


def feature_files(
    features_dir: str, prefix: str = FEATURES_PREFIX
) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The Parquet files of the pass that wrote `prefix`-*.parquet into `features_dir`."""
    fs, path = fsspec.core.url_to_fs(features_dir)
    files = sorted(fs.glob(f"{path}/{prefix}-*.parquet"))
    if not files:
        raise FileNotFoundError(f"No {prefix}-*.parquet under {features_dir!r}")
    return fs, files


def read_features(features_dir: str, prefix: str = FEATURES_PREFIX) -> pa.Table:
    """Every row and column of a pass's files, as one Arrow table (for small sets: training
    reads the vectors a batch at a time with `read_matrix`)."""
    fs, files = feature_files(features_dir, prefix)
    return pq.read_table(files, filesystem=fs)


ROW_COLUMNS = ["uri", "label", "split", "error"]


def read_matrix(features_dir: str, column: str, rows: np.ndarray) -> np.ndarray:
    """The vectors of `column` at `rows` (positions over all the feature files, in their
    order) as a float16 matrix, filled a record batch at a time: the files' vectors are
    never all in memory at once beside it. ValueError if a row asked for has none."""
    fs, files = feature_files(features_dir)
    slot = np.full(rows.max() + 1 if len(rows) else 0, -1)
    slot[rows] = np.arange(len(rows))
    matrix: np.ndarray | None = None
    start = 0
    for name in files:
        with fs.open(name, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024, columns=[column]):
                taken = np.flatnonzero(slot[start : start + batch.num_rows] >= 0)
                if len(taken):
                    values = batch.column(0).take(taken)
                    if values.null_count:
                        raise ValueError(f"{features_dir!r}: rows without {column}")
                    vectors = matrix_of(values)
                    if matrix is None:
                        matrix = np.empty((len(rows), vectors.shape[1]), np.float16)
                    matrix[slot[start + taken]] = vectors
                start += batch.num_rows
    if matrix is None:
        raise ValueError(f"{features_dir!r}: no {column} at the rows asked for")
    return matrix


def matrix_of(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A list<float> column without nulls -> a (rows, width) matrix of its own type."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1)


def labelled_set(
    features_dir: str, rows: pa.Table, classes: list[str], mirrored: bool
) -> LabelledSet:
    """The set of `rows` (their `position` in the feature files); `mirrored`: read the
    mirrors' features too (only training uses them)."""
    index = {name: i for i, name in enumerate(classes)}
    names = np.array(rows["label"].to_pylist(), dtype=object)
    positions = rows["position"].to_numpy()
    return LabelledSet(
        read_matrix(features_dir, "features", positions),
        _mirrored_matrix(features_dir, positions) if mirrored else None,
        np.array([index.get(n, -1) for n in names]),
        names,
    )


def _mirrored_matrix(features_dir: str, positions: np.ndarray) -> np.ndarray:
    try:
        return read_matrix(features_dir, "mirrored_features", positions)
    except ValueError:
        raise ValueError(
            "--augment_mirror: these feature files hold no mirrors' features; "
            "write them again (without --reuse_features)"
        ) from None


def training_data(features_dir: str, train_options: TrainOptions) -> TrainingData:
    """The splits' matrices, read from the feature files a batch at a time into float16."""
    table = _feature_rows(features_dir)
    train_rows = _training_rows(table, train_options)
    classes = sorted(set(train_rows["label"].to_pylist()))
    evaluation = rows_of_split(_usable(table), train_options.eval_split)
    return TrainingData(
        classes,
        labelled_set(features_dir, train_rows, classes, train_options.augment_mirror),
        labelled_set(features_dir, evaluation, classes, False) if evaluation.num_rows else None,
        {"rows": table.num_rows, "errors": table.num_rows - table["error"].null_count},
    )


def _feature_rows(features_dir: str) -> pa.Table:
    """The feature files' rows without their vectors, each with its `position` in them."""
    fs, files = feature_files(features_dir)
    table = pq.read_table(files, filesystem=fs, columns=ROW_COLUMNS)
    return table.append_column("position", pa.array(np.arange(table.num_rows)))


def _usable(rows: pa.Table) -> pa.Table:
    return rows.filter(pc.and_(pc.is_null(rows["error"]), pc.is_valid(rows["label"])))


def _training_rows(rows: pa.Table, train_options: TrainOptions) -> pa.Table:
    usable = _usable(rows)
    train_rows = (
        rows_of_split(usable, train_options.train_split) if train_options.split_column else usable
    )
    if train_rows.num_rows == 0:
        raise ValueError(f"No usable rows in split {train_options.train_split!r} to train on")
    return train_rows


def rows_of_split(rows: pa.Table, split: str) -> pa.Table:
    return rows.filter(pc.equal(rows["split"], split))
