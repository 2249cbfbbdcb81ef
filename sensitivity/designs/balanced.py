"""Balanced pairs of discrete columns (switches, class, image, short order): BalancedPairs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    pass

from sensitivity.designs.base import (
    _STREAM_DISCRETE,
    _STREAM_NESTED,
    doubling_stages,
    uniform_rows,
)


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

    Nested (``first`` < n_pairs, a design grown by doubling, METHOD.md "Adaptive N"): the first
    ``first`` pairs are exactly those of ``BalancedPairs(seed, first)``, and every doubling
    keeps the pairs drawn so far and stratifies the new ones so that every stage's prefix, the
    first ``first`` 2^k pairs, holds exactly one v in each of ``first`` 2^k equal strata of
    [0, 1): each old v lies in one half of its stratum, a new pair takes the other half of a
    random one (a random permutation keyed by the seed, the column and the stage) and its own w
    in it. Pair n is then a pure function of (seed, first, n) for every n < n_pairs.

    Args:
        seed: the design's seed.
        n_pairs: the design's number of pairs (base points or trajectories).
        discrete: {column: (cells + 1,) cell edges from 0 to 1}, checked by the caller.
        first: pairs of the first stage of a design grown by doubling; None: n_pairs (one
            stratification over all pairs).
    """

    def __init__(
        self,
        seed: int,
        n_pairs: int,
        discrete: Mapping[int, np.ndarray],
        first: int | None = None,
    ) -> None:
        self.seed = seed
        self.n_pairs = n_pairs
        self.first = n_pairs if first is None else first
        self.discrete = dict(discrete)
        self._strata: tuple[np.ndarray, np.ndarray] | None = None

    def _permutations(self) -> tuple[np.ndarray, np.ndarray]:
        """((n_pairs, C) int64 stratum of each pair per discrete column, (n_pairs,) int64 the
        number of strata it was drawn among)."""
        if self._strata is None:
            w = (uniform_rows([self.seed, _STREAM_DISCRETE], 0, self.n_pairs, len(self.discrete))
                 if self.first < self.n_pairs else None)
            columns = [self._nested(c, None if w is None else w[:, k])
                       for k, c in enumerate(self.discrete)]
            strata = (np.stack(columns, axis=1) if columns
                      else np.empty((self.n_pairs, 0), dtype=np.int64))
            # A stage after the first doubles the strata: 2 start of them.
            scale = np.concatenate([np.full(stop - start, 2 * start if start else stop)
                                    for start, stop in doubling_stages(self.first, self.n_pairs)])
            self._strata = strata, scale
        return self._strata

    def _nested(self, column: int, w: np.ndarray | None) -> np.ndarray:
        """(n_pairs,) int64: the stratum of each pair of ``column`` among the strata of the
        stage that drew it; ``w`` (n_pairs,) its positions inside them (None: one stage)."""
        strata = np.random.default_rng([self.seed, _STREAM_DISCRETE, column]).permutation(
            self.first
        )
        if w is None:
            return strata
        drawn = [strata]
        # current: every pair's stratum at this stage's resolution; u: its position inside it.
        current, u = strata, w[: self.first].copy()
        for stage, (start, stop) in enumerate(doubling_stages(self.first, self.n_pairs)[1:], 1):
            half = (u >= 0.5).astype(np.int64)
            u = 2.0 * u - half  # exact in binary floating point
            current = 2 * current + half
            other = np.empty(start, dtype=np.int64)
            other[current // 2] = current ^ 1  # the free half of each old pair's stratum
            taken = np.random.default_rng([self.seed, _STREAM_NESTED, column, stage]).permutation(
                start
            )[: stop - start]
            drawn.append(other[taken])
            current = np.concatenate([current, other[taken]])
            u = np.concatenate([u, w[start:stop]])
        return np.concatenate(drawn)

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
        strata, scale = (part[start:stop] for part in self._permutations())
        w = uniform_rows([self.seed, _STREAM_DISCRETE], start, stop, len(self.discrete))
        v = (strata + w) / scale[:, None]
        for k, (column, edges) in enumerate(self.discrete.items()):
            widths = np.diff(edges)
            last = len(widths) - 1
            i = np.clip(np.searchsorted(edges, v[:, k], side="right") - 1, 0, last)
            inner = np.clip((v[:, k] - edges[i]) / widths[i], 0.0, np.nextafter(1.0, 0.0))
            j = np.clip(np.searchsorted(edges, inner, side="right") - 1, 0, last)
            first[:, column] = edges[i] + widths[i] / 2.0
            second[:, column] = edges[j] + widths[j] / 2.0
