"""The commands (python -m pipeline, .train, .serve, .explain, .report; `artstyle`), their
options, and the graphs of the pipelines they run."""

import sys

from pipeline import terminal

# `python -m pipeline.X` imports this package before X, whose imports load TensorFlow: the
# terminal is set up here, before them. (sys.argv[0] is "-m" while Python looks for X.)
if sys.argv[0] == "-m":
    verbose, sys.argv[1:] = terminal.take_verbose_flag(sys.argv[1:])
    terminal.set_up(verbose)
