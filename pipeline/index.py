"""`python -m pipeline.index OUT_DIR... --output INDEX [--add | --replace]`: a nearest-neighbour
index of the paintings of one or more runs (their embeddings-*.parquet), or more of them
added to an index.

Every run is checked before any work (its files' footers: one model, one embedding, one
dimension, and the index's), so that a wrong folder is one line and exit status 2 with the
index untouched. Runs are added in the order given; a painting whose URI the index holds
already, from an earlier run, keeps its item, so building from A and B is the same as
building from A then adding B, and adding a run twice adds nothing. The index is written
as models.vector_index saves it: interrupted, it is the index it was.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from models.embedding import STORED_DTYPE
from pipeline import terminal
from pipeline.exits import run_reporting
from pipeline.flags import INDEX_COMMAND, UsageError

if TYPE_CHECKING:  # loaded once the flags are read: --help answers at once
    import numpy as np
    import pyarrow as pa

    from models.vector_index import RunRecord, VectorIndex
    from transforms.embeddings import EmbeddingsOrigin, RunEmbeddings


def run(argv: list[str] | None = None) -> VectorIndex:
    args = INDEX_COMMAND.parse(sys.argv[1:] if argv is None else argv)
    from models.vector_index import VectorIndex, writing
    from transforms.embeddings import EmbeddingsOrigin, open_run_embeddings

    _check_output(args)
    runs = [open_run_embeddings(folder) for folder in args.runs]
    for one in runs[1:]:
        _check_same_vectors(one, runs[0].origin, f"the first run, {runs[0].folder},")
    with writing(args.output):
        index = VectorIndex.load(args.output) if args.add else None
        if index is not None:
            manifest = index.manifest
            _check_same_vectors(runs[0], EmbeddingsOrigin(manifest.model_id, manifest.embedding),
                                f"the index {args.output}")  # fmt: skip
        known_uris = set(index.items.column("uri").to_pylist()) if index is not None else set()
        vectors, items, records = new_paintings(runs, known_uris)
        if index is None:
            index = new_index(runs[0].origin, args.search or "auto", len(vectors))
        index.add(vectors, items)
        for record in records:
            index.record_run(record)
            print(f"artstyle: {_describe_added(record)}")
        written = len(vectors) > 0 or not args.add
        if written:
            index.save(args.output)
    print(f"artstyle: {_describe_index(index, args.output, written)}")
    return index


def new_paintings(
    runs: list[RunEmbeddings], known_uris: set[str]
) -> tuple[np.ndarray, pa.Table, list[RunRecord]]:
    """The runs' paintings whose URIs are not in `known_uris` nor in an earlier run: their
    vectors as stored (float16: 1 KB a painting at 512 dimensions), their items' columns,
    and what each run gave. Rows of one run that share a URI are all kept."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from models.vector_index import ITEM_COLUMNS, RunRecord

    dimension = runs[0].origin.embedding.dimension
    vectors = np.empty((sum(one.n_rows for one in runs), dimension), STORED_DTYPE)
    tables, records, count = [], [], 0
    for one in runs:
        known = pa.array(sorted(known_uris), pa.string())
        added = 0
        for batch_vectors, rows in one.batches(ITEM_COLUMNS):
            uris = rows.column("uri")
            is_new = pc.invert(pc.is_in(uris, value_set=known)).to_numpy(zero_copy_only=False)
            kept = int(is_new.sum())
            vectors[count : count + kept] = batch_vectors[is_new]
            tables.append(pa.Table.from_batches([rows.filter(is_new)]))
            count, added = count + kept, added + kept
            known_uris.update(uri for uri in uris.to_pylist() if uri is not None)
        records.append(RunRecord(one.folder, added, one.n_rows - added))
    items = pa.concat_tables(tables, promote_options="permissive")
    return vectors[:count], items, records


def new_index(origin: EmbeddingsOrigin, search: str, n_items: int) -> VectorIndex:
    """An empty index for `origin`'s vectors, exact or approximate as `search` (a value of
    --search) chooses for `n_items` paintings."""
    from models.vector_index import VectorIndex, chosen_parameters

    return VectorIndex.new(origin.model_id, origin.embedding, chosen_parameters(search, n_items))


def _check_output(args: argparse.Namespace) -> None:
    """What --output holds must be what --add or --replace (or neither) expects."""
    from models.vector_index import foreign_files, is_index

    if args.add and args.search:
        raise UsageError("--search chooses a new index's search: --add keeps the index's own")
    if is_index(args.output):
        if not (args.add or args.replace):
            raise UsageError(
                f"{args.output} is an index already: --add adds the runs to it, --replace "
                "builds it anew"
            )
        return
    if args.add:
        raise UsageError(f"there is no index at {args.output} to add to (leave out --add "
                         "to build one)")  # fmt: skip
    others = foreign_files(args.output)
    if others:
        raise UsageError(
            f"{args.output} is a folder of other files ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}), not an index: choose another --output"
        )


def _check_same_vectors(embeddings: RunEmbeddings, origin: EmbeddingsOrigin, whose: str) -> None:
    """Vectors of different models (or of one model's different embeddings) do not compare."""
    from models.vector_index import VectorIndexError

    if embeddings.origin != origin:
        raise VectorIndexError(
            f"{embeddings.folder} holds embeddings of {embeddings.origin.describe()}, "
            f"{whose} of {origin.describe()}: vectors of different models do not compare"
        )


def _describe_added(record: RunRecord) -> str:
    skipped = (
        f" ({record.skipped:,} already in the index by URI, kept as they were)"
        if record.skipped
        else ""
    )
    return f"{record.path}: {record.added:,} paintings added{skipped}"


def _describe_index(index: VectorIndex, output: str, written: bool) -> str:
    from models.vector_index import EXACT_LIMIT
    from transforms.embeddings import EmbeddingsOrigin

    manifest = index.manifest
    search = "exact search" if manifest.approximate is None else "approximate search (IVF)"
    state = f"index written to {output}" if written else f"nothing added: {output} is as it was"
    origin = EmbeddingsOrigin(manifest.model_id, manifest.embedding)
    line = f"{state}: {index.size:,} paintings, {search}, {origin.describe()}"
    if manifest.approximate is None and index.size > EXACT_LIMIT:
        line += (
            f"; past {EXACT_LIMIT:,} paintings exact search slows down: --replace "
            "--search approximate builds an approximate one"
        )
    return line


def errors() -> tuple[type[Exception], ...]:
    from models.vector_index import VectorIndexError
    from transforms.embeddings import EmbeddingsError

    return UsageError, VectorIndexError, EmbeddingsError


INTERRUPTED = "artstyle: interrupted; the index is as it was before"


def main(argv: list[str] | None = None) -> None:
    run_reporting(lambda: run(argv), errors, interrupted=INTERRUPTED)


if __name__ == "__main__":
    main()
    terminal.end_process()
