"""Ctrl-C: one line and a prompt exit, or (for steps that must not stop half-way) a short wait.

Beam's DirectRunner runs the graph in threads of this process. A KeyboardInterrupt raised in
the main thread neither stops those threads nor silences them: the process lingers until
they finish, and each prints its traceback on the way. So the process is ended with
`os._exit` after its one line; the kernel closes its files and releases its locks.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

INTERRUPTED_STATUS = 130  # 128 + SIGINT, as shells report a process that Ctrl-C ended
CLEANUP_S = 3.0  # the most an interrupted run waits for its clean-up (a remote lock's delete)


@contextmanager
def exit_on_interrupt(message: str, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Inside the block, Ctrl-C prints `message` on stderr, gives `cleanup` up to CLEANUP_S
    seconds, and ends the process with status 130. Outside the main thread (where signal
    handlers cannot be set) the block runs unguarded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        end_interrupted(message, cleanup)

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def end_interrupted(message: str, cleanup: Callable[[], None] | None = None) -> NoReturn:
    """Prints `message` on stderr, gives `cleanup` up to CLEANUP_S seconds, and ends the
    process with status 130."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C waits for the clean-up
    print(message, file=sys.stderr, flush=True)
    if cleanup is not None:
        worker = threading.Thread(target=cleanup, daemon=True)
        worker.start()
        worker.join(CLEANUP_S)
    sys.stdout.flush()
    os._exit(INTERRUPTED_STATUS)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C inside the block takes effect when the block is done (a few renames that must
    not stop half-way), through whatever handler is in place then."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            _take_effect(previous)


def _take_effect(handler: Any) -> None:
    """A deferred Ctrl-C, through `handler` as Python would have called it on the signal:
    called directly rather than by raising the signal again, so that it takes effect before
    the block's caller goes on, whatever the signal's delivery."""
    if callable(handler):
        handler(signal.SIGINT, None)
    elif handler == signal.SIG_DFL:
        raise KeyboardInterrupt
