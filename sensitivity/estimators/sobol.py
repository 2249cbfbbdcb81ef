"""Saltelli-design Sobol' indices as SALib computes them, streamed over base points (METHOD.md
section 5).

Intervals. With i.i.d. (Monte Carlo) base points the delta method over base points
(``common._ratio_conf``) has nominal coverage. The points of one scrambled Sobol' sequence are
not independent, and there its intervals are too wide at large N yet not uniformly conservative
at small N (docs/PERFORMANCE.md, "Estimators": Confidence intervals). For such points
``SobolAccumulator(replicates=R)`` keeps the first-moment sums of R independently scrambled
replicates instead and applies the same delta method to the R replicate means, with Student's t
(randomised quasi-Monte Carlo): calibrated, and still exact to merge.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sensitivity.estimators.common import (
    _CONSTANT_RTOL,
    _as_blocks,
    _at_least_two,
    _check_finite,
    _ConstantUnits,
    _flags_numpy,
    _n_groups,
    _numpy,
    _ratio_conf,
    _replicate_ratio,
    _t_score,
    _unit_flags,
    _unit_slices,
)
from sensitivity.estimators.moments import MomentsResult, _moments_result
from sensitivity.estimators.partial_sums import run_chunks
from sensitivity.estimators.power_sums import Exponents, _rebase_table, _ShiftedPowerSums

# A Sobol' unit is also degenerate when the variance of [A; B] is below this fraction of its
# largest mean squared cross-sample change (AB_j - A): its indices would exceed 1e11, and a true
# V of 0 (a sparse map that is 0 on every A and B row) re-expanded about another shift (merges,
# distributed sync) leaves float64 round-off of ~1e-16 x shift^2 that must not count as variance.
_DEGENERATE_RATIO = 1e-12

Tables = dict[str, dict[Exponents, Tensor]]


@dataclass
class SobolResult(_ConstantUnits):
    """Sobol' indices per group and unit; arrays are float64 numpy.

    S1, ST, S1_conf, ST_conf: (G, *unit_shape); S2, S2_conf: (G, G, *unit_shape), symmetric with a
    zero diagonal, or None without second order. ``*_conf`` are confidence half-widths.
    mean: (*unit_shape) over all rows; variance, variance_conf: (*unit_shape) population variance
    of [A; B] (the normaliser, output units squared) and its half-width. constant: (*unit_shape)
    bool, units with zero variance (indices set to 0); flag: (*unit_shape) uint8 FLAG_* code of
    every unit. n: base points; replicates: R; interval: how the half-widths were computed;
    names: group names when known.
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


def _pair_numerator(
    cZ: dict[Exponents, Tensor], cH: dict[Exponents, Tensor], e: Tensor, j: Tensor
) -> Tensor:
    """Sum over blocks of z_jk = Zt + h_j ((a + b) / 2 + e) (see ``_accumulate_pairs``).

    Args:
        cZ, cH: the centred Z and H tables, entries (..., P, c) and (..., G, c).
        e: (c,) mean of [A; B] minus the mean of all rows.
        j: (P,) the first group of every pair.

    Returns:
        (..., P, c).
    """
    return cZ[(0, 0)] + (0.5 * (cH[(1, 0)] + cH[(0, 1)]) + e * cH[(0, 0)])[..., j, :]


