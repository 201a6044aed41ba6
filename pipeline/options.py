"""Command-line options, as Beam PipelineOptions so that Beam's own flags mix in freely.

Every flag's value is checked where the flag is declared (its argparse `type`), and every
flag must be one of ours or Beam's: a bad one is a one-line message before any work.

Nothing here loads Keras or TensorFlow (the model layer's defaults come from models.settings),
so that --help answers at once: the commands' modules import them, after their --help.
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import fsspec

# Beam's parser, for the flags Beam declares with its add_value_provider_argument.
from apache_beam.options.pipeline_options import (
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    _BeamArgumentParser,
)

from models.settings import (
    DEFAULT_BUNDLE,
    ENGINES,
    FEATURE_KINDS,
    PRECISIONS,
    HeadConfig,
    check_backbone_names,
)
from pipeline.interrupts import exit_on_interrupt
from pipeline.outputs import OutputError
from transforms.catalog import CatalogError
from transforms.fetch import DEFAULT_MAX_BYTES, FetchPolicy, default_user_agent
from transforms.images import DEFAULT_MAX_PIXELS

STARTUP_ERROR_STATUS = 2


class UsageError(ValueError):
    """An unknown flag, or a value its flag cannot take: a one-line message at start-up."""


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def number(
    minimum: float, *, above: bool = False, below: float = math.inf
) -> Callable[[str], float]:
    """An argparse type: a finite number from `minimum` (or `above` it), under `below`."""
    bounds = f"above {minimum:g}" if above else f"at least {minimum:g}"
    if below < math.inf:
        bounds += f" and below {below:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
        in_bounds = (value > minimum if above else value >= minimum) and value < below
        if not (math.isfinite(value) and in_bounds):
            raise argparse.ArgumentTypeError(f"must be {bounds}, not {text}")
        return value

    return parse


def backbone_names(text: str) -> str:
    """An argparse type: a backbone name, or several joined by '+'."""
    try:
        check_backbone_names(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


class CatalogOptions(PipelineOptions):
    """What to read and where to write: shared by prediction and training.

    Each options class here is a direct PipelineOptions subclass with flags of its own, the
    way Beam's own views are: Beam parses every direct subclass to pass options to workers,
    and would warn about (or conflict on) flags defined in a subclass of a subclass.
    """

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument(
            "--input",
            help="A CSV or Parquet catalog (or a glob of shards), or a folder or glob of "
            "images. URIs may be local paths, gs://, s3://, http(s)://: anything fsspec opens.",
        )
        parser.add_argument("--output", help="Folder (or URI) to write to.")
        parser.add_argument("--uri_column", default="uri", help="The catalog's image column.")
        parser.add_argument(
            "--label_column",
            default=None,
            help="The catalog's label column (default: 'style', if the catalog has one).",
        )

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
        parser.add_argument(
            "--batch_size", type=whole_number(1), default=32, help="Images per model call (fixed)."
        )
        parser.add_argument(
            "--backbone_weights",
            default=None,
            help="A local file of the backbone's ImageNet weights, for hosts that cannot "
            "download them (ResNet50: Keras's ..._notop.h5 file).",
        )

    def check(self) -> None:
        if self.backbone_weights and not _is_file(self.backbone_weights):
            raise UsageError(f"--backbone_weights: no such file: {self.backbone_weights}")


class ImageOptions(PipelineOptions):
    """How images are fetched and decoded: concurrency, politeness, retries, deadlines, and
    the caps on bytes and pixels that keep one image from taking a worker's memory."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        defaults = FetchPolicy()
        parser.add_argument(
            "--fetch_concurrency",
            type=whole_number(1),
            default=defaults.concurrency,
            help="Images fetched at once per worker (network and bucket reads wait, not work).",
        )
        parser.add_argument(
            "--max_connections_per_host",
            type=whole_number(1),
            default=defaults.max_connections_per_host,
            help="Connections at once to one host (Wikimedia's hosts: at most 2, as its "
            "robot policy asks).",
        )
        parser.add_argument(
            "--max_retries",
            type=whole_number(0),
            default=defaults.max_retries,
            help="Retries of a transient failure (timeouts, resets, HTTP 408/429/5xx), with "
            "exponential backoff and the server's Retry-After. gs:// and s3:// retry in "
            "their own libraries instead.",
        )
        parser.add_argument(
            "--fetch_timeout_s",
            type=number(0, above=True),
            default=defaults.timeout_s,
            help="Deadline per image, all attempts together: then it is an error row.",
        )
        parser.add_argument(
            "--max_image_bytes",
            type=whole_number(1),
            default=DEFAULT_MAX_BYTES,
            help="Larger files are error rows, found out while streaming.",
        )
        parser.add_argument(
            "--max_image_pixels",
            type=whole_number(1),
            default=DEFAULT_MAX_PIXELS,
            help="Larger images are error rows (decompression-bomb guard).",
        )

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
        parser.add_argument(
            "--model", default=DEFAULT_BUNDLE, help="A model bundle folder (default: shipped)."
        )
        parser.add_argument(
            "--top_k", type=whole_number(1), default=5, help="Styles listed per image."
        )
        parser.add_argument(
            "--precision",
            choices=PRECISIONS,
            default="auto",
            help="The backbone's arithmetic. 'auto': bfloat16 on a GPU or a CPU with AMX; "
            "on a CPU with AVX512_BF16 alone, whichever a short timing of both finds faster "
            "(once per machine, cached); else float32.",
        )
        parser.add_argument(
            "--engine",
            choices=ENGINES,
            default="keras",
            help="What runs the model. 'keras' (TensorFlow): the fastest over many images, "
            "where bfloat16 pays. 'openvino': Keras's float32 results from a process without "
            "TensorFlow, which starts seconds sooner: for small catalogs. Its first run with a "
            "bundle converts the model (once per machine, cached).",
        )
        parser.add_argument(
            "--report",
            action="store_true",
            help="Also write OUTPUT/report.html, a page of scores, charts and Grad-CAM of "
            "sampled rows (as python -m pipeline.report OUTPUT does after a run).",
        )


