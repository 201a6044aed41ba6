"""The commands' flags, declared without Beam, so that --help answers before Beam loads.

The flags are Beam options (pipeline.options: each group below is one PipelineOptions view,
so that Beam's own flags mix in freely), but importing Beam alone takes over a second: --help
is answered from these declarations with plain argparse instead, and the same declarations
make the views. Every flag's value is checked where it is declared (its argparse `type`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from models.settings import (
    DEFAULT_BUNDLE,
    DUPLICATE_MAX_DISTANCE,
    ENGINES,
    FEATURE_KINDS,
    INDEX_SEARCHES,
    PRECISIONS,
    HeadConfig,
    check_backbone_names,
)
from transforms.fetch import DEFAULT_MAX_BYTES, FetchPolicy
from transforms.images import DEFAULT_MAX_PIXELS

FlagGroup = Callable[[argparse.ArgumentParser], None]  # declares some flags on a parser

REPORT_SAMPLES = 12  # the report's confident mistakes, and least confident rows (labelled runs)
REPORT_PER_STYLE = 4  # the report's paintings per predicted style (runs without labels)
HELP_EPILOG = (
    "Beam's own options (--runner, --direct_num_workers, ...) are accepted too, and --verbose "
    "shows the libraries' own logs (TensorFlow, absl, Beam) and INFO lines."
)


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


def add_catalog_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of pipeline.options.CatalogOptions."""
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


def add_overwrite_flag(parser: argparse.ArgumentParser) -> None:
    """--overwrite, of the commands that publish into a run's output folder."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace files in the output folder that look like results (predictions-*.parquet, "
        "summary.json, report.html, ...) but that artstyle has no record of writing (an "
        "earlier version's, or copied in). Without it, such files stop the command at "
        "start-up: they would be read with its results.",
    )


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of pipeline.options.ModelOptions."""
    parser.add_argument(
        "--batch_size", type=whole_number(1), default=32, help="Images per model call (fixed)."
    )
    parser.add_argument(
        "--backbone_weights",
        default=None,
        help="A local file of the backbone's ImageNet weights, for hosts that cannot "
        "download them (ResNet50: Keras's ..._notop.h5 file).",
    )


def add_image_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of pipeline.options.ImageOptions."""
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
    add_image_limit_flags(parser)


def add_image_limit_flags(parser: argparse.ArgumentParser) -> None:
    """What one image may cost: the pipeline's (in ImageOptions) and the service's. Their help
    prints the default the parser holds, which a command may set to its own."""
    parser.add_argument(
        "--fetch_timeout_s",
        type=number(0, above=True),
        default=FetchPolicy().timeout_s,
        help="Seconds per image, all attempts together (default: %(default)g): past them, "
        "the image is an error.",
    )
    parser.add_argument(
        "--max_image_bytes",
        type=whole_number(1),
        default=DEFAULT_MAX_BYTES,
        help="Larger files are errors, found out while streaming (default: %(default)d bytes).",
    )
    parser.add_argument(
        "--max_image_pixels",
        type=whole_number(1),
        default=DEFAULT_MAX_PIXELS,
        help="Larger images are errors (decompression-bomb guard).",
    )


def add_predict_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of pipeline.options.PredictOptions."""
    add_classifier_flags(parser)
    add_overwrite_flag(parser)
    parser.add_argument(
        "--report",
        action="store_true",
        help="Also write OUTPUT/report.html, a page of scores, charts and Grad-CAM of "
        "sampled rows (as python -m pipeline.report OUTPUT does after a run).",
    )


