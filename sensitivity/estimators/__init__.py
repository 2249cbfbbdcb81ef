"""Streaming estimators of Sobol indices, Shapley effects and moments (METHOD.md sections 5-7).

Every accumulator is a ``torchmetrics.Metric`` fed whole design blocks of model outputs of any unit
shape (millions of activation units at once) and keeps float64 sums whose size depends on the
number of groups and units, never on the number of rows. Sums add across batches and, with
``dist_reduce_fx="sum"``, across processes, so a sharded run gives the single-process result up to
floating-point summation order. ``compute()`` returns a dataclass of numpy float64 arrays shaped
(G, *unit_shape) (indices) or (*unit_shape) (per-unit statistics), with a FLAG_* code per unit.

One estimator per module, as torchmetrics keeps one metric per file:

- ``sobol``: ``SobolAccumulator``, ``SobolResult`` (and the replicated RQMC intervals);
- ``shapley``: ``ShapleyAccumulator`` (Goda), ``PermutationShapleyAccumulator`` (Song, Nelson
  and Staum), ``ShapleyResult``;
- ``moments``: ``MomentsAccumulator``, ``MomentsResult``;
- ``contrast``: ``ContrastAccumulator``, ``ContrastResult``;
- ``power_sums``: the shifted power-sum tables behind Sobol' and moments (numerics, merging);
- ``common``: unit flags and their thresholds, the delta-method interval, argument checks.
"""

from sensitivity.estimators.common import (
    FLAG_CONSTANT,
    FLAG_NAMES,
    FLAG_NEGLIGIBLE,
    FLAG_UNSUPPORTED,
    FLAG_VALID,
    MIN_VARIANCE_PRECISION,
    NEGLIGIBLE_VARIANCE,
    VALUE_RESOLUTION,
)
from sensitivity.estimators.contrast import ContrastAccumulator, ContrastResult
from sensitivity.estimators.moments import MomentsAccumulator, MomentsResult
from sensitivity.estimators.shapley import (
    PermutationShapleyAccumulator,
    ShapleyAccumulator,
    ShapleyResult,
)
from sensitivity.estimators.sobol import SobolAccumulator, SobolResult

__all__ = [
    "FLAG_CONSTANT",
    "FLAG_NAMES",
    "FLAG_NEGLIGIBLE",
    "FLAG_UNSUPPORTED",
    "FLAG_VALID",
    "MIN_VARIANCE_PRECISION",
    "NEGLIGIBLE_VARIANCE",
    "VALUE_RESOLUTION",
    "ContrastAccumulator",
    "ContrastResult",
    "MomentsAccumulator",
    "MomentsResult",
    "PermutationShapleyAccumulator",
    "ShapleyAccumulator",
    "ShapleyResult",
    "SobolAccumulator",
    "SobolResult",
]
