"""The output folder on its own: results staged then published, only our files removed, one
run at a time (local disks: flock; memory:// stands in for an object store)."""

import json
import os
import posixpath
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from importlib.util import find_spec

import fsspec
import pytest

from pipeline.interrupts import interrupts_deferred
from pipeline.outputs import (
    FILES_RECORD,
    LOCK_FILE,
    REPORT_RESULTS,
    RUN_RESULTS,
    STAGING_PREFIX,
    STALE_AFTER_S,
    Holder,
    OutputError,
    OutputFolder,
    Results,
)


def stage(folder: OutputFolder, files: dict[str, str]) -> None:
    """What a pipeline run leaves in the staging folder."""
    fs, _ = fsspec.core.url_to_fs(folder.staging)
    for name, text in files.items():
        fs.makedirs(posixpath.dirname(f"{folder.staging}/{name}"), exist_ok=True)
        fs.pipe_file(f"{folder.staging}/{name}", text.encode())


def contents(path) -> dict[str, str]:
    """The folder's files, less the tool's own hidden ones (the record, the lock)."""
    return {p.name: p.read_text() for p in path.iterdir() if p.is_file() and p.name[0] != "."}


RUN_1 = {"predictions-00000-of-00002.parquet": "1a", "predictions-00001-of-00002.parquet": "1b",
         "metrics-00000-of-00001.parquet": "1m", "summary.json": "1s"}  # fmt: skip
RUN_2 = {"predictions-00000-of-00001.parquet": "2a", "metrics-00000-of-00001.parquet": "2m",
         "summary.json": "2s"}  # fmt: skip


def test_results_appear_only_when_published_and_replace_only_our_own(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with OutputFolder.claim(str(out)) as folder:
        stage(folder, RUN_1)
        assert not (out / "summary.json").exists()  # nothing in place before the end
        folder.publish()
    user_files = {"notes.txt": "the user's"}
    assert contents(out) == {**RUN_1, **user_files}
    assert json.loads((out / FILES_RECORD).read_text())["files"] == sorted(RUN_1)

    with OutputFolder.claim(str(out)) as folder:
        stage(folder, RUN_2)
        assert contents(out) == {**RUN_1, **user_files}  # until the run has finished
        folder.publish()
        assert folder.others_files() == []
    assert contents(out) == {**RUN_2, **user_files}
    assert not list(out.glob(f"{STAGING_PREFIX}*"))


AN_EARLIER_VERSIONS = {f"predictions-0000{i}-of-00003.parquet": "old" for i in range(3)} | {
    "summary.json": "old",
    "report.html": "old",
}


def test_results_the_tool_has_no_record_of_stop_the_run_at_start_up(tmp_path):
    for name, text in AN_EARLIER_VERSIONS.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "notes.txt").write_text("the user's")
    names = ", ".join(sorted(AN_EARLIER_VERSIONS)[:5])
    refused = f"^{tmp_path} holds files .* not on record as its own \\({names}\\): move them "
    with pytest.raises(OutputError, match=refused + "away, or pass --overwrite to replace them$"):
        claim_and_leave(str(tmp_path))
    assert contents(tmp_path) == {**AN_EARLIER_VERSIONS, "notes.txt": "the user's"}
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))
    claim_and_leave(str(tmp_path), overwrite=True)  # the refusal released the lock

    for i in range(124):
        (tmp_path / f"metrics-{i:05d}-of-00124.parquet").write_text("old")
    with pytest.raises(OutputError, match=r"metrics-00004-of-00124.parquet and 124 more\)"):
        claim_and_leave(str(tmp_path))


def test_overwrite_replaces_them_when_the_run_publishes_and_not_before(tmp_path):
    for name, text in AN_EARLIER_VERSIONS.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "notes.txt").write_text("the user's")
    with (
        pytest.raises(RuntimeError, match="the pipeline broke"),
        OutputFolder.claim(str(tmp_path), overwrite=True) as folder,
    ):
        stage(folder, RUN_2)
        raise RuntimeError("the pipeline broke")
    assert contents(tmp_path) == {**AN_EARLIER_VERSIONS, "notes.txt": "the user's"}

    with OutputFolder.claim(str(tmp_path), overwrite=True) as folder:
        stage(folder, RUN_2)
        folder.publish()
    assert contents(tmp_path) == {**RUN_2, "notes.txt": "the user's"}
    assert json.loads((tmp_path / FILES_RECORD).read_text())["files"] == sorted(RUN_2)