class TrainOptions(PipelineOptions):
    """Training flags, beside CatalogOptions, ModelOptions and ImageOptions: every choice
    that shapes the model is one, and lands in the manifest."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument(
            "--backbone",
            type=backbone_names,
            default="efficientnet_lite2",
            help="Backbone name, or several joined by '+' (an ensemble: features concatenated).",
        )
        parser.add_argument(
            "--features",
            choices=FEATURE_KINDS,
            default="stage_covariance",
            help="'pooled' (last layer), 'stage_stats' (plus channel means and deviations of "
            "stages) or 'stage_covariance' (plus channel covariances of early stages).",
        )
        parser.add_argument("--model_id", default=None, help="Bundle id (default: derived).")
        parser.add_argument("--split_column", default="split", help="Catalog's split column.")
        parser.add_argument("--train_split", default="train", help="Rows to train on.")
        parser.add_argument("--eval_split", default="val", help="Rows to report scores on.")
        parser.add_argument(
            "--embeddings",
            default=None,
            help="Where image features are written (default: OUTPUT.embeddings/).",
        )
        parser.add_argument(
            "--reuse_embeddings",
            action="store_true",
            help="Fit the head on features written by an earlier run with the same backbone.",
        )
        parser.add_argument(
            "--augment_mirror",
            action="store_true",
            help="Also fit the head on every training painting's left-right mirror "
            "(the feature pass computes both: twice its time).",
        )
        parser.add_argument(
            "--folds",
            type=whole_number(2),
            default=5,
            help="Heads cross-fitted on the training split, each early-stopped on its own "
            "fold; the bundle averages them, their out-of-fold logits calibrate it.",
        )
        parser.add_argument(
            "--hidden_units",
            type=whole_number(0),
            default=HeadConfig.hidden_units,
            help="MLP head width; 0: linear.",
        )
        fraction = number(0, below=1)
        parser.add_argument("--dropout", type=fraction, default=HeadConfig.dropout)
        parser.add_argument("--l2", type=number(0), default=HeadConfig.l2)
        parser.add_argument("--label_smoothing", type=fraction, default=HeadConfig.label_smoothing)
        parser.add_argument(
            "--learning_rate", type=number(0, above=True), default=HeadConfig.learning_rate
        )
        parser.add_argument(
            "--epochs",
            type=whole_number(1),
            default=HeadConfig.epochs,
            help="At most; early stopping.",
        )
        parser.add_argument("--seed", type=whole_number(0), default=HeadConfig.seed)

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
        )


HELP_EPILOG = (
    "Beam's own options (--runner, --direct_num_workers, ...) are accepted too, and --verbose "
    "shows the libraries' own logs (TensorFlow, absl, Beam) and INFO lines."
)


def parse_options(
    argv: list[str] | None, views: tuple[type[PipelineOptions], ...], prog: str, about: str
) -> PipelineOptions:
    """PipelineOptions from `argv` (default: the command line), every flag one of `views`'s
    or Beam's and every value checked, else UsageError."""
    argv = sys.argv[1:] if argv is None else argv
    answer_help(argv, views, prog, about)
    check_flags(argv, views)
    options = PipelineOptions(argv)
    options.view_as(SetupOptions).save_main_session = False
    options.view_as(CatalogOptions).check()
    options.view_as(ModelOptions).check()
    return options


