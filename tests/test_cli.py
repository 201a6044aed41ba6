"""`artstyle COMMAND`: each command as its `python -m` form, and --help without TensorFlow."""

import importlib.util
import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from bench.flags import OTHER_BENCHES
from pipeline import cli, terminal
from pipeline.cli import COMMANDS, called_as, main, run_module

# Runs in a fresh interpreter, then says which heavy libraries the help loaded.
HELP_THEN_MODULES = """
import json, runpy, sys
try:
    {help}
except SystemExit as stop:
    assert stop.code == 0, stop.code
heavy = ("tensorflow", "keras", "apache_beam", "faiss")
print(json.dumps({{name: name in sys.modules for name in heavy}}))
"""


def modules_loaded_by(help_call: str) -> tuple[str, dict[str, bool]]:
    script = HELP_THEN_MODULES.format(help=help_call)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    *shown, loaded = run.stdout.splitlines()
    return "\n".join(shown), json.loads(loaded)


ARTSTYLE = "from pipeline.cli import main; main([{!r}, '--help'])"
PYTHON_M = "sys.argv = ['-m', '--help']; runpy.run_module({!r}, run_name='__main__')"


def without_usage(help: str) -> str:
    """--help's text after its usage lines (which argparse wraps by the name's length)."""
    return help.split("\n\n", 1)[1]


@pytest.mark.parametrize(
    "command, module, flags",
    [
        ("predict", "pipeline", ("--input INPUT", "--top_k TOP_K", "--verbose")),
        ("train", "pipeline.train", ("--backbone BACKBONE", "--verbose")),
        ("serve", "pipeline.serve", ("--port PORT", "--max_batch MAX_BATCH")),
        ("bench", "bench", ("--output OUTPUT", "--startup_runs STARTUP_RUNS", "large_catalog")),
        ("explain", "pipeline.explain", ("--output DIR", "--feature_maps LAYER")),
        ("report", "pipeline.report", ("--samples SAMPLES", "--per_style PER_STYLE")),
        ("index", "pipeline.index", ("--output INDEX", "--add", "--search")),
        ("duplicates", "pipeline.duplicates", ("--max_distance D", "--output FILE.parquet")),
        ("similar", "pipeline.similar", ("--index INDEX", "-k K", "--engine", "--batch_size")),
    ],
)
def test_help_is_the_same_both_ways_names_the_command_typed_and_loads_no_heavy_library(
    command, module, flags
):
    """`artstyle COMMAND --help` and `python -m MODULE --help`: the same flags, each usage
    line naming the command as it was typed, and neither Keras, TensorFlow, Beam (whose
    import alone took over a second) nor FAISS."""
    (artstyle, loaded), (python_m, loaded_too) = (
        modules_loaded_by(ARTSTYLE.format(command)),
        modules_loaded_by(PYTHON_M.format(module)),
    )
    assert artstyle.startswith(f"usage: artstyle {command} ")
    assert python_m.startswith(f"usage: python -m {module} ")
    assert without_usage(artstyle) == without_usage(python_m).replace(
        f"python -m {module} NAME", f"artstyle {command} NAME"
    )
    assert all(flag in artstyle for flag in flags)
    for modules in (loaded, loaded_too):
        assert not any(modules.values()), modules


@pytest.mark.parametrize("bench", OTHER_BENCHES)
def test_every_benchmark_is_a_command_of_artstyle_bench(bench, monkeypatch, capsys):
    """`artstyle bench NAME` runs bench.NAME, as `python -m bench NAME` does (here in this
    process, whose terminal the test keeps as it is)."""
    monkeypatch.setattr(terminal, "set_up", lambda verbose: None)
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    monkeypatch.setattr(cli, "_called_as", {})
    with pytest.raises(SystemExit) as stop:
        main(["bench", bench, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: artstyle bench {bench} ")


def test_the_list_of_commands_loads_no_library():
    shown, loaded = modules_loaded_by("from pipeline.cli import main; main(['--help'])")
    assert shown.startswith("usage: artstyle [--verbose] COMMAND [FLAGS]")
    for name, command in COMMANDS.items():
        assert f"  {name} " in shown
        assert f"(python -m {command.module})" in shown
    assert not any(loaded.values())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["trian"], "artstyle: unknown command 'trian' (did you mean train?)"),
        (["serv", "--port=1"], "artstyle: unknown command 'serv' (did you mean serve?)"),
        (["--input=c.csv"],
         "artstyle: unknown command '--input=c.csv' "
         "(one of predict, train, serve, explain, report, index, similar, duplicates, "
         "bench)"),
    ],
)  # fmt: skip
def test_an_unknown_command_is_one_line_with_a_suggestion(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err == message + "\n"


def test_no_command_is_the_usage_and_status_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--verbose"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("usage: artstyle")


def test_a_command_runs_its_module_as_python_m_does(tmp_path, monkeypatch, capsys):
    (tmp_path / "echo_command.py").write_text(
        "import json, sys\nfrom pipeline.cli import called_as\n"
        "print(json.dumps({'name': __name__, 'argv': sys.argv, "
        "'called_as': called_as('echo_command')}))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", sys.argv[:])  # a command's own, while it runs
    monkeypatch.setattr(cli, "_called_as", {})
    assert called_as("echo_command") == "python -m echo_command"
    run_module("echo_command", ["--input=c.csv", "--top_k", "3"], "artstyle echo")
    ran = json.loads(capsys.readouterr().out)
    assert ran["name"] == "__main__"
    assert ran["argv"] == [str(tmp_path / "echo_command.py"), "--input=c.csv", "--top_k", "3"]
    assert ran["called_as"] == "artstyle echo"


def test_bench_runs_from_a_checkout_and_says_so_elsewhere(tmp_path, monkeypatch, capsys):
    """The installed package leaves the benchmarks out: without a checkout beside it,
    `artstyle bench` is one line."""
    monkeypatch.setattr(cli, "CHECKOUT", tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--output=b.json"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "artstyle: bench runs from a checkout of artstyle's repository (python -m bench there)\n"
    )


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_a_module_that_python_m_runs(name):
    module = COMMANDS[name].module
    spec = importlib.util.find_spec(module)
    assert spec is not None
    if spec.submodule_search_locations is not None:  # a package: -m runs its __main__
        assert importlib.util.find_spec(f"{module}.__main__") is not None


def test_the_console_script_is_the_cli():
    (script,) = entry_points(group="console_scripts", name="artstyle")
    assert script.value == "pipeline.cli:main"


def test_a_bad_flag_is_the_same_line_through_artstyle(tmp_path, monkeypatch, capsys):
    """The same one-line error and status as `python -m pipeline`'s (tests/test_options.py),
    here in this process (whose terminal the test keeps as it is)."""
    monkeypatch.setattr(terminal, "set_up", lambda verbose: None)
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    monkeypatch.setattr(cli, "_called_as", {})
    flags = [f"--input={tmp_path / 'c.csv'}", f"--output={tmp_path / 'out'}", "--top-k", "3"]
    with pytest.raises(SystemExit) as stop:
        main(["predict", *flags, "--verbose"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "artstyle: unknown flag --top-k (did you mean --top_k?)\n"
