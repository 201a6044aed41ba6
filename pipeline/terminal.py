"""What a command prints on the terminal: its own lines, not its libraries' chatter.

TensorFlow, absl, CUDA's stub and Beam each print start-up lines that say nothing a user can
act on ("cuInit ... UNKNOWN ERROR (303)" on a machine without a GPU, "oneDNN custom operations
are on", "apitools not found"). `set_up` quiets them before TensorFlow loads, since its C++
logging reads TF_CPP_MIN_LOG_LEVEL once, as it loads: `python -m pipeline...` and `python -m
bench...` call it from their package's __init__.py (which Python imports before the command's
module, `set_up_for_python_m`), `artstyle` from pipeline/cli.py. With --verbose everything is
shown, at INFO.

absl's C++ logging writes some lines before any level applies (TensorFlow's libraries log as
they load, and again when a worker thread loads another), straight to file descriptor 2. Those
are taken out there, by `grep -v` in a process of its own, so that a crash's last lines still
get through; the level it applies is TensorFlow's own (a value the user set is kept).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import MutableMapping
from typing import NoReturn

from pipeline.interrupts import end_interrupted
from transforms import library_internals

VERBOSE_FLAG = "--verbose"
TOOL_PREFIX = "artstyle"
TF_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"
# 3 hides INFO, WARNING and ERROR: CUDA's "failed call to cuInit" is an ERROR.
QUIET_TF_LOG_LEVEL = "3"
ABSL_SEVERITIES = "IWE"  # in TF_CPP_MIN_LOG_LEVEL's order: level n hides the first n
ABSL_LINE = r"^[{severities}][0-9]{{4}} [0-9:.]+ +[0-9]+ [^ ]+:[0-9]+\] "
ABSL_BANNER = r"^WARNING: All log messages before absl::InitializeLog\(\) is called"
# Python loggers of libraries whose warnings are for their developers, not for ours.
QUIET_LOGGERS = ("absl", "tensorflow", "h5py")
# Where Beam relays the log lines of its worker processes (multi_processing mode), one
# protobuf's text each ("Worker: severity: WARN ... message: ..."), at their own level.
WORKER_RELAY_LOGGER = "apache_beam.runners.portability.local_job_service"
# How a relayed worker's traceback ends when Ctrl-C stopped it.
WORKER_INTERRUPTED = "KeyboardInterrupt"
# Warnings Beam logs on the root logger at import or at run time: nothing to act on, and no
# logger of their own to quiet.
BEAM_NOISE = (
    "apitools not found",
    "Resource module is not available",
)
_set_up_already = False


def take_verbose_flag(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether `argv` asks for --verbose, and `argv` without it: the flag is the terminal's,
    so every command takes it, and none sees it."""
    return VERBOSE_FLAG in argv, [arg for arg in argv if arg != VERBOSE_FLAG]


def set_up_for_python_m() -> None:
    """For `python -m PACKAGE.X`, from PACKAGE's __init__.py: Python imports it before X,
    whose imports load TensorFlow, and while it looks for X, sys.argv[0] is "-m". Takes
    --verbose out of the command's arguments."""
    if sys.argv[0] == "-m":
        verbose, sys.argv[1:] = take_verbose_flag(sys.argv[1:])
        set_up(verbose)


def set_up(verbose: bool) -> None:
    """Quiets the libraries, or lets everything through at INFO. Before the command's
    imports; once per process (a second call changes nothing)."""
    global _set_up_already
    if _set_up_already:
        return
    _set_up_already = True
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    if verbose:
        logging.basicConfig(level=logging.INFO)
        return
    _filter_native_stderr(native_noise(tf_log_level(os.environ)))
    quiet_python_logging(logging.StreamHandler())  # on this stderr, before anything logs


def tf_log_level(environ: MutableMapping[str, str]) -> str:
    """TensorFlow's C++ log level: the user's, where they set one, else quiet; set in
    `environ`, where TensorFlow reads it as it loads."""
    return environ.setdefault(TF_LOG_LEVEL, QUIET_TF_LOG_LEVEL)


