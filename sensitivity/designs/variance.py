"""i.i.d. rows for per-unit moments (method "variance")."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    pass

from sensitivity.designs.base import Design, uniform_rows


class VarianceDesign(Design):
    """Rows for method "variance": i.i.d. uniform (its moments' intervals assume independence).

    Args:
        d: columns of a row.
        n: rows (blocks of one row).
        seed: key of the ``uniform_rows`` stream: any block range is regenerated alone.
    """

    def __init__(self, d: int, n: int, seed: int = 0) -> None:
        self.d, self.n_blocks, self.seed, self.block_size = int(d), int(n), int(seed), 1
        self.groups = [[c] for c in range(self.d)]

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the ``uniform_rows`` stream."""
        return uniform_rows([self.seed], start, stop, self.d)

    def row_kinds(self) -> list[str]:
        """One "row" per block."""
        return ["row"]
