"""The terminal: a command prints its own lines, not its libraries' chatter (unless --verbose)."""

import io
import logging
import os
import re
import signal
import subprocess
import sys

import pytest

from pipeline import terminal
from tests.conftest import COLOURS, painting

# Lines the libraries print on their own: TensorFlow's and absl's C++ logging, CUDA's stub,
# absl's Python logging, Beam's harmless warnings.
LIBRARY_LINES = re.compile(
    r"^[IWE]\d{4} |absl|cuda|cuInit|oneDNN|cpu_feature_guard|apitools|Resource module"
    r"|WARNING:|INFO:",
    re.IGNORECASE | re.MULTILINE,
)


def catalog_of_paintings(folder, n: int) -> str:
    lines = ["uri,style"]
    for i in range(n):
        style, colour = list(COLOURS.items())[i % len(COLOURS)]
        painting(folder / f"p{i}.png", colour, seed=i)
        lines.append(f"p{i}.png,{style}")
    (folder / "catalog.csv").write_text("\n".join(lines) + "\n")
    return str(folder / "catalog.csv")


def without_tf_log_level() -> dict:
    """The environment without a TensorFlow log level of the user's."""
    return {key: value for key, value in os.environ.items() if key != terminal.TF_LOG_LEVEL}


def run_pipeline(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *flags],
        capture_output=True,
        text=True,
        env=without_tf_log_level(),
    )


# ## Quiet by default, everything with --verbose


@pytest.mark.parametrize(
    "mode",
    [
        [],
        # Worker processes: Beam relays their log lines (its own warnings) to the launcher.
        ["--direct_num_workers=2", "--direct_running_mode=multi_processing"],
    ],
    ids=["in_memory", "multi_processing"],
)
def test_a_run_prints_only_its_own_lines(tmp_path, tiny_bundle, mode):
    catalog = catalog_of_paintings(tmp_path / "paintings", 4)
    run = run_pipeline(
        f"--input={catalog}", f"--output={tmp_path / 'out'}", f"--model={tiny_bundle}", *mode
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert run.stdout.startswith("artstyle: 4 images, 0 errors, model tiny-test-model")


def test_verbose_shows_the_libraries_start_up_lines(tmp_path, tiny_bundle):
    catalog = catalog_of_paintings(tmp_path / "paintings", 2)
    run = run_pipeline(
        f"--input={catalog}", f"--output={tmp_path / 'out'}", f"--model={tiny_bundle}", "--verbose"
    )
    assert run.returncode == 0, run.stderr
    assert LIBRARY_LINES.search(run.stderr)


@pytest.mark.parametrize(("given", "kept"), [(None, "3"), ("1", "1"), ("0", "0")])
def test_tensorflows_log_level_is_set_unless_the_user_set_it(given, kept):
    environ = {terminal.TF_LOG_LEVEL: given} if given else {}
    assert terminal.tf_log_level(environ) == kept
    assert environ == {terminal.TF_LOG_LEVEL: kept}  # where TensorFlow reads it


NATIVE_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796186228.245943   32343 port.cc:153] oneDNN custom operations are on.",
    "W0000 00:00:1796186228.245943   32343 cuda_dnn.cc:8] a warning",
    "E0000 00:00:1796186507.071277    1521 cuda_platform.cc:52] failed call to cuInit: 303",
    "F0000 00:00:1796186507.071277    1521 check.cc:1] a check failed",
    "a line of a C library's own",
]
EVERY_LINE = ["WARNING: All", "I0000", "W0000", "E0000", "F0000", "a line of a C library's own"]


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("3", ["F0000", "a line of a C library's own"]),
        ("1", ["W0000", "E0000", "F0000", "a line of a C library's own"]),
        ("0", EVERY_LINE),
        ("a word", EVERY_LINE),
    ],
)
def test_c_libraries_lines_are_filtered_by_tensorflows_own_level(level, shown):
    """absl writes some lines to file descriptor 2 before any level applies: `grep -v` with
    this expression takes them out there (end to end: test_a_run_prints_only_its_own_lines)."""
    noise = terminal.native_noise(level)
    kept = [line for line in NATIVE_LINES if not (noise and re.search(noise, line))]
    assert [next(s for s in shown if line.startswith(s)) for line in kept] == shown


@pytest.fixture
def quiet_logging():
    """The terminal's Python logging, in this process, onto a string; then the loggers as
    they were (what it added taken off, their levels restored)."""
    loggers = [logging.getLogger(name) for name in
               ("", terminal.WORKER_RELAY_LOGGER, *terminal.QUIET_LOGGERS)]  # fmt: skip
    before = [(logger, logger.level, logger.handlers[:], logger.filters[:]) for logger in loggers]
    lines = io.StringIO()
    terminal.quiet_python_logging(logging.StreamHandler(lines))
    try:
        yield lines
    finally:
        for logger, level, handlers, filters in before:
            logger.setLevel(level)
            for added in [handler for handler in logger.handlers if handler not in handlers]:
                logger.removeHandler(added)
            for added in [filter for filter in logger.filters if filter not in filters]:
                logger.removeFilter(added)


