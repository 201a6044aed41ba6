"""`python -m bench.serve`: the service under load on loopback, against the batch pipeline on
the same engine, and against the service on Keras.

The service runs as its own process (`python -m pipeline.serve`, as in production) on
127.0.0.1, on the engine it chooses by default (--engine). Clients in this process post the
benchmark's paintings as image bodies, each sending its next request when its answer has
come: 1, 4 and 16 of them, each level for --seconds after a short warm-up. A level reports
images/s, the p50/p95/p99 latency, and the service process's CPU time per image. The
service's start-up is timed from its process's start until /health/ready answers (its
first on this machine, which compiles what it runs, and a restart), and its peak resident
memory is read before any heatmap is asked for. Then one client asks for Grad-CAM's
heatmaps too (?heatmap=true): the first answer's latency (on OpenVINO it loads Grad-CAM, on
Keras), the p50 after it, and the memory with Grad-CAM loaded. The service's answers for
the first paintings are set beside the pipeline's rows for the same files.

The references, measured in the same run:

- the batch pipeline's images/s over the same paintings read from disk, on the same engine
  in the same arithmetic (`python -m pipeline`, start-up left out as `python -m bench`
  does), in --rounds turns with the service at the most clients, so that the machine's
  load, which drifts where it is shared, weighs on both alike;
- the model's one-image latency: the service's classifier for one image, in this process;
- the service on Keras (`--engine keras`, as it ran before it had an engine of its choice,
  with Grad-CAM loaded at start-up): its start-up, and its peak memory at the most clients.

Every run uses a cache folder of its own: the pipeline's first run converts the model for
OpenVINO and times the arithmetic, as a user's first run does, and everything after reads
them. The targets: ready in under TARGET_READY_S on the default engine (a restart); at
most TARGET_MEMORY_VS_KERAS x the Keras service's peak memory; at the most clients at
least TARGET_VS_PIPELINE x the pipeline's images/s; at one client a p50 under
TARGET_P50_VS_ONE_IMAGE x the one-image latency.
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pandas as pd

from bench.cli import sample_catalog, table
from bench.flags import DATA, REPO_ROOT
from bench.measure import PipelineRun, _high_water_kb, own_cache, pipeline_rates, run_pipeline
from models.bundle import ModelBundle
from models.engine_choice import choose_engine
from models.fixed_batches import predict_in_fixed_batches
from pipeline.cli import called_as
from pipeline.flags import ENGINE, MODEL, PRECISION, add
from pipeline.serve.config import ServeConfig
from pipeline.serve.service import load_classifiers, service_precision
from transforms.fetch import read_file
from transforms.images import decode_image

CLIENT_LEVELS = (1, 4, 16)
WARM_UP_S = 3.0
TARGET_READY_S = 5.0  # on the default engine
TARGET_MEMORY_VS_KERAS = 0.6  # peak, before any heatmap
TARGET_VS_PIPELINE = 0.9  # at the most clients
TARGET_P50_VS_ONE_IMAGE = 2.0  # at one client
SERVER_START_TIMEOUT_S = 300
PIPELINE_BATCH_SIZE = 32  # the pipeline's default --batch_size
HEATMAP_SECONDS = 10.0  # one client asking for Grad-CAM's heatmap too: its latency
COMPARED_IMAGES = 32  # the service's answers set beside the pipeline's rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=called_as("bench.serve"), description=__doc__.split("\n")[0]
    )
    add(parser, MODEL, DATA)
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
    add(
        parser,
        PRECISION,
        ENGINE.but(
            "Here: the service's and the pipeline's (the Keras service is measured besides)."
        ),
    )
    parser.add_argument(
        "--pipeline_images", type=int, default=1500, help="The pipeline's larger runs."
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="Turns of the pipeline's larger run and the service at the most clients.",
    )
    parser.add_argument("--output", type=Path, default=None, help="A JSON file to write.")
    return parser.parse_args(argv)


# --- The machine's load --------------------------------------------------------------------


@dataclass
class LoadLog:
    """The 1-minute load average around each section: the machine may be shared."""

    sections: dict[str, list[float]] = field(default_factory=dict)

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        print(f"bench.serve: measuring {name} ...", file=sys.stderr, flush=True)
        before = os.getloadavg()[0]
        yield
        self.sections[name] = [before, os.getloadavg()[0]]


# --- The model alone -----------------------------------------------------------------------


def one_image_latency_s(predict: Callable[[np.ndarray], Any], image: np.ndarray, runs: int = 30):
    """The median time of `predict` on a batch of one, after a first call (a trace)."""
    batch = image[np.newaxis]
    predict(batch)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        predict(batch)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


# --- The service ---------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    ready_s: float = 0.0  # from just before the process starts until /health/ready says 200

    def peak_rss_mb(self) -> float:
        return _high_water_kb(self.process.pid) / 1024

    def cpu_s(self) -> float:
        """User and system time of all its threads so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@contextmanager
