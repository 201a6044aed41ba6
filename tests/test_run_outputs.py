"""Whole runs and their output folder: reruns, a second run at once, Ctrl-C, the time told."""

import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.outputs import LOCK_FILE, STAGING_PREFIX, OutputError, OutputFolder
from pipeline.predict import run, seconds_since_process_start
from tests.conftest import CLASSES, COLOURS, painting


def catalog_of(folder, n: int) -> str:
    """n small paintings, cheap to decode: the model's time is most of a run's."""
    uris = []
    for i in range(n):
        style = CLASSES[i % len(CLASSES)]
        painting(folder / "images" / f"{i}.png", COLOURS[style], seed=i, size=(16, 16))
        uris.append(f"images/{i}.png")
    pd.DataFrame({"uri": uris}).to_csv(folder / "catalog.csv", index=False)
    return str(folder / "catalog.csv")


def files_of(folder) -> dict[str, bytes]:
    """The folder's files, but the lock, which names its latest holder."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != LOCK_FILE}


def test_a_run_keeps_the_users_files_and_tells_the_time_since_the_process_started(
    tmp_path, tiny_bundle, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.parquet").write_bytes(b"the user's")
    age_before_the_run = seconds_since_process_start()

    summary = run(
        [f"--input={catalog_of(tmp_path, 3)}", f"--output={out}", f"--model={tiny_bundle}"]
    )

    assert summary.n_images == 3
    assert (out / "notes.parquet").read_bytes() == b"the user's"
    assert (out / "summary.json").exists() and not list(out.glob(f"{STAGING_PREFIX}*"))
    printed = capsys.readouterr().out
    seconds = float(re.search(r"model tiny-test-model, ([\d.]+) s", printed).group(1))
    assert seconds >= age_before_the_run  # pytest's start-up and the tests before count too
    assert "also holds" not in printed


def test_an_earlier_versions_shards_are_never_read_with_a_runs_own(tmp_path, tiny_bundle):
    """A folder of 120 rows in 3 shards that the tool has no record of: the run stops at
    start-up, or with --overwrite replaces them; never 124 rows for a 4-row run."""
    out = tmp_path / "out"
    out.mkdir()
    for shard in range(3):
        rows = pa.table({"uri": [f"old-{shard}-{i}.png" for i in range(40)]})
        pq.write_table(rows, out / f"predictions-{shard:05d}-of-00003.parquet")
    (out / "summary.json").write_text('{"n_images": 120}')
    earlier = files_of(out)
    argv = [f"--input={catalog_of(tmp_path, 4)}", f"--output={out}", f"--model={tiny_bundle}"]

    shards = "predictions-00000-of-00003.parquet, predictions-00001-of-00003.parquet, "
    with pytest.raises(OutputError, match=f"not on record as its own \\({shards}.*--overwrite"):
        run(argv)
    assert files_of(out) == earlier and not list(out.glob(f"{STAGING_PREFIX}*"))

    summary = run([*argv, "--overwrite"])
    predictions = pq.read_table(sorted(map(str, out.glob("predictions-*-of-*.parquet"))))
    assert predictions.num_rows == summary.n_images == 4
    assert not [uri for uri in predictions["uri"].to_pylist() if uri.startswith("old-")]
    run(argv)  # the folder's results are now on record: a rerun needs no flag


def test_the_process_age_is_the_kernels():
    started = psutil.Process().create_time()  # whole seconds: it adds the boot time's
    assert seconds_since_process_start() == pytest.approx(time.time() - started, abs=1.5)


def test_a_second_run_into_a_held_folder_stops_before_any_work(tmp_path, tiny_bundle):
    out = tmp_path / "out"
    argv = [f"--input={catalog_of(tmp_path, 1)}", f"--output={out}", f"--model={tiny_bundle}"]
    with OutputFolder.claim(str(out)), pytest.raises(OutputError, match="another run is writing"):
        run(argv)
    assert not files_of(out)


@pytest.mark.parametrize(
    "mode",
    [
        [],
        # Beam's worker processes share the terminal's process group: Ctrl-C reaches them too.
        ["--direct_num_workers=2", "--direct_running_mode=multi_processing"],
    ],
    ids=["in_memory", "multi_processing"],
)
def test_ctrl_c_ends_a_run_at_once_in_one_line_and_keeps_the_earlier_results(
    tmp_path, tiny_bundle, mode
):
    out = tmp_path / "out"
    argv = [f"--input={catalog_of(tmp_path, 400)}", f"--output={out}", f"--model={tiny_bundle}"]
    run(argv)
    earlier = files_of(out)

    cli = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *argv, *mode, "--batch_size=1"],  # slow: time to stop it
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(f"{STAGING_PREFIX}*/beam-temp-*")):  # Beam is writing
            assert cli.poll() is None and time.monotonic() < deadline, "the run never started"
            time.sleep(0.05)
        time.sleep(0.5)
        assert cli.poll() is None, "the run ended before it could be interrupted"
        children = psutil.Process(cli.pid).children(recursive=True)
        os.killpg(cli.pid, signal.SIGINT)  # to the process group, as a terminal's Ctrl-C
        interrupted = time.monotonic()
        _, stderr = cli.communicate(timeout=30)
        seconds = time.monotonic() - interrupted
    finally:
        cli.kill()

    assert cli.returncode == 130 and seconds < 5
    assert "Traceback" not in stderr
    ours = [line for line in stderr.splitlines() if "artstyle" in line]
    kept = f"(the earlier ones in {out} are as they were)"
    assert ours == [f"artstyle: interrupted; no results were written {kept}"]
    assert files_of(out) == earlier
    assert not list(out.glob(f"{STAGING_PREFIX}*"))
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, "worker processes outlived the run"


def test_an_output_folder_with_a_bracket_stops_before_any_work(tmp_path, tiny_bundle):
    """Beam's writers take `[` for a glob, and cannot write under one: one line at start-up,
    not a BeamIOError traceback after the run."""
    out = tmp_path / "out [1]"
    argv = [f"--input={catalog_of(tmp_path, 1)}", f"--output={out}", f"--model={tiny_bundle}"]
    with pytest.raises(OutputError, match=r"choose a folder without '\['$"):
        run(argv)
    assert not out.exists()
