"""Replay a recorded table instead of a GPU (Kernel Tuner's simulation mode).

``qflash-tune --simulate FILE`` runs the same search, the same constraints and the same DB
writing as a GPU run, but each measurement is a lookup in a table recorded by an exhaustive sweep
on a real GPU (:mod:`.table`).  A config the table lacks replays as a failed trial: it was outside
the recorded grid or did not build.  The GPU name comes from the table, and the DB entry records
the table's path and sha256 as its source, so a simulated entry never passes for a live one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qflash_gen.config import KernelConfig
from qflash_gen.tune.measure.base import Measurement, Measurer, ShapeSpec
from qflash_gen.tune.table import Table, read_table

NOT_RECORDED = "not in the recorded table (outside the recorded grid, or not measurable)"


class SimulatedMeasurer(Measurer):
    """Measurements looked up in a recorded table.

    Args:
        table: a :class:`Table` or the path of a table file.
        gpu: which GPU's rows to replay; required when the table holds several, and must be one
            of them (a clear error naming ``--gpu`` otherwise).
        delay_s: sleep per measurement, to emulate GPU time (tests of kill-and-resume use it).
    """

    def __init__(self, table: Table | str | os.PathLike[str], gpu: str | None = None, *, delay_s: float = 0.0) -> None:
        self.table = table if isinstance(table, Table) else read_table(table)
        gpus = self.table.gpus()
        if not gpus:
            raise ValueError(f"--simulate {self.table.path}: the table has no rows")
        if gpu is None:
            if len(gpus) > 1:
                raise ValueError(f"--simulate {self.table.path} holds several GPUs {gpus}; pick one with --gpu")
            gpu = gpus[0]
        elif gpu not in gpus:
            raise ValueError(
                f"--gpu {gpu} does not match the recorded table {self.table.path}, which holds GPU(s) {gpus}"
            )
        self.gpu = gpu
        self.delay_s = delay_s
        self.calls = 0

    @property
    def protocol(self) -> dict[str, Any]:
        return self.table.protocol

    @property
    def provenance(self) -> dict[str, Any]:
        path = self.table.path
        return {
            "source": "simulated",
            "table": str(Path(path).name) if path else None,
            "table_sha256": self.table.sha256,
            "environment": self.table.environment,
        }

    def shapes(self) -> list[ShapeSpec]:
        return self.table.shapes(self.gpu)

    def configs(self, shape: ShapeSpec | None = None) -> list[KernelConfig]:
        return self.table.configs(self.gpu, shape)

    def has_shape(self, shape: ShapeSpec) -> bool:
        return any(s.match_key() == shape.match_key() for s in self.shapes())

    def measure(self, config: KernelConfig, shape: ShapeSpec) -> Measurement:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        got = self.table.lookup(self.gpu, shape, config)
        return got if got is not None else Measurement.failed(NOT_RECORDED)

    def measure_many(self, config: KernelConfig, shapes: Sequence[ShapeSpec]) -> list[Measurement]:
        return [self.measure(config, s) for s in shapes]
