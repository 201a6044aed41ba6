"""A progress bar on the terminal while a run reads its images: how many, how fast, how long.

Shown only where it can be true and is wanted: the loading step must run in this process
(Beam's direct runner in memory or in threads, not in worker processes or on a service), and
stderr must be a terminal (not a log file or CI's). Its count is transforms/progress.py's; its
total is the catalog's rows where that is cheap to know (Parquet footers, local CSV files'
lines, a local folder's images), counted while the run starts; otherwise there is no total,
and no time left.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from pipeline.plan import Workers
from transforms.catalog import Catalog, catalog_size
from transforms.progress import IMAGES_DONE

REDRAW_S = 0.5


@contextmanager
def progress_bar(workers: Workers, catalog: Catalog, images: int | None = None) -> Iterator[None]:
    """Around a run whose `workers` are where they are: the bar while it runs, gone when
    it ends (the summary follows). Its total is `images` where the run reads only some of
    the catalog's rows (it knows how many), else the catalog's rows."""
    if not (sys.stderr.isatty() and workers is Workers.IN_THIS_PROCESS):
        yield
        return
    columns = (
        TextColumn("artstyle:"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        RateColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    bar = Progress(*columns, console=Console(stderr=True), transient=True, auto_refresh=False)
    task = bar.add_task("images", total=None)
    start = IMAGES_DONE.value
    stopped = threading.Event()

    def redraw() -> None:
        bar.update(task, total=images or catalog_size(catalog), refresh=True)
        while not stopped.wait(REDRAW_S):
            bar.update(task, completed=IMAGES_DONE.value - start, refresh=True)

    with bar, _cleared_on_interrupt(bar):
        bar.console.show_cursor(True)  # a process killed mid-run leaves no cursor hidden
        drawing = threading.Thread(target=redraw, name="progress-bar", daemon=True)
        drawing.start()
        try:
            yield
        finally:
            stopped.set()
            drawing.join()


@contextmanager
def _cleared_on_interrupt(bar: Progress) -> Iterator[None]:
    """Ctrl-C clears the bar, then does what it did before: an interrupted run prints one line
    and ends the process at once, which would leave the bar on screen with the shell's prompt
    after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def clear_then_interrupt(signum: int, frame: object) -> None:
        bar.stop()
        signal.signal(signal.SIGINT, previous)
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, clear_then_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class RateColumn(ProgressColumn):
    """Images per second, once there is a rate to show."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text(f"{speed:.1f}/s" if speed else "", style="progress.data.speed")
