"""The Saltelli design on replicated scrambled Sobol' (or i.i.d.) points (METHOD.md section 5)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import qmc

if TYPE_CHECKING:
    pass

from sensitivity.designs.balanced import BalancedPairs, _check_discrete
from sensitivity.designs.base import (
    _STREAM_RANDOM_POINTS,
    _STREAM_REPLICATE,
    Design,
    _check_groups,
    _check_int,
    _group_mask,
    check_power_of_two,
    doubling_stages,
    uniform_rows,
)

# scipy's Sobol engine uses 30-bit integers by default: at most 2**30 distinct points.
_SOBOL_MAX_POINTS = 2**30
SAMPLINGS = ("sobol", "random")


def saltelli_rows(
    A: np.ndarray,
    B: np.ndarray,
    groups: Sequence[Sequence[int]] | None = None,
    second_order: bool = False,
) -> np.ndarray:
    """Saltelli cross-samples of base matrices in SALib's interleaved layout.

    Per base point n the rows are [A_n, AB_n^0..AB_n^{G-1}, (BA_n^0..BA_n^{G-1}), B_n], where
    AB^j is A with group j's columns taken from B and BA^j the reverse.

    Args:
        A, B: (N, d) base points in [0, 1).
        groups: G lists of columns partitioning 0..d-1 (default: one group per column).
        second_order: also the BA^j rows.

    Returns:
        (N * (G + 2), d) float64, or (N * (2G + 2), d) with ``second_order``.

    Raises:
        ValueError: A and B not 2-D of equal shape, or groups that do not partition the columns.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A.ndim != 2 or A.shape != B.shape:
        raise ValueError(f"A and B must be 2-D arrays of equal shape, got {A.shape} and {B.shape}")
    d = A.shape[1]
    mask = _group_mask(_check_groups(groups, d), d)[None]  # (1, G, d)
    a, b = A[:, None, :], B[:, None, :]
    parts = [a, np.where(mask, b, a)]
    if second_order:
        parts.append(np.where(mask, a, b))
    parts.append(b)
    return np.concatenate(parts, axis=1).reshape(-1, d)


