"""The pipeline over HTTP against the same paintings on disk: is the network's latency hidden?

A server on 127.0.0.1, in this process, serves the benchmark's paintings and holds every
request for a fixed latency before answering, as a distant host or an object store does.
The pipeline (its own process, as a user runs it) reads the same catalog from disk and
from the server; with enough fetches in flight, its rate over HTTP should be close to its
rate from disk, and its memory the same.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from aiohttp import web

from bench.measure import PipelineRun, own_cache, pipeline_rates, run_pipeline

LATENCIES_MS = (50, 200)


@contextmanager
def latency_server(root: Path, latency_s: float) -> Iterator[str]:
    """Serves `root` at the yielded base URL, each answer `latency_s` late."""

    async def serve(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(latency_s)
        path = (root / request.match_info["path"]).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return web.Response(status=404)
        return web.FileResponse(path)

    app = web.Application()
    app.router.add_get("/{path:.+}", serve)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="latency-server", daemon=True)
    thread.start()

    async def start() -> tuple[web.AppRunner, str]:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
        return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"

    runner, url = asyncio.run_coroutine_threadsafe(start(), loop).result()
    try:
        yield url
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def measure_fetch(
    catalog: pd.DataFrame,
    root: Path,
    folder: Path,
    args: Any,
    startup: PipelineRun,
    concurrency: int,
) -> dict[str, Any]:
    """Disk, then HTTP at each latency, over the same `catalog` (absolute paths under `root`).

    The runs are on the default engine, in `folder`'s cache, where `startup` (that engine's
    one-batch run) converted the model already. Each rate leaves out that run's time, the
    fixed cost, as the main figures do. Disk is read before the HTTP runs and again after
    them, and HTTP compared with the mean of the two, so that a shared machine's load
    drifting moves the ratios less. The per-host cap is raised to the concurrency, since
    every request goes to one host here, which a real collection spreads over many or a
    bucket serves at scale.
    """
    flags = [f"--fetch_concurrency={concurrency}", f"--max_connections_per_host={concurrency}"]

    def run(name: str, uris: Sequence[str]) -> PipelineRun:
        path = folder / f"fetch-{name}.csv"
        catalog.assign(uri=list(uris)).to_csv(path, index=False)
        output = folder / f"fetch-{name}"
        return run_pipeline(
            path, output, args.model, args.batch_size, args.precision, flags, own_cache(folder)
        )

    disk_before = run("disk-before", catalog["uri"])
    results: dict[str, Any] = {
        "fetch_images": disk_before.n_images,
        "fetch_engine": disk_before.engine,
        "fetch_concurrency": concurrency,
    }
    for latency_ms in LATENCIES_MS:
        with latency_server(root, latency_ms / 1000) as url:
            uris = [f"{url}/{Path(uri).relative_to(root).as_posix()}" for uri in catalog["uri"]]
            http = run(f"http-{latency_ms}ms", uris)
        results |= {
            f"fetch_http_{latency_ms}ms_images_per_s": pipeline_rates(startup, http)[
                "images_per_s"
            ],
            f"fetch_http_{latency_ms}ms_errors": http.n_errors,
            f"fetch_http_{latency_ms}ms_peak_rss_mb": http.peak_rss_mb,
        }
    disk_after = run("disk-after", catalog["uri"])
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
    for latency_ms in LATENCIES_MS:
        rate = results[f"fetch_http_{latency_ms}ms_images_per_s"]
        results[f"fetch_http_{latency_ms}ms_vs_disk"] = (
            rate / disk_rate if rate and disk_rate else None
        )
    return results
