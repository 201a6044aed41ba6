"""Command-line options, as Beam PipelineOptions so that Beam's own flags mix in freely."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

from models.bundle import DEFAULT_BUNDLE, BundleError
from models.head import HeadConfig
from models.precision import PRECISIONS
from transforms.catalog import CatalogError
from transforms.fetch import DEFAULT_MAX_BYTES, FetchPolicy, default_user_agent
from transforms.images import DEFAULT_MAX_PIXELS


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
        parser.add_argument(
            "--batch_size", type=int, default=32, help="Images per model call (fixed)."
        )
        parser.add_argument(
            "--backbone_weights",
            default=None,
            help="A local file of the backbone's ImageNet weights, for hosts that cannot "
            "download them (ResNet50: Keras's ..._notop.h5 file).",
        )
        parser.add_argument(
            "--max_image_pixels",
            type=int,
            default=DEFAULT_MAX_PIXELS,
            help="Larger images are error rows (decompression-bomb guard).",
        )

    def check_required(self) -> None:
        """Beam parses every options class on every parse (workers, TestPipeline), so argparse's
        `required=True` would fail them all: the entry points check here instead."""
        missing = [f"--{name}" for name in ("input", "output") if not getattr(self, name)]
        if missing:
            raise SystemExit(f"artstyle: missing {' and '.join(missing)} (see --help)")


class FetchOptions(PipelineOptions):
    """How images are fetched: concurrency, politeness, retries, deadlines, byte caps."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        defaults = FetchPolicy()
        parser.add_argument(
            "--fetch_concurrency",
            type=int,
            default=defaults.concurrency,
            help="Images fetched at once per worker (network and bucket reads wait, not work).",
        )
        parser.add_argument(
            "--max_connections_per_host",
            type=int,
            default=defaults.max_connections_per_host,
            help="Connections at once to one host (Wikimedia's hosts: at most 2, as its "
            "robot policy asks).",
        )
        parser.add_argument(
            "--max_retries",
            type=int,
            default=defaults.max_retries,
            help="Retries of a transient failure (timeouts, resets, HTTP 408/429/5xx), with "
            "exponential backoff and the server's Retry-After. gs:// and s3:// retry in "
            "their own libraries instead.",
        )
        parser.add_argument(
            "--fetch_timeout_s",
            type=float,
            default=defaults.timeout_s,
            help="Deadline per image, all attempts together: then it is an error row.",
        )
        parser.add_argument(
            "--max_image_bytes",
            type=int,
            default=DEFAULT_MAX_BYTES,
            help="Larger files are error rows, found out while streaming.",
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
    """Prediction flags, beside CatalogOptions."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument(
            "--model", default=DEFAULT_BUNDLE, help="A model bundle folder (default: shipped)."
        )
        parser.add_argument("--top_k", type=int, default=5, help="Styles listed per image.")
        parser.add_argument(
            "--precision",
            choices=PRECISIONS,
            default="auto",
            help="The backbone's arithmetic. 'auto': bfloat16 where the worker runs it "
            "natively (a GPU, or a CPU with AVX512_BF16 or AMX), else float32.",
        )


class TrainOptions(PipelineOptions):
    """Training flags, beside CatalogOptions: every choice that shapes the model is one, and
    lands in the manifest."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument(
            "--backbone",
            default="efficientnet_lite2",
            help="Backbone name, or several joined by '+' (an ensemble: features concatenated).",
        )
        parser.add_argument(
            "--features",
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
            type=int,
            default=5,
            help="Heads cross-fitted on the training split, each early-stopped on its own "
            "fold; the bundle averages them, their out-of-fold logits calibrate it.",
        )
        parser.add_argument(
            "--hidden_units",
            type=int,
            default=HeadConfig.hidden_units,
            help="MLP head width; 0: linear.",
        )
        parser.add_argument("--dropout", type=float, default=HeadConfig.dropout)
        parser.add_argument("--l2", type=float, default=HeadConfig.l2)
        parser.add_argument("--label_smoothing", type=float, default=HeadConfig.label_smoothing)
        parser.add_argument("--learning_rate", type=float, default=HeadConfig.learning_rate)
        parser.add_argument(
            "--epochs", type=int, default=HeadConfig.epochs, help="At most; early stopping."
        )
        parser.add_argument("--seed", type=int, default=HeadConfig.seed)


def parse_options(
    argv: list[str] | None, views: tuple[type[PipelineOptions], ...], prog: str, about: str
) -> PipelineOptions:
    """PipelineOptions from `argv` (default: the command line), checked for our required flags.

    Beam's parser answers --help with its own flags only; ours are listed here instead.
    """
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        parser = argparse.ArgumentParser(
            prog=prog,
            description=about,
            epilog="Beam's own options (--runner, --direct_num_workers, ...) are accepted too.",
        )
        for view in views:
            view._add_argparse_args(parser)
        parser.print_help()
        raise SystemExit(0)
    options = PipelineOptions(argv)
    options.view_as(SetupOptions).save_main_session = False
    options.view_as(CatalogOptions).check_required()
    return options


def run_command(run: Callable[[], object]) -> None:
    """An entry point's `main`: a bad catalog or bundle is a one-line message, not a trace."""
    logging.getLogger().setLevel(logging.WARNING)
    try:
        run()
    except (CatalogError, BundleError) as error:
        raise SystemExit(f"artstyle: {error}") from None
