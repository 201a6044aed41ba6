"""Command-line options, as Beam PipelineOptions so that Beam's own flags mix in freely.

The flags themselves are declared in pipeline.flags (--help is answered from there, before
Beam loads); here they become Beam's views, and every flag must be one of ours or Beam's: a
bad one is a one-line message before any work. Nothing here loads Keras or TensorFlow.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import fsspec
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

from models.bundle import BundleError
from models.settings import HeadConfig, VoteConfig
from pipeline import flags
from pipeline.exits import run_reporting
from pipeline.flags import UsageError
from pipeline.outputs import OutputError
from transforms import library_internals
from transforms.catalog import CatalogError
from transforms.fetch import FetchPolicy, default_user_agent


class CatalogOptions(PipelineOptions):
    """What to read and where to write: shared by prediction and training.

    Each options class here is a direct PipelineOptions subclass with flags of its own, the
    way Beam's own views are: Beam parses every direct subclass to pass options to workers,
    and would warn about (or conflict on) flags defined in a subclass of a subclass.
    """

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        flags.add_catalog_flags(parser)

    def check(self) -> None:
        """Beam parses every options class on every parse (workers, TestPipeline), so argparse's
        `required=True` would fail them all: the entry points check here instead."""
        missing = [f"--{name}" for name in ("input", "output") if not getattr(self, name)]
        if missing:
            raise UsageError(f"missing {' and '.join(missing)} (see --help)")


class ModelOptions(PipelineOptions):
    """How the model runs: shared by prediction and training (the features' pass)."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        flags.add_model_flags(parser)

    def check(self) -> None:
        if self.backbone_weights and not _is_file(self.backbone_weights):
            raise UsageError(f"--backbone_weights: no such file: {self.backbone_weights}")


class ImageOptions(PipelineOptions):
    """How images are fetched and decoded: concurrency, politeness, retries, deadlines, and
    the caps on bytes and pixels that keep one image from taking a worker's memory."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        flags.add_image_flags(parser)

    def policy(self) -> FetchPolicy:
        """Beam's own --user_agent ("describing the pipeline to external services") is the
        contact part of the User-Agent, as Wikimedia's policy asks for one."""
        return FetchPolicy(
            concurrency=self.fetch_concurrency,
            max_connections_per_host=self.max_connections_per_host,
            max_retries=self.max_retries,
            timeout_s=self.fetch_timeout_s,
            max_bytes=self.max_image_bytes,
            user_agent=default_user_agent(self.view_as(SetupOptions).user_agent),
        )


class PredictOptions(PipelineOptions):
    """Prediction flags, beside CatalogOptions, ModelOptions and ImageOptions."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        flags.add_predict_flags(parser)


class TrainOptions(PipelineOptions):
    """Training flags, beside CatalogOptions, ModelOptions and ImageOptions: every choice
    that shapes the model is one, and lands in the manifest."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        flags.add_train_flags(parser)

    def head_config(self) -> HeadConfig:
        """The head's hyperparameters, as the flags set them."""
        return HeadConfig(
            hidden_units=self.hidden_units,
            dropout=self.dropout,
            l2=self.l2,
            label_smoothing=self.label_smoothing,
            learning_rate=self.learning_rate,
            epochs=self.epochs,
            seed=self.seed,
            class_balance=self.class_balance,
            projection=self.projection,
        )

    def vote_config(self) -> VoteConfig:
        """The training paintings' vote, as the flags set it."""
        return VoteConfig(voters=self.voters, weight=self.vote_weight)


def parse_options(argv: list[str] | None, command: flags.CommandLine) -> PipelineOptions:
    """PipelineOptions from `argv` (default: the command line), every flag one of the
    command's or Beam's and every value checked, else UsageError."""
    argv = sys.argv[1:] if argv is None else argv
    command.answer_help(argv)
    check_flags(argv, command.groups)
    options = PipelineOptions(argv)
    options.view_as(SetupOptions).save_main_session = False
    options.view_as(CatalogOptions).check()
    options.view_as(ModelOptions).check()
    return options


class _FlagParser(library_internals.beam_argument_parser()):  # type: ignore[misc]
    """Raises UsageError where argparse would print the usage (Beam's runs to hundreds of
    lines) and exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message.removeprefix("argument "))


def check_flags(argv: list[str], groups: Sequence[flags.FlagGroup]) -> None:
    """Beam itself takes an unknown flag for a warning, lost among TensorFlow's start-up
    lines, and runs on without it; here it is an error, with the nearest known flag: every
    flag must be Beam's or one of `groups`'."""
    parser = _FlagParser(allow_abbrev=False)
    library_internals.add_beam_flags(parser)
    flags.add(parser, *groups)
    _, unknown = parser.parse_known_args(argv)
    if unknown:
        known = library_internals.known_flags(parser)
        raise UsageError(_unknown_argument_message(unknown[0], known))


def _unknown_argument_message(argument: str, known: list[str]) -> str:
    if not argument.startswith("-"):
        return f"unexpected argument {argument!r}: flags are written --name=value (see --help)"
    flag = argument.split("=", 1)[0]
    underscored = "--" + flag.lstrip("-").replace("-", "_")
    nearest = (
        [underscored] if underscored in known else difflib.get_close_matches(flag, known, 1, 0.8)
    )
    hint = f"did you mean {nearest[0]}?" if nearest else "see --help"
    return f"unknown flag {flag} ({hint})"


def _is_file(url: str) -> bool:
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.isfile(path)
    except (ImportError, ValueError, OSError):
        return False


def run_command(run: Callable[[], object]) -> None:
    """An entry point's `main`: a bad flag, catalog, bundle or output folder is one line on
    stderr and exit status 2, Ctrl-C one line and 130; never a traceback. (What else reaches
    the terminal is pipeline/terminal.py's concern, set up before the command's imports.)"""
    run_reporting(run, startup_errors)


def startup_errors() -> tuple[type[Exception], ...]:
    """The errors that are one line: a bad flag, catalog, bundle or output folder."""
    return UsageError, CatalogError, BundleError, OutputError