def answer_help(
    argv: list[str], views: tuple[type[PipelineOptions], ...], prog: str, about: str
) -> None:
    """If `argv` asks for --help, lists the flags of `views` and exits. (Beam's parser would
    answer with its own flags only.)"""
    if not {"-h", "--help"} & set(argv):
        return
    parser = _BeamArgumentParser(prog=prog, description=about, epilog=HELP_EPILOG)
    for view in views:
        view._add_argparse_args(parser)
    parser.print_help()
    raise SystemExit(0)


@dataclass(frozen=True)
class CommandLine:
    """A command whose flags are Beam options: how it is called, what it does, its views.
    Declared here rather than in the command's module, so that its --help is answered before
    that module (and TensorFlow with it) loads."""

    prog: str
    about: str
    views: tuple[type[PipelineOptions], ...]

    def parse(self, argv: list[str] | None = None) -> PipelineOptions:
        return parse_options(argv, self.views, self.prog, self.about)

    def answer_help(self, argv: list[str]) -> None:
        answer_help(argv, self.views, self.prog, self.about)


PREDICT_COMMAND = CommandLine(
    "python -m pipeline",
    "Predicts the art style of every image of a catalog, with Apache Beam.",
    (CatalogOptions, ModelOptions, ImageOptions, PredictOptions),
)
TRAIN_COMMAND = CommandLine(
    "python -m pipeline.train",
    "Trains a style model bundle: backbone features, a fitted head, a manifest.",
    (CatalogOptions, ModelOptions, ImageOptions, TrainOptions),
)


class _FlagParser(_BeamArgumentParser):
    """Raises UsageError where argparse would print the usage (Beam's runs to hundreds of
    lines) and exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message.removeprefix("argument "))


def check_flags(argv: list[str], views: tuple[type[PipelineOptions], ...]) -> None:
    """Beam itself takes an unknown flag for a warning, lost among TensorFlow's start-up
    lines, and runs on without it; here it is an error, with the nearest known flag."""
    parser = _FlagParser(allow_abbrev=False)
    beams = {str(cls): cls for cls in PipelineOptions.__subclasses__()
             if cls.__module__.startswith("apache_beam.")}  # fmt: skip
    for view in (*beams.values(), *views):
        view._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [flag for action in parser._actions for flag in action.option_strings]
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


def runner_name(options: PipelineOptions) -> str:
    """--runner in short and lower case ('direct' when unset, 'dataflow' for DataflowRunner)."""
    return (options.view_as(StandardOptions).runner or "direct").lower().removesuffix("runner")


def run_command(run: Callable[[], object]) -> None:
    """An entry point's `main`: a bad flag, catalog, bundle or output folder is one line on
    stderr and exit status 2, Ctrl-C one line and 130; never a traceback. (What else reaches
    the terminal is pipeline/terminal.py's concern, set up before the command's imports.)"""
    with exit_on_interrupt("artstyle: interrupted"):
        try:
            run()
        except SystemExit:  # --help, or a command that ends itself: loads nothing more
            raise
        except startup_errors() as error:
            print(f"artstyle: {error}", file=sys.stderr)
            raise SystemExit(STARTUP_ERROR_STATUS) from None


def startup_errors() -> tuple[type[Exception], ...]:
    """The errors that are one line: a bad flag, catalog, bundle or output folder. The
    bundle's is in models.bundle, which loads Keras: it is imported when a command has raised
    (and has loaded it by then), not with this module."""
    from models.bundle import BundleError

    return UsageError, CatalogError, BundleError, OutputError
