"""`python -m bench.serve`: the service under load on loopback, against the batch pipeline.

The service runs as its own process (`python -m pipeline.serve`, as in production) on
127.0.0.1. Clients in this process post the benchmark's paintings as image bodies, each
sending its next request when its answer has come: 1, 4 and 16 of them, each level for
--seconds after a short warm-up. A level reports images/s and the p50/p95/p99 latency.

Then one client asking for Grad-CAM's heatmaps too (?heatmap=true): their p50.

Two references, measured in the same run: the model's one-image latency (the classifier
on a batch of one, in this process, before the service starts), and the batch pipeline's
images/s over the same paintings read from disk (`python -m pipeline --engine keras`, the
service's engine, start-up left out as `python -m bench` does). The targets: at 16
clients, at least 0.8 x the pipeline's images/s; at 1 client, a p50 under 2 x the model's
one-image latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pandas as pd

from bench.cli import sample_catalog, table
from bench.flags import DEFAULT_DATA, REPO_ROOT
from bench.measure import _high_water_kb, pipeline_rates, run_pipeline
from models.bundle import DEFAULT_BUNDLE, ModelBundle, load_classifier
from models.precision import PRECISIONS
from pipeline.cli import called_as
from pipeline.serve.config import ServeConfig
from transforms.fetch import read_file
from transforms.images import decode_image
from transforms.model_handler import predict_in_fixed_batches

CLIENT_LEVELS = (1, 4, 16)
WARM_UP_S = 3.0
TARGET_VS_PIPELINE = 0.8  # at the most clients
TARGET_P50_VS_ONE_IMAGE = 2.0  # at one client
SERVER_START_TIMEOUT_S = 300
PIPELINE_BATCH_SIZE = 32  # the pipeline's default --batch_size
HEATMAP_SECONDS = 10.0  # one client asking for Grad-CAM's heatmap too: its latency


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=called_as("bench.serve"), description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default=DEFAULT_BUNDLE, help="A model bundle folder.")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Has catalog.csv.")
    parser.add_argument("--images", type=int, default=256, help="Paintings the clients send.")
    parser.add_argument("--seconds", type=float, default=30.0, help="Each level's length.")
    parser.add_argument(
        "--clients", type=int, nargs="+", default=list(CLIENT_LEVELS), help="The levels."
    )
    service = ServeConfig()  # the service's defaults, so that it is measured as it runs
    parser.add_argument(
        "--max_batch", type=int, default=service.max_batch, help="As the service's flag."
    )
    parser.add_argument(
        "--max_wait_ms", type=float, default=service.max_wait_ms, help="As the service's flag."
    )
    parser.add_argument("--precision", choices=PRECISIONS, default=service.precision)
    parser.add_argument(
        "--pipeline_images", type=int, default=1500, help="The pipeline's larger run."
    )
    parser.add_argument("--output", type=Path, default=None, help="A JSON file to write.")
    return parser.parse_args(argv)


# --- The model alone -----------------------------------------------------------------------


def one_image_latency_s(bundle: ModelBundle, image: np.ndarray, precision: str, runs: int = 30):
    """The median time of the classifier on a batch of one, after a first call that traces."""
    model = load_classifier(bundle.path, None, precision)  # as the service loads it
    batch = image[np.newaxis]
    predict_in_fixed_batches(model, batch, 1)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        predict_in_fixed_batches(model, batch, 1)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


# --- The service ---------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    process: subprocess.Popen

    def peak_rss_mb(self) -> float:
        return _high_water_kb(self.process.pid) / 1024


@contextmanager
def serving(model: str, flags: Sequence[str], log: Path) -> Iterator[Server]:
    """`python -m pipeline.serve` on a free port of 127.0.0.1, once it is ready."""
    port = _free_port()
    command = [sys.executable, "-m", "pipeline.serve", f"--model={model}", f"--port={port}",
               *flags]  # fmt: skip
    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process)
    try:
        asyncio.run(_wait_ready(server, log))
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _wait_ready(server: Server, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"the service exited:\n{log.read_text()[-3000:]}")
            try:
                async with session.get(f"{server.url}/health/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the service was not ready in {SERVER_START_TIMEOUT_S} s")


async def measure_level(
    url: str,
    bodies: Sequence[bytes],
    clients: int,
    seconds: float,
    warm_up_s: float = WARM_UP_S,
    route: str = "/predict",
) -> dict[str, Any]:
    """`clients` clients posting `bodies` in turn, each waiting for its answer before the
    next request, for `warm_up_s` and then `seconds`: the rate of answers in those seconds
    and the latencies of the requests sent in them."""
    loop = asyncio.get_running_loop()
    measuring_from = loop.time() + warm_up_s
    until = measuring_from + seconds
    latencies: list[float] = []
    answered, failed = 0, 0

    async def client(session: aiohttp.ClientSession, first: int) -> None:
        nonlocal answered, failed
        index = first
        while (sent := loop.time()) < until:
            body = bodies[index % len(bodies)]
            index += clients
            async with session.post(
                f"{url}{route}", data=body, headers={"Content-Type": "image/jpeg"}
            ) as response:
                await response.read()
                ok = response.status == 200
            done = loop.time()
            if sent >= measuring_from and done <= until:
                latencies.append(done - sent)
                answered += ok
                failed += not ok

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session, i) for i in range(clients)))
    return {"clients": clients, "images_per_s": answered / seconds, "errors": failed,
            **latency_percentiles(latencies)}  # fmt: skip


def latency_percentiles(latencies: Sequence[float]) -> dict[str, float | None]:
    """p50, p95 and p99 in milliseconds (None without a single latency)."""
    if not latencies:
        return dict.fromkeys(("p50_ms", "p95_ms", "p99_ms"))
    p50, p95, p99 = np.percentile(np.asarray(latencies) * 1e3, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def measure_service(args: argparse.Namespace, bodies: list[bytes], folder: Path) -> dict:
    flags = [f"--max_batch={args.max_batch}", f"--max_wait_ms={args.max_wait_ms}",
             f"--precision={args.precision}"]  # fmt: skip
    with serving(args.model, flags, folder / "serve.log") as server:
        levels = [
            asyncio.run(measure_level(server.url, bodies, clients, args.seconds))
            for clients in args.clients
        ]
        with_heatmaps = asyncio.run(
            measure_level(server.url, bodies, 1, HEATMAP_SECONDS, route="/predict?heatmap=true")
        )
        return {
            "levels": levels,
            "heatmap_p50_ms": with_heatmaps["p50_ms"],
            "service_peak_rss_mb": server.peak_rss_mb(),
        }


# --- The batch pipeline --------------------------------------------------------------------


def measure_pipeline(args: argparse.Namespace, uris: list[str], folder: Path) -> dict:
    """Images/s of `python -m pipeline` over the paintings, start-up left out: a run of one
    batch and a larger one, through the straight line of bench.measure.pipeline_rates. On
    Keras, the service's engine, so that the two differ by serving alone."""

    def run(n: int):
        catalog = folder / f"catalog-{n}.csv"
        pd.DataFrame({"uri": [uris[i % len(uris)] for i in range(n)]}).to_csv(catalog, index=False)
        output = folder / f"run-{n}"
        return run_pipeline(
            catalog, output, args.model, PIPELINE_BATCH_SIZE, args.precision, ["--engine=keras"]
        )

    startup, main = run(PIPELINE_BATCH_SIZE), run(args.pipeline_images)
    return {"pipeline_images_per_s": pipeline_rates(startup, main)["images_per_s"]}


