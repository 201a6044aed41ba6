"""How many images this process has loaded or found unreadable, live, for a progress display.

Beam's metrics reach the launcher only when a run ends. On a local runner the loading step
runs in the launcher's own process, so a count kept here can be read there while the run goes
on (pipeline/progress_bar.py); a worker elsewhere keeps a count of its own that nobody reads.
"""

from __future__ import annotations

import threading


class Count:
    """A whole number that threads add to and any thread reads."""

    def __init__(self) -> None:
        self._value = 0
        self._lock = threading.Lock()

    def add(self, amount: int = 1) -> None:
        with self._lock:
            self._value += amount

    @property
    def value(self) -> int:
        return self._value


IMAGES_DONE = Count()  # LoadImageFn's records, each counted once, loaded or not