def add_classifier_flags(parser: argparse.ArgumentParser) -> None:
    """Which model answers, how many styles it lists, and what runs it in what arithmetic:
    the pipeline's (in PredictOptions) and the service's."""
    parser.add_argument(
        "--model", default=DEFAULT_BUNDLE, help="A model bundle folder (default: shipped)."
    )
    parser.add_argument("--top_k", type=whole_number(1), default=5, help="Styles listed per image.")
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
        default="auto",
        help="What runs the model. 'keras': TensorFlow. 'openvino': the same results (in "
        "bfloat16, the same rounding) from a process without TensorFlow, which starts "
        "seconds sooner; its first run with a bundle converts the model (once per machine, "
        "cached). 'auto': OpenVINO on a CPU; Keras on a GPU and in worker processes.",
    )


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of pipeline.options.TrainOptions."""
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
    parser.add_argument(
        "--class_balance",
        type=number(0),
        default=HeadConfig.class_balance,
        help="Each style's weight is (mean paintings a style / its paintings) to this power: "
        "1 weighs every style alike, 0 every painting.",
    )
    parser.add_argument(
        "--projection",
        type=whole_number(0),
        default=HeadConfig.projection,
        help="The merged head reads its features through a projection to this many numbers, "
        "fitted to what its hidden units see (0: none): most of the bundle's size, and each "
        "painting's embedding.",
    )
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


def add_index_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of python -m pipeline.index."""
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="OUT_DIR",
        help="Output folders of runs with --embeddings (any fsspec URI), added in this order.",
    )
    parser.add_argument(
        "--output", required=True, metavar="INDEX", help="The index: a folder on local disk."
    )
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--add",
        action="store_true",
        help="Add the runs' paintings to the index at --output, without rebuilding it. A "
        "painting whose URI the index holds already keeps its item (rebuild with --replace "
        "to take a later run's); rows of one run that share a URI are items of their own.",
    )
    existing.add_argument(
        "--replace",
        action="store_true",
        help="Build a new index over the one at --output, which stays whole until the new "
        "one is written.",
    )
    parser.add_argument(
        "--search",
        choices=INDEX_SEARCHES,
        default=None,
        help="A new index's search. 'exact': every painting compared; 'approximate': IVF, "
        "the paintings of the query's nearest cells compared (k-means cells fitted on the "
        "runs' paintings), faster past ten thousand paintings, most but not always all of "
        "the true nearest (its recall is in docs/similar.md). 'auto' (default): exact up "
        "to the size where one query stays quick, approximate past it.",
    )


def add_max_distance_flag(parser: argparse.ArgumentParser, default: float | None) -> None:
    """--max_distance, for the commands that list neighbours or pairs."""
    parser.add_argument(
        "--max_distance",
        type=number(0),
        default=default,
        metavar="D",
        help="The largest cosine distance listed: 0 for the same direction, 1 for unrelated "
        f"paintings, 2 for opposite ones (default: {default}).",
    )


def add_duplicates_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of python -m pipeline.duplicates."""
    parser.add_argument("index", metavar="INDEX", help="An index (python -m pipeline.index).")
    add_max_distance_flag(parser, DUPLICATE_MAX_DISTANCE)
    parser.add_argument(
        "--output", default=None, metavar="FILE.parquet", help="Write every pair there too."
    )
    parser.add_argument(
        "--show", type=whole_number(0), default=20, help="Pairs printed (the closest groups)."
    )


class OneLineParser(argparse.ArgumentParser):
    """Raises UsageError where argparse would print its usage and exit: a bad flag is one
    line, as the commands' other errors are."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message.removeprefix("argument "))


@dataclass(frozen=True)
class CommandLine:
    """A command: how it is called, what it does, its flag groups. Declared here rather than
    in the command's module, so that its --help is answered before that module (and Beam and
    TensorFlow with it) loads. The flags of a Beam command are Beam options
    (pipeline.options parses them); a command without Beam parses its own (`parse`)."""

    prog: str
    about: str
    groups: Sequence[FlagGroup]

    def answer_help(self, argv: list[str]) -> None:
        """If `argv` asks for --help, lists the command's flags and exits. (Beam's parser
        would answer with its own flags only.)"""
        if not {"-h", "--help"} & set(argv):
            return
        parser = argparse.ArgumentParser(prog=self.prog, description=self.about, epilog=HELP_EPILOG)
        for add_flags in self.groups:
            add_flags(parser)
        parser.print_help()
        raise SystemExit(0)

    def parse(self, argv: list[str]) -> argparse.Namespace:
        """The flags of a command without Beam options; UsageError for a bad one."""
        parser = OneLineParser(prog=self.prog, description=self.about, allow_abbrev=False)
        for add_flags in self.groups:
            add_flags(parser)
        return parser.parse_args(argv)


PREDICT_COMMAND = CommandLine(
    "python -m pipeline",
    "Predicts the art style of every image of a catalog, with Apache Beam.",
    (add_catalog_flags, add_model_flags, add_image_flags, add_predict_flags),
)
TRAIN_COMMAND = CommandLine(
    "python -m pipeline.train",
    "Trains a style model bundle: backbone features, a fitted head, a manifest.",
    (add_catalog_flags, add_model_flags, add_image_flags, add_train_flags),
)
INDEX_COMMAND = CommandLine(
    "python -m pipeline.index",
    "Builds a nearest-neighbour index of the embeddings of runs (python -m pipeline "
    "--embeddings), or adds runs to one.",
    (add_index_flags,),
)
DUPLICATES_COMMAND = CommandLine(
    "python -m pipeline.duplicates",
    "Lists the pairs of near-identical paintings in an index, grouped.",
    (add_duplicates_flags,),
)
