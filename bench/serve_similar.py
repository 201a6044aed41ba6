"""`python -m bench.serve_similar`: POST /similar against POST /predict, on one service.

A run of the pipeline with --embeddings over --images paintings of --data (as a user runs
it), their index (python -m pipeline.index), and the service started on them with --index
(`python -m pipeline.serve`, its own process on 127.0.0.1, on --engine). Other paintings
of --data, not in the index, are the queries. One client posts them, each request when the
answer before it has come, to /predict and to /similar (k = --k) in turns of --seconds,
--rounds times each, so that a shared machine's drifting load weighs on both alike; the
figure is each route's median p50 over its turns. The service without --index, started
beside it and idle meanwhile, answers /predict in the same turns: what the classifier's
second output (the embedding) costs a prediction.

Also: whether every indexed painting queried finds itself first, and what the page's
thumbnails cost, each read, decoded and encoded the first time and from the cache after.

The target: /similar's p50 at most TARGET_VS_PREDICT x /predict's on the same service.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.cli import sample_catalog, table
from bench.flags import DATA, JSON_OUTPUT
from bench.measure import PipelineRun, own_cache, run_pipeline, run_process, write_results
from bench.serve import LoadLog, Server, answers, measure_level, serving
from models.bundle import ModelBundle
from pipeline.cli import called_as
from pipeline.flags import ENGINE, MODEL, PRECISION, add
from transforms.fetch import read_file

TARGET_VS_PREDICT = 1.2
PIPELINE_BATCH_SIZE = 32
SELF_QUERIES = 20  # indexed paintings queried, each expected to find itself first


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=called_as("bench.serve_similar"), description=__doc__.split("\n")[0]
    )
    add(parser, JSON_OUTPUT, MODEL, DATA, PRECISION, ENGINE)
    parser.add_argument("--images", type=int, default=300, help="Paintings in the index.")
    parser.add_argument("--queries", type=int, default=64, help="Paintings posted as queries.")
    parser.add_argument("-k", type=int, default=10, help="Neighbours asked for (the page's).")
    parser.add_argument("--seconds", type=float, default=20.0, help="Each turn's length.")
    parser.add_argument("--rounds", type=int, default=3, help="Turns of each route.")
    return parser.parse_args(argv)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    bundle = ModelBundle.load(args.model)
    bundle.check_embedding()
    rows = sample_catalog(args.data, args.images + args.queries)
    indexed, queries = rows.iloc[: args.images], rows.iloc[args.images :]
    bodies = [read_file(uri) for uri in queries["uri"]]
    load = LoadLog()
    results: dict[str, Any] = {"model": bundle.id, "cpu_count": os.cpu_count(),
                               "indexed_paintings": len(indexed), "k": args.k}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="artstyle-bench-serve-similar-") as name:
        folder = Path(name)
        os.environ.update(own_cache(folder))  # for the processes started here
        index, run = build_index(args, indexed, folder, load)
        results |= {"engine": run.engine, "precision": run.precision}  # the service's too
        flags = [f"--precision={args.precision}", f"--engine={args.engine}", "--no_heatmaps"]
        with (
            serving(args.model, [*flags, f"--index={index}"], folder / "serve.log") as similar,
            serving(args.model, flags, folder / "serve-plain.log") as plain,
        ):
            results["ready_s_with_index"] = similar.ready_s
            results |= measure_turns(args, similar, plain, bodies, load)
            results |= check_self_found(similar, indexed["uri"].tolist()[:SELF_QUERIES], args.k)
            results |= measure_thumbnails(similar, bodies[0], args.k, load)
    results["load_average_1min"] = load.sections
    return results | targets(results)


def build_index(
    args: argparse.Namespace, indexed, folder: Path, load: LoadLog
) -> tuple[Path, PipelineRun]:
    """The pipeline with --embeddings over the indexed paintings, then their index."""
    catalog = folder / "catalog.csv"
    indexed.to_csv(catalog, index=False)
    with load.section(f"the pipeline with --embeddings over {len(indexed)} paintings"):
        run = run_pipeline(catalog, folder / "run", args.model, PIPELINE_BATCH_SIZE,
                           args.precision, ["--embeddings", f"--engine={args.engine}"])  # fmt: skip
    assert run.n_errors == 0, f"{run.n_errors} paintings could not be predicted"
    index = folder / "index"
    command = [sys.executable, "-m", "pipeline.index", str(folder / "run"), f"--output={index}"]
    with load.section("the index"):
        run_process(command, folder / "index.log")
    return index, run


def measure_turns(
    args: argparse.Namespace, similar: Server, plain: Server, bodies: list[bytes], load: LoadLog
) -> dict[str, Any]:
    """One client, in turns: /predict and /similar on the service with --index, and
    /predict on the one without; each figure the median of its turns'."""
    routes = {
        "predict": (similar, "/predict"),
        "similar": (similar, f"/similar?k={args.k}"),
        "predict_without_index": (plain, "/predict"),
    }
    turns: dict[str, list[dict[str, Any]]] = {name: [] for name in routes}
    for turn in range(1, args.rounds + 1):
        for name, (server, route) in routes.items():
            with load.section(f"turn {turn}: {name}, one client, {args.seconds:g} s"):
                level = asyncio.run(measure_level(server.url, bodies, 1, args.seconds, route=route))
            turns[name].append(level)
    results: dict[str, Any] = {}
    for name, levels in turns.items():
        for key in ("p50_ms", "p95_ms", "images_per_s"):
            known = [level[key] for level in levels if level[key] is not None]
            results[f"{name}_{key}"] = float(np.median(known)) if known else None
        results[f"{name}_p50_ms_in_turns"] = [level["p50_ms"] for level in levels]
        results[f"{name}_errors"] = sum(level["errors"] for level in levels)
    return results