def serving(model: str, flags: Sequence[str], log: Path) -> Iterator[Server]:
    """`python -m pipeline.serve` on a free port of 127.0.0.1, once it is ready."""
    port = _free_port()
    command = [sys.executable, "-m", "pipeline.serve", f"--model={model}", f"--port={port}",
               *flags]  # fmt: skip
    started = time.perf_counter()
    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process)
    try:
        asyncio.run(_wait_ready(server, log))
        server.ready_s = time.perf_counter() - started
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
            await asyncio.sleep(0.02)
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


async def answers(url: str, bodies: Sequence[bytes], route: str = "/predict") -> list[dict]:
    """One answer per body, one request at a time."""
    results = []
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            async with session.post(
                f"{url}{route}", data=body, headers={"Content-Type": "image/jpeg"}
            ) as response:
                response.raise_for_status()
                results.append(await response.json())
    return results


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def service_flags(args: argparse.Namespace, engine: str) -> list[str]:
    return [f"--max_batch={args.max_batch}", f"--max_wait_ms={args.max_wait_ms}",
            f"--precision={args.precision}", f"--engine={engine}"]  # fmt: skip


def measure_service(
    args: argparse.Namespace,
    bodies: list[bytes],
    folder: Path,
    load: LoadLog,
    pipeline: PipelineRuns,
) -> dict[str, Any]:
    """The service on --engine: its start-up (the first on this machine, which compiles what
    it runs, and a restart), the levels, memory, its first answers, heatmaps. The level at
    the most clients takes --rounds turns with the pipeline's larger run, which the service
    sits through idle: a shared machine's load, which drifts, then weighs on both alike."""
    flags = service_flags(args, args.engine)
    first_log, log = folder / "serve-first.log", folder / "serve.log"
    with (
        load.section("the service's first start-up"),
        serving(args.model, flags, first_log) as first,
    ):
        results: dict[str, Any] = {"first_ready_s": first.ready_s}
    with serving(args.model, flags, log) as server:
        results["ready_s"] = server.ready_s
        *fewer, most = sorted(args.clients)
        levels = [measure_service_level(server, bodies, clients, args.seconds, load)
                  for clients in fewer]  # fmt: skip
        turns, pipeline_runs = [], []
        for turn in range(1, args.rounds + 1):
            with load.section(f"turn {turn}: the pipeline over {args.pipeline_images} paintings"):
                pipeline_runs.append(pipeline.run(args.pipeline_images, f"turn-{turn}"))
            turns.append(measure_service_level(server, bodies, most, args.seconds, load))
        results["levels"] = [*levels, summary_of_turns(turns)]
        results["pipeline_runs"] = pipeline_runs
        results["service_peak_rss_mb"] = server.peak_rss_mb()
        results["answers"] = asyncio.run(answers(server.url, bodies[:COMPARED_IMAGES]))
        heatmap = "/predict?heatmap=true"
        with load.section("the first heatmap, and heatmaps at one client"):
            first_s, shown = timed(lambda: asyncio.run(answers(server.url, bodies[:1], heatmap)))
            with_heatmaps = asyncio.run(
                measure_level(server.url, bodies, 1, HEATMAP_SECONDS, route=heatmap)
            )
        results["first_heatmap_s"] = first_s if "heatmap" in shown[0] else None
        results["heatmap_p50_ms"] = with_heatmaps["p50_ms"]
        results["service_peak_rss_with_heatmaps_mb"] = server.peak_rss_mb()
    return results


