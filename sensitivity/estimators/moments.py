"""Per-unit mean and variance with normal intervals from shifted power sums (METHOD.md 7)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sensitivity.estimators.common import (
    _CONSTANT_RTOL,
    _at_least_two,
    _check_finite,
    _constant_flags,
    _ConstantUnits,
    _numpy,
)
from sensitivity.estimators.power_sums import Exponents, _rebase_table, _ShiftedPowerSums


@dataclass
class MomentsResult(_ConstantUnits):
    """Per-unit moments; arrays (*unit_shape) float64 numpy, in output units (var: squared).

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
    """Mean and variance per unit from the sums of (y - shift)^k, k = 0..4.

    Args:
        unit_shape: shape of one row's outputs.
        conf_level: confidence level of the half-widths, in (0, 1).
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    def __init__(
        self, unit_shape: Sequence[int] = (), conf_level: float = 0.95, **kwargs: Any
    ) -> None:
        super().__init__(unit_shape, conf_level, **kwargs)
        self._add_table("one", (), [(4,)])

    def update(self, Y: Tensor) -> None:
        """Add rows of outputs.

        Args:
            Y: (rows, *unit_shape), any float dtype.
        """
        if (
            not isinstance(Y, Tensor)
            or Y.ndim != 1 + len(self.unit_shape)
            or (Y.shape[1:] != self.unit_shape)
        ):
            raise ValueError(
                f"MomentsAccumulator.update expects a tensor (rows, *{self.unit_shape}), got "
                f"{tuple(Y.shape) if isinstance(Y, Tensor) else type(Y).__name__}"
            )
        Y = Y.reshape(Y.shape[0], 1, -1)  # rows as blocks of one row
        value_range = _check_finite(Y[:, 0], self.n, 1)
        self._fix_shift(Y)
        self._update_blocks(Y, [(0, slice(0, Y.shape[0]))], _row_terms, value_range)
        self.n = self.n + Y.shape[0]

    def compute(self) -> MomentsResult:
        """The moments of every row seen so far (at least 2)."""
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
    """Moments from shifted power sums.

    Args:
        sums: {(k,): (U,) sum over the n rows of (y - shift)^k}, k = 0..4.
        n: the number of rows.
        shift: (U,) the shift of the sums.
        z: the normal quantile of ``conf_level``.
        conf_level: recorded with the result.
        unit_shape: the arrays' shape.

    Returns:
        The result with (*unit_shape) arrays.
    """
    _at_least_two(n, "rows for a variance")
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


def _row_terms(y: Tensor) -> tuple[tuple[Tensor], dict[str, Tensor]]:
    """A chunk's one variable, y (rows, 1, c) -> (rows, c); no weighted table."""
    return (y[:, 0],), {}
