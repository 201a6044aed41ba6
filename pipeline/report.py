"""`python -m pipeline.report DIR`: the report page of a finished run, `DIR/report.html`
(pipeline/report_page.py). This module is the command alone, so that --help and a bad flag
answer before Beam, TensorFlow and the page's libraries load."""

from __future__ import annotations

import argparse
import sys

from pipeline import terminal
from pipeline.flags import REPORT_COMMAND


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The report's own flags; the rest are Beam's (--runner, ...), for the Grad-CAM step."""
    args, beam_args = report_parser().parse_known_args(argv)
    from pipeline.options import check_flags  # Beam's: after --help

    check_flags(beam_args, ())  # the rest must be Beam's: a mistyped flag is an error
    return args, beam_args


def report_parser() -> argparse.ArgumentParser:
    return REPORT_COMMAND.parser(allow_abbrev=False)


def run(argv: list[str] | None = None) -> str:
    """Writes the page and publishes it in DIR (pipeline/outputs.py), beside the run's
    results, which stay as they are; returns the page's path."""
    args, beam_args = parse_args(sys.argv[1:] if argv is None else argv)
    from apache_beam.options.pipeline_options import PipelineOptions

    from models.bundle import ModelBundle, check_backbone_weights
    from pipeline.outputs import REPORT_RESULTS, OutputFolder
    from pipeline.report_page import check_finished_run, write_report
    from transforms.catalog import open_catalog

    bundle = ModelBundle.load(args.model)
    check_backbone_weights(bundle.manifest.backbone.name, args.backbone_weights)
    bundle.check_head()  # Grad-CAM's Keras reads it in a Beam step: refused, it is one line now
    check_finished_run(args.output)  # before the folder is claimed: claiming creates one
    catalog = open_catalog(args.input, uri_column=args.uri_column) if args.input else None
    with OutputFolder.claim(args.output, REPORT_RESULTS, args.overwrite) as output:
        path = write_report(
            output,
            output.published_results(),
            bundle,
            catalog=catalog,
            backbone_weights=args.backbone_weights,
            beam_options=PipelineOptions(beam_args),
            samples=args.samples,
            per_style=args.per_style,
        )
        output.publish()
    print(f"artstyle: report written to {path}")
    return path


def main() -> None:
    report_parser().parse_known_args(sys.argv[1:])  # --help and a bad flag, before Beam loads
    from pipeline.options import run_command

    run_command(run)


if __name__ == "__main__":
    main()
    terminal.end_process()
