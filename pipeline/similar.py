"""`python -m pipeline.similar QUERY... --index INDEX [-k 10] [--max_distance D] [--output
FILE.parquet]`: the paintings of an index nearest to each query, with their distances.

A query is an image (a path or any URI the pipeline reads) or a catalog, whose every row is
one. Each query's embedding is computed by the model that made the index's (--model names
its bundle; another model's vectors do not compare, and are refused in one line), then
looked up in the index. The queries run as one Beam job on this machine, where the index
is: images are read and run as the pipeline reads and runs them, so a catalog of thousands
is as welcome as one image. An image named on the command line that cannot be read is one
line and exit status 2; a catalog's row that cannot be read is a row with its error.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import terminal
from pipeline.exits import run_reporting
from pipeline.flags import SIMILAR_COMMAND, UsageError

if TYPE_CHECKING:  # loaded once the flags are read: --help answers at once
    import apache_beam as beam
    import pyarrow as pa
    from apache_beam.options.pipeline_options import PipelineOptions

    from models.bundle import ModelBundle
    from models.vector_index import VectorIndex
    from pipeline.plan import RunPlan
    from transforms.catalog import Catalog

# The flags of the command itself; the others are the pipeline's, read through its views.
QUERY_FLAGS = ("queries", "index", "k", "max_distance", "output", "show")
NEIGHBOUR_FILES = "neighbours"  # the job's shards, in a temporary folder


class QueryError(UsageError):
    """An image named on the command line cannot be a query: one line naming it."""


def run(argv: list[str] | None = None) -> pa.Table:
    argv = sys.argv[1:] if argv is None else argv
    SIMILAR_COMMAND.answer_help(argv)
    args = SIMILAR_COMMAND.parse(argv)
    from models.bundle import ModelBundle
    from pipeline.plan import plan_run
    from pipeline.result_tables import check_table_output, neighbours_text, write_table
    from transforms.catalog import open_catalog, table_format_of

    if args.output:
        check_table_output(args.output)
    bundle = ModelBundle.load(args.model)
    open_index(args.index, bundle)
    images = [query for query in args.queries if table_format_of(query) is None]
    catalogs = [open_catalog(query) for query in args.queries if table_format_of(query)]
    options = pipeline_options(args, images, catalogs)
    plan = plan_run(options, bundle)
    with tempfile.TemporaryDirectory(prefix="artstyle-similar-") as folder:
        prefix = str(Path(folder) / NEIGHBOUR_FILES)
        run_job(options, plan, bundle, images, catalogs, args, prefix)
        table = in_query_order(read_shards(folder), images)
    failed = table.filter(table["error"].is_valid()).to_pylist()
    for row in failed:
        if row["query"] in images:
            raise QueryError(f"{row['query']}: {row['error']}")
    if args.output:
        write_table(table, args.output)
    print(neighbours_text(table, args.show))
    print(f"artstyle: {summary(table, args)}")
    return table


def pipeline_options(
    args: argparse.Namespace, images: list[str], catalogs: list[Catalog]
) -> PipelineOptions:
    """The pipeline's options (its views: the model's, the images') from the command's
    flags, for a job on Beam's DirectRunner, here. A few images named alone are run in one
    batch of their number, not padded to --batch_size."""
    from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

    values = {name: value for name, value in vars(args).items() if name not in QUERY_FLAGS}
    if not catalogs:
        values["batch_size"] = min(args.batch_size, len(images))
    options = PipelineOptions([], **values, embeddings=True)
    options.view_as(SetupOptions).save_main_session = False
    return options


def open_index(folder: str, bundle: ModelBundle) -> VectorIndex:
    """The index at `folder`, to be queried with `bundle`'s embeddings (here, and by the
    service's --index): a missing, corrupt or empty index, a bundle without a projection,
    or an index of another model is one line (VectorIndexError, BundleError)."""
    from models.vector_index import VectorIndex, VectorIndexError

    index = VectorIndex.load(folder)
    if index.size == 0:
        raise VectorIndexError(f"{folder} holds no paintings: add runs to it first")
    bundle.check_embedding()
    check_same_model(index, bundle, folder)
    return index


def check_same_model(index: VectorIndex, bundle: ModelBundle, folder: str) -> None:
    """The index's vectors and the queries' must be of one model and one embedding."""
    from models.vector_index import VectorIndexError
    from transforms.embeddings import EmbeddingsOrigin

    manifest = index.manifest
    indexed = EmbeddingsOrigin(manifest.model_id, manifest.embedding)
    assert bundle.manifest.embedding is not None  # check_embedding checked
    asked = EmbeddingsOrigin(bundle.id, bundle.manifest.embedding)
    if indexed != asked:
        raise VectorIndexError(
            f"{folder} is an index of {indexed.describe()}; --model {bundle.path} is "
            f"{asked.describe()}: vectors of different models do not compare (name the "
            "index's bundle with --model)"
        )


def run_job(
    options: PipelineOptions,
    plan: RunPlan,
    bundle: ModelBundle,
    images: list[str],
    catalogs: list[Catalog],
    args: argparse.Namespace,
    prefix: str,
) -> None:
    import apache_beam as beam

    with beam.Pipeline(options=options) as pipeline:
        build_graph(pipeline, options, plan, bundle, images, catalogs, args, prefix)


def build_graph(
    pipeline: beam.Pipeline,
    options: PipelineOptions,
    plan: RunPlan,
    bundle: ModelBundle,
    images: list[str],
    catalogs: list[Catalog],
    args: argparse.Namespace,
    prefix: str,
) -> None:
    """Queries -> embeddings (the prediction pipeline's reading and model) -> neighbour rows,
    and a row per query that failed, written as Parquet shards under `prefix`."""
    import apache_beam as beam

    from models.vector_index import NEIGHBOUR_SCHEMA
    from pipeline.options import ImageOptions, ModelOptions
    from pipeline.predict import classifier_loader
    from transforms.catalog import ImageRecord, ReadCatalog
    from transforms.infer_images import InferImages
    from transforms.model_handler import FixedBatchModelHandler
    from transforms.neighbours import NeighbourRowsFn, failed_query
    from transforms.parquet import WriteParquet

    loader = classifier_loader(options, plan, bundle)
    model = FixedBatchModelHandler(loader, options.view_as(ModelOptions).batch_size)
    image_options = options.view_as(ImageOptions)

    sources = []
    if images:
        named = [ImageRecord(query, query, None) for query in images]
        sources.append(pipeline | "NamedImages" >> beam.Create(named))
    for i, catalog in enumerate(catalogs):
        sources.append(pipeline | f"ReadCatalog{i}" >> ReadCatalog(catalog))
    queries = sources | "AllQueries" >> beam.Flatten()
    inferred, failures = queries | "Embed" >> InferImages(
        model, bundle.input_size, image_options.max_image_pixels, image_options.policy()
    )
    neighbours = inferred | "Neighbours" >> beam.ParDo(
        NeighbourRowsFn(args.index, args.k, args.max_distance)
    )
    failed = failures | "FailedQueries" >> beam.Map(failed_query)
    _ = (neighbours, failed) | "WriteNeighbours" >> WriteParquet(prefix, NEIGHBOUR_SCHEMA)


def read_shards(folder: str) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from models.vector_index import NEIGHBOUR_SCHEMA

    shards = sorted(Path(folder).glob(f"{NEIGHBOUR_FILES}-*.parquet"))
    tables = [pq.read_table(shard, schema=NEIGHBOUR_SCHEMA) for shard in shards]
    return pa.concat_tables(tables) if tables else NEIGHBOUR_SCHEMA.empty_table()


def in_query_order(table: pa.Table, images: list[str]) -> pa.Table:
    """The images named first, in the order named; then the catalogs' queries by name; each
    query's rows by rank."""
    import numpy as np
    import pyarrow as pa

    queries = table["query"].to_pylist()
    named = {query: position for position, query in enumerate(images)}
    first = np.array([named.get(query, len(images)) for query in queries], np.int64)
    _, names = np.unique(["" if query is None else query for query in queries], return_inverse=True)
    ranks = table["rank"].fill_null(0).to_numpy()
    order = np.lexsort((ranks, names, first))
    return table.take(pa.array(order, pa.int64()))


def summary(table: pa.Table, args: argparse.Namespace) -> str:
    import pyarrow.compute as pc

    queries = pc.count_distinct(table["query"], mode="all").as_py()
    failed = table.filter(table["error"].is_valid()).num_rows
    neighbours = table.filter(table["rank"].is_valid()).num_rows
    within = f" within {args.max_distance:g}" if args.max_distance is not None else ""
    line = f"{queries:,} queries, {neighbours:,} neighbours (k = {args.k}{within})"
    if failed:
        line += f", {failed:,} queries failed (their error is in the table)"
    if args.output:
        line += f"; written to {args.output}"
    return line


def errors() -> tuple[type[Exception], ...]:
    from models.bundle import BundleError
    from models.vector_index import VectorIndexError
    from pipeline.result_tables import TableOutputError
    from transforms.catalog import CatalogError

    return UsageError, VectorIndexError, BundleError, CatalogError, TableOutputError


def main(argv: list[str] | None = None) -> None:
    run_reporting(lambda: run(argv), errors)


if __name__ == "__main__":
    main()
    terminal.end_process()
