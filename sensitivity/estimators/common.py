"""What every accumulator shares: argument checks, unit flags, interval arithmetic, chunking.

Degenerate outputs. Every result carries a ``flag`` per unit (FLAG_* below). A unit whose output
variance is zero (a dead ReLU) gets index 0 with a 0 half-width, FLAG_CONSTANT, and is counted in
``result.n_constant``; so does a Sobol' unit whose [A; B] variance is zero while some AB rows
differ (a sparse map), where every index would be a division by zero. A unit whose index
normaliser is too imprecise at this N (FLAG_UNSUPPORTED) or negligible (FLAG_NEGLIGIBLE) keeps its
raw indices, which can be of any size: callers leave flagged units out of summaries and rankings.
A non-finite output raises ``ValueError`` naming the unit and the row; it is never propagated.

Intervals. Every index is a ratio of two means over i.i.d. blocks (base points, trajectories,
permutations, images), S = mean(x) / mean(v), and its half-width is the delta method's
(``_ratio_conf``), built from streamed first and second moments of the per-block terms. Unlike a
bootstrap (O(N x units) memory, or R copies of every sum for a Poisson bootstrap) it costs
O(G x units) memory and merges exactly across batches and processes; its agreement with SALib's
bootstrap and its coverage are in docs/PERFORMANCE.md ("Estimators").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import scipy.stats
import torch
from torch import Tensor
from torchmetrics import Metric

# A unit is constant when its standard deviation is below this fraction of |mean| (or zero): far
# below float32 resolution (6e-8), so only truly constant outputs (up to float64 round-off) qualify.
_CONSTANT_RTOL = 1e-12

# Unit flags (the results' ``flag`` arrays): whether a unit's indices mean anything at this N.
# Flagged units keep their raw values but are left out of every summary, figure and ranking.
FLAG_VALID = 0
FLAG_CONSTANT = 1  # zero variance: its indices are undefined and reported as 0
FLAG_UNSUPPORTED = 2  # the normaliser is too imprecise at this N for its ratios to mean anything
FLAG_NEGLIGIBLE = 3  # variance negligible next to its layer's, or below float32 resolution
FLAG_NAMES = ("valid", "constant", "unsupported", "negligible")
# A unit is negligible when its variance is below this fraction of its layer's mean unit
# variance (sd below 1e-3 of the layer's typical sd): float32 forwards carry round-off of about
# 1e-6 of the layer's scale (docs/PERFORMANCE.md, "Engine efficiency": channels_last), which
# would move such a unit's indices by 1e-3 or more.
NEGLIGIBLE_VARIANCE = 1e-6
# ... or when its sd is below this fraction of its own |mean| (about 8 float32 ulps): variation
# a float32 forward cannot resolve, e.g. a constant plus round-off noise.
VALUE_RESOLUTION = 1e-6
# A unit is unsupported when its index normaliser (variance) is less than this many standard
# errors: every index is a ratio to it, and a ratio whose denominator has a coefficient of
# variation above 1/3 is dominated by that denominator's noise (shares of +-1e16 from a
# variance estimate of 1e-11, say), beyond what its delta-method interval describes.
MIN_VARIANCE_PRECISION = 3.0


# ------------------------------------------------------------------------------ argument checks
def _z_score(conf_level: float) -> float:
    """Two-sided normal quantile of ``conf_level`` (in (0, 1)): 1.96 for 0.95."""
    if not 0.0 < conf_level < 1.0:
        raise ValueError(f"conf_level must lie strictly between 0 and 1, got {conf_level}")
    return NormalDist().inv_cdf(0.5 + conf_level / 2.0)


def _t_score(conf_level: float, df: int) -> float:
    """Two-sided Student-t quantile of ``conf_level`` with ``df`` degrees of freedom."""
    _z_score(conf_level)
    return float(scipy.stats.t.ppf(0.5 + conf_level / 2.0, df))


def _at_least_two(n: Tensor | int, what: str) -> None:
    """Raise unless ``n`` >= 2 ``what`` were seen: every interval needs a spread."""
    if float(n) < 2:
        raise ValueError(f"need at least 2 {what}, got {int(n)}")


def _unit_shape(unit_shape: Sequence[int]) -> tuple[int, ...]:
    """``unit_shape`` as a tuple of positive ints (ValueError otherwise)."""
    shape = tuple(int(s) for s in unit_shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"unit_shape must hold positive sizes, got {tuple(unit_shape)}")
    return shape


def _n_groups(n_groups: int) -> int:
    """``n_groups`` checked to be a positive int (bool, float and str refused)."""
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
        raise ValueError(f"n_groups must be a positive integer, got {n_groups!r}")
    return n_groups


def _check_finite(Y: Tensor, rows_before: Tensor | int, block_size: int) -> tuple[float, float]:
    """Raise ``ValueError`` naming the first non-finite entry of Y; else its range.

    Args:
        Y: (n_blocks, block_size, U) blocks or (rows, U) rows of outputs.
        rows_before: blocks (or rows) already accumulated; read only to name a bad entry, so
            that a count kept on a GPU costs no synchronisation.
        block_size: rows per block (to name the row of a block's entry).

    Returns:
        (smallest, largest) output, which chooses the partial sums' dtype
        (``partial_sums.compute_dtype``).
    """
    # The extremes are finite only if every entry is: one pass without temporaries, where
    # isfinite() costs several full-size passes (docs/PERFORMANCE.md, "Engine efficiency").
    if Y.numel() == 0:
        return 0.0, 0.0
    low, high = (float(v) for v in torch.aminmax(Y))
    if math.isfinite(low) and math.isfinite(high):
        return low, high
    bad = ~torch.isfinite(Y)
    rows_before = int(rows_before)
    index = [int(i) for i in bad.nonzero()[0]]
    value = float(Y[tuple(index)])
    if Y.ndim == 3:
        block, position, unit = index
        row = (rows_before + block) * block_size + position
        where = f"row {row} (block {rows_before + block}, position {position} in the block)"
    else:
        row, unit = index
        where = f"row {rows_before + row}"
    raise ValueError(
        f"non-finite model output {value} at {where}, unit {unit} (flat index into the unit "
        f"shape); the estimators need finite outputs - check the model or layer producing them"
    )


def _as_blocks(Y: Tensor, block_size: int, unit_shape: tuple[int, ...], name: str) -> Tensor:
    """Validate whole design blocks and flatten their units.

    Args:
        Y: (n_blocks, block_size, *unit_shape) outputs.
        block_size: rows per design block.
        unit_shape: the accumulator's unit shape.
        name: the caller, for the error message.

    Returns:
        Y as (n_blocks, block_size, U), U = prod(unit_shape).
    """
    if not isinstance(Y, Tensor):
        raise ValueError(f"{name} expects a torch.Tensor, got {type(Y).__name__}")
    if Y.ndim != 2 + len(unit_shape) or Y.shape[1] != block_size or Y.shape[2:] != unit_shape:
        raise ValueError(
            f"{name} expects outputs of shape (n_blocks, {block_size}, *{unit_shape}) "
            f"(whole design blocks of {block_size} rows), got {tuple(Y.shape)}"
        )
    return Y.reshape(Y.shape[0], block_size, -1)


def _unit_slices(n_units: int, per_unit: int, device: torch.device) -> list[slice]:
    """Slices of units whose float64 temporaries hold about 2^20 values (CPU) or 2^26 (GPU).

    On CPU, temporaries under glibc's 32 MB mmap threshold reuse freed heap memory instead of
    faulting in fresh pages on every operation (docs/PERFORMANCE.md, "Estimators"); on a GPU,
    chunks bound the memory an update takes.

    Args:
        n_units: units of the accumulator.
        per_unit: float64 temporary values per unit.
        device: where the temporaries live.

    Returns:
        Consecutive slices covering range(n_units).
    """
    budget = 1 << 26 if device.type == "cuda" else 1 << 20
    step = max(1, budget // max(1, per_unit))
    return [slice(start, min(start + step, n_units)) for start in range(0, n_units, step)]


# --------------------------------------------------------------------------- interval arithmetic
def _ratio_conf(
    n: Tensor | float, x: Tensor, xx: Tensor, v: Tensor, vv: Tensor, xv: Tensor, z: float
) -> tuple[Tensor, Tensor]:
    """Ratio of means S = x / v and its delta-method half-width over n i.i.d. blocks.

    Var(S) ~ [Var(x) - 2 S Cov(x, v) + S^2 Var(v)] / (n mean(v)^2).

    Args:
        n: number of blocks.
        x, v: means of the per-block numerator and denominator terms (broadcastable).
        xx, vv, xv: means of their products x^2, v^2, x v.
        z: the quantile the standard error is multiplied by.

    Returns:
        (S, z * sd(S)), both 0 where v == 0.
    """
    bessel = n / (n - 1.0)
    var_x = (xx - x * x) * bessel
    var_v = (vv - v * v) * bessel
    cov = (xv - x * v) * bessel
    safe_v = torch.where(v > 0, v, torch.ones_like(v))
    ratio = torch.where(v > 0, x / safe_v, torch.zeros_like(x))
    var_ratio = (var_x - 2.0 * ratio * cov + ratio * ratio * var_v) / (n * safe_v * safe_v)
    conf = z * torch.sqrt(torch.clamp(var_ratio, min=0.0))
    return ratio, torch.where(v > 0, conf, torch.zeros_like(conf))


def _replicate_ratio(x: Tensor, v: Tensor, V: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """Pooled ratio S = mean_r x_r / V and its half-width from R replicate estimates.

    The delta method over the R replicates (``_ratio_conf`` with n = R).

    Args:
        x: (R, *lead, c) replicate means of the numerator terms.
        v: (R, c) replicate means of the denominator's.
        V: (c,) their mean (0 for units flagged constant, whose S and half-width are then 0).
        t: the quantile (Student's t, R - 1 df).

    Returns:
        (S, half-width), each (*lead, c).
    """
    r = x.shape[0]
    v = v.reshape(r, *([1] * (x.ndim - 2)), -1)
    return _ratio_conf(
        float(r), x.mean(0), (x * x).mean(0), V, (v * v).mean(0), (x * v).mean(0), t
    )


# ------------------------------------------------------------------------------------ unit flags
def _unit_flags(constant: Tensor, variance: Tensor, variance_se: Tensor, mean: Tensor) -> Tensor:
    """The FLAG_* code of every unit of one accumulator (a layer), from its index normaliser.

    Precedence: constant, unsupported, negligible.

    Args:
        constant: (U,) bool, units already found constant (FLAG_CONSTANT).
        variance: (U,) the indices' normaliser (Sobol': the variance of [A; B]; Shapley: the
            sum of the effects), in output units squared.
        variance_se: (U,) its standard error.
        mean: (U,) the unit's mean output.

    Returns:
        (U,) uint8 flags.
    """
    flag = torch.full(constant.shape, FLAG_VALID, dtype=torch.uint8, device=constant.device)
    layer_scale = variance.mean() if variance.numel() else variance.new_zeros(())
    negligible = (variance < NEGLIGIBLE_VARIANCE * layer_scale) | (
        variance < (VALUE_RESOLUTION * mean.abs()) ** 2
    )
    flag[negligible] = FLAG_NEGLIGIBLE
    flag[variance < MIN_VARIANCE_PRECISION * variance_se] = FLAG_UNSUPPORTED
    flag[constant] = FLAG_CONSTANT
    return flag


def _numpy(t: Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """A state-derived tensor as a float64 numpy array of ``shape``."""
    return t.detach().to("cpu", torch.float64).numpy().reshape(shape)


def _flags_numpy(flag: Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """(U,) uint8 flags as a numpy array of ``shape``."""
    return flag.detach().to("cpu").numpy().astype(np.uint8).reshape(shape)


def _constant_flags(constant: Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """Flags of an estimator without an index normaliser: FLAG_CONSTANT or FLAG_VALID."""
    return np.where(_numpy(constant, shape) > 0, FLAG_CONSTANT, FLAG_VALID).astype(np.uint8)


# ----------------------------------------------------------------------------------- base classes
class _UnitMetric(Metric):
    """Base of the accumulators: float64 sums per unit of outputs of shape ``unit_shape``.

    Args:
        unit_shape: shape of one row's outputs (units); () for a scalar output.
        conf_level: confidence level of the half-widths, in (0, 1).
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(
        self, unit_shape: Sequence[int] = (), conf_level: float = 0.95, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.unit_shape = _unit_shape(unit_shape)
        self.n_units = math.prod(self.unit_shape)
        self.conf_level = conf_level
        self._z = _z_score(conf_level)
        # Workers of an update (partial_sums, "Threads"); set by the caller, not a state.
        self.threads = 1

    def _add_sum_states(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """A float64 zero state per entry, summed across processes, then the block count n."""
        for name, shape in shapes.items():
            self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")


class _ConstantUnits:
    """Base of the result dataclasses: ``constant`` and ``flag`` mark the degenerate units.

    Not a dataclass itself, so the subclasses keep their own field order (and positional
    constructors). ``constant``: (*unit_shape) bool, units whose indices were set to 0;
    ``flag``: (*unit_shape) uint8, a FLAG_* code per unit (FLAG_VALID = 0: meaningful).
    """

    constant: np.ndarray
    flag: np.ndarray

    @property
    def n_constant(self) -> int:
        """How many units are flagged in ``constant``."""
        return int(np.count_nonzero(self.constant))

    @property
    def valid(self) -> np.ndarray:
        """(*unit_shape) bool: the units whose indices are meaningful (flag FLAG_VALID)."""
        return self.flag == FLAG_VALID
