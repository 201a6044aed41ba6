"""Every command's flags, each declared once, without Beam, so that --help answers at once.

A flag is a `Flag`: its name, its help and argparse's keywords, its value checked by its
argparse `type`. Groups of flags (`add_*_flags`) are what commands compose: the prediction
and training commands' groups are Beam options too (pipeline.options: each group is one
PipelineOptions view, so that Beam's own flags mix in freely), but importing Beam alone
takes over a second, so --help is answered from these declarations with plain argparse.
Where a command needs a flag otherwise (another default, a required value), it says so with
`Flag.but`, and why, in the flag's help.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, NoReturn

from models.settings import (
    DEFAULT_BUNDLE,
    ENGINES,
    FEATURE_KINDS,
    INDEX_SEARCHES,
    PRECISIONS,
    SAME_PICTURE_DISTANCE,
    HeadConfig,
    VoteConfig,
    check_backbone_names,
)
from pipeline.cli import called_as
from transforms.fetch import DEFAULT_MAX_BYTES, FetchPolicy
from transforms.images import DEFAULT_MAX_PIXELS

FlagGroup = Callable[[argparse.ArgumentParser], None]  # declares some flags on a parser

REPORT_SAMPLES = 12  # the report's confident mistakes, and least confident rows (labelled runs)
REPORT_PER_STYLE = 4  # the report's paintings per predicted style (runs without labels)
VERBOSE_EPILOG = "--verbose shows the libraries' own logs (TensorFlow, absl, Beam) and INFO lines."
BEAM_EPILOG = (
    "Beam's own options (--runner, --direct_num_workers, ...) are accepted too, and "
    + VERBOSE_EPILOG
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


@dataclass(frozen=True)
class Flag:
    """One flag, declared once: its name, its help, and the rest of argparse's keywords
    (`settings`: type, default, choices, action, metavar, required, ...). Calling it with a
    parser declares it there, so that a flag is a FlagGroup of its own."""

    name: str
    help: str | None = None
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __call__(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(self.name, help=self.help, **self.settings)

    @property
    def default(self) -> Any:
        return self.settings.get("default")

    def but(self, why: str | None = None, *, help: str | None = None, **settings: Any) -> Flag:
        """The flag as one command needs it: other `settings` (another default, say), `why`
        added to its help, or another `help` where the command gives the flag another use."""
        text = help if help is not None else self.help
        if why:
            text = f"{text} {why}" if text else why
        return replace(self, help=text, settings=MappingProxyType({**self.settings, **settings}))


def flag(name: str, help: str | None = None, **settings: Any) -> Flag:
    return Flag(name, help, MappingProxyType(settings))


def add(parser: argparse.ArgumentParser, *groups: FlagGroup) -> None:
    """Declares `groups` (flags, or groups of them) on `parser`, in order."""
    for group in groups:
        group(parser)


# --- The catalog and the output ------------------------------------------------------------

INPUT = flag(
    "--input",
    "A CSV or Parquet catalog (or a glob of shards), or a folder or glob of images. URIs may "
    "be local paths, gs://, s3://, http(s)://: anything fsspec opens.",
)
OUTPUT = flag("--output", "Folder (or URI) to write to.")
URI_COLUMN = flag("--uri_column", "The catalog's image column.", default="uri")
LABEL_COLUMN = flag(
    "--label_column",
    "The catalog's label column (default: 'style', if the catalog has one).",
    default=None,
)
OVERWRITE = flag(
    "--overwrite",
    "Replace files in the output folder that look like results (predictions-*.parquet, "
    "summary.json, report.html, ...) but that artstyle has no record of writing (an "
    "earlier version's, or copied in). Without it, such files stop the command at "
    "start-up: they would be read with its results.",
    action="store_true",
)

# --- The model and what runs it ------------------------------------------------------------

MODEL = flag("--model", "A model bundle folder (default: shipped).", default=DEFAULT_BUNDLE)
BACKBONE_WEIGHTS = flag(
    "--backbone_weights",
    "A local file of the backbone's ImageNet weights, for hosts that cannot download them "
    "(ResNet50: Keras's ..._notop.h5 file).",
    default=None,
)
BATCH_SIZE = flag(
    "--batch_size", "Images per model call (fixed).", type=whole_number(1), default=32
)
PRECISION = flag(
    "--precision",
    "The backbone's arithmetic. 'auto': bfloat16 on a GPU or a CPU with AMX; on a CPU with "
    "AVX512_BF16 alone, whichever a short timing of both finds faster (once per machine, "
    "cached); else float32.",
    choices=PRECISIONS,
    default="auto",
)
ENGINE = flag(
    "--engine",
    "What runs the model. 'keras': TensorFlow. 'openvino': the same results (in bfloat16, "
    "the same rounding) from a process without TensorFlow, which starts seconds sooner; its "
    "first run with a bundle converts the model (once per machine, cached). 'auto': OpenVINO "
    "on a CPU; Keras on a GPU and where the workers are other machines.",
    choices=ENGINES,
    default="auto",
)
TOP_K = flag("--top_k", "Styles listed per image.", type=whole_number(1), default=5)
EMBEDDINGS = flag(
    "--embeddings",
    "Also write each predicted image's embedding, a short vector from the same pass (the "
    "model's projection, L2-normalised), to OUTPUT/embeddings-*.parquet: what python -m "
    "pipeline.index makes an index of similar paintings from. The model must give one (a "
    "bundle trained with --projection).",
    action="store_true",
)

# --- Fetching and decoding images ----------------------------------------------------------

_FETCH = FetchPolicy()
FETCH_CONCURRENCY = flag(
    "--fetch_concurrency",
    "Images fetched at once per worker (network and bucket reads wait, not work).",
    type=whole_number(1),
    default=_FETCH.concurrency,
)
MAX_CONNECTIONS_PER_HOST = flag(
    "--max_connections_per_host",
    "Connections at once to one host (Wikimedia's hosts: at most 2, as its robot policy asks).",
    type=whole_number(1),
    default=_FETCH.max_connections_per_host,
)
MAX_RETRIES = flag(
    "--max_retries",
    "Retries of a transient failure (timeouts, resets, HTTP 408/429/5xx), with exponential "
    "backoff and the server's Retry-After. gs:// and s3:// retry in their own libraries "
    "instead.",
    type=whole_number(0),
    default=_FETCH.max_retries,
)
FETCH_TIMEOUT_S = flag(
    "--fetch_timeout_s",
    "Seconds per image, all attempts together (default: %(default)g): past them, the image "
    "is an error.",
    type=number(0, above=True),
    default=_FETCH.timeout_s,
)
MAX_IMAGE_BYTES = flag(
    "--max_image_bytes",
    "Larger files are errors, found out while streaming (default: %(default)d bytes).",
    type=whole_number(1),
    default=DEFAULT_MAX_BYTES,
)
MAX_IMAGE_PIXELS = flag(
    "--max_image_pixels",
    "Larger images are errors (decompression-bomb guard).",
    type=whole_number(1),
    default=DEFAULT_MAX_PIXELS,
)

# --- The report ----------------------------------------------------------------------------

REPORT = flag(
    "--report",
    "Also write OUTPUT/report.html, a page of scores, charts and Grad-CAM of sampled rows "
    "(as python -m pipeline.report OUTPUT does after a run).",
    action="store_true",
)
SAMPLES = flag(
    "--samples", "Rows per sampled section.", type=whole_number(1), default=REPORT_SAMPLES
)
PER_STYLE = flag(
    "--per_style",
    "Gallery rows per style (no labels).",
    type=whole_number(1),
    default=REPORT_PER_STYLE,
)

# --- Explanations --------------------------------------------------------------------------

STYLE = flag("--style", "Explain this style instead of each image's top style.", default=None)
FEATURE_MAPS = flag(
    "--feature_maps",
    "Also draw this backbone layer's filters and activation maps ('stem_conv', "
    "'block3_dwconv', 'stage4_out', ...; 'efficientnet_lite2/stem_conv' for the second "
    "backbone of an ensemble).",
    metavar="LAYER",
    default=None,
)

# --- Training ------------------------------------------------------------------------------

_FRACTION = number(0, below=1)
BACKBONE = flag(
    "--backbone",
    "Backbone name, or several joined by '+' (an ensemble: features concatenated).",
    type=backbone_names,
    default="efficientnet_lite2",
)
FEATURE_KIND = flag(
    "--feature_kind",
    "The features a head reads: 'pooled' (the last layer's), 'stage_stats' (plus channel "
    "means and deviations of stages) or 'stage_covariance' (plus channel covariances of "
    "early stages).",
    choices=FEATURE_KINDS,
    default="stage_covariance",
)
MODEL_ID = flag("--model_id", "Bundle id (default: derived).", default=None)
SPLIT_COLUMN = flag("--split_column", "Catalog's split column.", default="split")
TRAIN_SPLIT = flag("--train_split", "Rows to train on.", default="train")
EVAL_SPLIT = flag("--eval_split", "Rows to report scores on.", default="val")
FEATURES_DIR = flag(
    "--features_dir",
    "The folder of the images' feature files (default: OUTPUT.features/).",
    default=None,
)
REUSE_FEATURES = flag(
    "--reuse_features",
    "Fit the head on the feature files an earlier run with the same backbone and feature "
    "kind wrote in the features folder.",
    action="store_true",
)
AUGMENT_MIRROR = flag(
    "--augment_mirror",
    "Also fit the head on every training painting's left-right mirror (the feature pass "
    "computes both: twice its time).",
    action="store_true",
)
FOLDS = flag(
    "--folds",
    "Heads cross-fitted on the training split, each early-stopped on its own fold; the "
    "bundle averages them, their out-of-fold logits calibrate it.",
    type=whole_number(2),
    default=5,
)
HIDDEN_UNITS = flag(
    "--hidden_units",
    "MLP head width; 0: linear.",
    type=whole_number(0),
    default=HeadConfig.hidden_units,
)
DROPOUT = flag("--dropout", type=_FRACTION, default=HeadConfig.dropout)
L2 = flag("--l2", type=number(0), default=HeadConfig.l2)
CLASS_BALANCE = flag(
    "--class_balance",
    "Each style's weight is (mean paintings a style / its paintings) to this power: 1 weighs "
    "every style alike, 0 every painting.",
    type=number(0),
    default=HeadConfig.class_balance,
)
PROJECTION = flag(
    "--projection",
    "The merged head reads its features through a projection to this many numbers, fitted "
    "to what its hidden units see (0: none): most of the bundle's size, and each painting's "
    "embedding.",
    type=whole_number(0),
    default=HeadConfig.projection,
)
VOTERS = flag(
    "--voters",
    "The bundle keeps every training painting, and this many nearest ones vote for a "
    "painting's style beside the head (0: the head alone; models/vote.py).",
    type=whole_number(0),
    default=VoteConfig.voters,
)
VOTE_WEIGHT = flag(
    "--vote_weight",
    "The share of the bundle's probabilities that the training paintings' vote is.",
    type=_FRACTION,
    default=VoteConfig.weight,
)
LABEL_SMOOTHING = flag("--label_smoothing", type=_FRACTION, default=HeadConfig.label_smoothing)
LEARNING_RATE = flag(
    "--learning_rate", type=number(0, above=True), default=HeadConfig.learning_rate
)
EPOCHS = flag(
    "--epochs", "At most; early stopping.", type=whole_number(1), default=HeadConfig.epochs
)
SEED = flag("--seed", type=whole_number(0), default=HeadConfig.seed)

# --- The index of embeddings -----------------------------------------------------------------

ADD = flag(
    "--add",
    "Add the runs' paintings to the index at --output, without rebuilding it. A painting "
    "whose URI the index holds already keeps its item (rebuild with --replace to take a later "
    "run's); rows of one run that share a URI are items of their own.",
    action="store_true",
)
REPLACE = flag(
    "--replace",
    "Build a new index over the one at --output, which stays whole until the new one is written.",
    action="store_true",
)
SEARCH = flag(
    "--search",
    "A new index's search. 'exact': every painting compared; 'approximate': IVF, the "
    "paintings of the query's nearest cells compared (k-means cells fitted on the runs' "
    "paintings), faster past ten thousand paintings, most but not always all of the true "
    "nearest (its recall is in docs/similar.md). 'auto' (default): exact up to the size "
    "where one query stays quick, approximate past it.",
    choices=INDEX_SEARCHES,
    default=None,
)
INDEX = flag(
    "--index",
    "An index (python -m pipeline.index) of the same model as --model.",
    metavar="INDEX",
    default=None,
)
MAX_DISTANCE = flag(
    "--max_distance",
    "The largest cosine distance listed (0: the same direction, 1: unrelated, 2: opposite)",
    type=number(0),
    metavar="D",
    default=None,
)
SHOW = flag("--show", "Pairs printed (the closest groups).", type=whole_number(0), default=20)


# --- Groups: what the commands compose -----------------------------------------------------


def add_catalog_flags(parser: argparse.ArgumentParser) -> None:
    """What to read and where to write (pipeline.options.CatalogOptions)."""
    add(parser, INPUT, OUTPUT, URI_COLUMN, LABEL_COLUMN)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """How a backbone runs, in prediction and in training's feature pass
    (pipeline.options.ModelOptions)."""
    add(parser, BATCH_SIZE, BACKBONE_WEIGHTS)


def add_image_flags(parser: argparse.ArgumentParser) -> None:
    """How images are fetched and decoded (pipeline.options.ImageOptions)."""
    add(parser, FETCH_CONCURRENCY, MAX_CONNECTIONS_PER_HOST, MAX_RETRIES)
    add_image_limit_flags(parser)


def add_image_limit_flags(parser: argparse.ArgumentParser) -> None:
    """The caps on one image: its fetch's deadline, its bytes, its pixels."""
    add(parser, FETCH_TIMEOUT_S, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """What runs a bundle's classifier, and in which arithmetic."""
    add(parser, ENGINE, PRECISION)


def add_classifier_flags(parser: argparse.ArgumentParser) -> None:
    """Which model answers, how many styles it lists, what runs it: the pipeline's and the
    service's."""
    add(parser, MODEL, TOP_K, add_engine_flags)


def add_predict_flags(parser: argparse.ArgumentParser) -> None:
    """Prediction's own (pipeline.options.PredictOptions)."""
    add(parser, add_classifier_flags, EMBEDDINGS, OVERWRITE, REPORT)


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Training's own (pipeline.options.TrainOptions)."""
    add(parser, BACKBONE, FEATURE_KIND, MODEL_ID, SPLIT_COLUMN, TRAIN_SPLIT, EVAL_SPLIT)
    add(parser, FEATURES_DIR, REUSE_FEATURES, AUGMENT_MIRROR, FOLDS, HIDDEN_UNITS, DROPOUT)
    add(parser, L2, CLASS_BALANCE, PROJECTION, LABEL_SMOOTHING, LEARNING_RATE, EPOCHS, SEED)
    add(parser, VOTERS, VOTE_WEIGHT)


def add_explain_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_URI", help="Local paths or URIs.")
    add(
        parser,
        OUTPUT.but(help="Folder for the PNGs.", required=True, metavar="DIR"),
        MODEL,
        STYLE,
        FEATURE_MAPS,
        BACKBONE_WEIGHTS,
    )


def add_report_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="DIR", help="The --output folder of a finished run.")
    add(
        parser,
        INPUT.but(
            help="The run's catalog, which says where its rows' images are (without it, each "
            "row's URI is read as it is, relative ones from the current folder)."
        ),
        URI_COLUMN,
        MODEL.but("It must be the run's: the sampled rows are explained with it."),
        BACKBONE_WEIGHTS,
        SAMPLES,
        PER_STYLE,
        OVERWRITE,
    )


