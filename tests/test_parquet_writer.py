"""WriteParquet: rows written as they are made, published under Beam's shard names."""

import glob
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.testing.util import assert_that, equal_to

from transforms.parquet import WriteParquet

SCHEMA = pa.schema([pa.field("id", pa.int64()), pa.field("vector", pa.list_(pa.float16()))])


def _row(i: int) -> dict:
    return {"id": i, "vector": np.full(4096, i, np.float16)}  # 8 KB: a row group shows on disk


class _MakeRows(beam.DoFn):
    """Makes `count` rows in one bundle, noting before each how many files the writer has
    begun under `folder`."""

    def __init__(self, count: int, folder: str, seen: str):
        self._count, self._folder, self._seen = count, folder, seen

    def process(self, _):
        for i in range(self._count):
            begun = len(glob.glob(f"{self._folder}/.*/*.parquet"))
            with open(self._seen, "a") as f:
                f.write(f"{begun}\n")
            yield _row(i)


def test_rows_reach_disk_while_the_step_before_is_still_making_them(tmp_path):
    seen = tmp_path / "seen.txt"
    with beam.Pipeline() as pipeline:
        rows = pipeline | beam.Create([None]) | beam.ParDo(_MakeRows(40, str(tmp_path), str(seen)))
        _ = rows | WriteParquet(f"{tmp_path}/rows", SCHEMA, rows_per_group=4)
    begun = [int(line) for line in seen.read_text().split()]
    assert begun[0] == 0 and begun[-1] == 1  # writing began before the last row was made
    table = pq.read_table(glob.glob(f"{tmp_path}/rows-*.parquet"))
    assert sorted(table["id"].to_pylist()) == list(range(40))


def test_branches_are_written_apart_and_published_under_shard_names(tmp_path):
    prefix = f"{tmp_path}/out/rows"
    with beam.Pipeline() as pipeline:
        evens = pipeline | "Evens" >> beam.Create([_row(i) for i in range(0, 10, 2)])
        odds = pipeline | "Odds" >> beam.Create([_row(i) for i in range(1, 10, 2)])
        published = (evens, odds) | WriteParquet(prefix, SCHEMA)
        names = published | beam.Map(lambda paths: [os.path.basename(p) for p in paths])
        assert_that(
            names, equal_to([["rows-00000-of-00002.parquet", "rows-00001-of-00002.parquet"]])
        )
    assert sorted(os.listdir(tmp_path / "out")) == [
        "rows-00000-of-00002.parquet",
        "rows-00001-of-00002.parquet",
    ]  # the folder the bundles wrote in is gone
    table = pq.read_table(glob.glob(f"{prefix}-*.parquet"))
    assert table.schema == SCHEMA and sorted(table["id"].to_pylist()) == list(range(10))


def test_no_rows_is_one_empty_file_with_the_schema(tmp_path):
    with beam.Pipeline() as pipeline:
        _ = pipeline | beam.Create([]) | WriteParquet(f"{tmp_path}/rows", SCHEMA)
    (path,) = glob.glob(f"{tmp_path}/rows-*.parquet")
    assert path.endswith("rows-00000-of-00001.parquet")
    table = pq.read_table(path)
    assert table.num_rows == 0 and table.schema == SCHEMA


def test_a_later_write_replaces_every_shard_of_an_earlier_one_under_its_prefix(tmp_path):
    """Features written again (training without --reuse_features) come in as many shards as
    the run's bundles: an earlier run's shards past their number must not be read with
    them. Files of other prefixes stay."""
    prefix = f"{tmp_path}/rows"
    with beam.Pipeline() as pipeline:
        evens = pipeline | "Evens" >> beam.Create([_row(i) for i in range(0, 10, 2)])
        odds = pipeline | "Odds" >> beam.Create([_row(i) for i in range(1, 10, 2)])
        _ = (evens, odds) | WriteParquet(prefix, SCHEMA)
    (tmp_path / "rows-of-another-kind.parquet").write_bytes(b"")
    (tmp_path / "other-00000-of-00001.parquet").write_bytes(b"")
    with beam.Pipeline() as pipeline:
        _ = pipeline | beam.Create([_row(i) for i in range(20, 23)]) | WriteParquet(prefix, SCHEMA)
    assert sorted(os.listdir(tmp_path)) == [
        "other-00000-of-00001.parquet",
        "rows-00000-of-00001.parquet",
        "rows-of-another-kind.parquet",
    ]
    table = pq.read_table(glob.glob(f"{prefix}-*-of-*.parquet"))
    assert sorted(table["id"].to_pylist()) == [20, 21, 22]