class SobolDesign(Design):
    """Saltelli design on scrambled Sobol' points (METHOD.md section 5).

    With the defaults (one replicate, no discrete columns) base point n is point n of
    ``scipy.stats.qmc.Sobol(d=2*d, scramble=True, seed=seed)``, the same call as
    ``SALib.sample.sobol.sample``: A_n its first d columns, B_n its last d. Block n =
    [A_n, AB_n^0..AB_n^{G-1}, (BA_n^0..), B_n]: G + 2 rows, or 2G + 2 with ``second_order``.

    Args:
        d: columns of a row.
        n: base points (blocks), a power of two: a Sobol' sequence is balanced only over its
            first 2^m points (METHOD.md section 5).
        seed: seed of the scrambling and of the balanced pairs, >= 0.
        groups: G lists of columns partitioning 0..d-1 (default: one group per column).
        second_order: also the BA^j rows (S2 indices).
        replicates: R, a power of two <= n: R independently scrambled sequences of n / R base
            points each (randomised QMC), whose spread gives the intervals.
        sampling: "sobol" (the above) or "random" (i.i.d. uniform base points).
        discrete: {column: cell edges} of the columns drawn by ``BalancedPairs`` instead.
        first_stage: a design grown by doubling (METHOD.md "Adaptive N"): its blocks come in
            stages, the first ``first_stage`` being the design of that many base points and
            each later stage [m, 2m) adding to every replicate the next m / R points of its
            own sequence (and nested balanced pairs), so that the first m blocks of any stage
            boundary m hold the base points of the m-point design. A power of two in
            [replicates, n]; None: n (one stage, blocks in replicate order).

    Raises:
        ValueError: n, replicates or first_stage not a power of two, replicates > first_stage
            or n, first_stage > n, n > 2^30, an unknown sampling, bad groups or discrete
            columns.
    """

    def __init__(
        self,
        d: int,
        n: int,
        seed: int = 0,
        groups: Sequence[Sequence[int]] | None = None,
        second_order: bool = False,
        replicates: int = 1,
        sampling: str = "sobol",
        discrete: Mapping[int, Sequence[float]] | None = None,
        first_stage: int | None = None,
    ) -> None:
        self.d = _check_int("d", d, 1)
        n = _check_int("n", n, 1)
        first_stage = n if first_stage is None else _check_int("first_stage", first_stage, 1)
        check_power_of_two("first_stage", first_stage)
        if first_stage > n:
            raise ValueError(f"first_stage ({first_stage}) must not exceed n ({n})")
        replicates = _check_int("replicates", replicates, 1)
        check_power_of_two("n", n)
        check_power_of_two("replicates", replicates)
        if n > _SOBOL_MAX_POINTS:
            raise ValueError(f"n must be at most 2^30 (scipy's 30-bit Sobol' engine), got {n}")
        if replicates > first_stage:
            stage = "" if first_stage == n else " of the first stage"
            raise ValueError(
                f"replicates ({replicates}) must not exceed n ({first_stage}) base points{stage}"
            )
        if sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {sampling!r}; valid: {list(SAMPLINGS)}")
        self.seed = _check_int("seed", seed, 0)
        self.groups = _check_groups(groups, self.d)
        self.second_order = bool(second_order)
        self.replicates = replicates
        self.sampling = sampling
        g = len(self.groups)
        self.n_blocks = n
        self.block_size = 2 * g + 2 if self.second_order else g + 2
        self.stages = doubling_stages(first_stage, n)
        self.balanced = BalancedPairs(self.seed, n, _check_discrete(discrete, self.d),
                                      first_stage)

    def _segments(self, start: int, stop: int) -> list[tuple[int, int, int, int]]:
        """The runs of consecutive points of one replicate's sequence among blocks
        [start, stop): (first block, last block + 1, replicate, position of the first block in
        its replicate's sequence), in block order."""
        out = []
        for low, high in self.stages:
            # A stage of m blocks gives each replicate m / R consecutive points, from the
            # low / R it already has on.
            per = (high - low) // self.replicates
            for replicate in range(self.replicates):
                first = max(start, low + replicate * per)
                last = min(stop, low + (replicate + 1) * per)
                if first < last:
                    position = low // self.replicates + first - low - replicate * per
                    out.append((first, last, replicate, position))
        return out

    def replicate_of(self, start: int, stop: int) -> np.ndarray:
        """The replicate of each base point in a range.

        Args:
            start, stop: the base point (block) range.

        Returns:
            (stop - start,) int64 replicate indices.
        """
        out = np.empty(stop - start, dtype=np.int64)
        for first, last, replicate, _ in self._segments(start, stop):
            out[first - start : last - start] = replicate
        return out

    def _engine(self, replicate: int) -> qmc.Sobol:
        """A fresh scrambled Sobol' engine of dimension 2d for ``replicate``."""
        if self.replicates == 1:
            # ``seed=`` (not ``rng=``) on purpose: it is the call SALib makes, and scipy derives a
            # different scrambling from ``rng=seed``; this keeps our base points equal to SALib's.
            return qmc.Sobol(d=2 * self.d, scramble=True, seed=self.seed)
        rng = np.random.default_rng([self.seed, _STREAM_REPLICATE, replicate])
        return qmc.Sobol(d=2 * self.d, scramble=True, rng=rng)

    def base_points(self, start: int, stop: int) -> np.ndarray:
        """Base points [start, stop) as [A | B], balanced discrete columns included.

        A replicate's fresh engine is fast-forwarded to the first point asked for (cheap:
        PERFORMANCE.md "Design sampling and signed-rank tests"), so no state is carried between
        calls.

        Args:
            start, stop: the base point range.

        Returns:
            (stop - start, 2d) float64 in [0, 1).

        Raises:
            ValueError: a range outside [0, n].
        """
        if not 0 <= start <= stop <= self.n_blocks:
            raise ValueError(f"base point range [{start}, {stop}) outside [0, {self.n_blocks})")
        if self.sampling == "random":
            base = uniform_rows([self.seed, _STREAM_RANDOM_POINTS], start, stop, 2 * self.d)
        else:
            parts = []
            for first, last, replicate, position in self._segments(start, stop):
                engine = self._engine(replicate)
                if position > 0:
                    engine.fast_forward(position)
                with warnings.catch_warnings():
                    # A slice of a power-of-two design is rarely a power of two itself; the
                    # balance the warning is about belongs to the whole replicate.
                    warnings.filterwarnings("ignore", message="The balance properties of Sobol")
                    parts.append(engine.random(last - first))
            base = np.concatenate(parts) if parts else np.empty((0, 2 * self.d))
        self.balanced.apply(base[:, : self.d], base[:, self.d :], start)
        return base

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """The Saltelli rows of base points [start, stop)."""
        base = self.base_points(start, stop)
        return saltelli_rows(base[:, : self.d], base[:, self.d :], self.groups, self.second_order)

    def pair_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """The base points of a range, split.

        Args:
            start, stop: the base point range.

        Returns:
            (A, B), each (stop - start, d) float64 in [0, 1).
        """
        base = self.base_points(start, stop)
        return base[:, : self.d], base[:, self.d :]

    def row_kinds(self) -> list[str]:
        """"A", "AB_j" per group, ("BA_j" per group), "B"."""
        g = len(self.groups)
        kinds = ["A"] + [f"AB_{j}" for j in range(g)]
        if self.second_order:
            kinds += [f"BA_{j}" for j in range(g)]
        return [*kinds, "B"]
