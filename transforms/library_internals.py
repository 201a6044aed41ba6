"""The private names of other libraries that artstyle uses, all here, each beside the reason no
public one serves.

They were read in the versions of CHECKED_WITH (setup.py pins the libraries, the Python
version is the CI's): tests/test_library_internals.py fails when an installed version
differs, naming this module, so that whoever moves a pin reads these few functions again
first. Nothing else in the code names a private attribute of another library. Beam is
imported only where its parser is asked for: fetching, which uses fsspec's part, runs
without Beam.
"""

from __future__ import annotations

import argparse
import atexit
import sys

import fsspec

CHECKED_WITH = {"apache-beam": "2.77.0", "fsspec": "2026.9.0", "python": "3.11"}


def beam_argument_parser() -> type[argparse.ArgumentParser]:
    """The parser class of Beam's PipelineOptions, `_BeamArgumentParser`: Beam's own options
    declare their flags with its `add_value_provider_argument`, which argparse's parser
    lacks, so a parser that knows every Beam flag must be one of these."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    return _BeamArgumentParser


def add_beam_flags(parser: argparse.ArgumentParser) -> None:
    """Declares the flags of every options class of Beam's own on `parser` (one of
    `beam_argument_parser()`'s): Beam lists them nowhere, but each is a direct subclass of
    PipelineOptions that declares its flags in `_add_argparse_args`, the hook Beam's
    documentation tells subclasses to override, and calls on every parse."""
    from apache_beam.options.pipeline_options import PipelineOptions

    for view in PipelineOptions.__subclasses__():
        if view.__module__.startswith("apache_beam."):
            view._add_argparse_args(parser)  # type: ignore[arg-type]  # a Beam parser, untyped


def known_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every flag `parser` declares (--name and its aliases): argparse keeps its actions in
    `_actions` and has no public list of them."""
    return [flag for action in parser._actions for flag in action.option_strings]


def run_exit_handlers() -> None:
    """Runs the handlers registered with atexit, in their order, and forgets them: CPython's
    own runner, `atexit._run_exitfuncs`, for a process that then ends with `os._exit`
    (atexit has no public way to run them short of Python's whole teardown)."""
    atexit._run_exitfuncs()


def strip_protocol(fs: fsspec.AbstractFileSystem, url: str) -> str:
    """`url` as a path of `fs`, its protocol (and the options some filesystems read from
    it) taken off by the filesystem's own `_strip_protocol`: fsspec's public
    `core.strip_protocol` picks the filesystem from the URL again instead of using the
    one given."""
    return fs._strip_protocol(url)


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"
