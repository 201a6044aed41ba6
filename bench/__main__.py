"""`python -m bench`: see bench/cli.py."""

import sys

from bench.flags import parse_args

if __name__ == "__main__":
    parse_args(sys.argv[1:])  # --help and a bad flag answer before the benchmarks load TensorFlow
    from bench.cli import main

    main()
