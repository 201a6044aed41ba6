"""`artstyle COMMAND [FLAGS]`: the tool's commands under one name.

Each command is its `python -m` form (`artstyle predict --input ...` is `python -m pipeline
--input ...`, `artstyle bench ...` is `python -m bench ...`): its module is run the way Python's
-m runs it, with the same arguments, after the terminal is set up (pipeline/terminal.py).
Nothing here imports a command's module before it is run, so `artstyle --help` is quick.
"""

from __future__ import annotations

import difflib
import runpy
import sys
from dataclasses import dataclass

from pipeline import terminal

USAGE_ERROR_STATUS = 2  # as argparse's, and the commands' own


@dataclass(frozen=True)
class Command:
    module: str  # what `python -m` runs
    summary: str  # its line in `artstyle --help`


COMMANDS = {
    "predict": Command("pipeline", "the art style of every image of a catalog"),
    "train": Command("pipeline.train", "a model bundle from a labelled catalog"),
    "serve": Command("pipeline.serve", "the model over HTTP: an API, metrics and a page"),
    "explain": Command("pipeline.explain", "Grad-CAM and the top styles of single images"),
    "report": Command("pipeline.report", "the report page of a finished run"),
    "index": Command("pipeline.index", "a nearest-neighbour index of runs' embeddings"),
    "duplicates": Command("pipeline.duplicates", "the near-identical paintings in an index"),
    "bench": Command("bench", "the benchmarks, as a table and JSON"),
}


def main(argv: list[str] | None = None) -> None:
    verbose, argv = terminal.take_verbose_flag(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else USAGE_ERROR_STATUS)
    name, flags = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"artstyle: {unknown_command_message(name)}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR_STATUS)
    terminal.set_up(verbose)
    run(COMMANDS[name], flags)


def run(command: Command, flags: list[str]) -> None:
    """As `python -m MODULE FLAGS` (each command answers --help before TensorFlow and Beam
    load)."""
    sys.argv = [command.module, *flags]  # runpy puts the module's path first, as -m does
    runpy.run_module(command.module, run_name="__main__", alter_sys=True)


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: artstyle [--verbose] COMMAND [FLAGS]",
        "",
        "The art style of paintings, at collection scale (Apache Beam + Keras 3).",
        "",
        "commands:",
        *(
            f"  {name:<{width}}  {command.summary} (python -m {command.module})"
            for name, command in COMMANDS.items()
        ),
        "",
        "Each command is the same as its python -m form; artstyle COMMAND --help lists its flags.",
        "--verbose also shows the libraries' own logs (TensorFlow, absl, Beam) and INFO lines.",
    ]
    return "\n".join(lines)


def unknown_command_message(name: str) -> str:
    nearest = difflib.get_close_matches(name, COMMANDS, n=1)
    hint = f"did you mean {nearest[0]}?" if nearest else f"one of {', '.join(COMMANDS)}"
    return f"unknown command {name!r} ({hint})"
