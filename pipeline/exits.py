"""How a command ends on what its user can fix (a bad flag, a missing file): one line on
stderr and exit status 2; Ctrl-C one line and 130; never a traceback. Beam-free, for the
commands that never load Beam as for those that do (pipeline.options.run_command)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from pipeline.interrupts import exit_on_interrupt

STARTUP_ERROR_STATUS = 2
INTERRUPTED_MESSAGE = "artstyle: interrupted"


def run_reporting(
    run: Callable[[], object],
    errors: Callable[[], tuple[type[Exception], ...]],
    interrupted: str = INTERRUPTED_MESSAGE,
) -> None:
    """Runs `run`; an exception of `errors()` (asked only once one is raised, so that their
    modules load late) is one line and status 2, Ctrl-C the line `interrupted` and 130."""
    with exit_on_interrupt(interrupted):
        try:
            run()
        except SystemExit:  # --help, or a command that ends itself: loads nothing more
            raise
        except errors() as error:
            print(f"artstyle: {error}", file=sys.stderr)
            raise SystemExit(STARTUP_ERROR_STATUS) from None
