"""The benchmarks: how fast artstyle predicts and serves, where its time goes, how much memory
it needs. Each prints a table and writes JSON; their figures go to bench/results/ (named by
machine) and docs/benchmarks.md.

`python -m bench --images N --output FILE.json` measures the pipeline, section by section
(bench/cli.py): the model alone, the other engines, decoding alone, the pipeline as a user
runs it, the pipeline over HTTP against disk, the model alone again, and a fresh model per
image. Beside it, each a command of its own (`python -m bench NAME`, as `python -m
bench.NAME`, or `artstyle bench NAME`): `serve`, the service under load against the batch
pipeline; `large_catalog`, whether memory stays flat as a catalog grows tenfold; and
`similar`, the nearest-neighbour index (build, memory, one query, recall).

The benchmarks run from a checkout: neither the installed package nor the workers' image
holds them.
"""

from pipeline import terminal

terminal.set_up_for_python_m()  # before a benchmark's module imports TensorFlow