def check_self_found(server: Server, uris: list[str], k: int) -> dict[str, Any]:
    """Indexed paintings as queries: the share that find themselves first."""
    found = asyncio.run(answers(server.url, [read_file(uri) for uri in uris], f"/similar?k={k}"))
    firsts = [answer["neighbours"][0] for answer in found]
    return {
        "self_found_first": float(
            np.mean([n["uri"] == u for n, u in zip(firsts, uris, strict=True)])
        ),
        "self_distance_max": float(max(n["distance"] for n in firsts)),
    }


def measure_thumbnails(server: Server, body: bytes, k: int, load: LoadLog) -> dict[str, Any]:
    """The thumbnails of one answer's neighbours, as the page asks for them (all at once):
    first read, decoded and encoded, then from the cache."""

    async def fetch_all(paths: list[str]) -> float:
        async with aiohttp.ClientSession() as session:

            async def one(path: str) -> None:
                async with session.get(f"{server.url}{path}") as response:
                    assert response.status == 200, await response.text()
                    await response.read()

            started = time.perf_counter()
            await asyncio.gather(*(one(path) for path in paths))
            return time.perf_counter() - started

    (answer,) = asyncio.run(answers(server.url, [body], f"/similar?k={k}"))
    paths = [neighbour["thumbnail"] for neighbour in answer["neighbours"]]
    with load.section(f"{len(paths)} thumbnails, then again"):
        first_s = asyncio.run(fetch_all(paths))
        cached_s = asyncio.run(fetch_all(paths))
    return {"thumbnails": len(paths), "thumbnails_first_ms": 1e3 * first_s,
            "thumbnails_cached_ms": 1e3 * cached_s}  # fmt: skip


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """/similar's p50 against /predict's on the same service, and the embedding's cost to a
    prediction (the service with --index against the one without)."""
    predict, similar = results["predict_p50_ms"], results["similar_p50_ms"]
    ratio = similar / predict if predict and similar else None
    without = results["predict_without_index_p50_ms"]
    return {
        "similar_p50_vs_predict_p50": ratio,
        "predict_p50_with_index_vs_without": predict / without if predict and without else None,
        "target_similar_vs_predict_met": ratio is not None and ratio <= TARGET_VS_PREDICT,
    }


def report(results: dict[str, Any]) -> str:
    loads = "\n".join(
        f"  {section}: {before:.1f} -> {after:.1f}"
        for section, (before, after) in results["load_average_1min"].items()
    )
    others = {key: value for key, value in results.items() if key != "load_average_1min"}
    return table(others) + "\n\nload average (1 min):\n" + loads


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = benchmark(args)
    print(report(results))
    write_results(results, Path(args.output))
    return results


if __name__ == "__main__":
    main()
