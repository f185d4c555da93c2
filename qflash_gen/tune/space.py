"""The search space: which `KernelConfig`s the tuner may try for one workload, and why not others.

A :class:`Grid` lists the values of each axis (taken from the allowed values in
``qflash_gen.config``); a :class:`SearchSpace` binds a grid to one workload ``(N, D, masked)`` and
a GPU's shared memory and applies the constraints:

* **Redundant tiles.**  A ``block_n >= N`` tile covers the whole row (the single-pass body), so of
  the values ``>= N`` only the smallest is kept: a larger one computes the same thing on more
  padding.  Likewise for ``block_m`` (rows of a program beyond N are masked padding).
* **Overflow.**  ``acc_bits`` is not searched by default: when int32 cannot overflow, int64 gives
  the same bits (the oracle is the same integer program) at a higher cost, so it is dominated.
  The space picks the narrowest width :func:`qflash_gen.config.fits` allows.  A grid may still
  list ``acc_bits`` explicitly; then configs that can overflow are infeasible.
* **Rescale of a single pass.**  When ``block_n >= N`` the kernel runs one pass with no online
  rescale (``SINGLE_PASS`` is a constexpr: the rescale helper is never called), so configs that
  differ only in rescale there run the same kernel: :meth:`SearchSpace.equivalent` says so (the
  climb of :mod:`.staged` and the runtime's-pick check use it; the grid still lists them, so
  study names and stored studies stay as they were).
* **Shared memory.**  A lower-bound estimate (:func:`smem_estimate`) rejects configs that cannot
  fit the GPU's per-block shared memory (``qflash_gen.gpu.smem_limit``); anything the estimate misses fails at compile time in the
  worker, which the tuner records as a failed trial.

The numeric axes are presented to Optuna as two categorical parameters, ``exp`` (``shift``,
``idiv``, ``poly2``, ``lut<k>``) and ``rescale`` (``shift<b>``, ``idiv``), so there are no
conditional parameters: TPE and NSGA-II see one flat product of categoricals.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from qflash_gen import config as cfgmod
from qflash_gen.config import KernelConfig

if TYPE_CHECKING:
    import optuna

# Simplicity order of the numeric choices (ties within noise go to the simpler config).
_EXP_RANK = {"shift": 0, "idiv": 1, "poly2": 2, "lut": 3}
_RESCALE_RANK = {"shift": 0, "split": 1, "idiv": 2}


def exp_token(config: KernelConfig) -> str:
    """``exp`` parameter value of a config: ``shift``, ``idiv``, ``poly2`` or ``lut<k>``."""
    return f"lut{config.lut_bits}" if config.exp_variant == "lut" else config.exp_variant


def rescale_token(config: KernelConfig) -> str:
    """``rescale`` parameter value of a config: ``shift<b>``, ``split`` or ``idiv``."""
    return f"shift{config.rescale_bits}" if config.rescale == "shift" else config.rescale


def parse_exp(token: str) -> tuple[str, int]:
    """``"lut5"`` → ``("lut", 5)``, ``"poly2"`` → ``("poly2", 0)``; ValueError otherwise."""
    if token in ("shift", "idiv", "poly2"):
        return token, 0
    if token.startswith("lut") and token[3:].isdigit():
        bits = int(token[3:])
        lo, hi = cfgmod.LUT_BITS_RANGE
        if lo <= bits <= hi:
            return "lut", bits
    raise ValueError(
        f"exp choice {token!r} is not supported; expected shift, idiv, poly2 or lut<k> with k in "
        f"{cfgmod.LUT_BITS_RANGE[0]}..{cfgmod.LUT_BITS_RANGE[1]}"
    )


def parse_rescale(token: str) -> tuple[str, int]:
    """``"shift8"`` → ``("shift", 8)``, ``"idiv"`` → ``("idiv", 0)``; ValueError otherwise."""
    if token in ("idiv", "split"):
        return token, 0
    if token.startswith("shift") and token[5:].isdigit():
        bits = int(token[5:])
        lo, hi = cfgmod.RESCALE_BITS_RANGE
        if lo <= bits <= hi:
            return "shift", bits
    raise ValueError(
        f"rescale choice {token!r} is not supported; expected idiv, split or shift<b> with b in "
        f"{cfgmod.RESCALE_BITS_RANGE[0]}..{cfgmod.RESCALE_BITS_RANGE[1]}"
    )


@dataclasses.dataclass(frozen=True)
class Grid:
    """Values of every axis of the search.  ``acc_bits=()`` means: the narrowest width that fits."""

    block_m: tuple[int, ...] = cfgmod.BLOCK_M_VALUES
    block_n: tuple[int, ...] = cfgmod.BLOCK_N_VALUES
    num_warps: tuple[int, ...] = cfgmod.NUM_WARPS_VALUES
    num_stages: tuple[int, ...] = cfgmod.NUM_STAGES_VALUES
    exp: tuple[str, ...] = ("shift", "idiv", "poly2", "lut4", "lut6", "lut8")
    rescale: tuple[str, ...] = ("split", "shift6", "shift8", "shift10", "shift12", "shift15", "idiv")
    acc_bits: tuple[int, ...] = ()
    # 14-bit P by default: the 7-bit P passes the SQNR floor on random inputs but loses up to
    # 8 dB on trained ViTs' peaked attention (docs/fidelity.md); `--p-bits 7,14` lets it compete.
    p_bits: tuple[int, ...] = (14,)
    # Triton's maxnreg (0 = the compiler's choice); see KernelConfig.max_regs.
    max_regs: tuple[int, ...] = (0,)
    # heads per program (1 = one (batch, head) per program); see KernelConfig.heads_per_program.
    heads_per_program: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        allowed = {
            "block_m": cfgmod.BLOCK_M_VALUES,
            "block_n": cfgmod.BLOCK_N_VALUES,
            "num_warps": cfgmod.NUM_WARPS_VALUES,
            "num_stages": cfgmod.NUM_STAGES_VALUES,
            "acc_bits": cfgmod.ACC_BITS,
            "p_bits": cfgmod.P_BITS_VALUES,
        }
        for name, ok in allowed.items():
            values = getattr(self, name)
            bad = [v for v in values if v not in ok]
            if bad:
                raise ValueError(f"Grid.{name}: {bad} not allowed; KernelConfig accepts {ok}")
            if name != "acc_bits" and not values:
                raise ValueError(f"Grid.{name} is empty")
        if not self.max_regs:
            raise ValueError("Grid.max_regs is empty (0 = the compiler's choice)")
        for r in self.max_regs:
            KernelConfig(max_regs=r)  # ValueError naming the allowed values
        if not self.heads_per_program:
            raise ValueError("Grid.heads_per_program is empty (1 = one head per program)")
        for g in self.heads_per_program:
            KernelConfig(heads_per_program=g)
        for token in self.exp:
            parse_exp(token)
        for token in self.rescale:
            parse_rescale(token)
        if not self.exp or not self.rescale:
            raise ValueError("Grid.exp and Grid.rescale need at least one choice")

    def to_dict(self) -> dict[str, list]:
        d = {f.name: list(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if d["max_regs"] == [0]:
            del d["max_regs"]  # grids (and space hashes) from before the axis existed read unchanged
        if d["heads_per_program"] == [1]:
            del d["heads_per_program"]
        return d

    @classmethod
    def from_configs(cls, configs: Iterable[KernelConfig]) -> Grid:
        """The smallest grid holding ``configs`` (used to search exactly a recorded table's space).

        ``acc_bits`` stays derived when every config uses the width the overflow bound picks for
        it at some N (the recorded grids do); otherwise it becomes an explicit axis."""
        configs = list(configs)
        if not configs:
            raise ValueError("Grid.from_configs needs at least one config")

        def values(attr: str, fn=None) -> tuple:  # first-seen order: a table lists its grid in order
            return tuple(dict.fromkeys(fn(c) if fn else getattr(c, attr) for c in configs))

        accs = tuple(sorted(values("acc_bits")))
        return cls(
            block_m=values("block_m"),
            block_n=values("block_n"),
            num_warps=values("num_warps"),
            num_stages=values("num_stages"),
            exp=values("exp", exp_token),
            rescale=values("rescale", rescale_token),
            acc_bits=() if accs == (32,) or _acc_is_derived(configs) else accs,
            p_bits=tuple(sorted(values("p_bits"))),
            max_regs=values("max_regs"),
            heads_per_program=values("heads_per_program"),
        )


def _acc_is_derived(configs: list[KernelConfig]) -> bool:
    """True if 64-bit configs appear only where their 32-bit twin is absent (the derived rule)."""
    hashes = {c.hash for c in configs}
    return all(c.acc_bits == 32 or c.replace(acc_bits=32).hash not in hashes for c in configs)


GRIDS: dict[str, Grid] = {
    # Real tuning on a GPU: every tile value KernelConfig allows, and the numeric variants that
    # span the accuracy range (lut4 ~ coarse, lut8 ~ fine; rescale shift6 .. shift15 exact).
    # max_regs 168: 3 programs of 4 warps per SM, 128: 4 (spills); 2 heads per program pipeline
    # the next head's loads (ViT-B b=64 on an H100: -7 % at num_stages=2, docs/perf-notes.md).
    "tune": Grid(max_regs=(0, 168, 128), heads_per_program=(1, 2)),
    # The exhaustive sweep recorded for simulation (tests/data/h100_sweep.csv): the tile axes that
    # move latency (issue 4: 1.5-2x between median and best) and two exp variants on either side
    # of the 30 dB floor (shift ~29 dB, poly2 ~37 dB at N=197 with fp16 output, CPU oracle).
    "sweep": Grid(
        block_m=(32, 64, 128),
        block_n=(32, 64, 128, 256),
        num_warps=(2, 4, 8),
        num_stages=(1, 2, 3),
        exp=("shift", "poly2"),
        rescale=("shift8",),
        p_bits=(7,),  # recorded before the 14-bit P existed
    ),
    # The 14-bit-P table for the H200 (issue 17; docs/tuner-efficiency.md has the command): the
    # tile axes of "sweep" with 16-row tiles, the two exp variants, the exact rescale and its
    # Q15 shift (a single pass takes one), and the launch options the H100 winners use (r168,
    # 2 heads per program).  2016 configs at N=197, 648 at N=49: large enough to know the best
    # of each axis the tuner searches, small enough to record in two 10-minute calls.
    "sweep14": Grid(
        block_m=(16, 32, 64, 128),
        block_n=(32, 64, 128, 256),
        num_warps=(2, 4, 8),
        num_stages=(1, 2, 3),
        exp=("shift", "poly2"),
        rescale=("split", "shift15"),
        p_bits=(14,),
        max_regs=(0, 168),
        heads_per_program=(1, 2),
    ),
    # A quick look (a few dozen configs per workload).
    "small": Grid(
        block_m=(64, 128),
        block_n=(32, 64, 128, 256),
        num_warps=(4, 8),
        num_stages=(1, 2),
        exp=("poly2",),
        rescale=("shift8",),
    ),
}


def get_grid(name: str) -> Grid:
    """A named grid (``tune``, ``sweep``, ``small``); ValueError naming ``--grid`` otherwise."""
    try:
        return GRIDS[name]
    except KeyError:
        raise ValueError(f"--grid {name!r} is unknown; known: {sorted(GRIDS)}") from None


def smem_estimate(config: KernelConfig, head_dim: int) -> int:
    """Lower bound of the kernel's shared memory (bytes): pipelined K and V tiles plus Q.

    int8 K and V tiles of ``block_n x D`` per pipeline stage, and the ``block_m x D`` Q tile.
    Layout conversions and the bias tile may add more; those configs fail in the compile, which
    the worker reports.  A lower bound never rejects a config that would have fit."""
    stages = max(1, config.num_stages)
    return stages * config.block_n * head_dim * 2 + config.block_m * head_dim


def _first_covering(values: Iterable[int], n: int) -> tuple[int, ...]:
    """The values below ``n`` plus the smallest one ``>= n`` (larger ones only add padding)."""
    values = sorted(set(values))
    below = [v for v in values if v < n]
    above = [v for v in values if v >= n]
    return tuple(below + above[:1])


def complexity(config: KernelConfig) -> tuple:
    """Sort key for "simpler": narrower accumulators, fewer stages, cheaper exp and rescale,
    fewer warps, smaller tiles.  Used only to break ties within measurement noise."""
    return (
        config.acc_bits,
        config.num_stages,
        _EXP_RANK[config.exp_variant],
        _RESCALE_RANK[config.rescale],
        config.num_warps,
        config.block_m * config.block_n,
        config.lut_bits,
        config.rescale_bits,
        config.p_bits,
    )


class SearchSpace:
    """A grid bound to one workload ``(N, D)`` and a shared-memory limit.

    ``distributions`` is what Optuna samples (only axes with more than one value);
    :meth:`config_from_params` turns a sample into a config or an infeasibility reason;
    :meth:`configs` enumerates every feasible config (the exhaustive sweep)."""

    def __init__(self, grid: Grid, n: int, d: int, *, smem_limit: int | None = None) -> None:
        if n < 1 or d < 1:
            raise ValueError(f"SearchSpace needs N >= 1 and D >= 1, got N={n}, D={d}")
        self.grid = grid
        self.n = n
        self.d = d
        self.smem_limit = smem_limit
        self.choices: dict[str, tuple] = {
            "block_m": _first_covering(grid.block_m, n),
            "block_n": _first_covering(grid.block_n, n),
            "num_warps": tuple(grid.num_warps),
            "num_stages": tuple(grid.num_stages),
            "exp": tuple(grid.exp),
            "rescale": tuple(grid.rescale),
            "p_bits": tuple(grid.p_bits),
            "max_regs": tuple(grid.max_regs),
            "heads_per_program": tuple(grid.heads_per_program),
        }
        if grid.acc_bits:
            self.choices["acc_bits"] = tuple(grid.acc_bits)
        self.fixed: dict[str, Any] = {k: v[0] for k, v in self.choices.items() if len(v) == 1}

    # -- Optuna view ----------------------------------------------------------------------
    @functools.cached_property
    def distributions(self) -> dict[str, optuna.distributions.CategoricalDistribution]:
        import optuna  # here, not at the top: the sweep runs where optuna is not installed

        return {
            name: optuna.distributions.CategoricalDistribution(list(values))
            for name, values in self.choices.items()
            if len(values) > 1
        }

    def _build(self, values: Mapping[str, Any]) -> KernelConfig:
        exp_variant, lut_bits = parse_exp(values["exp"])
        rescale, rescale_bits = parse_rescale(values["rescale"])
        base = KernelConfig(
            block_m=int(values["block_m"]),
            block_n=int(values["block_n"]),
            num_warps=int(values["num_warps"]),
            num_stages=int(values["num_stages"]),
            exp_variant=exp_variant,
            lut_bits=lut_bits,
            rescale=rescale,
            rescale_bits=rescale_bits,
            acc_bits=int(values.get("acc_bits", 32)),
            p_bits=int(values["p_bits"]),
            max_regs=int(values["max_regs"]),
            heads_per_program=int(values["heads_per_program"]),
        )
        if "acc_bits" not in values and not cfgmod.fits(base, self.n, self.d):
            base = base.replace(acc_bits=64)
        return base

    def canonical(self, config: KernelConfig) -> KernelConfig:
        """``config`` with the fields that cannot change its kernel at this N set to the space's
        choice: a single pass (``block_n >= N``) never rescales, so its rescale becomes the
        space's first (the same compiled kernel, the same bits)."""
        if not cfgmod.single_pass(config, self.n):
            return config
        rescale, bits = parse_rescale(self.choices["rescale"][0])
        if (config.rescale, config.rescale_bits) == (rescale, bits):
            return config
        return config.replace(rescale=rescale, rescale_bits=bits)

    def equivalent(self, a: KernelConfig, b: KernelConfig) -> bool:
        """True when ``a`` and ``b`` run the same kernel on this workload (see :meth:`canonical`)."""
        return self.canonical(a) == self.canonical(b)

    def check(self, config: KernelConfig) -> str | None:
        """Why ``config`` is infeasible for this workload, or None if it is feasible."""
        if not cfgmod.fits(config, self.n, self.d):
            try:
                cfgmod.check_workload(config, self.n, self.d)
            except ValueError as exc:
                return f"overflow: {exc}"
        if self.smem_limit is not None:
            need = smem_estimate(config, self.d)
            if need > self.smem_limit:
                return f"shared memory: needs >= {need} bytes, the GPU allows {self.smem_limit}"
        return None

    def config_from_params(self, params: Mapping[str, Any]) -> tuple[KernelConfig, str | None]:
        """Optuna params (fixed axes filled in) → ``(config, reason)``; reason None = feasible."""
        values = {**self.fixed, **params}
        missing = sorted(set(self.choices) - set(values))
        if missing:
            raise ValueError(f"params lack axes {missing}")
        config = self._build(values)
        return config, self.check(config)

    @staticmethod
    def _axis_values(config: KernelConfig) -> dict[str, Any]:
        """``config`` on the space's axes (acc_bits included; spaces that derive it drop it)."""
        return {
            "block_m": config.block_m,
            "block_n": config.block_n,
            "num_warps": config.num_warps,
            "num_stages": config.num_stages,
            "exp": exp_token(config),
            "rescale": rescale_token(config),
            "p_bits": config.p_bits,
            "max_regs": config.max_regs,
            "heads_per_program": config.heads_per_program,
            "acc_bits": config.acc_bits,
        }

    def axis_values(self, config: KernelConfig) -> dict[str, Any] | None:
        """``config`` as a value on every axis of this space (fixed axes included), or None when
        the space cannot produce it."""
        params = self.params_for(config)
        return None if params is None else {**self.fixed, **params}

    def params_for(self, config: KernelConfig) -> dict[str, Any] | None:
        """The Optuna params that give ``config``, or None when the space cannot produce it."""
        values = self._axis_values(config)
        if "acc_bits" not in self.choices:
            del values["acc_bits"]
        for name, value in values.items():
            if value not in self.choices[name]:
                return None
        if self._build(values) != config:
            return None  # e.g. an int64 config where the space derives int32
        return {k: v for k, v in values.items() if k in self.distributions}

    def adapt(self, config: KernelConfig) -> KernelConfig | None:
        """The config of this space closest to ``config`` (e.g. a stale DB winner measured under
        another template or P width, or the runtime default): each axis keeps the config's value
        where this space has it and otherwise takes the space's choices in order; the first
        feasible combination, or None."""
        want = self._axis_values(config)
        names = list(self.choices)
        axes = []
        for name in names:
            choices = list(self.choices[name])
            value = want[name]
            axes.append([value] + [c for c in choices if c != value] if value in choices else choices)
        for combo in itertools.product(*axes):
            candidate = self._build(dict(zip(names, combo, strict=True)))
            if self.check(candidate) is None:
                return candidate
        return None

    # -- enumeration ----------------------------------------------------------------------
    def _all_values(self) -> Iterator[dict[str, Any]]:
        names = list(self.choices)
        for combo in itertools.product(*(self.choices[n] for n in names)):
            yield dict(zip(names, combo, strict=True))

    @functools.cached_property
    def _feasible(self) -> tuple[KernelConfig, ...]:
        seen: dict[KernelConfig, None] = {}
        for values in self._all_values():
            config = self._build(values)
            if config not in seen and self.check(config) is None:
                seen[config] = None
        return tuple(seen)

    @functools.cached_property
    def hash_list(self) -> tuple[str, ...]:
        """``config.hash`` of every feasible config, in :meth:`configs` order (computed once)."""
        return tuple(c.hash for c in self._feasible)

    @functools.cached_property
    def hashes(self) -> frozenset[str]:
        return frozenset(self.hash_list)

    @functools.cached_property
    def kernel_hashes(self) -> frozenset[str]:
        """``hash`` of the :meth:`canonical` form of every feasible config: one per distinct kernel."""
        return frozenset(self.canonical(c).hash for c in self._feasible)

    def configs(self) -> list[KernelConfig]:
        """Every feasible config, in grid order (tiles outermost)."""
        return list(self._feasible)

    @property
    def size(self) -> int:
        return len(self._feasible)

    @functools.cached_property
    def hash(self) -> str:
        """What the DB header records as the search-space hash: the grid, N, D and limits."""
        blob = json.dumps(
            {"grid": self.grid.to_dict(), "n": self.n, "d": self.d, "smem_limit": self.smem_limit},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"SearchSpace(N={self.n}, D={self.d}, size={self.size}, axes={ {k: len(v) for k, v in self.choices.items()} })"