def measure_service_level(
    server: Server, bodies: list[bytes], clients: int, seconds: float, load: LoadLog
) -> dict[str, Any]:
    """A level, and the service process's CPU time per answer in it (its warm-up too)."""
    with load.section(f"the service at {clients} clients, {seconds:g} s"):
        cpu_before = server.cpu_s()
        level = asyncio.run(measure_level(server.url, bodies, clients, seconds))
        answered = level["images_per_s"] * (seconds + WARM_UP_S)
        cpu_ms = 1e3 * (server.cpu_s() - cpu_before) / answered if answered else None
    return level | {"service_cpu_ms_per_image": cpu_ms}


def summary_of_turns(turns: list[dict[str, Any]]) -> dict[str, Any]:
    """One level measured in several turns: the mean rate, the median of each other figure,
    and the turns themselves."""
    summary: dict[str, Any] = {"clients": turns[0]["clients"]}
    summary["images_per_s"] = float(np.mean([turn["images_per_s"] for turn in turns]))
    summary["errors"] = sum(turn["errors"] for turn in turns)
    for key in ("p50_ms", "p95_ms", "p99_ms", "service_cpu_ms_per_image"):
        known = [turn[key] for turn in turns if turn[key] is not None]
        summary[key] = float(np.median(known)) if known else None
    return summary | {"turns": turns}


def measure_keras_service(
    args: argparse.Namespace, bundle: ModelBundle, bodies: list[bytes], folder: Path, load: LoadLog
) -> dict[str, Any]:
    """The service on Keras, as it runs by default there (Grad-CAM loaded at start-up): its
    start-up, and its peak memory at the most clients. Its arithmetic is timed first, here
    (as on a machine where a Keras process has run before), so that the service does not
    build its model twice."""
    with load.section("the Keras arithmetic, timed once on this machine"):
        service_precision(bundle, "keras", args.precision, (1,))
    clients = max(args.clients)
    flags, log = service_flags(args, "keras"), folder / "serve-keras.log"
    section = load.section(f"the service on Keras: start-up, {clients} clients")
    with section, serving(args.model, flags, log) as server:
        level = asyncio.run(measure_level(server.url, bodies, clients, args.seconds))
        return {
            "keras_service_ready_s": server.ready_s,
            f"keras_service_images_per_s_at_{clients}_clients": level["images_per_s"],
            "keras_service_peak_rss_mb": server.peak_rss_mb(),
        }


# --- The batch pipeline --------------------------------------------------------------------


@dataclass
class PipelineRuns:
    """`python -m pipeline` over the benchmark's paintings on the service's engine: a run of
    one batch (start-up) and larger ones, whose rates leave the start-up out through the
    straight line of bench.measure.pipeline_rates."""

    args: argparse.Namespace
    uris: list[str]
    folder: Path

    def run(self, n: int, name: str) -> PipelineRun:
        catalog = self.folder / f"catalog-{n}.csv"
        uris = [self.uris[i % len(self.uris)] for i in range(n)]
        pd.DataFrame({"uri": uris}).to_csv(catalog, index=False)
        return run_pipeline(
            catalog,
            self.folder / name,
            self.args.model,
            PIPELINE_BATCH_SIZE,
            self.args.precision,
            [f"--engine={self.args.engine}"],
        )

    def rows(self, name: str) -> pd.DataFrame:
        files = sorted((self.folder / name).glob("predictions-*.parquet"))
        return pd.concat(map(pd.read_parquet, files)).set_index("uri")


def compare_with_pipeline(
    service_answers: list[dict], uris: list[str], rows: pd.DataFrame
) -> dict[str, Any]:
    """The largest difference in a listed probability between the service's answer and the
    pipeline's row for the same painting, and whether they list the same styles."""
    differences, same_styles = [], True
    for answer, uri in zip(service_answers, uris, strict=False):
        row = rows.loc[uri]
        same_styles &= answer["top_k_styles"] == list(row["top_k_styles"])
        differences.append(
            np.max(np.abs(np.subtract(answer["top_k_probabilities"], row["top_k_probabilities"])))
        )
    return {
        "compared_images": len(differences),
        "max_abs_diff_vs_pipeline": float(max(differences)),
        "same_styles_as_pipeline": bool(same_styles),
    }


