"""Streaming estimators of Sobol indices, Shapley effects and moments (METHOD.md sections 5-7).

Every accumulator is a ``torchmetrics.Metric`` fed whole design blocks of model outputs of any unit
shape (millions of activation units at once) and keeps float64 sums whose size depends on the
number of groups and units, never on the number of rows. Sums add across batches and, with
``dist_reduce_fx="sum"``, across processes, so a sharded run gives the single-process result up to
floating-point summation order. ``compute()`` returns a dataclass of numpy float64 arrays shaped
(G, *unit_shape) (indices) or (*unit_shape) (per-unit statistics).

Confidence intervals: delta method, streamed. Every index is a ratio of two means over i.i.d.
blocks (base points, trajectories, permutations, images): S = mean(x) / mean(v). Its variance is
Var(S) ~ [Var(x) - 2 S Cov(x, v) + S^2 Var(v)] / (N mean(v)^2), which needs only the first and
second moments of the per-block terms - more sums, updated and merged like the others. We use it
rather than SALib's bootstrap because a bootstrap needs the per-base-point terms of all N base
points (memory O(N x units)) or, as a Poisson bootstrap, R replicates of every sum (R x more
memory), while batch means depend on how rows are split between processes. The delta method is
exact to merge and costs O(G x units) memory. Its half-width is z * sqrt(Var(S)), z the normal
quantile of ``conf_level`` (SALib reports the same quantity from its bootstrap, and the two agree
within the bootstrap's noise). The intervals assume i.i.d. blocks: with Monte Carlo base points
their coverage is nominal; the points of one scrambled Sobol' sequence are not independent, and
on Ishigami the intervals were 3-6x too wide from N = 1024 on, yet one (S1 of x3) covered only
87% at N = 512. For such points ``SobolAccumulator(replicates=R)`` keeps the first-moment sums of
R independently scrambled replicates instead and applies the same delta method to the R
replicate means, with Student's t (randomised quasi-Monte Carlo): calibrated, and still exact to
merge. Measured figures: docs/PERFORMANCE.md.

Numerics: Sobol' and moment sums are kept as sums of powers of y - shift, where ``shift`` (per
unit) is the mean of the first batch an accumulator sees. Raw power sums lose about
(mean / sd)^k of relative precision to cancellation for a k-th moment; shifted ones do not.
Accumulators whose shifts differ are brought to a common shift (a binomial re-expansion, exact in
exact arithmetic) before their sums are added, in ``merge_state`` and in the distributed sync
(so ``shift`` is the one state not reduced by "sum"); add the raw states of two accumulators by
hand only when their ``shift`` states are equal. The Shapley and contrast sums are built from
differences of outputs and need no shift.

Degenerate outputs: every result carries a ``flag`` per unit (FLAG_* below). A unit whose output
variance is zero (a dead ReLU) gets index 0 with a 0 half-width, FLAG_CONSTANT, and is counted
in ``result.n_constant``; so does a Sobol' unit whose [A; B] variance is zero while some AB rows
differ (a sparse map), where every index would be a division by zero. A unit whose index
normaliser is too imprecise at this N (FLAG_UNSUPPORTED) or negligible (FLAG_NEGLIGIBLE) keeps
its raw indices, which can be of any size: callers leave flagged units out of summaries and
rankings. A non-finite output raises ``ValueError`` naming the unit and the row; it is never
propagated.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import scipy.stats
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

Exponents = tuple[int, ...]

# A unit is constant when its standard deviation is below this fraction of |mean| (or zero): far
# below float32 resolution (6e-8), so only truly constant outputs (up to float64 round-off) qualify.
_CONSTANT_RTOL = 1e-12
# A Sobol' unit is also degenerate when the variance of [A; B] is below this fraction of its
# largest mean squared cross-sample change (AB_j - A): its indices would exceed 1e11, and a true
# V of 0 (a sparse map that is 0 on every A and B row) re-expanded about another shift (merges,
# distributed sync) leaves float64 round-off of ~1e-16 x shift^2 that must not count as variance.
_DEGENERATE_RATIO = 1e-12


# Unit flags (the results' ``flag`` arrays): whether a unit's indices mean anything at this N.
# Flagged units keep their raw values but are left out of every summary, figure and ranking.
FLAG_VALID = 0
FLAG_CONSTANT = 1  # zero variance: its indices are undefined and reported as 0
FLAG_UNSUPPORTED = 2  # the normaliser is too imprecise at this N for its ratios to mean anything
FLAG_NEGLIGIBLE = 3  # variance negligible next to its layer's, or below float32 resolution
FLAG_NAMES = ("valid", "constant", "unsupported", "negligible")
# A unit is negligible when its variance is below this fraction of its layer's mean unit
# variance (sd below 1e-3 of the layer's typical sd): float32 forwards carry round-off of about
# 1e-6 of the layer's scale (a channels-last forward moved activations by 1.5e-6), which would
# move such a unit's indices by 1e-3 or more.
NEGLIGIBLE_VARIANCE = 1e-6
# ... or when its sd is below this fraction of its own |mean| (about 8 float32 ulps): variation
# a float32 forward cannot resolve, e.g. a constant plus round-off noise.
VALUE_RESOLUTION = 1e-6
# A unit is unsupported when its index normaliser (variance) is less than this many standard
# errors: every index is a ratio to it, and a ratio whose denominator has a coefficient of
# variation above 1/3 is dominated by that denominator's noise (shares of +-1e16 from a
# variance estimate of 1e-11, say), beyond what its delta-method interval describes.
MIN_VARIANCE_PRECISION = 3.0


def _z_score(conf_level: float) -> float:
    if not 0.0 < conf_level < 1.0:
        raise ValueError(f"conf_level must lie strictly between 0 and 1, got {conf_level}")
    return NormalDist().inv_cdf(0.5 + conf_level / 2.0)


def _t_score(conf_level: float, df: int) -> float:
    """Two-sided Student-t quantile of ``conf_level`` with ``df`` degrees of freedom."""
    _z_score(conf_level)
    return float(scipy.stats.t.ppf(0.5 + conf_level / 2.0, df))


def _unit_shape(unit_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in unit_shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"unit_shape must hold positive sizes, got {tuple(unit_shape)}")
    return shape


def _n_groups(n_groups: int) -> int:
    """``n_groups`` checked to be a positive int (bool, float and str refused)."""
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
        raise ValueError(f"n_groups must be a positive integer, got {n_groups!r}")
    return n_groups


def _check_finite(Y: Tensor, rows_before: Tensor | int, block_size: int) -> None:
    """Raise naming the first non-finite entry of Y (n_blocks, block_size, U) or (rows, U).

    rows_before: blocks (or rows) already accumulated; read only to name a bad entry, so that
    a count kept on a GPU costs no synchronisation.
    """
    # A sum is finite only if every term is: one pass without temporaries, where isfinite()
    # costs several full-size passes (a third of a CPU update, measured). Overflow of a sum of
    # finite values falls through to the exact check.
    total = Y.sum(dtype=torch.float64 if Y.dtype == torch.float64 else torch.float32)
    if bool(torch.isfinite(total)):
        return
    bad = ~torch.isfinite(Y)
    if not bool(bad.any()):
        return
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
    """Validate Y (n_blocks, block_size, *unit_shape) and return it as (n_blocks, block_size, U)."""
    if not isinstance(Y, Tensor):
        raise ValueError(f"{name} expects a torch.Tensor, got {type(Y).__name__}")
    if Y.ndim != 2 + len(unit_shape) or Y.shape[1] != block_size or Y.shape[2:] != unit_shape:
        raise ValueError(
            f"{name} expects outputs of shape (n_blocks, {block_size}, *{unit_shape}) "
            f"(whole design blocks of {block_size} rows), got {tuple(Y.shape)}"
        )
    return Y.reshape(Y.shape[0], block_size, -1)


def _closure(exponents: Iterable[Exponents]) -> list[Exponents]:
    """Every exponent tuple <= one of ``exponents`` (what the binomial re-expansion needs)."""
    out = {f for e in exponents for f in itertools.product(*(range(k + 1) for k in e))}
    return sorted(out, key=lambda e: (sum(e), e))


def _rebase_table(table: dict[Exponents, Tensor], delta: Tensor) -> dict[Exponents, Tensor]:
    """Sums of w * prod_t (y_t + delta)^e_t from the sums of w * prod_t y_t^f_t, f <= e.

    ``delta`` (U,) broadcasts against every table entry (*lead, U). One variable at a time, the
    binomial expansion sum_k C(i, k) delta^(i - k) S_k is built in place by repeated synthetic
    steps S_i += delta * S_(i-1) (i from the top down, once per degree): d(d + 1) / 2 fused
    multiply-adds per line of degree d instead of a power, two products and a sum per term.
    """
    out = {e: value.clone() for e, value in table.items()}
    for t in range(len(next(iter(table)))):
        top = max(e[t] for e in out)
        descending = sorted(out, key=lambda e: -e[t])
        for step in range(1, top + 1):
            for e in descending:
                if e[t] >= step:
                    lower = tuple(k - (u == t) for u, k in enumerate(e))
                    out[e].addcmul_(delta, out[lower])
    return out


def _agreed(stacked: Tensor) -> Tensor:
    """Reduction of the shift state: every process holds the same value after re-basing."""
    return stacked[0]


def _ratio_conf(
    n: Tensor, x: Tensor, xx: Tensor, v: Tensor, vv: Tensor, xv: Tensor, z: float
) -> tuple[Tensor, Tensor]:
    """Ratio of means S = x / v and its delta-method half-width.

    x, v: means of the per-block terms; xx, vv, xv: means of their products (all broadcastable).
    Returns (S, z * sd(S)) with S = 0 and half-width 0 where v == 0.
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

    x: (R, *lead, c) replicate means of the numerator terms; v: (R, c) of the denominator's;
    V: (c,) their mean (0 for units flagged constant, whose S and half-width are then 0).
    The delta method over the R replicates (``_ratio_conf`` with n = R), quantile ``t``.
    """
    r = x.shape[0]
    v = v.reshape(r, *([1] * (x.ndim - 2)), -1)
    return _ratio_conf(
        float(r), x.mean(0), (x * x).mean(0), V, (v * v).mean(0), (x * v).mean(0), t
    )


def _unit_flags(constant: Tensor, variance: Tensor, variance_se: Tensor, mean: Tensor) -> Tensor:
    """(U,) uint8 flag of every unit of one accumulator (a layer), from its index normaliser.

    constant: units already found constant (FLAG_CONSTANT); variance, variance_se: the
    normaliser of the indices (Sobol': the variance of [A; B]; Shapley: the sum of the effects)
    and its standard error; mean: the unit's mean. Precedence: constant, unsupported,
    negligible.
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


def _flags_numpy(flag: Tensor, shape: tuple[int, ...]) -> np.ndarray:
    return flag.detach().to("cpu").numpy().astype(np.uint8).reshape(shape)


def _constant_flags(constant: Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """Flags of an estimator without an index normaliser: FLAG_CONSTANT or FLAG_VALID."""
    return np.where(_numpy(constant, shape) > 0, FLAG_CONSTANT, FLAG_VALID).astype(np.uint8)


def _numpy(t: Tensor, shape: tuple[int, ...]) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy().reshape(shape)


def _unit_slices(n_units: int, per_unit: int, device: torch.device) -> list[slice]:
    """Slices of units whose float64 temporaries hold about 2^20 values (CPU) or 2^26 (GPU).

    per_unit: temporary values per unit. On CPU, temporaries under glibc's 32 MB mmap threshold
    reuse freed heap memory instead of faulting in fresh pages on every operation (1.5-4.5x
    faster updates of 100k units, measured); on a GPU, chunks bound the memory an update takes.
    """
    budget = 1 << 26 if device.type == "cuda" else 1 << 20
    step = max(1, budget // max(1, per_unit))
    return [slice(start, min(start + step, n_units)) for start in range(0, n_units, step)]


class _ShiftedPowerSums(Metric):
    """Base of the accumulators whose states are float64 sums of w * prod_t (y_t - shift)^e_t.

    A *table* is a weight name (a per-block, shift-invariant tensor such as AB_j - A) with a
    downward-closed set of exponent tuples over the shifted variables; it is one state
    ``<weight>_sums`` (U, K, *lead), units first, so that an update adds one contiguous block per
    chunk of units (a batched matrix product straight into the state) instead of K strided
    writes. ``table`` gives the entries as (*lead, U) views. ``_rebased_states`` re-expands every
    table about a new shift, which is how accumulators with different shifts are merged;
    ``_centred_tables`` is how ``compute`` centres the sums.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, unit_shape: Sequence[int] = (), replicates: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unit_shape = _unit_shape(unit_shape)
        self.n_units = math.prod(self.unit_shape)
        if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
            raise ValueError(f"replicates must be a positive integer, got {replicates!r}")
        self.replicates = replicates
        self._tables: dict[str, list[Exponents]] = {}
        self._replicated: set[str] = set()
        # Every monomial any table needs, in the order tables were added: a table whose entries
        # are the first k monomials reads them as a slice of the per-chunk monomial tensor.
        self._monomials: list[Exponents] = []
        self._selection: dict[str, slice | Tensor] = {}
        self.add_state("shift", torch.zeros(self.n_units, dtype=torch.float64), _agreed)
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _add_table(
        self,
        weight: str,
        lead: tuple[int, ...],
        exponents: Iterable[Exponents],
        replicated: bool = False,
    ) -> None:
        """A table of sums; ``replicated`` keeps one per replicate: state (U, R, K, *lead)."""
        closure = _closure(exponents)
        self._monomials += [e for e in closure if e not in self._monomials]
        index = sorted(self._monomials.index(e) for e in closure)
        self._tables[weight] = [self._monomials[i] for i in index]
        k = len(index)
        self._selection[weight] = (
            slice(0, k) if index == list(range(k)) else torch.tensor(index, dtype=torch.long)
        )
        if replicated:
            self._replicated.add(weight)
            shape: tuple[int, ...] = (self.n_units, self.replicates, k, *lead)
        else:
            shape = (self.n_units, k, *lead)
        self._add_sum_state(self._state_name(weight), shape)

    def _add_sum_state(self, name: str, shape: tuple[int, ...]) -> None:
        """A float64 zero state of ``shape`` summed across processes.

        torchmetrics keeps a deep copy of every state's default for ``reset()``, which would
        double the memory of these sums (126 float64 values per unit for first-order Sobol').
        The default kept here is a zero-stride view of one zero instead; ``reset()`` clones it
        into a real zero tensor.
        """
        self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        setattr(self, name, torch.zeros(shape, dtype=torch.float64))
        self._defaults[name] = self._defaults[name].expand(shape)

    @staticmethod
    def _state_name(weight: str) -> str:
        return f"{weight}_sums"

    def table(
        self, weight: str, states: dict[str, Tensor] | None = None
    ) -> dict[Exponents, Tensor]:
        """The sums of one table as {exponent tuple: (*lead, U) view} (from ``states`` or self);
        (R, *lead, U) for a replicated table."""
        name = self._state_name(weight)
        sums = states[name] if states is not None else getattr(self, name)
        if weight in self._replicated:
            return {e: sums[:, :, k].movedim(0, -1) for k, e in enumerate(self._tables[weight])}
        return {e: sums[:, k].movedim(0, -1) for k, e in enumerate(self._tables[weight])}

    def _fix_shift(self, Y: Tensor) -> None:
        """On the first batch, take its per-unit mean as the shift. Y (..., U)."""
        # torchmetrics counts this update already: only the first update since construction or
        # reset() reads n (a device synchronisation on a GPU); resumed or merged states keep n.
        if self._update_count <= 1 and float(self.n) == 0.0:
            # A mean in the outputs' own dtype is 8x faster on CPU than one accumulated in
            # float64 and just as good a shift (any value near the mean keeps the sums exact).
            self.shift = Y.reshape(-1, self.n_units).mean(0).to(torch.float64)

    def _shifted_chunk(self, Y: Tensor, units: slice, buffer: Tensor) -> Tensor:
        """Y (n, r, U) -> (c, r, n) float64 minus the shift, for the c units ``units``.

        Units first (each unit's rows contiguous), written into ``buffer``, which is reused
        across chunks: fresh large temporaries cost page faults on CPU.
        """
        c = units.stop - units.start
        out = buffer[: c * Y.shape[0] * Y.shape[1]].view(c, Y.shape[1], Y.shape[0])
        out.copy_(Y[:, :, units].permute(2, 1, 0))
        return out.sub_(self.shift[units, None, None])

    def _monomial_chunk(self, variables: Sequence[Tensor]) -> Tensor:
        """(c, M, n): every monomial prod_t variables[t]^e_t in ``self._monomials`` order."""
        first = variables[0]
        out = torch.empty(
            (first.shape[0], len(self._monomials), first.shape[1]),
            dtype=first.dtype,
            device=first.device,
        )
        position = {e: i for i, e in enumerate(self._monomials)}
        for i, e in enumerate(self._monomials):
            # Tables are downward closed and added lowest degree first, so e minus one power
            # of its first variable is already in ``out``: one product per monomial.
            t = next((t for t, k in enumerate(e) if k > 0), None)
            if t is None:
                out[:, i] = 1.0
                continue
            lower = tuple(k - (u == t) for u, k in enumerate(e))
            if sum(lower) == 0:
                out[:, i] = variables[t]
            else:
                torch.mul(out[:, position[lower]], variables[t], out=out[:, i])
        return out

    def _accumulate(
        self,
        weight: str,
        values: Tensor | None,
        monomials: Tensor,
        units: slice,
        replicate: int = 0,
    ) -> None:
        """Add sum_n values[u, :, n] * monomial_e[u, n] to each entry e of a table.

        values: (c, L, n) weights per block, or None for weight 1 (a table without lead);
        monomials: (c, M, n) from ``_monomial_chunk`` for the c units ``units``; replicate: the
        replicate of every block n (replicated tables only).
        """
        selection = self._selection[weight]
        chosen = (
            monomials[:, selection]
            if isinstance(selection, slice)
            else monomials.index_select(1, selection.to(monomials.device))
        )
        state = getattr(self, self._state_name(weight))[units]  # (c, K, *lead), contiguous
        if weight in self._replicated:
            state = state[:, replicate]  # (c, K, *lead): contiguous matrices, strided batch
        # Units as the batch of one small matrix product, added in place into the state.
        if values is None:
            state += chosen.sum(2)
        else:
            state.baddbmm_(chosen, values.transpose(1, 2))

    def _rebased_states(self, states: dict[str, Tensor], new_shift: Tensor) -> dict[str, Tensor]:
        out = dict(states)
        delta = states["shift"] - new_shift
        for weight, exponents in self._tables.items():
            rebased = _rebase_table(self.table(weight, states), delta)
            out[self._state_name(weight)] = torch.stack(
                [rebased[e].movedim(-1, 0) for e in exponents],
                dim=2 if weight in self._replicated else 1,
            )
        out["shift"] = new_shift.clone()
        return out

    def _set_states(self, states: dict[str, Tensor]) -> None:
        for name, value in states.items():
            setattr(self, name, value)

    @staticmethod
    def _common_shift(counts: Sequence[Tensor], shifts: Sequence[Tensor]) -> Tensor:
        total = sum(counts)
        if float(total) == 0.0:
            return torch.zeros_like(shifts[0])
        return sum(c * s for c, s in zip(counts, shifts, strict=True)) / total

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        # Behind merge_state (and forward): move both sets of sums to one shift, then add.
        for name in self._defaults:
            if name not in incoming_state:
                raise ValueError(f"incoming state lacks {name!r}; was it built the same way?")
            if incoming_state[name].shape != getattr(self, name).shape:
                raise ValueError(
                    f"state {name!r} has shape {tuple(incoming_state[name].shape)}, expected "
                    f"{tuple(getattr(self, name).shape)}: accumulators differ in groups or units"
                )
        common = self._common_shift(
            [self.n, incoming_state["n"]], [self.shift, incoming_state["shift"]]
        )
        self._set_states(self._rebased_states(self.metric_state, common))
        super()._reduce_states(self._rebased_states(dict(incoming_state), common))

    def _sync_dist(self, dist_sync_fn: Any = gather_all_tensors, process_group: Any = None) -> None:
        # Sums taken about different shifts cannot be added: agree on the count-weighted mean
        # shift first (one extra gather), re-base locally, then let torchmetrics sum.
        group = process_group or self.process_group
        counts = dist_sync_fn(self.n, group=group)
        shifts = dist_sync_fn(self.shift, group=group)
        common = self._common_shift(counts, shifts)
        self._set_states(self._rebased_states(self.metric_state, common))
        super()._sync_dist(dist_sync_fn, process_group)

    def _centred_tables(self, centre: Tensor) -> dict[str, dict[Exponents, Tensor]]:
        """Every table re-expanded about ``centre`` (U,), given relative to the current shift."""
        return {w: _rebase_table(self.table(w), -centre) for w in self._tables}


class _ConstantUnits:
    """Base of the result dataclasses: ``constant`` and ``flag`` mark the degenerate units.

    Not a dataclass itself, so the subclasses keep their own field order (and positional
    constructors); ``constant``: (*unit_shape) bool, units whose indices were set to 0;
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


@dataclass
class SobolResult(_ConstantUnits):
    """Sobol' indices per group and unit; arrays are float64 numpy.

    S1, ST, S1_conf, ST_conf: (G, *unit_shape); S2, S2_conf: (G, G, *unit_shape), symmetric with a
    zero diagonal, or None without second order. ``*_conf`` are confidence half-widths.
    mean: (*unit_shape) over all rows; variance, variance_conf: (*unit_shape) population variance
    of [A; B] (the normaliser) and its half-width. constant: (*unit_shape) bool, units with zero
    variance (indices set to 0); flag: (*unit_shape) uint8 FLAG_* code of every unit.
    n: base points; replicates: R; interval: how the half-widths were computed; names: group
    names when known.
    """

    S1: np.ndarray
    ST: np.ndarray
    S1_conf: np.ndarray
    ST_conf: np.ndarray
    S2: np.ndarray | None
    S2_conf: np.ndarray | None
    mean: np.ndarray
    variance: np.ndarray
    variance_conf: np.ndarray
    constant: np.ndarray
    flag: np.ndarray
    n: int
    conf_level: float
    replicates: int = 1
    interval: str = ""
    names: list[str] | None = None


class SobolAccumulator(_ShiftedPowerSums):
    """Saltelli-design Sobol' indices as SALib computes them, streamed over base points.

    update(Y, replicate=None): Y (n_blocks, block_size, *unit_shape), any float dtype, blocks in
    SALib's layout [A, AB_0..AB_{G-1}, (BA_0..BA_{G-1}), B] (block_size G + 2, or 2G + 2 with
    second order). Per base point (dropping the index n), with mu the mean of all rows and V the
    population variance of [A; B] (SALib centres and scales Y first; both cancel in these ratios):
        S1_j = mean[(B - mu)(AB_j - A)] / V                      (Saltelli 2010)
        ST_j = mean[(A - AB_j)^2] / (2V)                         (Jansen)
        S2_jk = mean[(BA_j - mu)(AB_k - mu) - (A - mu)(B - mu)] / V - S1_j - S1_k  (Saltelli 2002)

    Intervals. replicates = 1: the delta method over base points (module docstring), calibrated
    for i.i.d. base points; the sums include the per-point second moments it needs (13 power
    sums of (A, B), 14 per group, 16 more per group and 9 per pair with second order).
    replicates = R > 1: the base points come in R independent replicates of equal size (a
    ``SobolDesign`` with ``replicates=R``), and ``replicate`` (n_blocks,) int gives each
    block's; the states are then per-replicate first moments (5 + 3 per group per replicate,
    plus P + 3G per replicate with second order) and the interval is the delta method over the
    R replicate estimates with Student's t (R - 1 degrees of freedom), which holds for
    randomised quasi-Monte-Carlo points. The point estimates are the same either way (the
    pooled formulas above).

    Without second order, ``moments`` holds after ``compute()`` the per-unit moments of every
    row of the design, as a MomentsAccumulator fed all rows would give them (computed from the
    synced sums under DDP, like the indices).
    """

    def __init__(
        self,
        n_groups: int,
        unit_shape: Sequence[int] = (),
        second_order: bool = False,
        conf_level: float = 0.95,
        replicates: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(unit_shape, replicates, **kwargs)
        self.n_groups = _n_groups(n_groups)
        self.second_order = bool(second_order)
        self.conf_level = conf_level
        self._z = _z_score(conf_level)
        g = n_groups
        self.block_size = 2 * g + 2 if self.second_order else g + 2
        self.moments: MomentsResult | None = None
        pairs = list(itertools.combinations(range(g), 2))
        self._pair_j = torch.tensor([j for j, _ in pairs], dtype=torch.long)
        self._pair_k = torch.tensor([k for _, k in pairs], dtype=torch.long)
        p = len(pairs)
        # Exponents are over (A - shift, B - shift); the closure adds every lower power, which the
        # re-expansion about a new centre needs. What each entry is for: see compute().
        # Added smallest first so that each table's monomials are a prefix of the shared list.
        if replicates == 1:
            self._add_table("D4", (g,), [(0, 0)])
            self._add_table("D2", (g,), [(2, 0), (0, 2)])
            self._add_table("D", (g,), [(2, 1), (0, 3)])
            self._add_table("one", (), [(4, 0), (2, 2), (0, 4)])
            if self.second_order:
                self._add_table("Z", (p,), [(2, 0), (0, 2)])
                self._add_table("Z2", (p,), [(0, 0)])
                self._add_table("ZH", (p,), [(1, 0), (0, 1)])
                self._add_table("H", (g,), [(3, 0), (2, 1), (1, 2), (0, 3)])
                self._add_table("H2", (g,), [(2, 0), (1, 1), (0, 2)])
        else:
            self._add_table("rD2", (g,), [(0, 0)], replicated=True)
            self._add_table("rD", (g,), [(0, 1)], replicated=True)
            self._add_table("rone", (), [(2, 0), (0, 2)], replicated=True)
            if self.second_order:
                self._add_table("rZ", (p,), [(0, 0)], replicated=True)
                self._add_table("rH", (g,), [(1, 0), (0, 1)], replicated=True)
            else:
                self._add_table("SD4", (1,), [(0, 0)])
                self._add_table("SD2", (1,), [(2, 0)])
                self._add_table("one", (), [(4, 0), (0, 4)])
        if not self.second_order:
            # With S = sum_j D_j, S3 = sum_j D_j^3 (and the group sums of D_j^2, D_j^4), every
            # row's power sums follow from the tables (AB_j = A + D_j): the moments of all rows
            # at a fraction of the cost of a MomentsAccumulator's own pass over the outputs.
            self._add_table("S", (1,), [(3, 0)])
            self._add_table("S3", (1,), [(1, 0)])

    def update(self, Y: Tensor, replicate: Tensor | np.ndarray | None = None) -> None:
        """Add whole base points: Y (n_blocks, block_size, *unit_shape); ``replicate``
        (n_blocks,) int in [0, R), required with R > 1 replicates."""
        Y = _as_blocks(Y, self.block_size, self.unit_shape, "SobolAccumulator.update")
        runs = self._replicate_runs(replicate, Y.shape[0])
        _check_finite(Y, self.n, self.block_size)
        self._fix_shift(Y)
        g, n = self.n_groups, Y.shape[0]
        pairs = len(self._pair_j)
        per_unit = n * (
            self.block_size + len(self._monomials) + 4 * g
            + (4 * pairs + 3 * g if self.second_order else 0)
        )
        slices = _unit_slices(self.n_units, per_unit, Y.device)
        buffer = torch.empty(
            (slices[0].stop - slices[0].start) * self.block_size * n,
            dtype=torch.float64,
            device=Y.device,
        )
        for r, blocks in runs:
            for units in slices:
                self._update_units(self._shifted_chunk(Y[blocks], units, buffer), units, r)
        self.n = self.n + n

    def _replicate_runs(
        self, replicate: Tensor | np.ndarray | None, n_blocks: int
    ) -> list[tuple[int, slice]]:
        """[(replicate, blocks)]: the runs of consecutive blocks of one replicate."""
        if self.replicates == 1:
            if replicate is not None and bool(np.any(np.asarray(replicate) != 0)):
                raise ValueError("replicate ids given, but this accumulator has 1 replicate")
            return [(0, slice(0, n_blocks))]
        if replicate is None:
            raise ValueError(
                f"this accumulator keeps {self.replicates} replicates: pass replicate=(n_blocks,) "
                f"ids (SobolDesign.replicate_of(start, stop))"
            )
        ids = np.asarray(torch.as_tensor(replicate).cpu(), dtype=np.int64).reshape(-1)
        if ids.shape != (n_blocks,) or ids.min() < 0 or ids.max() >= self.replicates:
            raise ValueError(
                f"replicate must hold {n_blocks} ids in [0, {self.replicates}), got "
                f"{ids.tolist() if ids.size <= 16 else ids.shape}"
            )
        edges = [0, *(np.flatnonzero(np.diff(ids)) + 1).tolist(), n_blocks]
        return [(int(ids[a]), slice(a, b)) for a, b in itertools.pairwise(edges)]

    def _update_units(self, Y: Tensor, units: slice, r: int) -> None:
        """Y (c, block_size, n) shifted float64 outputs of the units ``units``, replicate r."""
        g = self.n_groups
        A, B = Y[:, 0], Y[:, -1]
        D = Y[:, 1 : g + 1] - A[:, None]  # (c, G, n) AB_j - A
        D2 = D * D
        monomials = self._monomial_chunk((A, B))
        replicated = self.replicates > 1
        if not self.second_order:
            self._accumulate("one", None, monomials, units)
            self._accumulate("S", D.sum(1, keepdim=True), monomials, units)
            self._accumulate("S3", (D2 * D).sum(1, keepdim=True), monomials, units)
        if replicated:
            self._accumulate("rone", None, monomials, units, r)
            self._accumulate("rD", D, monomials, units, r)
            self._accumulate("rD2", D2, monomials, units, r)
            if not self.second_order:
                self._accumulate("SD2", D2.sum(1, keepdim=True), monomials, units)
                self._accumulate("SD4", (D2 * D2).sum(1, keepdim=True), monomials, units)
        else:
            if self.second_order:
                self._accumulate("one", None, monomials, units)
            self._accumulate("D", D, monomials, units)
            self._accumulate("D2", D2, monomials, units)
            self._accumulate("D4", D2 * D2, monomials, units)
        if self.second_order:
            j, k = self._pair_j.to(Y.device), self._pair_k.to(Y.device)
            E = Y[:, g + 1 : 2 * g + 1] - B[:, None]  # BA_j - B
            H = E - D
            half = ((A - B) / 2.0)[:, None]
            # z_jk(m) = (BA_j - m)(AB_k - m) - (A - m)(B - m) - (B - m)(D_j + D_k) is linear in m:
            # z = Zt + (p - m) H_j with p = (A + B) / 2 and the shift-invariant
            # Zt = z(p) = E_j D_k + (A - B)/2 (E_j + D_j).
            Z = E[:, j] * D[:, k] + half * (E + D)[:, j]
            if replicated:
                self._accumulate("rZ", Z, monomials, units, r)
                self._accumulate("rH", H, monomials, units, r)
            else:
                self._accumulate("Z", Z, monomials, units)
                self._accumulate("Z2", Z * Z, monomials, units)
                self._accumulate("ZH", Z * H[:, j], monomials, units)
                self._accumulate("H", H, monomials, units)
                self._accumulate("H2", H * H, monomials, units)

    @property
    def interval(self) -> str:
        """How the half-widths are computed (recorded with the results)."""
        if self.replicates == 1:
            return "delta method over base points, normal quantile (assumes i.i.d. points)"
        r = self.replicates
        return f"delta method over {r} replicates, Student t ({r - 1} df)"

    def compute(self) -> SobolResult:
        n = self.n
        if float(n) < 2:
            raise ValueError(f"need at least 2 base points for Sobol indices, got {int(n)}")
        if self.replicates > 1:
            counts = self.table("rone")[(0, 0)][:, 0]
            if bool((counts != counts[0]).any()):
                raise ValueError(
                    f"the replicates hold {counts.tolist()} base points; every replicate needs "
                    f"the same number (a whole SobolDesign with these replicates)"
                )
        g, u = self.n_groups, self.n_units
        leads = {"S1": (g,), "ST": (g,), "S1_conf": (g,), "ST_conf": (g,), "mean": (),
                 "variance": (), "variance_se": (), "variance_conf": (), "constant": ()}
        if self.second_order:
            leads.update(S2=(g, g), S2_conf=(g, g))
        device = self.shift.device
        out = {
            k: torch.empty((*lead, u), dtype=torch.bool if k == "constant" else torch.float64,
                           device=device)
            for k, lead in leads.items()
        }
        # By chunks of units: whole-layer float64 temporaries (tens of MB each, hundreds of
        # them) made compute() take seconds per million units on CPU.
        compute_units = (
            self._compute_units if self.replicates == 1 else self._compute_units_replicated
        )
        for units in _unit_slices(u, 256, device):
            for key, value in compute_units(units, n).items():
                out[key][..., units] = value
        flag = _unit_flags(out["constant"], out["variance"], out["variance_se"], out["mean"])
        shape = (g, *self.unit_shape)
        pair_shape = (g, g, *self.unit_shape)
        self.moments = None if self.second_order else self._row_moments()
        return SobolResult(
            S1=_numpy(out["S1"], shape),
            ST=_numpy(out["ST"], shape),
            S1_conf=_numpy(out["S1_conf"], shape),
            ST_conf=_numpy(out["ST_conf"], shape),
            S2=_numpy(out["S2"], pair_shape) if self.second_order else None,
            S2_conf=_numpy(out["S2_conf"], pair_shape) if self.second_order else None,
            mean=_numpy(out["mean"], self.unit_shape),
            variance=_numpy(out["variance"], self.unit_shape),
            variance_conf=_numpy(out["variance_conf"], self.unit_shape),
            constant=_numpy(out["constant"], self.unit_shape).astype(bool),
            flag=_flags_numpy(flag, self.unit_shape),
            n=int(n),
            conf_level=self.conf_level,
            replicates=self.replicates,
            interval=self.interval,
        )

    def _row_moments(self) -> MomentsResult:
        """Moments of all n (G + 2) rows from the power sums of each row kind about the shift:
        sum (A + D_j)^k = sum_i C(k, i) A^(k - i) D_j^i, summed over the groups j."""
        g, one = self.n_groups, self.table("one")
        S, S3 = (self._group_sums(w) for w in ("S", "S3"))
        if self.replicates == 1:
            D2, D4 = self._group_sums("D2"), self._group_sums("D4")[(0, 0)]
        else:
            D2, D4 = self._group_sums("SD2"), self._group_sums("SD4")[(0, 0)]
        sums = {
            (0,): one[(0, 0)] * (g + 2),
            (1,): (g + 1) * one[(1, 0)] + one[(0, 1)] + S[(0, 0)],
            (2,): (g + 1) * one[(2, 0)] + one[(0, 2)] + 2 * S[(1, 0)] + D2[(0, 0)],
            (3,): (g + 1) * one[(3, 0)] + one[(0, 3)] + 3 * S[(2, 0)] + 3 * D2[(1, 0)]
            + S3[(0, 0)],
            (4,): (g + 1) * one[(4, 0)] + one[(0, 4)] + 4 * S[(3, 0)] + 6 * D2[(2, 0)]
            + 4 * S3[(1, 0)] + D4,
        }
        return _moments_result(
            sums, self.n * (g + 2), self.shift, self._z, self.conf_level, self.unit_shape
        )

    def _group_sums(self, weight: str) -> dict[Exponents, Tensor]:
        """A table's entries summed over its lead axis: {exponents: (U,)}."""
        name = self._state_name(weight)
        summed = getattr(self, name).sum(2, keepdim=True)  # contiguous axis: a fast reduction
        return {e: t[0] for e, t in self.table(weight, {name: summed}).items()}

    def _constant(self, V: Tensor, mean: Tensor, largest_change: Tensor) -> Tensor:
        """Units whose [A; B] variance is zero: relative to their mean (float64 round-off), or
        to their largest mean squared cross-sample change (a sparse map, see _DEGENERATE_RATIO)."""
        return (V <= (_CONSTANT_RTOL * torch.abs(mean)) ** 2) | (
            V <= _DEGENERATE_RATIO * largest_change
        )

    def _compute_units(self, units: slice, n: Tensor) -> dict[str, Tensor]:
        """compute()'s arrays for the units ``units`` (one replicate): (*lead, c) tensors."""
        g = self.n_groups
        tables = {w: {e: t[..., units] for e, t in self.table(w).items()} for w in self._tables}
        shift = self.shift[units]
        one = tables["one"]
        # Mean of all rows (relative to the shift), from sums already kept: AB_j = A + D_j and
        # BA_j = B + H_j + D_j.
        d_sum = tables["D"][(0, 0)].sum(0)
        all_sum = (g + 1) * one[(1, 0)] + one[(0, 1)] + d_sum
        if self.second_order:
            all_sum = all_sum + g * one[(0, 1)] + tables["H"][(0, 0)].sum(0) + d_sum
        mu = all_sum / (n * self.block_size)
        ab_mean = (one[(1, 0)] + one[(0, 1)]) / (2.0 * n)
        # Centre every table on the mean of [A; B]: a = A - mean, b = B - mean below.
        C = {w: _rebase_table(table, -ab_mean) for w, table in tables.items()}
        e = ab_mean - mu  # so B - mu = b + e
        c1, cD, cD2 = C["one"], C["D"], C["D2"]
        V = (c1[(2, 0)] + c1[(0, 2)]) / (2.0 * n)  # per-block v = (a^2 + b^2) / 2
        vv = (c1[(4, 0)] + 2.0 * c1[(2, 2)] + c1[(0, 4)]) / (4.0 * n)
        constant = self._constant(V, shift + mu, tables["D2"][(0, 0)].amax(0) / n)
        V = torch.where(constant, torch.zeros_like(V), V)
        V_se = torch.sqrt(torch.clamp((vv - V * V) / (n - 1.0), min=0.0))
        # First order: x = (b + e) D_j.
        x1 = (cD[(0, 1)] + e * cD[(0, 0)]) / n
        xx1 = (cD2[(0, 2)] + 2.0 * e * cD2[(0, 1)] + e * e * cD2[(0, 0)]) / n
        xv1 = (cD[(2, 1)] + cD[(0, 3)] + e * (cD[(2, 0)] + cD[(0, 2)])) / (2.0 * n)
        S1, S1_conf = _ratio_conf(n, x1, xx1, V, vv, xv1, self._z)
        # Total: x = D_j^2 / 2.
        xT = cD2[(0, 0)] / (2.0 * n)
        xxT = C["D4"][(0, 0)] / (4.0 * n)
        xvT = (cD2[(2, 0)] + cD2[(0, 2)]) / (4.0 * n)
        ST, ST_conf = _ratio_conf(n, xT, xxT, V, vv, xvT, self._z)
        out = {"S1": S1, "ST": ST, "S1_conf": S1_conf, "ST_conf": ST_conf, "mean": shift + mu,
               "variance": V, "variance_se": V_se, "variance_conf": self._z * V_se,
               "constant": constant}
        if self.second_order:
            out["S2"], out["S2_conf"] = self._second_order(C, n, e, V, vv)
        return out

    def _second_order(
        self, C: dict[str, dict[Exponents, Tensor]], n: Tensor, e: Tensor, V: Tensor, vv: Tensor
    ) -> tuple[Tensor, Tensor]:
        """S2 and its half-width as (G, G, c) from the centred tables of c units.

        S2_jk = mean(z) / V with z = Zt + h_j ((a + b) / 2 + e) (see update) and v as for S1.
        """
        j = self._pair_j.to(e.device)
        cZ, cZH, cH, cH2 = C["Z"], C["ZH"], C["H"], C["H2"]

        def at_j(t: Tensor) -> Tensor:
            return t[j]

        x = (cZ[(0, 0)] + at_j(0.5 * (cH[(1, 0)] + cH[(0, 1)]) + e * cH[(0, 0)])) / n
        xx = (
            C["Z2"][(0, 0)]
            + cZH[(1, 0)]
            + cZH[(0, 1)]
            + 2.0 * e * cZH[(0, 0)]
            + at_j(
                0.25 * (cH2[(2, 0)] + 2.0 * cH2[(1, 1)] + cH2[(0, 2)])
                + e * (cH2[(1, 0)] + cH2[(0, 1)])
                + e * e * cH2[(0, 0)]
            )
        ) / n
        xv = (
            0.5 * (cZ[(2, 0)] + cZ[(0, 2)])
            + at_j(
                0.25 * (cH[(3, 0)] + cH[(2, 1)] + cH[(1, 2)] + cH[(0, 3)])
                + 0.5 * e * (cH[(2, 0)] + cH[(0, 2)])
            )
        ) / n
        return self._pair_matrix(*_ratio_conf(n, x, xx, V, vv, xv, self._z))

    def _pair_matrix(self, s2: Tensor, conf: Tensor) -> tuple[Tensor, Tensor]:
        """(P, c) values of the pairs j < k as symmetric (G, G, c) matrices, zero diagonal."""
        g = self.n_groups
        j, k = self._pair_j.to(s2.device), self._pair_k.to(s2.device)
        full = torch.zeros((g, g, s2.shape[-1]), dtype=torch.float64, device=s2.device)
        full_conf = torch.zeros_like(full)
        full[j, k] = full[k, j] = s2
        full_conf[j, k] = full_conf[k, j] = conf
        return full, full_conf

    def _compute_units_replicated(self, units: slice, n: Tensor) -> dict[str, Tensor]:
        """compute()'s arrays for the units ``units`` from R replicates: (*lead, c) tensors.

        Every replicate's means use the global centres (mean of all rows, mean of [A; B]), so
        the mean of the R replicate numerators and denominators are the pooled ones and the
        indices equal those of one replicate; the half-widths come from the replicates' spread.
        """
        g, R = self.n_groups, self.replicates
        tables = {w: {e: t[..., units] for e, t in self.table(w).items()} for w in self._replicated}
        shift = self.shift[units]
        per = tables["rone"][(0, 0)][:, None]  # (R, 1, c) base points per replicate
        one = {e: t.sum(0) for e, t in tables["rone"].items()}
        d_sum = tables["rD"][(0, 0)].sum((0, 1))
        all_sum = (g + 1) * one[(1, 0)] + one[(0, 1)] + d_sum
        if self.second_order:
            all_sum = all_sum + g * one[(0, 1)] + tables["rH"][(0, 0)].sum((0, 1)) + d_sum
        mu = all_sum / (n * self.block_size)
        ab_mean = (one[(1, 0)] + one[(0, 1)]) / (2.0 * n)
        C = {w: _rebase_table(table, -ab_mean) for w, table in tables.items()}
        e = ab_mean - mu
        c1, cD, cD2 = C["rone"], C["rD"], C["rD2"]
        v = (c1[(2, 0)] + c1[(0, 2)]) / (2.0 * per[:, 0])  # (R, c) replicate denominators
        V = v.mean(0)
        constant = self._constant(V, shift + mu, tables["rD2"][(0, 0)].sum(0).amax(0) / n)
        V = torch.where(constant, torch.zeros_like(V), V)
        t = _t_score(self.conf_level, R - 1)
        V_se = torch.sqrt(torch.clamp(v.var(0, correction=1) / R, min=0.0))
        S1, S1_conf = _replicate_ratio((cD[(0, 1)] + e * cD[(0, 0)]) / per, v, V, t)
        ST, ST_conf = _replicate_ratio(cD2[(0, 0)] / (2.0 * per), v, V, t)
        out = {"S1": S1, "ST": ST, "S1_conf": S1_conf, "ST_conf": ST_conf, "mean": shift + mu,
               "variance": V, "variance_se": V_se, "variance_conf": t * V_se,
               "constant": constant}
        if self.second_order:
            j = self._pair_j.to(e.device)
            cZ, cH = C["rZ"], C["rH"]
            x = (cZ[(0, 0)] + (0.5 * (cH[(1, 0)] + cH[(0, 1)]) + e * cH[(0, 0)])[:, j]) / per
            out["S2"], out["S2_conf"] = self._pair_matrix(*_replicate_ratio(x, v, V, t))
        return out


@dataclass
class ShapleyResult(_ConstantUnits):
    """Shapley effects per group and unit; arrays are float64 numpy.

    shapley, shapley_conf: (G, *unit_shape) in output-variance units (they sum to ``variance``);
    shapley_normalized, shapley_normalized_conf: (G, *unit_shape) shares summing to 1.
    variance, variance_conf: (*unit_shape) the estimator's own estimate of Var(Y) (the sum of the
    effects) and its half-width. constant: (*unit_shape) bool, units with zero estimated variance
    (effects 0); flag: (*unit_shape) uint8 FLAG_* codes, from ``variance`` (a unit whose
    variance estimate is not told from 0 has shares of any size). n: trajectories or
    permutations.
    """

    shapley: np.ndarray
    shapley_normalized: np.ndarray
    shapley_conf: np.ndarray
    shapley_normalized_conf: np.ndarray
    variance: np.ndarray
    variance_conf: np.ndarray
    constant: np.ndarray
    flag: np.ndarray
    n: int
    conf_level: float
    names: list[str] | None = None
    interval: str = "delta method over trajectories (permutations), normal quantile"


class _ContributionSums(Metric):
    """Shared part of the Shapley estimators: i.i.d. per-block contributions c (G,) whose sum R
    over groups estimates Var(Y). Effects are mean(c); shares mean(c) / mean(R) (delta method).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(
        self, n_groups: int, unit_shape: Sequence[int] = (), conf_level: float = 0.95, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.n_groups = _n_groups(n_groups)
        self.unit_shape = _unit_shape(unit_shape)
        self.n_units = math.prod(self.unit_shape)
        self.conf_level = conf_level
        self._z = _z_score(conf_level)
        g, u = n_groups, self.n_units
        # y0: the first row of each block, for the units' mean (the flags' resolution test).
        shapes = {"c": (g, u), "cc": (g, u), "cr": (g, u), "r": (u,), "rr": (u,), "y0": (u,)}
        for name, shape in shapes.items():
            self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _permutations(self, permutations: Tensor | np.ndarray, n_blocks: int) -> Tensor:
        perms = torch.as_tensor(permutations)
        if perms.shape != (n_blocks, self.n_groups) or perms.dtype.is_floating_point:
            raise ValueError(
                f"permutations must be integers of shape ({n_blocks}, {self.n_groups}) (one group "
                f"order per block), got {tuple(perms.shape)} {perms.dtype}"
            )
        perms = perms.long()
        valid = torch.sort(perms, dim=1).values == torch.arange(self.n_groups, device=perms.device)
        if not bool(valid.all()):
            block = int((~valid.all(dim=1)).nonzero()[0])
            raise ValueError(
                f"permutations[{block}] = {perms[block].tolist()} is not a permutation of "
                f"0..{self.n_groups - 1}"
            )
        return perms

    def update(self, Y: Tensor, permutations: Tensor | np.ndarray) -> None:
        """Add whole blocks: Y (n_blocks, block_size, *unit_shape), permutations (n_blocks, G)."""
        Y = _as_blocks(Y, self.block_size, self.unit_shape, f"{type(self).__name__}.update")
        perms = self._permutations(permutations, Y.shape[0])
        _check_finite(Y, self.n, self.block_size)
        n = Y.shape[0]
        position = torch.argsort(perms.to(Y.device), dim=1)  # step at which group j changes
        for units in _unit_slices(self.n_units, n * (2 * self.block_size + 6), Y.device):
            steps = self._steps(Y[:, :, units].to(torch.float64))  # (n, G steps, c)
            c = torch.gather(steps, 1, position[:, :, None].expand_as(steps))  # group order
            r = c.sum(1)
            self.c[:, units] += c.sum(0)
            self.cc[:, units] += (c * c).sum(0)
            self.cr[:, units] += (c * r[:, None]).sum(0)
            self.r[units] += r.sum(0)
            self.rr[units] += (r * r).sum(0)
        self.y0 += Y[:, 0].sum(0, dtype=torch.float64)
        self.n = self.n + n

    def _steps(self, Y: Tensor) -> Tensor:
        """Y (n, block_size, c) float64 -> contributions (n, G, c) in step order."""
        raise NotImplementedError

    def compute(self) -> ShapleyResult:
        n = self.n
        if float(n) < 2:
            raise ValueError(f"need at least 2 trajectories/permutations, got {int(n)}")
        effects = self.c / n
        var_c = torch.clamp((self.cc / n - effects**2) * n / (n - 1.0), min=0.0)
        conf = self._z * torch.sqrt(var_c / n)
        total = self.r / n
        var_r = torch.clamp((self.rr / n - total**2) * n / (n - 1.0), min=0.0)
        # R >= 0 for Goda (it is (y_0 - y_G)^2 / 2) and typically for the permutation estimator; a
        # zero total means the unit never changed.
        constant = total <= 0
        total_se = torch.sqrt(var_r / n)
        flag = _unit_flags(constant, total, total_se, self.y0 / n)
        normalized, normalized_conf = _ratio_conf(
            n, effects, self.cc / n, total, self.rr / n, self.cr / n, self._z
        )
        zero = torch.zeros_like(effects)
        shape = (self.n_groups, *self.unit_shape)
        return ShapleyResult(
            shapley=_numpy(torch.where(constant, zero, effects), shape),
            shapley_normalized=_numpy(torch.where(constant, zero, normalized), shape),
            shapley_conf=_numpy(torch.where(constant, zero, conf), shape),
            shapley_normalized_conf=_numpy(torch.where(constant, zero, normalized_conf), shape),
            variance=_numpy(torch.clamp(total, min=0.0), self.unit_shape),
            variance_conf=_numpy(self._z * total_se, self.unit_shape),
            constant=_numpy(constant, self.unit_shape).astype(bool),
            flag=_flags_numpy(flag, self.unit_shape),
            n=int(n),
            conf_level=self.conf_level,
        )


class ShapleyAccumulator(_ContributionSums):
    """Goda (2021) Shapley effects, as ``SALib.analyze.shapley``, streamed over trajectories.

    update(Y, permutations): Y (n_traj, G + 1, *unit_shape), row 0 x1 then one group at a time
    switched to x2 in the order ``permutations`` (n_traj, G). Step s (1..G), which changes group
    pi_{s-1}, contributes (y_0 - (y_{s-1} + y_s) / 2)(y_{s-1} - y_s); per trajectory these sum to
    (y_0 - y_G)^2 / 2, an unbiased estimate of Var(Y). States: 3 per group and 2 per unit.
    """

    def __init__(
        self, n_groups: int, unit_shape: Sequence[int] = (), conf_level: float = 0.95, **kwargs: Any
    ) -> None:
        super().__init__(n_groups, unit_shape, conf_level, **kwargs)
        self.block_size = n_groups + 1

    def _steps(self, Y: Tensor) -> Tensor:
        before, after = Y[:, :-1], Y[:, 1:]
        return (Y[:, :1] - (before + after) / 2.0) * (before - after)


class PermutationShapleyAccumulator(_ContributionSums):
    """Song, Nelson and Staum (2016) random-permutation Shapley effects (the reference's).

    update(Y, permutations): Y (n_perm, G * n_outer * n_inner, *unit_shape) in
    ``PermutationDesign``'s order (position j, outer l, inner i); permutations (n_perm, G). At
    position j, c(P_j) = mean over outer samples of the sample variance (ddof 1) over inner rows
    estimates E[Var(Y | X_-P_j)]; group pi_j contributes c(P_j) - c(P_{j-1}), c(empty) = 0, and
    the contributions of one permutation sum to c(all groups), an estimate of Var(Y).
    """

    def __init__(
        self,
        n_groups: int,
        n_outer: int,
        n_inner: int,
        unit_shape: Sequence[int] = (),
        conf_level: float = 0.95,
        **kwargs: Any,
    ) -> None:
        super().__init__(n_groups, unit_shape, conf_level, **kwargs)
        if n_outer < 1 or n_inner < 2:
            raise ValueError(
                f"need n_outer >= 1 and n_inner >= 2 (a variance over inner rows), got "
                f"n_outer={n_outer}, n_inner={n_inner}"
            )
        self.n_outer, self.n_inner = int(n_outer), int(n_inner)
        self.block_size = n_groups * self.n_outer * self.n_inner

    def _steps(self, Y: Tensor) -> Tensor:
        Y = Y.reshape(Y.shape[0], self.n_groups, self.n_outer, self.n_inner, -1)
        # Deviations from the first inner row keep a constant unit's variance exactly 0.
        inner_var = torch.var(Y - Y[:, :, :, :1], dim=3, correction=1)
        cost = inner_var.mean(2)  # (n, G positions, c)
        return cost - torch.cat([torch.zeros_like(cost[:, :1]), cost[:, :-1]], dim=1)


@dataclass
class MomentsResult(_ConstantUnits):
    """Per-unit moments; arrays (*unit_shape) float64 numpy.

    var is the sample variance (ddof 1); cv = std / |mean| (0 for a constant unit, inf when the
    mean is 0 but the variance is not); *_conf are normal half-widths (var's from the 4th moment).
    """

    mean: np.ndarray
    var: np.ndarray
    std: np.ndarray
    cv: np.ndarray
    mean_conf: np.ndarray
    var_conf: np.ndarray
    constant: np.ndarray
    flag: np.ndarray
    n: int
    conf_level: float
    interval: str = "normal approximation over the rows (var: from the 4th moment)"


class MomentsAccumulator(_ShiftedPowerSums):
    """Mean and variance per unit from shifted power sums. update(Y): Y (rows, *unit_shape)."""

    def __init__(
        self, unit_shape: Sequence[int] = (), conf_level: float = 0.95, **kwargs: Any
    ) -> None:
        super().__init__(unit_shape, **kwargs)
        self.conf_level = conf_level
        self._z = _z_score(conf_level)
        self._add_table("one", (), [(4,)])

    def update(self, Y: Tensor) -> None:
        if (
            not isinstance(Y, Tensor)
            or Y.ndim != 1 + len(self.unit_shape)
            or (Y.shape[1:] != self.unit_shape)
        ):
            raise ValueError(
                f"MomentsAccumulator.update expects a tensor (rows, *{self.unit_shape}), got "
                f"{tuple(Y.shape) if isinstance(Y, Tensor) else type(Y).__name__}"
            )
        Y = Y.reshape(Y.shape[0], -1)
        _check_finite(Y, self.n, 1)
        self._fix_shift(Y)
        rows = Y.shape[0]
        sums = self.table("one")
        # Two arrays of (rows, units) in flight: about 2^16 values each keeps them in L2.
        slices = _unit_slices(self.n_units, 16 * rows, Y.device)
        buffer = torch.empty(
            (slices[0].stop - slices[0].start) * rows, dtype=torch.float64, device=Y.device
        )
        for units in slices:
            # Rows first, units contiguous: sums over rows need no transposed copy.
            y = buffer[: rows * (units.stop - units.start)].view(rows, -1)
            y.copy_(Y[:, units]).sub_(self.shift[units])
            power = y
            for k in range(1, 5):
                sums[(k,)][units] += power.sum(0)
                if k < 4:
                    power = power * y
        sums[(0,)] += rows
        self.n = self.n + rows

    def compute(self) -> MomentsResult:
        return _moments_result(
            self.table("one"), self.n, self.shift, self._z, self.conf_level, self.unit_shape
        )


def _moments_result(
    sums: dict[Exponents, Tensor],
    n: Tensor,
    shift: Tensor,
    z: float,
    conf_level: float,
    unit_shape: tuple[int, ...],
) -> MomentsResult:
    """Moments from the power sums {(k,): sum over n rows of (y - shift)^k}, k = 0..4, (U,)."""
    if float(n) < 2:
        raise ValueError(f"need at least 2 rows for a variance, got {int(n)}")
    mean_shifted = sums[(1,)] / n
    c = _rebase_table(sums, -mean_shifted)
    mean = shift + mean_shifted
    var = c[(2,)] / (n - 1.0)
    constant = var <= (_CONSTANT_RTOL * mean.abs()) ** 2
    var = torch.where(constant, torch.zeros_like(var), var)
    std = torch.sqrt(var)
    m2, m4 = c[(2,)] / n, c[(4,)] / n
    var_conf = z * torch.sqrt(torch.clamp((m4 - m2 * m2) / n, min=0.0))
    cv = torch.where(std == 0, torch.zeros_like(std), std / mean.abs())
    return MomentsResult(
        mean=_numpy(mean, unit_shape),
        var=_numpy(var, unit_shape),
        std=_numpy(std, unit_shape),
        cv=_numpy(cv, unit_shape),
        mean_conf=_numpy(z * std / torch.sqrt(n), unit_shape),
        var_conf=_numpy(torch.where(constant, torch.zeros_like(var), var_conf), unit_shape),
        constant=_numpy(constant, unit_shape).astype(bool),
        flag=_constant_flags(constant, unit_shape),
        n=int(n),
        conf_level=conf_level,
    )


@dataclass
class ContrastResult(_ConstantUnits):
    """Paired treated - original statistics per augmentation and unit; (A, *unit_shape) float64.

    mean_diff: mean over images and draws of y(augmented) - y(original); sd_diff: their standard
    deviation (ddof 1); effect_size: mean_diff / sd_diff (Cohen's d_z; 0 when both are 0, +-inf
    when only sd_diff is). mean_diff_conf uses the per-image mean differences (draws of one image
    share its original, so images are the independent units); effect_size_conf is the normal
    approximation sqrt(1/m + d^2 / (2m)) * z with m the number of images (conservative: it ignores
    the K draws). constant: (*unit_shape) bool, units with no difference anywhere.
    """

    mean_diff: np.ndarray
    mean_diff_conf: np.ndarray
    sd_diff: np.ndarray
    effect_size: np.ndarray
    effect_size_conf: np.ndarray
    constant: np.ndarray
    flag: np.ndarray
    n: int
    conf_level: float
    names: list[str] | None = None
    interval: str = "normal approximation over probe images"


class ContrastAccumulator(Metric):
    """Treatment-control contrasts (ContrastDesign): each augmentation alone vs the original.

    update(Y): Y (n_blocks, 1 + A*K, *unit_shape); row 0 the original image, then K rows per
    augmentation in problem order.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(
        self,
        n_augmentations: int,
        k: int,
        unit_shape: Sequence[int] = (),
        conf_level: float = 0.95,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if n_augmentations < 1 or k < 1:
            raise ValueError(f"need n_augmentations >= 1 and k >= 1, got {n_augmentations}, {k}")
        self.n_augmentations, self.k = int(n_augmentations), int(k)
        self.unit_shape = _unit_shape(unit_shape)
        self.n_units = math.prod(self.unit_shape)
        self.block_size = 1 + self.n_augmentations * self.k
        self.conf_level = conf_level
        self._z = _z_score(conf_level)
        shape = (self.n_augmentations, self.n_units)
        for name in ("d", "dd", "image_mean_sq"):
            self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, Y: Tensor) -> None:
        Y = _as_blocks(Y, self.block_size, self.unit_shape, "ContrastAccumulator.update")
        _check_finite(Y, self.n, self.block_size)
        n = Y.shape[0]
        for units in _unit_slices(self.n_units, 3 * n * self.block_size, Y.device):
            chunk = Y[:, :, units].to(torch.float64)
            d = (chunk[:, 1:] - chunk[:, :1]).reshape(n, self.n_augmentations, self.k, -1)
            image_mean = d.mean(2)
            self.d[:, units] += d.sum((0, 2))
            self.dd[:, units] += (d * d).sum((0, 2))
            self.image_mean_sq[:, units] += (image_mean * image_mean).sum(0)
        self.n = self.n + n

    def compute(self) -> ContrastResult:
        m = self.n
        if float(m) < 2:
            raise ValueError(f"need at least 2 images for contrast intervals, got {int(m)}")
        pairs = m * self.k
        mean = self.d / pairs
        sd = torch.sqrt(torch.clamp((self.dd / pairs - mean * mean) * pairs / (pairs - 1), min=0))
        image_var = torch.clamp((self.image_mean_sq / m - mean * mean) * m / (m - 1), min=0.0)
        zero = torch.zeros_like(mean)
        effect = torch.where(sd > 0, mean / torch.where(sd > 0, sd, 1.0), zero)
        effect = torch.where((sd == 0) & (mean != 0), torch.sign(mean) * math.inf, effect)
        effect_conf = self._z * torch.sqrt(1.0 / m + effect * effect / (2.0 * m))
        effect_conf = torch.where(torch.isfinite(effect), effect_conf, zero)
        constant = (self.dd == 0).all(0)
        shape = (self.n_augmentations, *self.unit_shape)
        return ContrastResult(
            mean_diff=_numpy(mean, shape),
            mean_diff_conf=_numpy(self._z * torch.sqrt(image_var / m), shape),
            sd_diff=_numpy(sd, shape),
            effect_size=_numpy(effect, shape),
            effect_size_conf=_numpy(effect_conf, shape),
            constant=_numpy(constant, self.unit_shape).astype(bool),
            flag=_constant_flags(constant, self.unit_shape),
            n=int(m),
            conf_level=self.conf_level,
        )
