#!/usr/bin/env python
"""Record an exhaustive measurement table on this GPU (what ``qflash-tune --simulate`` replays).

    QFLASH_GEN_CACHE=/tmp/qflash-kernels python tools/sweep.py --gpu h100 \\
        --workloads vit_b,swin_t --batches 8,64 --record h100_sweep.csv

    # issue 17's H200 table: 14-bit P and the tune grid's axes (grid sweep14), 2,664 configs;
    # run it again (a fresh call) until it prints "to measure: 0 configs" (docs/tuner-efficiency.md)
    QFLASH_GEN_CACHE=/tmp/qflash-kernels timeout -s INT 570 python tools/sweep.py --gpu h200 --grid sweep14 \\
        --workloads vit_b,swin_s --batches 64 --record tests/data/h200_sweep.csv --compile-jobs 15

Same as ``qflash-tune --exhaustive --grid sweep ...`` (every flag of qflash-tune applies; see
``--help``): one row per (shape, config) of the grid, written as soon as measured, resumed when the
file exists.  ``--compile-jobs`` workers compile while the timed worker measures each config as
soon as its compile is done, so a call records rows from its first seconds, and an interrupted one
(``timeout -s INT``) stops at once and keeps them.  A fresh machine has an empty Triton cache: each
call compiles again the configs it measures (only those still missing).  The timings are taken
beside the running compiles (the protocol note in docs/tuner-efficiency.md).

``--dry-run`` prints the plan, a time estimate and how many configs a 570 s call records -- an
*estimate* from the cost model in qflash_gen/tune/sweep.py (compile 2.5 CPU s, measurement 0.12 s,
30 s to start): for the H200 table above about 2,440 of the 2,664 configs per call, so two calls;
three if a measurement takes 0.3 s.  Needs no optuna.  ``--grid`` picks the grid (default ``sweep``,
the H100 table's; ``sweep14``: the H200's).  See qflash_gen/tune/sweep.py for the method.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qflash_gen.tune import cli  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """The exhaustive mode of ``qflash-tune`` with its own default grid (``sweep``)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--grid", default="sweep")
    known, rest = parser.parse_known_args(argv)
    return cli.main(["--exhaustive", "--grid", known.grid, *rest])


if __name__ == "__main__":
    sys.exit(main())