# --- All together --------------------------------------------------------------------------


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    bundle = ModelBundle.load(args.model)
    uris = sample_catalog(args.data, args.images)["uri"].tolist()
    bodies = [read_file(uri) for uri in uris]
    load = LoadLog()
    results: dict[str, Any] = {"model": bundle.id, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="artstyle-bench-serve-") as name:
        folder = Path(name)
        os.environ.update(own_cache(folder))  # for the processes started here, and this one
        pipeline = PipelineRuns(args, uris, folder)
        with load.section("the pipeline's first run (converting the model, timing precisions)"):
            first = pipeline.run(PIPELINE_BATCH_SIZE, "first")
        results |= {"engine": first.engine, "precision": first.precision}
        with load.section("the pipeline's start-up"):
            startup = pipeline.run(PIPELINE_BATCH_SIZE, "startup")
        with load.section("the model's one-image latency"):
            results["one_image_latency_ms"] = 1e3 * model_latency_s(args, bundle, bodies[0])
        service = measure_service(args, bodies, folder, load, pipeline)
        results |= pipeline_results(startup, service.pop("pipeline_runs"))
        results |= {key: value for key, value in service.items() if key != "answers"}
        results |= compare_with_pipeline(service["answers"], uris, pipeline.rows("first"))
        results |= measure_keras_service(args, bundle, bodies, folder, load)
    results["load_average_1min"] = load.sections
    return results | targets(results)


def model_latency_s(args: argparse.Namespace, bundle: ModelBundle, body: bytes) -> float:
    """The service's classifier for one image, loaded as the service loads it."""
    engine = choose_engine(args.engine, on_this_machine=True).engine
    precision = service_precision(bundle, engine, args.precision, (1,)).precision
    model = load_classifiers(bundle, engine, precision, (1,))[1]
    image = decode_image(body, size=bundle.input_size)
    return one_image_latency_s(lambda batch: predict_in_fixed_batches(model, batch, 1), image)


def pipeline_results(startup: PipelineRun, runs: list[PipelineRun]) -> dict[str, Any]:
    """The pipeline's rate in each turn (start-up left out), their mean, and its CPU time per
    image and peak memory."""
    rates = [pipeline_rates(startup, run) for run in runs]
    images_per_s = [rate["images_per_s"] for rate in rates if rate["images_per_s"] is not None]
    cpu_ms = [rate["cpu_ms_per_image"] for rate in rates if rate["cpu_ms_per_image"] is not None]
    return {
        "pipeline_images_per_s_in_turns": [rate["images_per_s"] for rate in rates],
        "pipeline_images_per_s": float(np.mean(images_per_s)) if images_per_s else None,
        "pipeline_cpu_ms_per_image": float(np.median(cpu_ms)) if cpu_ms else None,
        "pipeline_peak_rss_mb": max(run.peak_rss_mb for run in runs),
    }


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The ratios the targets are about, and whether each is met."""
    levels = {level["clients"]: level for level in results["levels"]}
    most, fewest = levels[max(levels)], levels[min(levels)]
    pipeline = results["pipeline_images_per_s"]
    vs_pipeline = most["images_per_s"] / pipeline if pipeline else None
    p50_ratio = (fewest["p50_ms"] or np.inf) / results["one_image_latency_ms"]
    memory_ratio = results["service_peak_rss_mb"] / results["keras_service_peak_rss_mb"]
    return {
        f"service_vs_pipeline_at_{most['clients']}_clients": vs_pipeline,
        f"p50_at_{fewest['clients']}_client_vs_one_image_latency": p50_ratio,
        "peak_rss_vs_keras_service": memory_ratio,
        "target_ready_met": results["ready_s"] < TARGET_READY_S,
        "target_memory_met": memory_ratio <= TARGET_MEMORY_VS_KERAS,
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
    others = {key: value for key, value in results.items()
              if key not in ("levels", "load_average_1min")}  # fmt: skip
    loads = "\n".join(
        f"  {section}: {before:.1f} -> {after:.1f}"
        for section, (before, after) in results["load_average_1min"].items()
    )
    return "\n".join(rows) + "\n\n" + table(others) + "\n\nload average (1 min):\n" + loads


def _ms(value: float | None) -> str:
    return f"{value:>7.1f}" if value is not None else f"{'n/a':>7}"


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