def add_index_flags(parser: argparse.ArgumentParser) -> None:
    """python -m pipeline.index's."""
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="OUT_DIR",
        help="Output folders of runs with --embeddings (any fsspec URI), added in this order.",
    )
    OUTPUT.but(help="The index: a folder on local disk.", required=True, metavar="INDEX")(parser)
    existing = parser.add_mutually_exclusive_group()
    add(existing, ADD, REPLACE)  # type: ignore[arg-type]  # a group declares as a parser does
    SEARCH(parser)


def add_duplicates_flags(parser: argparse.ArgumentParser) -> None:
    """python -m pipeline.duplicates's."""
    parser.add_argument("index", metavar="INDEX", help="An index (python -m pipeline.index).")
    MAX_DISTANCE.but(
        "between fingerprints (default: the index's embedding's same_picture_distance, "
        f"{SAME_PICTURE_DISTANCE} for the shipped model)."
    )(parser)
    add(
        parser,
        OUTPUT.but(help="Write every pair there too.", metavar="FILE.parquet"),
        SHOW,
    )


def add_similar_flags(parser: argparse.ArgumentParser) -> None:
    """python -m pipeline.similar's, beside the model's and the images'."""
    parser.add_argument(
        "queries",
        nargs="+",
        metavar="QUERY",
        help="Images (a path, or any URI the pipeline reads: gs://, https://, zip://, ...), or "
        "catalogs (.csv, .parquet, as python -m pipeline reads them) whose every row is a query.",
    )
    INDEX.but(required=True)(parser)
    parser.add_argument(
        "-k",
        type=whole_number(1),
        default=10,
        help="Nearest paintings listed per query (default: %(default)d).",
    )
    MAX_DISTANCE.but(
        "between styles; the same picture is listed whatever its style (default: none)."
    )(parser)
    add(
        parser,
        OUTPUT.but(
            help="Write every query's neighbours there too, one row per (query, neighbour); a "
            "query that could not be read is one row with its error.",
            metavar="FILE.parquet",
        ),
        SHOW.but(help="Queries whose neighbours are printed."),
        MODEL,
        add_engine_flags,
    )