def test_a_file_copied_in_during_the_run_is_named_after_it(tmp_path):
    with OutputFolder.claim(str(tmp_path)) as folder:
        stage(folder, RUN_2)
        (tmp_path / "predictions-mine.parquet").write_text("the user's")
        folder.publish()
        assert folder.others_files() == ["predictions-mine.parquet"]
    assert (tmp_path / "predictions-mine.parquet").read_text() == "the user's"


def test_a_report_publishes_its_page_beside_the_runs_results(tmp_path):
    with OutputFolder.claim(str(tmp_path)) as folder:
        stage(folder, RUN_1)
        folder.publish()
    (tmp_path / "predictions-mine.parquet").write_text("the user's")  # not the run's

    page = {"report.html": "page 1", "report_files/chart-1.png": "chart 1"}
    with OutputFolder.claim(str(tmp_path), REPORT_RESULTS) as folder:
        assert folder.published_results().names == set(RUN_1)
        stage(folder, page)
        folder.publish()
    with OutputFolder.claim(str(tmp_path), REPORT_RESULTS) as folder:
        stage(folder, {"report.html": "page 2", "report_files/chart-2.png": "chart 2"})
        folder.publish()
    assert contents(tmp_path) == {**RUN_1, "predictions-mine.parquet": "the user's",
                                  "report.html": "page 2"}  # fmt: skip
    assert [p.name for p in (tmp_path / "report_files").iterdir()] == ["chart-2.png"]
    recorded = json.loads((tmp_path / FILES_RECORD).read_text())["files"]
    assert recorded == sorted([*RUN_1, "report.html", "report_files"])

    (tmp_path / FILES_RECORD).unlink()  # as an earlier version left it
    with pytest.raises(OutputError, match=r"\(report.html, report_files\): move them away"):
        claim_and_leave(str(tmp_path), REPORT_RESULTS)
    with OutputFolder.claim(str(tmp_path), REPORT_RESULTS, overwrite=True) as folder:
        everything = {*RUN_1, "predictions-mine.parquet", "report.html", "report_files"}
        assert folder.published_results().names == everything  # without a record


def test_the_folders_path_is_never_a_glob(tmp_path):
    """`out*` is a folder of its own: `outA` beside it is not its results."""
    elsewhere = tmp_path / "outA"
    elsewhere.mkdir()
    for name, text in RUN_1.items():
        (elsewhere / name).write_text(text)
    out = tmp_path / "out*"
    with OutputFolder.claim(str(out)) as folder:
        stage(folder, RUN_2)
        folder.publish()
        assert folder.others_files() == []
    assert contents(out) == RUN_2 and contents(elsewhere) == RUN_1
    with pytest.raises(OutputError, match=r"cannot write under it: choose a folder without '\['"):
        claim_and_leave(str(tmp_path / "out [1]"))
    assert not (tmp_path / "out [1]").exists()


def test_a_run_that_fails_leaves_the_earlier_results_and_no_staging_folder(tmp_path):
    with OutputFolder.claim(str(tmp_path)) as folder:
        stage(folder, RUN_1)
        folder.publish()
    with (
        pytest.raises(RuntimeError, match="the pipeline broke"),
        OutputFolder.claim(str(tmp_path)) as folder,
    ):
        stage(folder, RUN_2)
        raise RuntimeError("the pipeline broke")
    assert contents(tmp_path) == RUN_1
    assert not list(tmp_path.glob(f"{STAGING_PREFIX}*"))


def test_a_dead_runs_staging_folder_goes_with_the_next_run_and_nothing_else(tmp_path):
    leftover = tmp_path / f"{STAGING_PREFIX}20260101-000000-dead"
    (leftover / "beam-temp-predictions-x").mkdir(parents=True)
    (leftover / "predictions-00000-of-00001.parquet").write_text("half")
    (tmp_path / ".artstyle-notes").mkdir()  # a look-alike name, not a staging folder
    with OutputFolder.claim(str(tmp_path)):
        assert not leftover.exists()
    assert (tmp_path / ".artstyle-notes").is_dir()


