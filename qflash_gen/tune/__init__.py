"""The tuner behind ``qflash-tune``: Optuna search over `KernelConfig`s, per GPU and workload.

Modules, one concept each (the flow: docs/architecture.md):

* :mod:`.cli` -- the argument parser and dispatch; :mod:`.commands` -- its modes (search,
  export, devices, sweep); :mod:`.setup` -- arguments to shapes, measurer, grid, storage;
  :mod:`.summary` -- what it prints.
* :mod:`.space` -- the search space (grid, constraints, Optuna distributions).
* :mod:`.plan` -- each study's warm starts (the runtime's current pick, every DB's entries, the
  default, their variants); :mod:`.incumbent` -- the current pick and what a winner must beat.
* :mod:`.study` -- open a study, take a slot, the ask/tell loop (:class:`~.study.StudySettings`);
  :mod:`.staged` -- the climb along the grid's axes before the sampler;
  :mod:`.trials` -- trial records and results; :mod:`.objective` -- objectives and the pick.
* :mod:`.measure` -- the measurement contract and its backends (GPU in a worker subprocess,
  replay of a recorded table).
* :mod:`.table` -- recorded tables (CSV); :mod:`.sweep` -- the exhaustive sweep that records them.
* :mod:`.storage` -- Optuna storage (journal file or a URL; :mod:`.journal`: a torn or damaged
  journal file); :mod:`.lease` -- several processes
  on one study (who measures a config, slots); :mod:`.db_turn` -- who writes the DB;
  :mod:`.winners` -- the DB entries and Pareto fronts; :mod:`.devices` -- ``--devices``: one
  device runner per GPU (docs/distributed.md).

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
    "SimulatedMeasurer": "measure.simulate",
    "GRIDS": "space",
    "Grid": "space",
    "SearchSpace": "space",
    "StudyResult": "trials",
    "StudySettings": "study",
    "TrialRecord": "trials",
    "pareto_front": "trials",
    "run_study": "study",
    "select_best": "trials",
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