# --- All together --------------------------------------------------------------------------


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    bundle = ModelBundle.load(args.model)
    uris = sample_catalog(args.data, args.images)["uri"].tolist()
    bodies = [read_file(uri) for uri in uris]
    results: dict[str, Any] = {"model": bundle.id, "cpu_count": os.cpu_count(),
                               "load_average_1min_before": os.getloadavg()[0]}  # fmt: skip
    _progress("the model's one-image latency")
    image = decode_image(bodies[0], size=bundle.input_size)
    results["one_image_latency_ms"] = 1e3 * one_image_latency_s(bundle, image, args.precision)
    with tempfile.TemporaryDirectory(prefix="artstyle-bench-serve-") as folder:
        _progress(f"the service at {args.clients} clients, {args.seconds:g} s each")
        results |= measure_service(args, bodies, Path(folder))
        _progress("the batch pipeline over the same paintings")
        results |= measure_pipeline(args, uris, Path(folder))
    results["load_average_1min_after"] = os.getloadavg()[0]
    return results | targets(results)


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The ratios the targets are about, and whether each is met."""
    levels = {level["clients"]: level for level in results["levels"]}
    most, fewest = levels[max(levels)], levels[min(levels)]
    pipeline = results["pipeline_images_per_s"]
    vs_pipeline = most["images_per_s"] / pipeline if pipeline else None
    p50_ratio = (fewest["p50_ms"] or np.inf) / results["one_image_latency_ms"]
    return {
        f"service_vs_pipeline_at_{most['clients']}_clients": vs_pipeline,
        f"p50_at_{fewest['clients']}_client_vs_one_image_latency": p50_ratio,
        "target_vs_pipeline_met": vs_pipeline is not None and vs_pipeline >= TARGET_VS_PIPELINE,
        "target_p50_met": p50_ratio < TARGET_P50_VS_ONE_IMAGE,
    }


def report(results: dict[str, Any]) -> str:
    rows = [f"{'clients':>7} | {'images/s':>8} | {'p50 ms':>7} | {'p95 ms':>7} | {'p99 ms':>7}"]
    for level in results["levels"]:
        rows.append(
            f"{level['clients']:>7} | {level['images_per_s']:>8.1f} | {_ms(level['p50_ms'])} | "
            f"{_ms(level['p95_ms'])} | {_ms(level['p99_ms'])}"
            + (f"  ({level['errors']} errors)" if level["errors"] else "")
        )
    others = {key: value for key, value in results.items() if key != "levels"}
    return "\n".join(rows) + "\n\n" + table(others)


def _ms(value: float | None) -> str:
    return f"{value:>7.1f}" if value is not None else f"{'n/a':>7}"


def _progress(section: str) -> None:
    print(f"bench.serve: measuring {section} ...", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = benchmark(args)
    print(report(results))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
