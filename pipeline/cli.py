"""`artstyle COMMAND [FLAGS]`: the tool's commands under one name.

Each command is its `python -m` form (`artstyle predict --input ...` is `python -m pipeline
--input ...`, `artstyle bench ...` is `python -m bench ...`): its module is run the way Python's
-m runs it, with the same arguments, after the terminal is set up (pipeline/terminal.py); only
its usage line differs, naming the command as its user typed it (`called_as`). Nothing here
imports a command's module before it is run, so `artstyle --help` is quick.
"""

from __future__ import annotations

import difflib
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline import terminal

USAGE_ERROR_STATUS = 2  # as argparse's, and the commands' own
# A checkout of the repository: the folder that holds the pipeline package and bench/.
CHECKOUT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Command:
    module: str  # what `python -m` runs
    summary: str  # its line in `artstyle --help`
    from_checkout: bool = False  # not in the installed package: run from a checkout


COMMANDS = {
    "predict": Command("pipeline", "the art style of every image of a catalog"),
    "train": Command("pipeline.train", "a model bundle from a labelled catalog"),
    "serve": Command("pipeline.serve", "the model over HTTP: an API, metrics and a page"),
    "explain": Command("pipeline.explain", "Grad-CAM and the top styles of single images"),
    "report": Command("pipeline.report", "the report page of a finished run"),
    "index": Command("pipeline.index", "a nearest-neighbour index of runs' embeddings"),
    "similar": Command("pipeline.similar", "the paintings of an index nearest to images"),
    "duplicates": Command("pipeline.duplicates", "the near-identical paintings in an index"),
    "bench": Command("bench", "the benchmarks, from a checkout", from_checkout=True),
}
_called_as: dict[str, str] = {}  # module -> the command that ran it, where it was not -m


def main(argv: list[str] | None = None) -> None:
    verbose, argv = terminal.take_verbose_flag(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else USAGE_ERROR_STATUS)
    name, flags = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"artstyle: {unknown_command_message(name)}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR_STATUS)
    command = COMMANDS[name]
    if command.from_checkout and not _on_path_from_checkout(command.module):
        print(f"artstyle: {name} runs from a checkout of artstyle's repository "
              f"(python -m {command.module} there)", file=sys.stderr)  # fmt: skip
        raise SystemExit(USAGE_ERROR_STATUS)
    terminal.set_up(verbose)
    run_module(command.module, flags, f"artstyle {name}")


def run_module(module: str, argv: list[str], name: str) -> None:
    """As `python -m MODULE ARGV` (each command answers --help before TensorFlow and Beam
    load), its usage line saying `name`."""
    _called_as[module] = name
    sys.argv = [module, *argv]  # runpy puts the module's path first, as -m does
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def called_as(module: str) -> str:
    """The command that runs `module` as its user typed it: `artstyle predict`, `python -m
    bench serve`, or, unless a command ran it, `python -m MODULE`. Usage lines say this."""
    return _called_as.get(module, f"python -m {module}")


def _on_path_from_checkout(module: str) -> bool:
    """Puts the checkout that holds this package first on the import path, where it has
    `module`'s package (an editable install's `artstyle` looks neither there nor in the
    current folder); False where it has none: an installed package, which leaves it out."""
    package = module.split(".")[0]
    if not (CHECKOUT / package / "__init__.py").is_file():
        return False
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    return True


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
