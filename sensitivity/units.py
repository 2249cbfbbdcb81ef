"""Which units of a map take part: the boolean unit masks that flagged units are left out by.

Correlation, LDA, guided masking and the single-class candidates all take ``valid`` (units not
flagged in the analysis, ``AnalysisResult.valid``) or None for every unit; ``unit_mask`` is the
one place that turns that argument into a checked boolean array.
"""

from __future__ import annotations

import numpy as np


def unit_mask(
    valid: np.ndarray | None, shape: tuple[int, ...], what: str = "the maps' units"
) -> np.ndarray:
    """The units that take part, checked against the map's unit shape.

    Args:
        valid: (*shape) bool, the valid units; None: every unit.
        shape: the unit shape of the map.
        what: what ``shape`` is the shape of, for the error message.

    Returns:
        (*shape) bool; ValueError when ``valid`` has another shape.
    """
    if valid is None:
        return np.ones(shape, dtype=bool)
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != tuple(shape):
        raise ValueError(f"valid has shape {valid.shape}, {what} {tuple(shape)}")
    return valid
