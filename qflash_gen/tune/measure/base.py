"""The measurement contract: what a tuned shape is, what one measurement says, how it is taken.

The tuner only ever asks ``measurer.measure(config, shape)``.  Behind it,
:class:`qflash_gen.tune.measure.gpu.GPUMeasurer` compiles and times the candidate in an isolated
worker process (:mod:`.isolation`, :mod:`.gpu_jobs`), and
:class:`qflash_gen.tune.measure.simulate.SimulatedMeasurer` looks the answer up in a table
recorded on a real GPU (Kernel Tuner's simulation mode), so the search logic and the DB writing
are tested on a CPU with real numbers.

Every measurement follows one recorded :class:`Protocol`: fresh random inputs, correctness
against the bit-exact oracle before any timing (a wrong kernel is a failed trial, never a fast
one), SQNR against float64 attention, then the latency.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from qflash_gen.config import KernelConfig
from qflash_gen.keys import DTYPE_NAMES, WorkloadKey, workload_key

ENERGY_FIELDS: tuple[str, ...] = ("energy_uj", "energy_spread_uj", "above_idle_uj", "idle_w")
OUT_DTYPES: tuple[str, ...] = DTYPE_NAMES
TIMINGS: tuple[str, ...] = ("do_bench", "cudagraph")
# Before a timing, the timed GPU worker process busies the GPU with fp16 matmuls
# (``gpu_jobs.warm_up``) when it has not timed anything yet or when more than
# ``GPU_IDLE_REWARM_S`` passed since its last timing: an idle H200 sat at a 345 MHz SM clock
# (1980 MHz max) and the first three timings were 3-4x too slow; a study compiles each batch ahead
# for seconds, and the first timings of a batch were again 2-6x slow with wide spreads while the
# worker warmed only once.  Where NVML reads the SM clock and its maximum, the warm-up runs until
# the clock reaches ``GPU_CLOCK_TARGET`` of the maximum; elsewhere for ``GPU_WARMUP_S``.
GPU_WARMUP_S = 0.25  # busy time where the SM clock or its maximum cannot be read
GPU_WARMUP_MAX_S = 1.0  # bound on one whole warm-up, cuBLAS's start included
GPU_CLOCK_TARGET = 0.9  # stop warming once the SM clock reads >= this fraction of its maximum
GPU_IDLE_REWARM_S = 1.0  # warm again before a timing that follows this much time without one
# A timing whose spread (p80 - p20) exceeds this fraction of its median is taken again, after a
# short warm-up, at most ``SPREAD_RETRIES`` times; the last one is kept (a bimodal timing: the
# clock ramping during the reps, or host-side launch gaps).
SPREAD_RETRY_FRACTION = 0.25
SPREAD_RETRIES = 2
GPU_RETRY_WARMUP_S = 0.05  # the short warm-up before a retry (clock target as above, <= 4x this)
GPU_WARMUP_NOTE = (
    f"the timed worker process runs fp16 matmuls on the GPU before its first timing and before any "
    f"timing that follows > {GPU_IDLE_REWARM_S:g} s without one: until NVML reads the SM clock at "
    f">= {GPU_CLOCK_TARGET:.0%} of its maximum, else for {GPU_WARMUP_S * 1e3:.0f} ms "
    f"(<= {GPU_WARMUP_MAX_S * 1e3:.0f} ms in all); a timing whose p80 - p20 spread exceeds "
    f"{SPREAD_RETRY_FRACTION:.0%} of its median is taken again after a short warm-up "
    f"(<= {SPREAD_RETRIES} times, the last kept, counted in the measurement's retries)"
)


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """One kernel launch to tune: a workload at a batch size, and its ``(B, H, N, D)``."""

    workload: str
    batch: int
    b: int
    h: int
    n: int
    d: int
    masked: bool

    @classmethod
    def of(cls, workload: Any, batch: int) -> ShapeSpec:
        """From a :class:`qflash_gen.workloads.Workload` (or its name) and a batch size."""
        from qflash_gen import workloads

        w = workloads.get(workload) if isinstance(workload, str) else workload
        b, h, n, d = workloads.shapes(w, batch)
        return cls(workload=w.name, batch=batch, b=b, h=h, n=n, d=d, masked=w.masked)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.b, self.h, self.n, self.d)

    @property
    def windows(self) -> int:
        """Attention instances per image (Swin windows); 1 when B is not a multiple of batch."""
        return self.b // self.batch if self.batch and self.b % self.batch == 0 else 1

    def match_key(self) -> tuple[int, int, int, int, bool]:
        """What identifies the launch (the workload name does not: vit_b and deit_b are one)."""
        return (self.b, self.h, self.n, self.d, self.masked)

    def label(self) -> str:
        return f"{self.workload} b{self.batch}"

    def key(self, dtype: str) -> WorkloadKey:
        """The DB key of this launch for a workload dtype (``fp16``: fp16 in and out; ``int8``:
        int8 in and out: a workload's kernel output has its dtype)."""
        return workload_key(self.b, self.h, self.n, self.d, masked=self.masked, in_dtype=dtype, out_dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShapeSpec:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Measurement:
    """The outcome of one candidate on one shape.

    ``correct`` is bit-equality with the oracle; ``latency_us`` (median) and ``spread_us``
    (80th minus 20th percentile) are None when nothing was timed; ``error`` says why a
    candidate failed (compile error, crash, timeout, mismatch, not in the recorded table);
    ``retries`` counts the timings taken again because their spread was too wide (see
    ``SPREAD_RETRY_FRACTION``; the values are the last timing's)."""

    latency_us: float | None
    spread_us: float | None
    sqnr_db: float | None
    correct: bool
    error: str | None = None
    # Energy per call (µJ, :mod:`qflash_gen.energy`), only where the protocol measures it:
    # total (idle floor during the call included), its spread (max - min of the rounds), the part
    # above idle, and the idle power (W) measured beside it.
    energy_uj: float | None = None
    energy_spread_uj: float | None = None
    above_idle_uj: float | None = None
    idle_w: float | None = None
    retries: int = 0  # listed by to_dict only when > 0 (records without retries stay as they were)

    @classmethod
    def failed(cls, error: str) -> Measurement:
        return cls(latency_us=None, spread_us=None, sqnr_db=None, correct=False, error=error)

    @property
    def ok(self) -> bool:
        """Correct and timed: a trial with a value (it may still miss the SQNR floor)."""
        return (
            self.correct
            and self.error is None
            and self.latency_us is not None
            and math.isfinite(self.latency_us)
            and self.sqnr_db is not None
        )

    def feasible(self, sqnr_floor: float) -> bool:
        return self.ok and self.sqnr_db is not None and self.sqnr_db >= sqnr_floor

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ENERGY_FIELDS:  # absent unless measured (latency-only records stay as they were)
            if out[key] is None:
                del out[key]
        if not out["retries"]:
            del out["retries"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Measurement:
        def num(key: str) -> float | None:
            v = data.get(key)
            return None if v is None else float(v)

        return cls(
            latency_us=num("latency_us"),
            spread_us=num("spread_us"),
            sqnr_db=num("sqnr_db"),
            correct=bool(data.get("correct", False)),
            error=data.get("error") or None,
            **{key: num(key) for key in ENERGY_FIELDS},
            retries=int(data.get("retries") or 0),
        )


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a measurement is taken; recorded with every DB entry and at the top of every table.

    Attributes:
        timing: ``do_bench`` (``triton.testing.do_bench``: L2 flushed before every rep, median of
            the reps) or ``cudagraph`` (``do_bench_cudagraph``: launches replayed from a CUDA
            graph, no host overhead, no L2 flush).
        warmup_ms, rep_ms: do_bench's warm-up and measuring time budgets (rep_ms sets the count).
        out_dtype: the kernel's output dtype while timed (the workload key's out dtype).
        seed: seed of the random inputs (fresh per shape, the same for every candidate).
        energy, energy_min_s, energy_repeats: also measure energy per call with NVML's counter
            (:mod:`qflash_gen.energy`): loops of >= ``energy_min_s`` s of CUDA-graph replay,
            ``energy_repeats`` rounds each with its idle span.  Listed in :meth:`to_dict` only
            when on, so latency-only protocols (and the tables recorded with them) are unchanged.
    """

    timing: str = "do_bench"
    warmup_ms: float = 10.0
    rep_ms: float = 50.0
    out_dtype: str = "fp16"
    seed: int = 0
    energy: bool = False  # also measure µJ per call (NVML counter, :mod:`qflash_gen.energy`)
    energy_min_s: float = 1.0
    energy_repeats: int = 3

    def __post_init__(self) -> None:
        if self.timing not in TIMINGS:
            raise ValueError(f"timing={self.timing!r} is not supported; choose one of {TIMINGS}")
        if self.out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype={self.out_dtype!r} is not supported; choose one of {OUT_DTYPES}")
        if not (self.warmup_ms >= 0 and self.rep_ms > 0):
            raise ValueError(f"warmup_ms={self.warmup_ms} must be >= 0 and rep_ms={self.rep_ms} > 0")
        if not (self.energy_min_s > 0 and math.isfinite(self.energy_min_s)) or self.energy_repeats < 1:
            raise ValueError(
                f"energy_min_s={self.energy_min_s} must be > 0 seconds and energy_repeats={self.energy_repeats} >= 1"
            )

    def to_dict(self) -> dict[str, Any]:
        """The full description (what a reader of a DB entry or a table needs to trust it)."""
        return {
            "timing": self.timing,
            "statistic": "median of reps; spread = p80 - p20",
            "warmup_ms": self.warmup_ms,
            "rep_ms": self.rep_ms,
            "l2_flush": self.timing == "do_bench",
            "out_dtype": self.out_dtype,
            "seed": self.seed,
            "inputs": "fresh randn fp32 q, k, v per shape, per-tensor dynamic int8 scales, int8 v key-major "
            "(quant.key_major, as quant_kernels writes it); masked shapes: "
            "Swin shifted-window mask + randn*2 relative-position bias",
            "correctness": "bit-exact vs the integer oracle reference_int8 (same config) before timing; a mismatch fails the trial",
            "sqnr": "float output (fp16 when timing int8) vs fp64 attention of the dequantized int8 inputs",
            "isolation": "one worker subprocess per candidate stream, per-candidate timeout",
            **(self._energy_dict() if self.energy else {}),
        }

    def _energy_dict(self) -> dict[str, Any]:
        from qflash_gen.energy import method

        return {
            "energy": True,
            "energy_min_s": self.energy_min_s,
            "energy_repeats": self.energy_repeats,
            "energy_method": method(self.energy_min_s, self.energy_repeats)
            + "; the shapes of one candidate share each round's idle span; energy_uj = total per call",
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Protocol:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


class Measurer(abc.ABC):
    """Contract: :meth:`measure` returns a :class:`Measurement` for any config and shape and
    never raises for a bad candidate (a crash, a hang, a wrong result or an absent table row is a
    ``Measurement`` with ``correct=False`` and an ``error``).  ``gpu`` names the card the numbers
    come from; ``protocol`` says how they were taken (stored with every DB entry); ``provenance``
    adds where they come from (a live GPU, or a recorded table and its sha256).

    A backend that compiles its candidates also has ``precompile(items, jobs, progress)``
    (:class:`~qflash_gen.tune.measure.gpu.GPUMeasurer`): :mod:`qflash_gen.tune.ahead` compiles
    the batches a run knows ahead through it; a backend without it compiles nothing ahead."""

    gpu: str
    # Rounds of the final head-to-head (:mod:`qflash_gen.tune.headtohead`): a study's best config
    # and the runtime's current pick measured again, alternating, before the DB decision.  0: a
    # measurer whose numbers do not drift (a replayed table) has none.
    head_to_head_rounds: int = 0

    @property
    @abc.abstractmethod
    def protocol(self) -> dict[str, Any]: ...

    @property
    def provenance(self) -> dict[str, Any]:
        return {"source": "measured"}

    @abc.abstractmethod
    def measure(self, config: KernelConfig, shape: ShapeSpec) -> Measurement: ...

    def measure_many(self, config: KernelConfig, shapes: Sequence[ShapeSpec]) -> list[Measurement]:
        """One config on several shapes (one compile where the backend can share it)."""
        return [self.measure(config, s) for s in shapes]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release workers or files."""

    def __enter__(self) -> Measurer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
