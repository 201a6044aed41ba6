"""`python -m pipeline.duplicates INDEX [--max_distance D] [--output FILE.parquet]`: the pairs
of near-identical paintings in an index (a scan twice, a crop, a copy re-encoded under
another number), grouped: a group is the paintings that pairs join, directly or through
others. Prints a summary and the closest groups' pairs; --output writes every pair."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from pipeline import terminal
from pipeline.exits import run_reporting
from pipeline.flags import DUPLICATES_COMMAND, UsageError

if TYPE_CHECKING:
    import pyarrow as pa


def run(argv: list[str] | None = None) -> pa.Table:
    args = DUPLICATES_COMMAND.parse(sys.argv[1:] if argv is None else argv)
    from models.vector_index import VectorIndex
    from pipeline.result_tables import duplicates_text, write_table

    index = VectorIndex.load(args.index)
    max_distance = args.max_distance
    if max_distance is None:
        max_distance = index.manifest.embedding.same_picture_distance
    pairs = index.near_pairs(max_distance)
    if args.output:
        write_table(pairs, args.output)
    print(duplicates_text(pairs, max_distance, args.show))
    if args.output:
        print(f"artstyle: {len(pairs):,} pairs written to {args.output}")
    return pairs


def errors() -> tuple[type[Exception], ...]:
    from models.vector_index import VectorIndexError
    from pipeline.result_tables import TableOutputError

    return UsageError, VectorIndexError, TableOutputError


def main(argv: list[str] | None = None) -> None:
    run_reporting(lambda: run(argv), errors)


if __name__ == "__main__":
    main()
    terminal.end_process()
