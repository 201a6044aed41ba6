"""The progress bar of a local run: images done of the catalog's rows, on a terminal only."""

import io
import signal
import sys
import time

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from pipeline.plan import Workers
from pipeline.progress_bar import progress_bar
from tests.conftest import painting
from transforms.catalog import ImageRecord, open_catalog
from transforms.load import LoadImages
from transforms.progress import IMAGES_DONE


def test_the_loading_step_counts_every_record_in_this_process(tmp_path):
    """Loaded or not, each record once: the count a progress bar reads on a local runner."""
    good = painting(tmp_path / "good.png", (10, 20, 30), seed=0)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    before = IMAGES_DONE.value
    with beam.Pipeline() as p:
        loaded = (
            p
            | beam.Create([ImageRecord(str(path), str(path), None) for path in (good, bad)])
            | LoadImages(32)
        )
        counts = (loaded.images, loaded.errors) | beam.Flatten() | beam.combiners.Count.Globally()
        assert_that(counts, equal_to([2]))
    assert IMAGES_DONE.value - before == 2


@pytest.mark.parametrize(
    ("flags", "here"),
    [
        ([], True),
        (["--runner=DirectRunner"], True),
        (["--direct_running_mode=multi_threading", "--direct_num_workers=2"], True),
        (["--direct_running_mode=multi_processing", "--direct_num_workers=2"], False),
        (["--runner=DataflowRunner"], False),
        (["--runner=PortableRunner"], False),
    ],
)
def test_the_bar_is_only_where_the_count_is(flags, here):
    assert (Workers.of(PipelineOptions(flags)) is Workers.IN_THIS_PROCESS) == here


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def twelve_rows(tmp_path):
    (tmp_path / "catalog.csv").write_text("uri\n" + "".join(f"{i}.png\n" for i in range(12)))
    return open_catalog(str(tmp_path / "catalog.csv"))


def test_the_bar_shows_images_done_of_the_total_on_a_terminal(tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress_bar(Workers.IN_THIS_PROCESS, twelve_rows(tmp_path)):
        IMAGES_DONE.add(5)
        deadline = time.monotonic() + 30  # the bar redraws on a thread of its own
        while "5/12" not in terminal.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "5/12" in terminal.getvalue()


def test_a_run_over_some_of_the_rows_shows_their_number_as_the_total(tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress_bar(Workers.IN_THIS_PROCESS, twelve_rows(tmp_path), images=4):
        IMAGES_DONE.add(3)
        deadline = time.monotonic() + 30
        while "3/4" not in terminal.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "3/4" in terminal.getvalue()


def test_no_bar_in_a_log(tmp_path, monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress_bar(Workers.IN_THIS_PROCESS, twelve_rows(tmp_path)):
        IMAGES_DONE.add(5)
    assert log.getvalue() == ""


def test_ctrl_c_clears_the_bar_then_does_what_it_did_before(tmp_path, monkeypatch):
    """An interrupted run prints its one line and ends at once: the bar must be gone first."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    seen = []

    def earlier_handler(signum, frame):
        seen.append((sys.stderr is terminal, terminal.getvalue()))

    previous = signal.signal(signal.SIGINT, earlier_handler)
    try:
        with progress_bar(Workers.IN_THIS_PROCESS, twelve_rows(tmp_path)):
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is earlier_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    ((bar_stopped, shown),) = seen
    assert bar_stopped  # rich no longer holds stderr
    assert shown.endswith("\x1b[2K")  # the bar's line erased
