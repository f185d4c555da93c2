"""Measuring candidates: the contract and its backends.

* :mod:`.base` -- :class:`ShapeSpec`, :class:`Measurement`, :class:`Protocol`, :class:`Measurer`;
* :mod:`.gpu` -- :class:`GPUMeasurer`: a worker subprocess per candidate stream
  (:mod:`.isolation` runs it, :mod:`.worker_main` is its main, :mod:`.gpu_jobs` its job code);
* :mod:`.simulate` -- :class:`SimulatedMeasurer`: replay of a recorded table.

Words: the *worker* is that subprocess; a *job* is one request to it; a study's budget holder is
a *slot* (:mod:`qflash_gen.tune.study`); one ``qflash-tune`` process per GPU of ``--devices`` is
a *device runner* (:mod:`qflash_gen.tune.devices`).
"""

from qflash_gen.tune.measure.base import ENERGY_FIELDS, OUT_DTYPES, TIMINGS, Measurement, Measurer, Protocol, ShapeSpec
from qflash_gen.tune.measure.gpu import GPU_TARGET, GPUMeasurer

__all__ = [
    "ENERGY_FIELDS",
    "GPU_TARGET",
    "OUT_DTYPES",
    "TIMINGS",
    "GPUMeasurer",
    "Measurement",
    "Measurer",
    "Protocol",
    "ShapeSpec",
]
