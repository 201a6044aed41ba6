"""The pipeline over HTTP against the same paintings on disk: is the network's latency hidden?

A server on 127.0.0.1, in this process, serves the benchmark's paintings and holds every
request for a fixed latency before answering, as a distant host or an object store does;
asked to, it also answers the first request for every fifth painting with 503 and
`Retry-After: 1`, as a host under load does. The pipeline (its own process, as a user runs
it) reads the same catalog from disk and from the server. Two questions:

- Once paintings flow, is its rate over HTTP close to its rate from disk? Over
  `--fetch_images` paintings, at 50 and 200 ms a request, and at 200 ms with the faults;
  start-up left out, as the pipeline's own figures do.
- Is a small catalog's whole run (start-up included: what a user waits for) as quick over
  HTTP as from disk? Over the first 100 and 400 rows, from disk, at 200 ms a request, and
  with the faults, in turns.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from aiohttp import web

from bench.measure import PipelineRun, own_cache, pipeline_rates, run_pipeline

LATENCIES_MS = (50, 200)
FAULTS_LATENCY_MS = 200
THROTTLED_EVERY = 5  # the first request for every fifth painting is answered 503
RETRY_AFTER_S = 1
TARGET_VS_DISK = 0.8


@dataclass
class LatencyServer:
    """Where the server is, and what it saw."""

    url: str = ""
    in_flight: int = 0
    most_in_flight: int = 0  # requests it held at once: the pipeline's per-host cap at most
    throttled: set[str] = field(default_factory=set)  # paths answered 503 once already


@contextmanager
def latency_server(
    root: Path, latency_s: float, throttled: Collection[str] = ()
) -> Iterator[LatencyServer]:
    """Serves `root`, each answer `latency_s` late; the first request for each path in
    `throttled` (relative to `root`) is answered 503 with Retry-After."""
    server, throttled = LatencyServer(), frozenset(throttled)

    async def serve(request: web.Request) -> web.StreamResponse:
        server.in_flight += 1
        server.most_in_flight = max(server.most_in_flight, server.in_flight)
        try:
            await asyncio.sleep(latency_s)
            name = request.match_info["path"]
            if name in throttled and name not in server.throttled:
                server.throttled.add(name)
                return web.Response(status=503, headers={"Retry-After": str(RETRY_AFTER_S)})
            path = (root / name).resolve()
            if not path.is_relative_to(root) or not path.is_file():
                return web.Response(status=404)
            return web.FileResponse(path)
        finally:
            server.in_flight -= 1

    app = web.Application()
    app.router.add_get("/{path:.+}", serve)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="latency-server", daemon=True)
    thread.start()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
        server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result()
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


@dataclass(frozen=True)
class Source:
    """Where a run reads the catalog's paintings: disk, or the server at a latency, with
    or without the faults."""

    name: str
    latency_ms: int | None = None  # None: from disk
    faults: bool = False


DISK = Source("disk")
HTTP = Source("http", FAULTS_LATENCY_MS)
HTTP_FAULTS = Source("http_faults", FAULTS_LATENCY_MS, faults=True)


class FetchRuns:
    """Runs of the pipeline over a prefix of `catalog` (absolute paths under `root`), from a
    Source, on the default engine in `folder`'s cache, with `concurrency` fetches in flight.
    The per-host cap is raised to the concurrency, since every request goes to one host
    here, which a real collection spreads over many or a bucket serves at scale."""

    def __init__(
        self, catalog: pd.DataFrame, root: Path, folder: Path, args: Any, concurrency: int
    ):
        self._catalog, self._root, self._folder, self._args = catalog, root, folder, args
        self._flags = [
            f"--fetch_concurrency={concurrency}",
            f"--max_connections_per_host={concurrency}",
        ]
        self._count = 0
        self.most_in_flight = 0

    def __call__(self, source: Source, n: int | None = None) -> PipelineRun:
        rows = self._catalog.head(n) if n is not None else self._catalog
        names = [Path(uri).relative_to(self._root).as_posix() for uri in rows["uri"]]
        if source.latency_ms is None:
            return self._run(source.name, rows)
        throttled = names[::THROTTLED_EVERY] if source.faults else ()
        with latency_server(self._root, source.latency_ms / 1000, throttled) as server:
            uris = [f"{server.url}/{name}" for name in names]
            run = self._run(source.name, rows.assign(uri=uris))
        self.most_in_flight = max(self.most_in_flight, server.most_in_flight)
        return run

    def _run(self, name: str, rows: pd.DataFrame) -> PipelineRun:
        self._count += 1
        path = self._folder / f"fetch-{self._count}-{name}.csv"
        rows.to_csv(path, index=False)
        output = self._folder / f"fetch-{self._count}-{name}"
        args = self._args
        return run_pipeline(
            path,
            output,
            args.model,
            args.batch_size,
            args.precision,
            self._flags,
            own_cache(self._folder),
        )


def measure_fetch(
    catalog: pd.DataFrame,
    root: Path,
    folder: Path,
    args: Any,
    startup: PipelineRun,
    concurrency: int,
) -> dict[str, Any]:
    """Both questions of the module's note, over `catalog`'s paintings.

    The runs are on the default engine, in `folder`'s cache, where `startup` (that engine's
    one-batch run) converted the model already; the rates leave out that run's time, the
    fixed cost, as the main figures do. Disk is read before the HTTP runs and again after
    them, and HTTP compared with the mean of the two, so that a shared machine's load
    drifting moves the ratios less. Then the small catalogs, each in `args.fetch_rounds`.
    """
    run = FetchRuns(catalog, root, folder, args, concurrency)
    disk_before = run(DISK)
    results: dict[str, Any] = {
        "fetch_images": disk_before.n_images,
        "fetch_engine": disk_before.engine,
        "fetch_concurrency": concurrency,
        "fetch_throttled_every": THROTTLED_EVERY,
    }
    sources = {f"http_{ms}ms": Source("http", ms) for ms in LATENCIES_MS}
    sources[f"http_{FAULTS_LATENCY_MS}ms_faults"] = HTTP_FAULTS
    for key, source in sources.items():
        http = run(source)
        results |= {
            f"fetch_{key}_images_per_s": pipeline_rates(startup, http)["images_per_s"],
            f"fetch_{key}_errors": http.n_errors,
            f"fetch_{key}_peak_rss_mb": http.peak_rss_mb,
        }
    disk_after = run(DISK)
    disk_rates = [
        pipeline_rates(startup, disk)["images_per_s"] for disk in (disk_before, disk_after)
    ]
    measured = [rate for rate in disk_rates if rate is not None]
    disk_rate = sum(measured) / 2 if len(measured) == 2 else None
    results |= {
        "fetch_disk_images_per_s_before": disk_rates[0],
        "fetch_disk_images_per_s_after": disk_rates[1],
        "fetch_disk_images_per_s": disk_rate,
        "fetch_disk_peak_rss_mb": max(disk_before.peak_rss_mb, disk_after.peak_rss_mb),
    }
    for key in sources:
        rate = results[f"fetch_{key}_images_per_s"]
        results[f"fetch_{key}_vs_disk"] = rate / disk_rate if rate and disk_rate else None
    for n in args.fetch_small_catalogs:
        results |= measure_small_catalog(run, n, args.fetch_rounds)
    results["fetch_most_in_flight"] = run.most_in_flight
    return results


def measure_small_catalog(
    run: Callable[[Source, int], PipelineRun], n: int, rounds: int
) -> dict[str, Any]:
    """Whole runs over the first `n` rows from disk, over HTTP and over HTTP with the
    faults, in turns: each round runs the three in a rotated order, so that none always
    goes first on a machine whose load drifts, and each HTTP run is set against that
    round's disk run. The figures are the medians over the rounds."""
    sources: Sequence[Source] = (DISK, HTTP, HTTP_FAULTS)
    runs: dict[str, list[PipelineRun]] = defaultdict(list)
    for turn in range(rounds):
        for source in (*sources[turn % 3 :], *sources[: turn % 3]):
            runs[source.name].append(run(source, n))
    key = f"fetch_{n}_rows"
    results: dict[str, Any] = {f"{key}_images": runs[DISK.name][0].n_images}
    for source in sources:
        walls = [one.wall_s for one in runs[source.name]]
        results[f"{key}_{source.name}_s"] = float(np.median(walls))
        results[f"{key}_{source.name}_runs_s"] = walls
        results[f"{key}_{source.name}_errors"] = max(one.n_errors for one in runs[source.name])
        results[f"{key}_{source.name}_peak_rss_mb"] = max(
            one.peak_rss_mb for one in runs[source.name]
        )
        if source is not DISK:
            ratios = [
                disk.wall_s / http.wall_s
                for disk, http in zip(runs[DISK.name], runs[source.name], strict=True)
            ]
            results[f"{key}_{source.name}_vs_disk"] = float(np.median(ratios))
    return results