def test_beams_harmless_warnings_are_dropped_and_the_tools_own_kept(quiet_logging):
    logging.warning("apitools not found, and bigquery client libraries are not available")
    logging.warning("Resource module is not available for current platform, memory usage ...")
    logging.warning("artstyle: could not remove %s: %s", "staging", "busy")
    logging.getLogger("apache_beam.io").warning("a warning of Beam's own")
    logging.getLogger("absl").warning("absl's")
    logging.getLogger("tensorflow").warning("TensorFlow's")
    logging.info("artstyle: an INFO line")
    assert quiet_logging.getvalue().splitlines() == [
        "artstyle: could not remove staging: busy",
        "WARNING:apache_beam.io: a warning of Beam's own",
    ]


def test_workers_start_up_warnings_and_ctrl_c_tracebacks_are_dropped_their_errors_kept(
    quiet_logging,
):
    relay = logging.getLogger(terminal.WORKER_RELAY_LOGGER)
    relay.warning("Worker: %s", 'severity: WARN message: "Discarding unparseable args: []"')
    relay.warning("Worker: %s", 'severity: WARN message: "artstyle: cannot cache it"')
    relay.error("Worker: %s", 'severity: ERROR message: "a DoFn failed"')
    relay.error("Worker: %s", 'severity: ERROR message: "failed: Traceback ... KeyboardInterrupt"')
    relayed = f"WARNING:{terminal.WORKER_RELAY_LOGGER}: Worker: "
    assert quiet_logging.getvalue().splitlines() == [
        relayed + 'severity: WARN message: "artstyle: cannot cache it"',
        relayed.replace("WARNING", "ERROR") + 'severity: ERROR message: "a DoFn failed"',
    ]


def test_verbose_is_the_terminals_flag_not_the_commands():
    assert terminal.take_verbose_flag(["--input=c.csv", "--verbose", "--top_k=3"]) == (
        True,
        ["--input=c.csv", "--top_k=3"],
    )
    assert terminal.take_verbose_flag(["--input=c.csv"]) == (False, ["--input=c.csv"])


def test_a_librarys_log_line_is_marked_as_its_own():
    formatter = terminal.TerminalFormatter()
    ours = logging.LogRecord("root", logging.WARNING, __file__, 1, "artstyle: %s", ("x",), None)
    theirs = logging.LogRecord("keras", logging.WARNING, __file__, 1, "a warning", (), None)
    assert formatter.format(ours) == "artstyle: x"
    assert formatter.format(theirs) == "WARNING:keras: a warning"


def test_a_finished_command_ends_without_teardown_but_with_its_exit_handlers_and_output():
    """end_process skips Python's finalisation, not what a command still owes its terminal:
    the exit handlers (the stderr filter's last lines among them), both streams' unflushed
    text, status 0."""
    script = (
        "import atexit, sys\n"
        "from pipeline import terminal\n"
        "terminal.set_up(False)\n"
        "atexit.register(lambda: print('exit handler ran', file=sys.stderr))\n"
        "print('last line, unflushed', end='')\n"
        "terminal.end_process()\n"
        "print('never printed')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert done.stdout == "last line, unflushed"
    assert "exit handler ran" in done.stderr


def test_ctrl_c_while_tensorflow_loads_is_one_line_and_status_130():
    """Before a command guards its own work, an interrupt lands in some import: the set-up's
    handler makes it the one line every interrupted command prints, without a traceback."""
    script = (
        "from pipeline import terminal\n"
        "terminal.set_up(False)\n"
        "print('set up', flush=True)\n"
        "import tensorflow\n"
        "print('loaded', flush=True)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline() == "set up\n"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "loaded" not in stdout
    assert stderr.strip().splitlines() == ["artstyle: interrupted"]


@pytest.mark.parametrize("package", ["pipeline", "bench"])
def test_python_m_of_either_package_quiets_the_terminal_before_the_commands_imports(package):
    """`python -m bench...` as `python -m pipeline...`: the package, which Python imports
    first, sets the terminal up (here, in a process of its own, as -m finds it)."""
    script = (
        "import os, sys\n"
        "sys.argv[:] = ['-m', '--top_k=3']\n"
        f"import {package}\n"
        "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), sys.argv[1:])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=without_tf_log_level()
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3 ['--top_k=3']"
