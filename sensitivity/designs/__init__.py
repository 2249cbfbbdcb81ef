"""Sampling designs over the unit hypercube [0, 1)^d (METHOD.md sections 3, 5, 6, 7).

A design is a sequence of *blocks*: rows that an estimator consumes together (one Sobol base point
with its cross-samples, one Shapley trajectory, one permutation, one probe image). Every block is a
pure function of ``(seed, block index)``: there is no sampler state, so ``rows(start, stop)`` of any
range equals the same slice of the whole design, and a run can be sharded over processes or
resumed from any block. Rows are float64 numpy arrays ``(rows, d)`` in [0, 1).

Designs know nothing of augmentations except ``ContrastDesign``, which reads the switch and
image columns of an ``AugmentationProblem``. The Sobol' and Goda designs take ``discrete``
columns (``AugmentationProblem.discrete_columns()``: a column read only through the cell its
value falls in, such as a switch ``u < p_on`` or a class ``floor(u * n_classes)``) and draw their
pairs of values from ``BalancedPairs`` instead of the sequence (see there why).
"""

from sensitivity.designs.balanced import BalancedPairs
from sensitivity.designs.base import Design, check_power_of_two, doubling_stages, uniform_rows
from sensitivity.designs.contrast import ContrastDesign
from sensitivity.designs.permutations import PermutationDesign, ShapleyDesign
from sensitivity.designs.sobol import SAMPLINGS, SobolDesign, saltelli_rows
from sensitivity.designs.variance import VarianceDesign

__all__ = [
    "SAMPLINGS",
    "BalancedPairs",
    "ContrastDesign",
    "Design",
    "PermutationDesign",
    "ShapleyDesign",
    "SobolDesign",
    "VarianceDesign",
    "check_power_of_two",
    "doubling_stages",
    "saltelli_rows",
    "uniform_rows",
]
