"""The commands (python -m pipeline, .train, .serve, .explain, .report; `artstyle`), their
options, and the graphs of the pipelines they run."""

from pipeline import terminal

terminal.set_up_for_python_m()  # before the command's module imports TensorFlow