class OneLineParser(argparse.ArgumentParser):
    """Raises UsageError where argparse would print its usage and exit: a bad flag is one
    line, as the commands' other errors are."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message.removeprefix("argument "))


@dataclass(frozen=True)
class CommandLine:
    """A command: the module `python -m` runs, what it does, its flag groups. Declared here
    rather than in the command's module, so that its --help is answered before that module
    (and Beam and TensorFlow with it) loads. The flags of a Beam command are Beam options
    (pipeline.options parses them); a command without Beam parses its own (`parse`)."""

    module: str
    about: str
    groups: Sequence[FlagGroup]
    epilog: str | None = BEAM_EPILOG

    @property
    def prog(self) -> str:
        """The command as its user typed it: `artstyle predict` or `python -m pipeline`."""
        return called_as(self.module)

    def parser(
        self, parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser, **settings: Any
    ) -> argparse.ArgumentParser:
        """A parser of the command's flags (`settings`: argparse's own)."""
        parser = parser_class(
            prog=self.prog, description=self.about, epilog=self.epilog, **settings
        )
        add(parser, *self.groups)
        return parser

    def parse(self, argv: list[str]) -> argparse.Namespace:
        """The flags of a command without Beam options; UsageError for a bad one."""
        return self.parser(parser_class=OneLineParser, allow_abbrev=False).parse_args(argv)

    def answer_help(self, argv: list[str]) -> None:
        """If `argv` asks for --help, lists the command's flags and exits. (Beam's parser
        would answer with its own flags only.)"""
        if not {"-h", "--help"} & set(argv):
            return
        self.parser().print_help()
        raise SystemExit(0)


PREDICT_COMMAND = CommandLine(
    "pipeline",
    "Predicts the art style of every image of a catalog, with Apache Beam.",
    (add_catalog_flags, add_model_flags, add_image_flags, add_predict_flags),
)
TRAIN_COMMAND = CommandLine(
    "pipeline.train",
    "Trains a style model bundle: backbone features, a fitted head, a manifest.",
    (add_catalog_flags, add_model_flags, add_image_flags, add_train_flags),
)
EXPLAIN_COMMAND = CommandLine(
    "pipeline.explain",
    "Writes, per image, a PNG of the painting, Grad-CAM for its top style and its top styles.",
    (add_explain_flags,),
    epilog=VERBOSE_EPILOG,
)
REPORT_COMMAND = CommandLine(
    "pipeline.report",
    "Writes DIR/report.html about the predictions of an earlier run in DIR.",
    (add_report_flags,),
)
INDEX_COMMAND = CommandLine(
    "pipeline.index",
    "Builds a nearest-neighbour index of the embeddings of runs (python -m pipeline "
    "--embeddings), or adds runs to one.",
    (add_index_flags,),
    epilog=VERBOSE_EPILOG,
)
SIMILAR_COMMAND = CommandLine(
    "pipeline.similar",
    "Lists the paintings of an index nearest to each query image, with their distances.",
    (add_similar_flags, add_model_flags, add_image_flags),
)
DUPLICATES_COMMAND = CommandLine(
    "pipeline.duplicates",
    "Lists the pairs of near-identical paintings in an index, grouped.",
    (add_duplicates_flags,),
    epilog=VERBOSE_EPILOG,
)
