"""Treatment-control contrasts: each augmentation alone against the original image (METHOD.md
section 7)."""

from __future__ import annotations

import math
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
    _constant_flags,
    _ConstantUnits,
    _numpy,
    _unit_slices,
    _UnitMetric,
)


@dataclass
class ContrastResult(_ConstantUnits):
    """Paired treated - original statistics per augmentation and unit; (A, *unit_shape) float64.

    mean_diff: mean over images and draws of y(augmented) - y(original), in output units;
    sd_diff: their standard deviation (ddof 1); effect_size: mean_diff / sd_diff (Cohen's d_z; 0
    when both are 0, +-inf when only sd_diff is). mean_diff_conf uses the per-image mean
    differences (draws of one image share its original, so images are the independent units);
    effect_size_conf is the normal approximation sqrt(1/m + d^2 / (2m)) * z with m the number of
    images (conservative: it ignores the K draws). constant: (*unit_shape) bool, units with no
    difference anywhere.
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


class ContrastAccumulator(_UnitMetric):
    """Treatment-control contrasts (``ContrastDesign``): each augmentation alone vs the original.

    ``update(Y)``: Y (n_blocks, 1 + A*K, *unit_shape); row 0 the original image, then K rows per
    augmentation in problem order. States: d, dd, image_mean_sq (A, U); n.

    Args:
        n_augmentations: A, the augmentations of the problem.
        k: K, draws per augmentation and image.
        unit_shape: shape of one row's outputs.
        conf_level: confidence level of the half-widths, in (0, 1).
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    def __init__(
        self,
        n_augmentations: int,
        k: int,
        unit_shape: Sequence[int] = (),
        conf_level: float = 0.95,
        **kwargs: Any,
    ) -> None:
        if n_augmentations < 1 or k < 1:
            raise ValueError(f"need n_augmentations >= 1 and k >= 1, got {n_augmentations}, {k}")
        super().__init__(unit_shape, conf_level, **kwargs)
        self.n_augmentations, self.k = int(n_augmentations), int(k)
        self.block_size = 1 + self.n_augmentations * self.k
        shape = (self.n_augmentations, self.n_units)
        self._add_sum_states({"d": shape, "dd": shape, "image_mean_sq": shape})

    def update(self, Y: Tensor) -> None:
        """Add whole blocks (probe images).

        Args:
            Y: (n_blocks, 1 + A*K, *unit_shape) outputs, any float dtype.
        """
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
        """The contrasts of every image seen so far (at least 2)."""
        m = self.n
        _at_least_two(m, "images for contrast intervals")
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
