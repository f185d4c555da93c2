"""Energy per attention call, measured with NVML's total-energy counter.

:mod:`.counter` opens and reads the counter (or says why there is none); :mod:`.meter` turns
counter readings around long CUDA-graph loops into microjoules per call (its module doc gives
the method).  Tested on a CPU with a fake counter.
"""

from qflash_gen.energy import counter
from qflash_gen.energy.counter import (
    UNAVAILABLE,
    EnergyCounter,
    EnergyError,
    EnergyUnavailable,
    NVMLCounter,
    open_counter,
    probe,
)
from qflash_gen.energy.meter import (
    DEFAULT_MIN_SECONDS,
    DEFAULT_REPEATS,
    METHOD,
    BusySample,
    EnergyMeter,
    EnergyResult,
    GraphWork,
    IdleSample,
    Work,
    combine,
    measure_callable,
    measure_callables,
    method,
)

__all__ = [
    "DEFAULT_MIN_SECONDS",
    "DEFAULT_REPEATS",
    "METHOD",
    "UNAVAILABLE",
    "BusySample",
    "EnergyCounter",
    "EnergyError",
    "EnergyMeter",
    "EnergyResult",
    "EnergyUnavailable",
    "GraphWork",
    "IdleSample",
    "NVMLCounter",
    "Work",
    "combine",
    "counter",
    "measure_callable",
    "measure_callables",
    "method",
    "open_counter",
    "probe",
]