class SobolAccumulator(_ShiftedPowerSums):
    """Saltelli-design Sobol' indices as SALib computes them, streamed over base points.

    ``update(Y, replicate=None)`` takes blocks in SALib's layout [A, AB_0..AB_{G-1},
    (BA_0..BA_{G-1}), B] (block_size G + 2, or 2G + 2 with second order). Per base point
    (dropping the index n), with mu the mean of all rows and V the population variance of
    [A; B] (SALib centres and scales Y first; both cancel in these ratios):
        S1_j = mean[(B - mu)(AB_j - A)] / V                      (Saltelli 2010)
        ST_j = mean[(A - AB_j)^2] / (2V)                         (Jansen)
        S2_jk = mean[(BA_j - mu)(AB_k - mu) - (A - mu)(B - mu)] / V - S1_j - S1_k  (Saltelli 2002)

    Intervals. replicates = 1: the delta method over base points, calibrated for i.i.d. base
    points; the sums include the per-point second moments it needs (13 power sums of (A, B), 14
    per group, 16 more per group and 9 per pair with second order). replicates = R > 1: the
    base points come in R independent replicates of equal size (a ``SobolDesign`` with
    ``replicates=R``); the states are then per-replicate first moments (5 + 3 per group per
    replicate, plus P + 3G per replicate with second order) and the interval is the delta
    method over the R replicate estimates with Student's t (R - 1 degrees of freedom), which
    holds for randomised quasi-Monte-Carlo points. The point estimates are the same either way
    (the pooled formulas above).

    Without second order, ``moments`` holds after ``compute()`` the per-unit moments of every
    row of the design, as a MomentsAccumulator fed all rows would give them (computed from the
    synced sums under DDP, like the indices).

    Args:
        n_groups: G, the groups (players) of the design.
        unit_shape: shape of one row's outputs.
        second_order: blocks hold BA_j rows and S2 is computed.
        conf_level: confidence level of the half-widths, in (0, 1).
        replicates: R, independent replicates of the base points (1: i.i.d. base points).
        **kwargs: passed to ``torchmetrics.Metric``.
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
        super().__init__(unit_shape, conf_level, replicates, **kwargs)
        self.n_groups = _n_groups(n_groups)
        self.second_order = bool(second_order)
        g = n_groups
        self.block_size = 2 * g + 2 if self.second_order else g + 2
        self.moments: MomentsResult | None = None
        pairs = list(itertools.combinations(range(g), 2))
        self._pair_j = torch.tensor([j for j, _ in pairs], dtype=torch.long)
        self._pair_k = torch.tensor([k for _, k in pairs], dtype=torch.long)
        self._add_tables(g, len(pairs))

    def _add_tables(self, g: int, p: int) -> None:
        """The tables of G groups and P pairs (what each entry is for: see ``compute``)."""
        # Exponents are over (A - shift, B - shift); the closure adds every lower power, which the
        # re-expansion about a new centre needs. Added smallest first so that each table's
        # monomials are a prefix of the shared list.
        if self.replicates == 1:
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

    # ------------------------------------------------------------------------------------ update
    def update(self, Y: Tensor, replicate: Tensor | np.ndarray | None = None) -> None:
        """Add whole base points.

        Args:
            Y: (n_blocks, block_size, *unit_shape), any float dtype.
            replicate: (n_blocks,) int in [0, R), each block's replicate; required with R > 1.
        """
        Y = _as_blocks(Y, self.block_size, self.unit_shape, "SobolAccumulator.update")
        runs = self._replicate_runs(replicate, Y.shape[0])
        value_range = _check_finite(Y, self.n, self.block_size)
        self._fix_shift(Y)
        self._update_blocks(Y, runs, self._terms, value_range)
        self.n = self.n + Y.shape[0]

    def _replicate_runs(
        self, replicate: Tensor | np.ndarray | None, n_blocks: int
    ) -> list[tuple[int, slice]]:
        """The runs of consecutive blocks of one replicate.

        Args:
            replicate: (n_blocks,) replicate ids, or None with one replicate.
            n_blocks: blocks of the update.

        Returns:
            [(replicate, blocks)] in block order.
        """
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

    def _terms(self, y: Tensor) -> tuple[tuple[Tensor, Tensor], dict[str, Tensor]]:
        """The variables and weights of one chunk (``_ShiftedPowerSums._update_blocks``).

        Args:
            y: (n, block_size, c) shifted outputs of n blocks.

        Returns:
            ((A, B), each (n, c)), {weighted table: (n, *lead, c)}.
        """
        g = self.n_groups
        A, B = y[:, 0], y[:, -1]
        D = y[:, 1 : g + 1] - A[:, None]  # (n, G, c) AB_j - A
        D2 = D * D
        weights: dict[str, Tensor] = {}
        if not self.second_order:
            weights["S"] = D.sum(1, keepdim=True)
            weights["S3"] = (D2 * D).sum(1, keepdim=True)
        if self.replicates > 1:
            weights.update(rD=D, rD2=D2)
            if not self.second_order:
                weights["SD2"] = D2.sum(1, keepdim=True)
                weights["SD4"] = (D2 * D2).sum(1, keepdim=True)
        else:
            weights.update(D=D, D2=D2, D4=D2 * D2)
        if self.second_order:
            weights.update(self._pair_terms(y, D))
        return (A, B), weights

    def _pair_terms(self, y: Tensor, D: Tensor) -> dict[str, Tensor]:
        """The second-order tables' weights of one chunk.

        Args:
            y: (n, 2G + 2, c) shifted outputs.
            D: (n, G, c) AB_j - A.
        """
        g = self.n_groups
        A, B = y[:, 0], y[:, -1]
        j, k = self._pair_j.to(y.device), self._pair_k.to(y.device)
        E = y[:, g + 1 : 2 * g + 1] - B[:, None]  # BA_j - B
        H = E - D
        half = ((A - B) / 2.0)[:, None]
        # z_jk(m) = (BA_j - m)(AB_k - m) - (A - m)(B - m) - (B - m)(D_j + D_k) is linear in m:
        # z = Zt + (p - m) H_j with p = (A + B) / 2 and the shift-invariant
        # Zt = z(p) = E_j D_k + (A - B)/2 (E_j + D_j).
        Z = E[:, j] * D[:, k] + half * (E + D)[:, j]
        if self.replicates > 1:
            return {"rZ": Z, "rH": H}
        return {"Z": Z, "Z2": Z * Z, "ZH": Z * H[:, j], "H": H, "H2": H * H}

    # ----------------------------------------------------------------------------------- compute
    @property
    def interval(self) -> str:
        """How the half-widths are computed (recorded with the results)."""
        if self.replicates == 1:
            return "delta method over base points, normal quantile (assumes i.i.d. points)"
        r = self.replicates
        return f"delta method over {r} replicates, Student t ({r - 1} df)"

    def compute(self) -> SobolResult:
        """The indices of every base point seen so far (at least 2); sets ``moments`` too."""
        n = self.n
        _at_least_two(n, "base points for Sobol indices")
        if self.replicates > 1:
            counts = self.table("rone")[(0, 0)][:, 0]
            if bool((counts != counts[0]).any()):
                raise ValueError(
                    f"the replicates hold {counts.tolist()} base points; every replicate needs "
                    f"the same number (a whole SobolDesign with these replicates)"
                )
        out = self._compute_arrays(n)
        flag = _unit_flags(out["constant"], out["variance"], out["variance_se"], out["mean"])
        self.moments = None if self.second_order else self._row_moments()
        return self._result(out, flag, n)

    def _compute_arrays(self, n: Tensor) -> dict[str, Tensor]:
        """Every array of the result, (*lead, U) tensors, computed by chunks of units."""
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
        # By chunks of units: whole-layer float64 temporaries (hundreds of them) made compute()
        # slow on CPU (docs/PERFORMANCE.md, "Engine efficiency"). The largest temporaries hold
        # R x (G + P) values per unit (second order: 448 at the defaults): sized by that, the
        # second-order compute() took 1.1 s for AlexNet's 205,672 units instead of 1.7.
        per_unit = max(256, 2 * self.replicates * (g + len(self._pair_j) * self.second_order))
        compute_units = (
            self._compute_units if self.replicates == 1 else self._compute_units_replicated
        )
        def chunk(units: slice, _: None) -> None:
            for key, value in compute_units(units, n).items():
                out[key][..., units] = value

        run_chunks(_unit_slices(u, per_unit, device), chunk, lambda: None, self.threads, device)
        return out

    def _result(self, out: dict[str, Tensor], flag: Tensor, n: Tensor) -> SobolResult:
        """``_compute_arrays``'s tensors and the unit flags as a result of numpy arrays."""
        shape = (self.n_groups, *self.unit_shape)
        pair_shape = (self.n_groups, self.n_groups, *self.unit_shape)
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
        summed = getattr(self, name).sum(-2, keepdim=True)  # the lead axis: (K, 1, U)
        return {e: t[0] for e, t in self.table(weight, {name: summed}).items()}

    def _unit_tables(self, weights: Sequence[str], units: slice) -> Tables:
        """The entries of the tables ``weights`` restricted to ``units``: (..., c) views."""
        return {w: {e: t[..., units] for e, t in self.table(w).items()} for w in weights}

    def _centres(
        self, one: dict[Exponents, Tensor], d_sum: Tensor, h_sum: Tensor | None, n: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Means of all rows and of [A; B], relative to the shift, from sums already kept.

        AB_j = A + D_j and BA_j = B + H_j + D_j, so every row's sum follows from the tables.

        Args:
            one: the (pooled) power sums of (A, B), entries (c,).
            d_sum: (c,) the sum of D_j over blocks and groups.
            h_sum: (c,) the sum of H_j over blocks and groups (second order), else None.
            n: base points.

        Returns:
            (mu, ab_mean), each (c,).
        """
        g = self.n_groups
        all_sum = (g + 1) * one[(1, 0)] + one[(0, 1)] + d_sum
        if self.second_order:
            all_sum = all_sum + g * one[(0, 1)] + h_sum + d_sum
        mu = all_sum / (n * self.block_size)
        ab_mean = (one[(1, 0)] + one[(0, 1)]) / (2.0 * n)
        return mu, ab_mean

    def _constant(self, V: Tensor, mean: Tensor, largest_change: Tensor) -> Tensor:
        """Units whose [A; B] variance is zero: relative to their mean (float64 round-off), or
        to their largest mean squared cross-sample change (a sparse map, see _DEGENERATE_RATIO)."""
        return (V <= (_CONSTANT_RTOL * torch.abs(mean)) ** 2) | (
            V <= _DEGENERATE_RATIO * largest_change
        )

    def _compute_units(self, units: slice, n: Tensor) -> dict[str, Tensor]:
        """compute()'s arrays for the units ``units`` (one replicate): (*lead, c) tensors."""
        tables = self._unit_tables(list(self._tables), units)
        shift = self.shift[units]
        h_sum = tables["H"][(0, 0)].sum(0) if self.second_order else None
        mu, ab_mean = self._centres(tables["one"], tables["D"][(0, 0)].sum(0), h_sum, n)
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
        self, C: Tables, n: Tensor, e: Tensor, V: Tensor, vv: Tensor
    ) -> tuple[Tensor, Tensor]:
        """S2 and its half-width from the centred tables of c units (one replicate).

        S2_jk = mean(z) / V with z = Zt + h_j ((a + b) / 2 + e) (see ``_accumulate_pairs``) and
        v as for S1.

        Args:
            C: the tables centred on the mean of [A; B], entries (..., c).
            n: base points.
            e: (c,) mean of [A; B] minus the mean of all rows.
            V, vv: (c,) means of the per-block denominator v and of v^2.

        Returns:
            (S2, half-width), each a symmetric (G, G, c) matrix.
        """
        j = self._pair_j.to(e.device)
        cZH, cH, cH2 = C["ZH"], C["H"], C["H2"]

        def at_j(t: Tensor) -> Tensor:
            return t[j]

        x = _pair_numerator(C["Z"], cH, e, j) / n
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
            0.5 * (C["Z"][(2, 0)] + C["Z"][(0, 2)])
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
        R = self.replicates
        tables = self._unit_tables(sorted(self._replicated), units)
        shift = self.shift[units]
        per = tables["rone"][(0, 0)][:, None]  # (R, 1, c) base points per replicate
        one = {e: t.sum(0) for e, t in tables["rone"].items()}
        h_sum = tables["rH"][(0, 0)].sum((0, 1)) if self.second_order else None
        mu, ab_mean = self._centres(one, tables["rD"][(0, 0)].sum((0, 1)), h_sum, n)
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
            x = _pair_numerator(C["rZ"], C["rH"], e, self._pair_j.to(e.device)) / per
            out["S2"], out["S2_conf"] = self._pair_matrix(*_replicate_ratio(x, v, V, t))
        return out
