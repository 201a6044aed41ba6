"""The other libraries' private names artstyle uses: in one module, read in the versions it
names, and still there."""

import argparse
from importlib.metadata import version
from pathlib import Path

import fsspec
import pytest

from transforms.library_internals import (
    CHECKED_WITH,
    add_beam_flags,
    beam_argument_parser,
    known_flags,
    python_version,
    strip_protocol,
)

REPO = Path(__file__).resolve().parent.parent
# The private names the module wraps, as code would use them.
WRAPPED = ("_BeamArgumentParser", "._add_argparse_args(", "._actions", "_run_exitfuncs",
           "._strip_protocol(")  # fmt: skip


@pytest.mark.parametrize("package", sorted(CHECKED_WITH))
def test_the_versions_installed_are_the_ones_the_internals_were_read_in(package):
    installed = python_version() if package == "python" else version(package)
    assert installed == CHECKED_WITH[package], (
        f"{package} is {installed}, not {CHECKED_WITH[package]}: read "
        "transforms/library_internals.py's functions against it, then update CHECKED_WITH"
    )


def test_no_other_module_uses_the_private_names_it_wraps():
    users = {
        str(path.relative_to(REPO)): [name for name in WRAPPED if name in path.read_text()]
        for folder in ("pipeline", "transforms", "models", "bench")
        for path in (REPO / folder).rglob("*.py")
        if path.name != "library_internals.py"
    }
    assert {path: names for path, names in users.items() if names} == {}


def test_beams_parser_knows_every_flag_of_beams_own_options():
    parser = beam_argument_parser()(allow_abbrev=False)
    assert isinstance(parser, argparse.ArgumentParser)
    add_beam_flags(parser)
    flags = known_flags(parser)
    for flag in ("--runner", "--direct_num_workers", "--temp_location", "--user_agent"):
        assert flag in flags
    assert len(flags) == len(set(flags))


def test_a_filesystems_own_path_of_a_url():
    assert strip_protocol(fsspec.filesystem("memory"), "memory://a/b.jpg") == "/a/b.jpg"
    assert strip_protocol(fsspec.filesystem("file"), "file:///tmp/a.jpg") == "/tmp/a.jpg"
