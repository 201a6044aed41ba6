"""How fast the pipeline predicts, where its time goes, and how much memory it needs.

`python -m bench --images N --output FILE.json` measures, in one run: the model alone
(several exact ways to call it), decoding alone, the whole pipeline as a subprocess (with
and without start-up, and its peak memory for N and for a larger catalog), and the
original project's way of loading the model afresh for every image.

Beside it, each its own command: `python -m bench.serve` (the service under load),
`python -m bench.large_catalog` (memory as a catalog grows tenfold) and `python -m
bench.similar` (the nearest-neighbour index: build, memory, one query, recall).
"""
