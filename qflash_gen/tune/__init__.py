"""The tuner behind ``qflash-tune``: Optuna search over `KernelConfig`s, per GPU and workload.

Modules, one concept each:

* :mod:`.space` — the search space (grid, constraints, Optuna distributions).
* :mod:`.measure` — the measurement contract (:class:`Measurer`, :class:`Measurement`,
  :class:`Protocol`) and the GPU backend; :mod:`.simulate` — replay of a recorded table.
* :mod:`.isolate` / :mod:`.worker` / :mod:`.gpu_worker` — candidates run in a worker subprocess.
* :mod:`.study` — the ask/tell loop, duplicate handling, resume, the pick and the Pareto front.
* :mod:`.table` — recorded tables (CSV); :mod:`.sweep` — the exhaustive sweep that records them.
* :mod:`.storage` — Optuna storage (embedded journal file or a URL); :mod:`.cli` — ``qflash-tune``.
* :mod:`.lease` — several workers on one study: who measures a config, worker slots, who writes
  the DB; :mod:`.devices` — ``--devices``: one worker process per GPU (docs/distributed.md).

Importing this package starts no process and touches no GPU.
"""

import importlib
from typing import Any

# Names are imported on first use: the sweep (tools/sweep.py) runs on GPU machines without
# optuna, which only the search (study, storage) needs.
_EXPORTS = {
    "GPUMeasurer": "measure",
    "Measurement": "measure",
    "Measurer": "measure",
    "Protocol": "measure",
    "ShapeSpec": "measure",
    "SimulatedMeasurer": "simulate",
    "GRIDS": "space",
    "Grid": "space",
    "SearchSpace": "space",
    "StudyResult": "study",
    "TrialRecord": "study",
    "pareto_front": "study",
    "run_study": "study",
    "select_best": "study",
    "Table": "table",
    "TableWriter": "table",
    "read_table": "table",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qflash_gen.tune' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qflash_gen.tune.{module}"), name)
