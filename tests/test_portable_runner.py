"""The pipeline on Beam's PortableRunner, its SDK workers in processes of their own: the
whole graph crosses process boundaries as it must on Flink, Spark or Dataflow, and gives
what the DirectRunner gives."""

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.predict import run
from tests.conftest import CLASSES, COLOURS, painting


@pytest.fixture
def worker_pool() -> Iterator[str]:
    """Beam's Python worker pool on 127.0.0.1, which starts each SDK worker as a process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The pool starts each worker as `python -c ...`: the one on PATH must be this one, with
    # Beam installed, even where its folder was never put on PATH (.venv/bin/python -m pytest).
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    pool = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
         f"--service_port={port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PATH": path},
    )  # fmt: skip
    try:
        yield f"localhost:{port}"
    finally:
        pool.terminate()
        pool.wait(timeout=30)


def predictions(output) -> pd.DataFrame:
    files = [str(path) for path in output.glob("predictions-*.parquet")]
    frame = pq.read_table(files).to_pandas().sort_values("uri").reset_index(drop=True)
    return frame[["uri", "label", "style", "top_k_probabilities", "error"]]


def test_the_portable_runner_predicts_what_the_direct_runner_does(
    tmp_path, tiny_bundle, worker_pool
):
    rows = [(f"{style}-{i}.jpg", style) for style in CLASSES for i in range(2)]
    for name, style in rows:
        painting(tmp_path / name, COLOURS[style], seed=len(name))
    rows.append(("missing.jpg", CLASSES[0]))
    pd.DataFrame(rows, columns=["uri", "style"]).to_csv(tmp_path / "catalog.csv", index=False)
    common = [f"--input={tmp_path / 'catalog.csv'}", f"--model={tiny_bundle}",
              "--batch_size=4", "--top_k=3", "--precision=float32"]  # fmt: skip

    run([*common, f"--output={tmp_path / 'direct'}"])
    run([*common, f"--output={tmp_path / 'portable'}", "--runner=PortableRunner",
         "--job_endpoint=embed", "--environment_type=EXTERNAL",
         f"--environment_config={worker_pool}"])  # fmt: skip

    direct, portable = predictions(tmp_path / "direct"), predictions(tmp_path / "portable")
    assert len(portable) == len(rows) and portable["error"].notna().sum() == 1
    pd.testing.assert_frame_equal(
        direct.drop(columns="top_k_probabilities"), portable.drop(columns="top_k_probabilities")
    )
    for ours, theirs in zip(
        direct["top_k_probabilities"], portable["top_k_probabilities"], strict=True
    ):
        if ours is not None:
            np.testing.assert_allclose(ours, theirs, atol=1e-6)
