"""`python -m bench [NAME] [FLAGS]`: the pipeline's benchmark (bench/cli.py), or the one NAME
names (bench/NAME.py, as `python -m bench.NAME`)."""

import sys

from bench.flags import OTHER_BENCHES, parse_args
from pipeline.cli import called_as, run_module

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and argv[0] in OTHER_BENCHES:
        run_module(f"bench.{argv[0]}", argv[1:], f"{called_as('bench')} {argv[0]}")
    else:
        parse_args(argv)  # --help and a bad flag answer before the benchmarks load TensorFlow
        from bench.cli import main

        main()
