"""Balanced pairs of discrete columns (switches, class, image, short order): BalancedPairs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    pass

from sensitivity.designs.base import _STREAM_DISCRETE, uniform_rows


def _check_discrete(
    discrete: Mapping[int, Sequence[float]] | None, d: int
) -> dict[int, np.ndarray]:
    """{column: cell edges} checked: columns in 0..d-1, edges increasing from 0 to 1."""
    out: dict[int, np.ndarray] = {}
    for column, edges in (discrete or {}).items():
        column = int(column)
        if not 0 <= column < d:
            raise ValueError(f"discrete column {column} is outside the design's columns 0..{d - 1}")
        e = np.asarray(edges, dtype=np.float64)
        if e.ndim != 1 or e.size < 2 or e[0] != 0.0 or e[-1] != 1.0 or np.any(np.diff(e) <= 0):
            raise ValueError(
                f"cell edges of discrete column {column} must increase strictly from 0 to 1, "
                f"got {list(edges)}"
            )
        out[column] = e
    return dict(sorted(out.items()))


class BalancedPairs:
    """Balanced cells for the discrete columns of a design's pairs: (A_n, B_n) or (x1_b, x2_b).

    Why and how: METHOD.md section 5 (balanced discrete pairs). The two cells of pair n come
    from v_n = (pi(n) + w_n) / n_pairs, pi a random permutation, w_n ~ U[0, 1) (both keyed by
    the seed and the column): the cell of v_n is the first member's, the cell of v_n's position
    inside it the second's. Values are cell midpoints, which decode exactly. Pair n is a pure
    function of (seed, n_pairs, n).

    Args:
        seed: the design's seed.
        n_pairs: the design's number of pairs (base points or trajectories).
        discrete: {column: (cells + 1,) cell edges from 0 to 1}, checked by the caller.
    """

    def __init__(self, seed: int, n_pairs: int, discrete: Mapping[int, np.ndarray]) -> None:
        self.seed = seed
        self.n_pairs = n_pairs
        self.discrete = dict(discrete)
        self._strata: np.ndarray | None = None

    def _permutations(self) -> np.ndarray:
        """(n_pairs, C) int64: the stratum of each pair, per discrete column."""
        if self._strata is None:
            self._strata = np.stack(
                [
                    np.random.default_rng([self.seed, _STREAM_DISCRETE, c]).permutation(
                        self.n_pairs
                    )
                    for c in self.discrete
                ],
                axis=1,
            ) if self.discrete else np.empty((self.n_pairs, 0), dtype=np.int64)
        return self._strata

    def apply(self, first: np.ndarray, second: np.ndarray, start: int) -> None:
        """Overwrite the discrete columns of pairs [start, start + len(first)) in place.

        Args:
            first, second: (k, d) float64, the two members of each pair (A and B, or x1 and
                x2); modified.
            start: the index of the first pair.
        """
        if not self.discrete:
            return
        stop = start + first.shape[0]
        strata = self._permutations()[start:stop]
        w = uniform_rows([self.seed, _STREAM_DISCRETE], start, stop, len(self.discrete))
        v = (strata + w) / self.n_pairs
        for k, (column, edges) in enumerate(self.discrete.items()):
            widths = np.diff(edges)
            last = len(widths) - 1
            i = np.clip(np.searchsorted(edges, v[:, k], side="right") - 1, 0, last)
            inner = np.clip((v[:, k] - edges[i]) / widths[i], 0.0, np.nextafter(1.0, 0.0))
            j = np.clip(np.searchsorted(edges, inner, side="right") - 1, 0, last)
            first[:, column] = edges[i] + widths[i] / 2.0
            second[:, column] = edges[j] + widths[j] / 2.0