def test_a_hand_edited_record_cannot_make_the_tool_delete_other_files(tmp_path):
    (tmp_path / "notes.csv").write_text("keep")
    (tmp_path.parent / "outside.parquet").write_text("keep")
    record = {"files": ["notes.csv", "../outside.parquet", "summary.json", 7]}
    (tmp_path / FILES_RECORD).write_text(json.dumps(record))
    with OutputFolder.claim(str(tmp_path)) as folder:
        stage(folder, RUN_2)
        folder.publish()
    assert (tmp_path / "notes.csv").read_text() == "keep"
    assert (tmp_path.parent / "outside.parquet").read_text() == "keep"


def test_a_second_run_is_kept_out_while_the_first_lives(tmp_path):
    busy = pytest.raises(OutputError, match=r"another run is writing to .* \(pid \d+ on ")
    with OutputFolder.claim(str(tmp_path)), busy:
        claim_and_leave(str(tmp_path))
    claim_and_leave(str(tmp_path))  # released


def test_ctrl_c_while_publishing_takes_effect_once_publishing_is_done():
    """With Python's own Ctrl-C handler in place (whatever an earlier test left there), a
    Ctrl-C delivered to the handler publishing holds is a KeyboardInterrupt once it is done."""
    earlier = signal.signal(signal.SIGINT, signal.default_int_handler)
    steps = []
    try:
        with pytest.raises(KeyboardInterrupt), interrupts_deferred():
            ctrl_c = signal.getsignal(signal.SIGINT)
            assert ctrl_c is not signal.default_int_handler  # publishing holds its own
            ctrl_c(signal.SIGINT, None)
            steps.append("went on to the end")
        assert steps == ["went on to the end"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, earlier)


def test_the_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pipeline.outputs import OutputFolder\n"
         "with OutputFolder.claim(sys.argv[1]):\n    print('held', flush=True)\n"
         "    time.sleep(60)\n", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=f"pid {holder.pid} on"):
            claim_and_leave(str(tmp_path))
        holder.send_signal(signal.SIGKILL)  # no clean-up of its own
        holder.wait(10)
    finally:
        holder.kill()
    claim_and_leave(str(tmp_path))


def test_object_stores_get_a_lock_object_that_goes_stale():
    fs = fsspec.filesystem("memory")
    lock = "/runs/out/" + LOCK_FILE
    with OutputFolder.claim("memory://runs/out") as folder:
        assert Holder.from_bytes(fs.cat_file(lock)).pid == os.getpid()
        with pytest.raises(OutputError, match="another run is writing to memory://runs/out"):
            claim_and_leave("memory://runs/out")
        stage(folder, RUN_2)
        folder.publish()
    assert not fs.exists(lock)  # released
    assert fs.cat_file("/runs/out/summary.json") == b"2s"

    now = time.time()
    elsewhere = Holder("x", "another-host", 1, now, now)
    fs.pipe_file(lock, elsewhere.to_bytes())
    with pytest.raises(OutputError, match="pid 1 on another-host"):
        claim_and_leave("memory://runs/out")
    long_ago = now - STALE_AFTER_S - 1
    fs.pipe_file(lock, replace(elsewhere, refreshed=long_ago).to_bytes())
    claim_and_leave("memory://runs/out")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    here = Holder("y", socket.gethostname(), int(dead.stdout), now, now)
    fs.pipe_file(lock, here.to_bytes())  # fresh, but its process is gone from this host
    claim_and_leave("memory://runs/out")


def claim_and_leave(url: str, results: Results = RUN_RESULTS, overwrite: bool = False) -> None:
    with OutputFolder.claim(url, results, overwrite):
        pass


WITHOUT_S3FS = pytest.mark.skipif(find_spec("s3fs") is not None, reason="s3fs is installed")


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("{tmp}/a_file", r"^--output .*/a_file is a file, not a folder$"),
        ("{tmp}/a_file/sub", r"^--output .*/a_file/sub cannot be written \(Not a directory\)$"),
        ("nosuch://bucket/out", r"^--output nosuch://bucket/out: Protocol not known: nosuch$"),
        pytest.param("s3://bucket/out", r"^--output s3://bucket/out: Install s3fs to access S3$",
                     marks=WITHOUT_S3FS),
    ],
)  # fmt: skip
def test_outputs_that_cannot_take_results_are_one_line_errors(tmp_path, output, message):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(OutputError, match=message):
        claim_and_leave(output.format(tmp=tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_folder_is_a_one_line_error(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OutputError, match=r"cannot be written \(Permission denied\)"):
            claim_and_leave(str(tmp_path))
    finally:
        tmp_path.chmod(0o700)