def quiet_python_logging(handler: logging.Handler) -> None:
    """Python's logging to `handler`, at WARNING, each library's line marked as its own:
    Beam's harmless warnings and its workers' start-up chatter dropped, absl's, TensorFlow's
    and h5py's warnings too."""
    handler.setFormatter(TerminalFormatter())
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    root.addHandler(handler)
    root.addFilter(_not_beam_noise)
    logging.getLogger(WORKER_RELAY_LOGGER).addFilter(_worker_line_worth_showing)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class TerminalFormatter(logging.Formatter):
    """The tool's own lines as they are (they begin "artstyle:"); a library's with its level
    and name, so that it is not taken for the tool's."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return line if line.startswith(TOOL_PREFIX) else f"{record.levelname}:{record.name}: {line}"


def end_process() -> NoReturn:
    """Ends a command whose results are written, without Python's teardown of its modules.

    With TensorFlow and Beam loaded, finalising their modules and threads takes a good share
    of a short run's time, after its results are out. The exit handlers still run
    (logging's flush, the stderr filter's last lines), then the process ends with status 0.
    """
    library_internals.run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C before the command guards its own work (pipeline.interrupts), while TensorFlow
    loads for seconds: nothing is written yet, so one line and status 130, not the traceback
    of whichever import was running."""
    end_interrupted(f"{TOOL_PREFIX}: interrupted")


def native_noise(level: str) -> str | None:
    """A regular expression of the C++ log lines that TensorFlow's log level hides (None:
    none)."""
    try:
        hidden = ABSL_SEVERITIES[: max(0, int(level))]
    except ValueError:
        return None
    if not hidden:
        return None
    return f"{ABSL_LINE.format(severities=hidden)}|{ABSL_BANNER}"


def _not_beam_noise(record: logging.LogRecord) -> bool:
    message = str(record.msg)
    return not any(message.startswith(noise) for noise in BEAM_NOISE)


def _worker_line_worth_showing(record: logging.LogRecord) -> bool:
    """A worker's errors and the tool's own lines; not the warnings every worker process
    logs as it starts (the flags it does not parse, no resource module, no staging folder),
    nor the traceback of a worker that the terminal's Ctrl-C reached too (the workers share
    its process group): the launcher says "interrupted" in its own line."""
    message = record.getMessage()
    if WORKER_INTERRUPTED in message:
        return False
    return record.levelno >= logging.ERROR or f"{TOOL_PREFIX}:" in message


def _filter_native_stderr(noise: str | None) -> None:
    """File descriptor 2 through `grep -v noise` to the terminal, for C and C++ writers; Python's
    own sys.stderr goes to the terminal directly, so that nothing it prints waits on the filter
    (an interrupted run's one line is printed just before the process ends)."""
    if noise is None:
        return
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    try:
        grep = subprocess.Popen(
            ["grep", "--line-buffered", "--invert-match", "--extended-regexp", noise],
            stdin=read_end,
            stdout=terminal,
            stderr=subprocess.DEVNULL,
        )
    except OSError:  # no grep here: the lines stay
        for fd in (terminal, read_end, write_end):
            os.close(fd)
        return
    os.close(read_end)
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = open(  # noqa: SIM115 (the process's stderr, open while it lives)
        terminal,
        "w",
        buffering=1,
        encoding=sys.stderr.encoding,
        errors=sys.stderr.errors,
        closefd=False,
    )

    def restore() -> None:
        """Gives file descriptor 2 back to the terminal, so that grep sees the end of its
        input, and waits for it to pass on the last lines before the shell's prompt."""
        sys.stderr.flush()
        os.dup2(terminal, 2)
        with contextlib.suppress(subprocess.TimeoutExpired):  # a child still holds the pipe
            grep.wait(timeout=2)

    atexit.register(restore)
