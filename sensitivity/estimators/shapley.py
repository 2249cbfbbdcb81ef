"""Shapley effects streamed over blocks: Goda's trajectories and Song, Nelson and Staum's random
permutations (METHOD.md section 6).

Both estimators produce, per block, i.i.d. contributions c (G,) whose sum R over the groups
estimates Var(Y); the effects are mean(c) and the shares mean(c) / mean(R), with delta-method
half-widths (``common._ratio_conf``). Their sums are built from differences of outputs and need
no shift.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sensitivity.estimators.common import (
    _as_blocks,
    _at_least_two,
    _check_finite,
    _ConstantUnits,
    _flags_numpy,
    _n_groups,
    _numpy,
    _ratio_conf,
    _unit_flags,
    _unit_slices,
    _UnitMetric,
)
from sensitivity.estimators.partial_sums import run_chunks


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


class _ContributionSums(_UnitMetric):
    """Shared part of the Shapley estimators: sums of the per-block contributions c (G,) and
    of their total R, with the products the delta method needs.

    States: c, cc, cr (G, U); r, rr, y0 (U,) (y0: the first row of each block, for the units'
    mean, which the flags' resolution test reads); n. Arguments as ``ShapleyAccumulator``'s.
    """

    block_size: int
    # A batch's sums in float32 for float32 outputs (partial_sums). Not for the permutation
    # estimator: its per-permutation contributions are averages that vary little between
    # permutations, so the variance of its intervals cancels float32 round-off badly.
    float32_partial_sums = True

    def __init__(
        self, n_groups: int, unit_shape: Sequence[int] = (), conf_level: float = 0.95, **kwargs: Any
    ) -> None:
        n_groups = _n_groups(n_groups)
        super().__init__(unit_shape, conf_level, **kwargs)
        self.n_groups = n_groups
        g, u = n_groups, self.n_units
        self._add_sum_states(
            {"c": (g, u), "cc": (g, u), "cr": (g, u), "r": (u,), "rr": (u,), "y0": (u,)}
        )

    def _permutations(self, permutations: Tensor | np.ndarray, n_blocks: int) -> Tensor:
        """Check and return the group orders: (n_blocks, G) int64, one permutation per block."""
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
        """Add whole blocks.

        Args:
            Y: (n_blocks, block_size, *unit_shape) outputs, any float dtype.
            permutations: (n_blocks, G) the group order of every block.
        """
        Y = _as_blocks(Y, self.block_size, self.unit_shape, f"{type(self).__name__}.update")
        perms = self._permutations(permutations, Y.shape[0])
        _check_finite(Y, self.n, self.block_size)
        n = Y.shape[0]
        position = torch.argsort(perms.to(Y.device), dim=1)  # step at which group j changes
        # A batch's sums of differences in float32 for float32 outputs, added to float64 states
        # (partial_sums: the round-off is that of an n-term float32 sum).
        low = self.float32_partial_sums and Y.dtype != torch.float64
        dtype = torch.float32 if low else torch.float64

        def chunk(units: slice, _: None) -> None:
            steps = self._steps(Y[:, :, units].to(dtype))  # (n, G steps, c)
            c = torch.gather(steps, 1, position[:, :, None].expand_as(steps))  # group order
            r = c.sum(1)
            self.c[:, units] += c.sum(0)
            self.cc[:, units] += (c * c).sum(0)
            self.cr[:, units] += (c * r[:, None]).sum(0)
            self.r[units] += r.sum(0)
            self.rr[units] += (r * r).sum(0)

        chunks = _unit_slices(self.n_units, n * (2 * self.block_size + 6), Y.device)
        run_chunks(chunks, chunk, lambda: None, self.threads, Y.device)
        self.y0 += Y[:, 0].sum(0, dtype=torch.float64)
        self.n = self.n + n

    def _steps(self, Y: Tensor) -> Tensor:
        """The contributions of every step: Y (n, block_size, c) float64 -> (n, G, c)."""
        raise NotImplementedError

    def compute(self) -> ShapleyResult:
        """The effects of every block seen so far (at least 2)."""
        n = self.n
        _at_least_two(n, "trajectories/permutations")
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

    ``update(Y, permutations)``: Y (n_traj, G + 1, *unit_shape), row 0 x1 then one group at a
    time switched to x2 in the order ``permutations`` (n_traj, G). Step s (1..G), which changes
    group pi_{s-1}, contributes (y_0 - (y_{s-1} + y_s) / 2)(y_{s-1} - y_s); per trajectory these
    sum to (y_0 - y_G)^2 / 2, an unbiased estimate of Var(Y). States: 3 per group and 3 per unit.

    Args:
        n_groups: G, the groups (players).
        unit_shape: shape of one row's outputs.
        conf_level: confidence level of the half-widths, in (0, 1).
        **kwargs: passed to ``torchmetrics.Metric``.
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

    ``update(Y, permutations)``: Y (n_perm, G * n_outer * n_inner, *unit_shape) in
    ``PermutationDesign``'s order (position j, outer l, inner i); permutations (n_perm, G). At
    position j, c(P_j) = mean over outer samples of the sample variance (ddof 1) over inner rows
    estimates E[Var(Y | X_-P_j)]; group pi_j contributes c(P_j) - c(P_{j-1}), c(empty) = 0, and
    the contributions of one permutation sum to c(all groups), an estimate of Var(Y).

    Args:
        n_groups: G, the groups (players).
        n_outer: outer samples per position (>= 1).
        n_inner: inner rows per outer sample (>= 2, a variance over them).
        unit_shape: shape of one row's outputs.
        conf_level: confidence level of the half-widths, in (0, 1).
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    float32_partial_sums = False  # see _ContributionSums

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
